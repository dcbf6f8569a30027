"""The ``lorakit`` command: train, eval, export, merge, prune, methods, compare, sweep, auto, fed.

Every option can also come from a YAML recipe (``--config recipe.yaml``, keys as the long option
names with ``_``); flags given on the command line override the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from .core import progress
from .errors import AdapterFileError, LorakitError, TrainingError

logger = logging.getLogger("lorakit")


class _Yaml(yaml.SafeLoader):
    """YAML as PyYAML reads it (1.1), plus YAML 1.2's floats without a dot (``1e-6``, ``-2E3``), which 1.1 reads
    as strings: users write learning rates that way."""


_Yaml.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                            list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """A YAML value or document: `yaml.safe_load` with YAML 1.2 exponent floats (`_Yaml`)."""
    return yaml.load(text, Loader=_Yaml)  # a SafeLoader subclass: plain data only, as safe_load

RUN_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("model", {"help": "alias (smollm2-135m, minilm-l6), local dir, .gguf file or hub id", "shown": "per task"}),
    ("task", {"help": "arith, gsm8k, sst2, trec, a .jsonl/.csv file, or a hub dataset name"}),
    ("method", {"help": "a method name from `lorakit methods`, or 'full' for full fine-tuning"}),
    ("data_dir", {"help": "folder holding sst2/, trec/, gsm8k/", "shown": "the Hugging Face Hub"}),
    ("steps", {"type": int, "help": "optimizer steps", "shown": "per task"}),
    ("batch_size", {"type": int, "help": "examples per optimizer step", "shown": "per task"}),
    ("grad_accum", {"type": int, "help": "micro-batches per step"}),
    ("lr", {"type": float, "help": "peak learning rate", "shown": "per method"}),
    ("weight_decay", {"type": float, "help": "AdamW weight decay"}),
    ("warmup_steps", {"type": int, "help": "linear warm-up steps"}),
    ("schedule", {"choices": ["linear", "cosine", "constant"], "help": "learning-rate schedule after warm-up"}),
    ("max_grad_norm", {"type": float, "help": "clip the gradient norm to this"}),
    ("max_length", {"type": int, "help": "tokens per example", "shown": "per task"}),
    ("seed", {"type": int, "help": "seed of the adapter init, data order and dropout"}),
    ("eval_every", {"type": int, "help": "evaluate every N steps (0: only before and after)"}),
    ("eval_limit", {"type": int, "help": "evaluation examples", "shown": "per task"}),
    ("eval_split", {"help": "split to evaluate on"}),
    ("metric", {"choices": ["exact_match", "accuracy", "nll"], "help": "evaluation metric", "shown": "the task's"}),
    ("max_new_tokens", {"type": int, "help": "generation length for exact-match scoring"}),
    ("init_samples", {"type": int, "help": "training examples fed to data-driven inits (LoRA-GA, LoRA-SB)",
                      "shown": "LoRA-SB: 50 generation, 2 classification (official); else 16"}),
    ("dtype", {"choices": ["fp32", "bf16", "fp16"], "help": "the base model's weight dtype"}),
    ("quantize", {"choices": ["nf4", "fp4", "int8", "torchao-int8", "torchao-int4"],
                  "help": "load the base quantized (the quant extra; torchao-int4 needs CUDA)", "shown": "none"}),
    ("device", {"choices": ["cpu", "cuda", "auto"], "help": "where the model runs (auto: CUDA when available)"}),
    ("output_dir", {"help": "where checkpoints, logs, run.json and the adapter go"}),
    ("save_every", {"type": int, "help": "checkpoint every N steps, and at the end (0: never)",
                    "shown": "steps/10"}),
]


class _Help(argparse.HelpFormatter):
    """Appends ``[default: X]`` to an option's help unless the help already names its default or there is none to
    show (``None``, ``False``): argparse's own formatter would print "(default: None)" after every such option."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default:" in text or action.default in (None, False, argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} [default: %(default)s]"


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (torch.set_num_threads) [default: OMP_NUM_THREADS if set, else the "
                        "CPUs this process may use less the busy ones (1-minute load average), at least 1]")


def set_threads(requested: int | None) -> int:
    """Set torch's CPU threads: ``requested``; by default OMP_NUM_THREADS when set (torch already obeys it), else
    the usable CPUs not busy with other work.  On shared cores torch's default (every core) oversubscribes them:
    on 2 loaded cores a step took 15.9 s at 2 threads and 5.9 s at 1 (issue 22; README's figures)."""
    import torch
    if requested is not None:
        if requested < 1:
            raise LorakitError(f"--threads must be a positive integer, got {requested}")
        threads = requested
    elif os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, min(cpus, cpus - round(os.getloadavg()[0])))
    torch.set_num_threads(threads)
    logger.debug("torch CPU threads: %d", threads)
    return threads


def _defaults() -> dict[str, Any]:
    from .train.run import RunConfig
    return {f.name: f.default for f in dataclasses.fields(RunConfig)
            if f.default is not dataclasses.MISSING}


def add_run_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    defaults = _defaults()
    for name, kw in RUN_FLAGS:
        if name in skip:
            continue
        default = defaults.get(name)
        shown = kw.get("shown", "per task" if default is None else default)
        help_text = kw.get("help", name.replace("_", " "))
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                       **{k: v for k, v in kw.items() if k not in ("help", "shown")},
                       help=f"{help_text} [default: {shown}]")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. -o r=16 -o init_lr=1e-6 (YAML values) [default: the method's]")
    p.add_argument("--no-length-grouping", dest="group_by_length", action="store_false", default=None,
                   help="random batches instead of length-grouped ones [default: grouped]")
    p.add_argument("--chat-template", dest="chat_template", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the tokenizer's chat template; --no-chat-template gives messages data lorakit's plain "
                        "'Role: content' format [default: on for messages data, and instruct models on arith]")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast [default: off]")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                   help="recompute activations in backward to save memory (same gradients) [default: off]")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun: shard the frozen base weights across ranks with FSDP2 [default: off]")
    p.add_argument("--packing", action="store_true", default=None,
                   help="pack examples into rows of --max-length tokens, no attention across examples; "
                        "--batch-size counts rows [default: off]")
    p.add_argument("--compile", action="store_true", default=None,
                   help="run the training forward under torch.compile (inductor; needs a C compiler) [default: off]")
    p.add_argument("--config", help="YAML recipe; flags override it")
    add_threads_flag(p)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LorakitError(f"method option {pair!r} must look like KEY=VALUE (e.g. r=16)")
        try:
            options[key.replace("-", "_")] = load_yaml(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "not valid YAML"
            raise LorakitError(f"method option -o {pair!r}: the value must be a YAML value such as 16, 0.5, "
                               f"text or [a, b] ({problem})") from None
    return options


def run_config(args: argparse.Namespace, **overrides: Any) -> Any:
    """Recipe values, then command-line flags, then ``overrides``, into a `RunConfig`; every value is checked
    (`lorakit.train.run.check_field`) and named by its flag or recipe key when it is wrong."""
    from .train.run import RunConfig, check_field
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            recipe = load_yaml(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise LorakitError(f"cannot read recipe {args.config}: {' '.join(str(err).split())}") from err
        if not isinstance(recipe, dict):
            raise LorakitError(f"recipe {args.config} must be a mapping of option: value")
        known = {f.name for f in dataclasses.fields(RunConfig)}
        unknown = sorted(set(recipe) - known - {"methods"})
        if unknown:
            raise LorakitError(f"recipe {args.config} has unknown keys {unknown}; known: {', '.join(sorted(known))}")
        values.update({k: check_field(k, v, f"recipe {args.config}: {k}") for k, v in recipe.items() if k in known})
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = check_field(f.name, value, "--" + f.name.replace("_", "-"))
    options = parse_options(getattr(args, "option", []) or [])
    if options:
        values["method_options"] = {**values.get("method_options", {}), **options}
    values.update(overrides)
    return RunConfig(**values)


# -- commands --------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    from .train.run import check_method_options, run_training
    cfg = run_config(args, resume=args.resume)
    check_method_options(cfg.method, cfg.method_options)
    result = run_training(cfg)
    r = result.config
    print(f"model {r['model']}, task {r['task']}, method {r['method']}: "
          f"{result.trainable_params:,} trainable parameters")
    print(f"{result.metric} before: {result.score_before:.4f}   after: {result.score_after:.4f}")
    if result.metric == "exact_match":
        print("(exact match reads the final number of each completion, so the answer's format does not count)")
    for sample in result.samples[:3]:
        print(f"  sample completion: {sample!r}")
    print(f"time {result.seconds:.0f} s ({result.train.seconds:.0f} s training); adapter saved to "
          f"{result.adapter_dir or '(full fine-tuning: no adapter)'}")


def _run_json(adapter: str) -> dict[str, Any]:
    """The training run's configuration from the ``run.json`` beside ``adapter`` ({} when there is none)."""
    run_json = Path(adapter).parent / "run.json"
    if not run_json.is_file():
        return {}
    try:
        run = json.loads(run_json.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise LorakitError(f"{run_json} is corrupt ({type(err).__name__}: {err}); expected the JSON that "
                           "`lorakit train` writes, with a 'config' object. Delete it and pass --model") from None
    if not isinstance(run, dict):
        raise LorakitError(f"{run_json}: 'config' must be an object, found {type(run).__name__}")
    return run


def _load_adapted(adapter: str, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """Base model (from the adapter's run.json or --model) with the adapter loaded."""
    from . import load as load_adapter
    from .io.peft_export import PEFT_PREFIX
    from .io.peft_import import is_peft_config
    from .io.persistence import SAVED_PREFIX, WEIGHTS_NAME, read_adapter_config, read_adapter_header, read_config_json
    from .models import load_model
    meta = read_config_json(adapter)
    peft = is_peft_config(meta)  # PEFT's names: base_model_name_or_path, base_model.model.<module>.<param>
    meta = meta if peft else read_adapter_config(adapter)
    run = _run_json(adapter)
    model_spec = getattr(args, "model", None) or run.get("model") or meta.get("base_model" if not peft else
                                                                              "base_model_name_or_path")
    if not model_spec or not isinstance(model_spec, str):
        raise LorakitError(f"{adapter} does not name its base model; pass --model")
    task_type = "classification" if "classifier" in (meta.get("modules_to_save") or []) else "causal-lm"
    num_labels = None
    if task_type == "classification":  # the head's row count, from the header `lorakit.load` checks (no data read)
        prefix = PEFT_PREFIX if peft else SAVED_PREFIX
        header = read_adapter_header(adapter)
        head = [k for k in header if k.startswith(prefix) and k.endswith("classifier.weight")]
        if head:
            shape = tuple(header[head[0]].shape)
            if len(shape) != 2 or min(shape) < 1:
                raise AdapterFileError(f"{Path(adapter) / WEIGHTS_NAME}: the classification head '{head[0]:.160}' "
                                       f"has shape {list(shape)}, expected [num_labels, hidden size]: the file is "
                                       "corrupt")
            num_labels = shape[0]
    model, tokenizer = load_model(model_spec, task_type, num_labels=num_labels,
                                  device=getattr(args, "device", None) or "auto")
    load_adapter(model, adapter)
    return model, tokenizer, run


def _set_rank(model: Any, rank: int | None) -> None:
    if rank is None:
        return
    from .api import get_state
    method = get_state(model).method
    if method.set_rank is None:
        raise LorakitError(f"--rank applies to methods trained for every rank (DyLoRA); {method.name} has a single "
                           "rank")
    method.set_rank(model, rank)


def cmd_eval(args: argparse.Namespace) -> None:
    from .train.data import load_task
    from .train.run import RunConfig, check_field, check_metric, encode, score
    flags = {name: check_field(name, getattr(args, name), "--" + name.replace("_", "-"))
             for name in ("task", "data_dir", "eval_limit", "eval_split", "metric", "max_new_tokens")
             if getattr(args, name, None) is not None}
    run = _run_json(args.adapter)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    try:
        cfg = RunConfig(**{k: v for k, v in run.items() if k in fields}) if run else RunConfig()
    except LorakitError as err:
        raise LorakitError(f"{Path(args.adapter).parent / 'run.json'}: {err}") from None
    cfg = dataclasses.replace(cfg, **flags).resolved()
    spec, examples = load_task(cfg.task, cfg.eval_split, cfg.data_dir, seed=cfg.seed, limit=cfg.eval_limit)
    check_metric(cfg.metric, spec)
    model, tokenizer, _ = _load_adapted(args.adapter, args)
    _set_rank(model, args.rank)
    metric = cfg.metric or spec.metric
    features = encode(spec, examples, tokenizer, cfg, evaluation=True)
    value, samples = score(model, tokenizer, metric, examples, features, cfg)
    print(json.dumps({"adapter": args.adapter, "task": cfg.task, "split": cfg.eval_split, "metric": metric,
                      "score": value, "rank": args.rank, "samples": samples[:3]}, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    from .io.peft_export import export_peft
    from .train.run import check_output_dir
    check_output_dir(args.out, "--out")
    model, _, _ = _load_adapted(args.adapter, args)
    _set_rank(model, args.rank)
    out = export_peft(model, args.out, modules_to_save=args.modules_to_save, rank_pattern=args.rank_pattern)
    print(f"PEFT LoRA adapter written to {out}")


def cmd_merge(args: argparse.Namespace) -> None:
    from .api import merge_and_unload
    from .core.files import write_files
    from .prune import PRUNED_KEY, save_pruned
    from .train.run import check_output_dir
    check_output_dir(args.out, "--out")
    model, tokenizer, _ = _load_adapted(args.adapter, args)
    merged = merge_and_unload(model)

    if getattr(merged.config, PRUNED_KEY, None) is not None:  # blocks of different widths: load_pruned's two files
        save_pruned(merged, args.out, tokenizer)
    else:
        def write(tmp: Path) -> None:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        write_files(args.out, write, last="config.json")  # all or nothing; planted symlinks replaced, not followed
    print(f"merged model written to {args.out}")


def cmd_prune(args: argparse.Namespace) -> None:
    from .models import load_model
    from .prune import calibration_batches, general_calibration, prune_llama, save_pruned
    from .train.run import check_output_dir
    check_output_dir(args.out, "--out")
    model, tokenizer = load_model(args.model, "causal-lm")
    if args.calibration == "text":
        batches = general_calibration(tokenizer, args.samples, args.max_length, args.seed)
    else:
        batches = calibration_batches(tokenizer, args.task, args.samples, args.max_length, args.data_dir, args.seed)
    report = prune_llama(model, batches, args.ratio, args.first, args.last)
    save_pruned(model, args.out, tokenizer)
    print(json.dumps({"out": args.out, "ratio": args.ratio, "calibration": args.calibration,
                      "params_before": report.params_before,
                      "params_after": report.params_after, "removed_share": round(report.removed_share, 4),
                      "pruned_blocks": list(report.pruned_blocks)}))


def cmd_methods(args: argparse.Namespace) -> None:
    from .core.registry import methods
    if args.r < 1:
        raise LorakitError(f"--r must be a positive integer (the rank for the counts), got {args.r}")
    registry = methods()
    counts: dict[str, int] = {}
    if args.model:
        from .core.inject import find_targets
        from .core.layer import base_shape
        from .models import load_model
        task_type = "classification" if args.task in ("sst2", "trec") else "causal-lm"
        model, _ = load_model(args.model, task_type, num_labels=2 if task_type == "classification" else None)
        shapes = [base_shape(m) for _, m in find_targets(model, "all-linear")]
        for name, m in registry.items():
            cfg = m.config_class(r=args.r)
            counts[name] = sum(m.params_per_matrix(d_out, d_in, cfg) for d_out, d_in in shapes)
    def per_matrix(m: Any) -> str:
        try:
            return f"{m.params_per_matrix(4096, 4096, m.config_class(r=args.r)):,}"
        except LorakitError:
            return "n/a"
    header = ("method", "paper", "trainable", f"params per 4096x4096 matrix (r={args.r})")
    rows = [header + (("params on --model (all-linear)",) if counts else ())]
    for name, m in sorted(registry.items()):
        rows.append((name, m.paper, m.trainable, per_matrix(m)) + ((f"{counts[name]:,}",) if counts else ()))
    if args.markdown:
        print("| " + " | ".join(rows[0]) + " |\n" + "| --- " * len(rows[0]) + "|")
        for row in rows[1:]:
            print("| " + " | ".join(row) + " |")
    else:
        for row in rows[1:]:
            print(f"{row[0]:<12} {row[2]:<40} {row[3]:>12} {row[4] if counts else ''}\n    {row[1]}")


def cmd_compare(args: argparse.Namespace) -> None:
    from .train.compare import compare
    from .train.run import FULL, check_method_options, check_output_dir
    base = run_config(args)
    names = args.methods.split(",") if args.methods else None
    if names is None and args.config:
        names = (load_yaml(Path(args.config).read_text()) or {}).get("methods")
    if not names or not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise LorakitError("compare needs --methods (comma-separated), or a 'methods' list of names in the recipe")
    for name in names:
        if name != FULL:  # full fine-tuning ignores the adapters' shared options
            check_method_options(name, base.method_options)
    check_output_dir(args.out, "--out")
    report = compare(base, names, Path(args.out), target_loss=args.target_loss)
    print(f"report written to {report}")


def sweep_config(args: argparse.Namespace) -> Any:
    """The `lorakit.sweep.SweepConfig` of ``lorakit sweep``/``auto``: every `lorakit train` flag makes the base run."""
    from .sweep import SweepConfig
    from .sweep.plan import parse_lrs, parse_methods
    return SweepConfig(base=run_config(args), methods=parse_methods(args.methods), lrs=parse_lrs(args.lrs),
                       seeds=args.seeds, scheduler=args.scheduler, budget=args.budget, reference=args.reference,
                       address=args.address, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                       output_dir=args.output_dir, resume=args.resume)


def _command_line() -> str:
    import shlex
    return shlex.join(["lorakit", *sys.argv[1:]])


def cmd_sweep(args: argparse.Namespace) -> None:
    from .sweep import sweep
    rows = sweep(sweep_config(args), command=_command_line())
    for row in rows:
        shown = "no finished trial" if not row["n"] else f"{row['mean']:.4f} ± {row['std']:.4f} (n={row['n']})"
        print(f"{row['method']:<12} lr {row['lr'] if row['lr'] is not None else '-':<8} {shown}   "
              f"{row['verdict'] or ''}")
    print(f"leaderboard written to {Path(args.output_dir) / 'leaderboard.md'}")


def cmd_auto(args: argparse.Namespace) -> None:
    from .sweep import auto
    outcome = auto(sweep_config(args), final_steps=args.final_steps, command=_command_line())
    print(f"winner: {outcome['winner']} at lr {outcome['lr']:g} ({outcome['metric']} {outcome['score']:.4f} after the "
          f"final run); adapter {outcome['adapter']}")
    print(f"PEFT adapter: {outcome['peft']}" if outcome["peft"] else f"no PEFT export: {outcome['peft_note']}")
    print("reproduce with:")
    print(f"  {outcome['command']}")


def add_sweep_flags(p: argparse.ArgumentParser) -> None:
    add_run_flags(p, skip=("method", "lr", "output_dir"))
    p.add_argument("--methods", required=True, help="comma-separated method names, or 'all'")
    p.add_argument("--lrs", default="auto",
                   help="comma-separated rates, or auto: 0.3x / 1x / 3x each method's default rate "
                        "[default: auto]")
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds per method at its best rate (from --seed on) [default: 3]")
    p.add_argument("--scheduler", choices=["asha", "grid"], default="asha",
                   help="asha: successive halving on the intermediate evaluations (seeds only for the surviving "
                        "rate); grid: every method x rate x seed [default: asha]")
    p.add_argument("--budget", type=int, help="choose each method's rank so its trainable parameters come closest to "
                                              "this [default: the methods' ranks]")
    p.add_argument("--reference", default="lora", help="the method the verdicts compare against [default: lora]")
    p.add_argument("--address", help="an existing Ray cluster: auto, host:port or ray://host:port [default: an "
                                     "embedded Ray on loopback]")
    p.add_argument("--cpus-per-trial", dest="cpus_per_trial", type=float, default=1.0,
                   help="CPUs each trial holds [default: 1]")
    p.add_argument("--gpus-per-trial", dest="gpus_per_trial", type=float, default=None,
                   help="GPUs each trial holds (fractions share one) [default: 1 if CUDA is available, else 0]")
    p.add_argument("--output-dir", dest="output_dir", default="lorakit-sweep",
                   help="trial run directories, leaderboard.json/.md and plots [default: lorakit-sweep]")
    p.add_argument("--resume", action="store_true",
                   help="finish the sweep in --output-dir (finished trials never run again)")


def cmd_fed(args: argparse.Namespace) -> None:
    try:
        from .fed import runner
        from .fed.config import FedConfig
    except ImportError as err:
        raise LorakitError(f"lorakit fed needs Flower and Opacus: pip install 'lorakit[fed]' ({err})") from err
    values = {k: getattr(args, k) for k in FedConfig.__dataclass_fields__ if getattr(args, k, None) is not None}
    result = runner.run(FedConfig(**values))
    for row in result["history"]:
        shown = {k: v for k, v in row.items() if k not in ("bytes_per_client", "excluded")}
        print(json.dumps(shown))
        for client, reason in row.get("excluded", {}).items():
            print(f"  round {row['round']}: excluded client {client}: {reason}")
    print(f"bytes up {result['totals']['up']:,}, down {result['totals']['down']:,}; results and checkpoint in "
          f"{values.get('output_dir', FedConfig.output_dir)}")


def add_fed_flags(p: argparse.ArgumentParser) -> None:
    from .core.quant import QUANT_KINDS
    from .fed.config import INIT_SOURCES, MODES, PARTITIONS, STRATEGY_NAMES, WEIGHTINGS, FedConfig
    helps = {"strategy": "aggregation", "clients": "clients (simulated SuperNodes, or loopback SuperNodes)",
             "rounds": "server rounds", "model": "alias, local dir or hub id",
             "quantize": "load the frozen base quantized, as lorakit train does (not with fedex-lora)",
             "task": "built-in task (sst2, trec, ...)",
             "data_dir": "folder holding sst2/, trec/", "partition": "how the training data is split",
             "alpha": "Dirichlet concentration (partition dirichlet)", "r": "adapter rank",
             "lora_alpha": "LoRA alpha of fedit/ffa-lora/fedex-lora", "lr": "local learning rate",
             "local_steps": "optimizer steps per client per round", "train_limit": "first N training examples",
             "eval_limit": "evaluation examples (server side)",
             "init_samples": "examples behind Fed-SB's init (per client with --init-source clients)",
             "init_source": "who computes Fed-SB's init: server (official, no upload), client (one designated "
                            "client uploads B, R, A) or clients (every client uploads dense gradient sums)",
             "init_data": "the server's init sample: a split of the task or a .jsonl/.csv file (first N; from "
                          "train they are held out of the clients' shards)",
             "init_overlap": "leave the server's train-split init rows in the clients' shards too, as the official "
                             "code (then outside the DP guarantee)",
             "init_lr": "LoRA-SB's eta for Fed-SB's init", "weighting": "uniform (official Fed-SB mean) or examples",
             "max_client_examples": "most examples a client may report",
             "host": "deployment: interface the SuperLink binds (not loopback: TLS and SuperNode auth forced on)",
             "tls": "deployment: TLS with a private CA", "supernode_auth": "deployment: only registered SuperNodes",
             "fraction": "share of clients sampled per round",
             "round_timeout": "seconds to wait for a round's client replies",
             "init_timeout": "seconds to wait for Fed-SB's gradient sums (includes the clients starting up)",
             "max_update_norm": "reject updates farther than this from the broadcast",
             "norm_factor": "reject updates this many times the round's median distance",
             "dp_epsilon": "DP-SGD target epsilon per client over the run (off when unset)",
             "dp_delta": "DP delta", "dp_max_grad_norm": "per-sample clipping norm",
             "output_dir": "checkpoints and fed_result.json", "resume": "continue after the last checkpointed round",
             "mode": "simulation (Flower simulation engine) or deployment (loopback SuperLink + SuperNodes)"}
    choices = {"strategy": STRATEGY_NAMES, "partition": PARTITIONS, "mode": MODES, "init_source": INIT_SOURCES,
               "weighting": WEIGHTINGS, "quantize": QUANT_KINDS}
    shown = {"quantize": "none", "lr": "per strategy", "lora_alpha": "r", "dp_epsilon": "off",
             "dp_delta": "1/examples per client",
             "data_dir": "the hub",
             "train_limit": "all", "init_lr": "lr / (sampled clients x local steps x rounds)",
             "max_client_examples": "largest partition"}
    for name, f in FedConfig.__dataclass_fields__.items():
        flag = "--" + name.replace("_", "-")
        text = f"{helps.get(name, name.replace('_', ' '))} [default: {shown.get(name, f.default)}]"
        if isinstance(f.default, bool):
            text = text.replace("[default: False]", "[default: off]").replace("[default: True]", "[default: on]")
            p.add_argument(flag, dest=name, action="store_true", default=None, help=text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument(flag, dest=name, type=kind, choices=choices.get(name), default=None, help=text)


# -- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="Low-rank fine-tuning, every method side by side.",
                                     formatter_class=_Help)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune (no arguments: LoRA-SB on SmolLM2 with the arithmetic task)",
                       formatter_class=_Help)
    add_run_flags(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.set_defaults(func=cmd_train)

    for name, func, what in (("eval", cmd_eval, "score a saved adapter"),
                             ("export", cmd_export, "write a PEFT LoRA adapter"),
                             ("merge", cmd_merge, "write the full merged model")):
        p = sub.add_parser(name, help=what, formatter_class=_Help)
        p.add_argument("adapter", help="adapter directory (lorakit or PEFT LoRA format; `lorakit train` writes it "
                                       "to <output-dir>/adapter)")
        p.add_argument("--model", help="base model [default: the one in the adapter's run.json or config]")
        p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                       help="where the model runs (auto: CUDA when available)")
        add_threads_flag(p)
        if name in ("eval", "export"):
            p.add_argument("--rank", type=int, help="evaluate/export at this rank (DyLoRA) [default: the trained one]")
        if name == "eval":
            run = " [default: the training run's]"
            p.add_argument("--task", help="task to score on" + run)
            p.add_argument("--data-dir", dest="data_dir", help="folder holding sst2/, trec/, gsm8k/" + run)
            p.add_argument("--eval-split", dest="eval_split", help="split to evaluate on" + run)
            p.add_argument("--metric", choices=["exact_match", "accuracy", "nll"], help="evaluation metric" + run)
            p.add_argument("--eval-limit", type=int, help="evaluation examples" + run)
            p.add_argument("--max-new-tokens", type=int, help="generation length for exact-match scoring" + run)
        else:
            p.add_argument("--out", required=True, help="output directory")
        if name == "export":
            p.add_argument("--rank-pattern", action="store_true", help="per-layer ranks instead of zero padding")
            p.add_argument("--modules-to-save", action="store_true", help="include trained heads")
        p.set_defaults(func=func)

    p = sub.add_parser("prune", help="structured (LLM-Pruner Taylor) pruning of a Llama model, for RankAdaptor",
                       formatter_class=_Help)
    add_threads_flag(p)
    p.add_argument("--model", default="smollm2-135m", help="alias, local dir, .gguf file or hub id")
    p.add_argument("--ratio", type=float, default=0.25,
                   help="LLM-Pruner's per-block ratio: share of heads (KV groups) and MLP channels removed per block")
    p.add_argument("--out", required=True, help="output directory (load it with lorakit.prune.load_pruned)")
    p.add_argument("--calibration", choices=("text", "task"), default="text",
                   help="LLM-Pruner's general-text windows (shipped prose) or --task training examples")
    p.add_argument("--task", default="arith", help="calibration examples' task (with --calibration task)")
    p.add_argument("--data-dir", dest="data_dir", help="folder holding sst2/, trec/, gsm8k/ [default: the hub]")
    p.add_argument("--samples", type=int, default=10, help="calibration examples")
    p.add_argument("--max-length", dest="max_length", type=int, default=64,
                   help="tokens per calibration example (the window length for text)")
    p.add_argument("--first", type=int, default=4, help="first blocks left unpruned")
    p.add_argument("--last", type=int, default=2, help="last blocks left unpruned")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("methods", help="list methods, with trainable-parameter counts for --model",
                       formatter_class=_Help)
    p.add_argument("--model", help="count trainable parameters on this model (all-linear)")
    p.add_argument("--task", default="arith", help="decides the model head (sst2/trec: classifier)")
    p.add_argument("--r", type=int, default=8, help="rank for the counts")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("compare", help="several methods on the same budget: report.md and plots", formatter_class=_Help)
    add_run_flags(p, skip=("method", "output_dir"))
    p.add_argument("--methods", help="comma-separated, e.g. lora,lora-sb,lora-ga,full")
    p.add_argument("--out", default="lorakit-compare", help="report folder [default: lorakit-compare]")
    p.add_argument("--target-loss", type=float, help="for 'steps to reach' [default: LoRA's final loss]")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="methods x learning rates x seeds on Ray Tune: leaderboard.json/.md and plots",
                       formatter_class=_Help)
    add_sweep_flags(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("auto", help="sweep, retrain the winner, export its PEFT adapter, print the command",
                       formatter_class=_Help)
    add_sweep_flags(p)
    p.add_argument("--final-steps", dest="final_steps", type=int, help="steps of the winner's final run "
                                                                       "[default: the sweep's]")
    p.set_defaults(func=cmd_auto)

    p = sub.add_parser("fed", help="federated fine-tuning on Flower (Fed-SB, FedIT, FFA-LoRA, FedEx-LoRA)",
                       formatter_class=_Help)
    try:
        add_fed_flags(p)
    except ImportError:  # the fed extra is not installed: `lorakit fed` says how to install it
        pass
    p.set_defaults(func=cmd_fed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "httpx", "urllib3", "huggingface_hub",
                  "torchao", "torch.utils._pytree"):  # torchao: imported by transformers' model loading
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        if args.func is not cmd_fed:  # fed's clients run in their own processes
            set_threads(getattr(args, "threads", None))
        with progress.enabled():
            args.func(args)
    except LorakitError as err:  # bad input (exit 2) or a run that cannot go on (exit 1): one line, no traceback
        if args.verbose:
            traceback.print_exc()
        print(f"lorakit: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, TrainingError) else 2
    except Exception as err:  # a bug: one line, the traceback under -v
        if args.verbose:
            raise
        print(f"lorakit: internal error: {type(err).__name__}: {err} (rerun with -v for the traceback and please "
              "report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
