"""lorakit against PEFT on LLM shapes, sized for one call on a lent GPU (benchmarks/results/gpu/README.md).

    python benchmarks/gpu_llm.py --budget 480                 # on the GPU: results/gpu/llm.{md,json}
    python benchmarks/gpu_llm.py --tiny --out /tmp/x          # the same code on CPU, toy shapes, seconds

Randomly initialised Llama-shaped models (no download; step time and memory do not depend on the weights), built
directly in bf16 on the device (``build_model``: never an fp32 copy on the host), Llama-3-8B and Llama-3.2-1B shapes,
one batch of ``--seq`` (2048) random tokens, every token supervised, all linear layers adapted at r=16.

Cases run in priority order (`plan`): the 8B shape first (the targets are stated there), then the 1B shape.  In one
process, on the same batches: PEFT and lorakit for LoRA, rsLoRA, DoRA, PiSSA, AdaLoRA; lorakit alone for LoRA-SB,
LoRA-XS, LoRA-GA, XGBLoRA, LoRA²; lorakit compiled (its own `CompiledForward`, as ``--compile`` trains); gradient
checkpointing off and on; QLoRA (an nf4 base, `lorakit.core.quant.quantize_model`) where bitsandbytes' CUDA build
loads.  Each case: attach (init time, with data-driven inits), ``--warmup`` steps (compiling, if compiled), then
``--steps`` timed steps (forward, backward, optimizer step; the trainer's hooks for lorakit, PEFT's own
``update_and_allocate`` for AdaLoRA), then the adapter is removed and the next case starts from the same base.  A case
that would not finish within ``--budget`` seconds of the whole run (estimated from the cases run so far) is skipped
and listed as such; results are rewritten after every case, so a killed run keeps what it measured.

Reported: tokens/s, peak CUDA memory (allocator peak over the timed steps, base weights included), init time, and
each as a ratio to PEFT's same case measured in the same run.  Losses: lorakit's trainer path
(`lorakit.core.driver.step_loss`) and PEFT's ``model(**batch).loss``, both the mean cross-entropy over every position.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.core.driver import build_optimizer, reset_optimizer, step_loss
from lorakit.train.compiled import CompiledForward
from lorakit.train.memory import enable_gradient_checkpointing

ROOT = Path(__file__).resolve().parents[1]
R = 16
SHAPES: dict[str, dict[str, Any]] = {  # the released configs' shapes (config.json of each model)
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, rope_theta=10000.0, tie_word_embeddings=False),
}
BOTH = ("lora", "rslora", "dora", "pissa", "adalora")
LORAKIT_ONLY = ("lora-sb", "lora-xs", "lora-ga", "xgblora", "lora2")


# -- the model --------------------------------------------------------------------------------------------
def build_model(shape: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
    """A random Llama of ``shape`` created directly on ``device`` in ``dtype`` (``meta`` allocates nothing): no
    float32 weights are ever materialised, on the host or elsewhere."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, attention_dropout=0.0, use_cache=False,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.requires_grad_(False)


def batches(vocab: int, n: int, seq: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (1, seq), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


# -- the adapters -----------------------------------------------------------------------------------------
def lorakit_config(method: str) -> lorakit.AdapterConfig:
    kw: dict[str, Any] = {"r": R, "target_modules": "all-linear"}
    if method == "lora-sb":
        kw["init_lr"] = 1e-4
    if method == "adalora":  # lorakit takes the run length from the hooks' on_train_begin
        kw.update(target_r=R // 2, tinit=1, tfinal=1)
    if method == "xgblora":
        kw["kappa"] = 2  # a boosting merge within the timed steps, so its cost is counted
    return lorakit.get_method(method).config_class(**kw)


def peft_config(method: str, total_steps: int) -> Any:
    targets = "all-linear"
    if method == "adalora":
        return AdaLoraConfig(init_r=R, target_r=R // 2, tinit=1, tfinal=1, total_step=total_steps,
                             target_modules=targets)
    return LoraConfig(r=R, lora_alpha=R, target_modules=targets, use_rslora=method == "rslora",
                      use_dora=method == "dora", init_lora_weights="pissa_niter_4" if method == "pissa" else True)


@dataclass
class Case:
    shape: str
    library: str  # "peft" or "lorakit"
    method: str
    checkpointing: bool = False
    compiled: bool = False
    quantized: bool = False
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return (f"{self.shape}/{self.library}-{self.method}{'-compiled' if self.compiled else ''}"
                f"{'-ckpt' if self.checkpointing else ''}{'-nf4' if self.quantized else ''}")

    def peft_key(self) -> str:
        return (f"{self.shape}/peft-{self.method}{'-ckpt' if self.checkpointing else ''}"
                f"{'-nf4' if self.quantized else ''}")


def plan(shapes: list[str], quantized: bool) -> list[Case]:
    """Every case, most important first (the 8B targets: LoRA and DoRA step time and memory, compiled LoRA)."""
    cases: list[Case] = []
    for shape in shapes:
        def pair(method: str, shape: str = shape, **kw: Any) -> list[Case]:
            return [Case(shape, "peft", method, **kw), Case(shape, "lorakit", method, **kw)]
        cases += pair("lora") + pair("dora") + [Case(shape, "lorakit", "lora", compiled=True)]
        cases += pair("rslora") + pair("pissa") + pair("adalora")
        cases += pair("lora", checkpointing=True) + pair("dora", checkpointing=True)
        cases += [Case(shape, "lorakit", m) for m in LORAKIT_ONLY]
        cases += [Case(shape, "lorakit", "dora", compiled=True), Case(shape, "lorakit", "lora", compiled=True,
                                                                       checkpointing=True)]
        if quantized:
            cases += pair("lora", quantized=True)
        cases += [Case(shape, "lorakit", m, checkpointing=True) for m in ("rslora", "pissa", "adalora")]
        cases += [Case(shape, "peft", m, checkpointing=True) for m in ("rslora", "pissa", "adalora")]
    return cases


# -- one case ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def checkpointing(model: LlamaForCausalLM, on: bool) -> Iterator[None]:
    """transformers' activation checkpointing (non-reentrant, as the lorakit trainer turns it on) inside the block."""
    restore = enable_gradient_checkpointing(model) if on else None
    try:
        yield
    finally:
        if restore is not None:
            restore()


def run_case(case: Case, model: LlamaForCausalLM, data: list[dict[str, torch.Tensor]], warmup: int, steps: int,
             device: torch.device, backend: str) -> dict[str, Any]:
    total = warmup + steps
    sync(device)
    start = time.perf_counter()
    if case.library == "peft":
        adapted = get_peft_model(model, peft_config(case.method, total))
        sync(device)
        init_s = time.perf_counter() - start
        optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-5)

        def step(i: int) -> float:
            loss = adapted(**data[i % len(data)]).loss
            loss.backward()
            optimizer.step()
            if case.method == "adalora":
                adapted.base_model.update_and_allocate(i)
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        def remove() -> None:
            adapted.unload()
    else:
        method = lorakit.get_method(case.method)
        lorakit.attach(model, lorakit_config(case.method), data=data[:1] if method.needs_data else None)
        sync(device)
        init_s = time.perf_counter() - start
        hooks = lorakit.hooks(model)
        hooks.on_train_begin(total)
        optimizer = build_optimizer(model, hooks, 1e-5, 0.0)
        compiled = CompiledForward(model, backend) if case.compiled else None

        def step(i: int) -> float:  # as `lorakit.train.trainer._Run.step` orders the hooks
            hooks.before_forward(i)
            with compiled.active() if compiled else contextlib.nullcontext():
                task, reg = step_loss(model, data[i % len(data)], hooks)
            (task if reg is None else task + reg).backward()
            hooks.after_loss(i, float(task.detach()))
            hooks.after_backward(i)
            optimizer.step()
            hooks.after_step(i)
            optimizer.zero_grad(set_to_none=True)
            if hooks.optimizer_reset_requested:
                reset_optimizer(model, hooks, optimizer, 1e-5, 0.0)
            return float(task.detach())

        def remove() -> None:
            lorakit.detach(model)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        with checkpointing(model, case.checkpointing):
            sync(device)
            t0 = time.perf_counter()
            for i in range(warmup):
                loss = step(i)
            sync(device)
            warmup_s = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for i in range(warmup, total):
                t = time.perf_counter()
                loss = step(i)
                sync(device)
                times.append(time.perf_counter() - t)
    finally:
        remove()
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    median = statistics.median(times)
    tokens = data[0]["input_ids"].numel()
    return {"init_s": init_s, "warmup_s": warmup_s, "step_s": times, "median_step_s": median,
            "tokens_per_s": tokens / median, "trainable": trainable, "last_loss": loss,
            "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


# -- the run ----------------------------------------------------------------------------------------------
def bnb_cuda() -> bool:
    """bitsandbytes imports and runs an nf4 layer on the GPU (a CPU-only build or a missing library cannot)."""
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes as bnb
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
        layer(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16))
        return True
    except Exception:  # any import or library-load failure means no usable CUDA build here
        return False


def ratio(value: float | None, ref: float | None) -> float | None:
    return None if value is None or ref is None or ref == 0 else value / ref


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    for r in results.values():
        if "tokens_per_s" not in r or r["case"]["library"] == "peft":
            continue
        ref = results.get(r["peft_key"], {})
        r["vs_peft"] = {"tokens_per_s": ratio(r["tokens_per_s"], ref.get("tokens_per_s")),
                        "peak_mib": ratio(r["peak_mib"], ref.get("peak_mib")),
                        "init_s": ratio(r["init_s"], ref.get("init_s")), "peft_case": r["peft_key"]}
        if r["case"]["compiled"]:  # the target: compiled lorakit against PEFT eager
            r["vs_peft"]["note"] = "compiled lorakit against PEFT eager"


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["# lorakit vs PEFT on Llama shapes (random init, bf16)", "",
             f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; "
             f"seq {env['seq']}, batch 1, compiled cases with {env['backend']}, r={R}, all linear layers; "
             f"{env['warmup']} warm-up + {env['steps']} timed steps per case; budget {env['budget_s']} s, run took "
             f"{env['wall_s']:.0f} s.  Command: "
             f"`{env['command']}`.  Ratios are lorakit / PEFT for the same case in this run (compiled lorakit: "
             "against PEFT eager).", "",
             "| case | tokens/s | vs PEFT | peak MiB | vs PEFT | init s | vs PEFT | warm-up s | trainable |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in report["results"].items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {key} | {r.get('skipped') or r.get('error')} | | | | | | | |")
            continue
        v = r.get("vs_peft", {})
        lines.append(f"| {key} | {r['tokens_per_s']:.0f} | {fmt(v.get('tokens_per_s'), '.3f')} | "
                     f"{fmt(r['peak_mib'], '.0f')} | {fmt(v.get('peak_mib'), '.3f')} | {r['init_s']:.2f} | "
                     f"{fmt(v.get('init_s'), '.2f')} | {r['warmup_s']:.1f} | {r['trainable']:,} |")
    lines += ["", "Targets on the 8B shape (issue 22): lorakit <= 1.00x PEFT's step time and peak memory for every "
              "method both have; DoRA <= 0.8x PEFT DoRA's peak memory; compiled lorakit >= 1.2x PEFT eager "
              "throughput.  Read them off the vs-PEFT columns (tokens/s ratio >= 1 means lorakit is faster)."]
    if report.get("notes"):
        lines += ["", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict[str, Any]) -> None:
    """Both files, each written to a temporary file and renamed over the old one (a kill leaves a whole file)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("llm.json", json.dumps(report, indent=2) + "\n"), ("llm.md", markdown(report))):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes on CPU (what CI runs)")
    parser.add_argument("--shapes", default="llama-3-8b,llama-3.2-1b")
    parser.add_argument("--only", help="comma-separated case keys (as in the report) to run, e.g. after a cut-off run")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (cases that would "
                        "exceed it are skipped)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled cases (--tiny "
                        "in CI: aot_eager, the same graphs without inductor's minutes of C++ compiling)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    if args.tiny:
        device, shapes, seq = torch.device("cpu"), ["tiny"], min(args.seq, 32)
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --tiny on a CPU")
        device, shapes, seq = torch.device("cuda"), args.shapes.split(","), args.seq
    quantized = bnb_cuda()
    notes = [] if quantized or args.tiny else ["QLoRA skipped: bitsandbytes with a CUDA library is not installed"]
    cases = plan(shapes, quantized)
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c.key in wanted]
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "torch": torch.__version__,
           "transformers": importlib.metadata.version("transformers"), "peft": importlib.metadata.version("peft"),
           "seq": seq, "backend": args.backend, "warmup": args.warmup, "steps": args.steps, "budget_s": args.budget,
           "command": "python " + " ".join([Path(sys.argv[0]).name if argv is None else "benchmarks/gpu_llm.py",
                                            *(sys.argv[1:] if argv is None else argv)]), "wall_s": 0.0}
    report: dict[str, Any] = {"environment": env, "results": {}, "notes": notes}
    out = Path(args.out)
    measured: dict[bool, list[float]] = {False: [], True: []}  # seconds per eager / compiled case so far
    default = {False: 30.0, True: 240.0}  # the estimate until one has been measured
    model: LlamaForCausalLM | None = None
    built: tuple[str, bool] | None = None
    data: list[dict[str, torch.Tensor]] = []
    for case in cases:
        elapsed = time.perf_counter() - begin
        estimate = 1.2 * max(measured[case.compiled]) if measured[case.compiled] else default[case.compiled]
        if elapsed + estimate > args.budget:
            report["results"][case.key] = {"skipped": f"budget ({elapsed:.0f} s used of {args.budget:.0f})"}
            continue
        if built != (case.shape, case.quantized):
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            t = time.perf_counter()
            model = build_model(case.shape, device)
            if case.quantized:
                from lorakit.core.quant import quantize_model
                quantize_model(model, "nf4")
            model.train()
            data = batches(model.config.vocab_size, 2, seq, device)
            report["notes"].append(f"{case.shape}{' nf4' if case.quantized else ''}: model built in "
                                   f"{time.perf_counter() - t:.1f} s")
            built = (case.shape, case.quantized)
        assert model is not None
        t = time.perf_counter()
        try:
            result = run_case(case, model, data, args.warmup, args.steps, device, args.backend)
        except torch.cuda.OutOfMemoryError as err:
            result = {"error": f"out of memory ({str(err).splitlines()[0][:120]})"}
        except Exception as err:  # one failing case must not lose the others: recorded, the run goes on
            result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        spent = time.perf_counter() - t
        measured[case.compiled].append(spent)
        report["results"][case.key] = {**result, "case_s": spent, "peft_key": case.peft_key(),
                                       "case": {"shape": case.shape, "library": case.library, "method": case.method,
                                                "checkpointing": case.checkpointing, "compiled": case.compiled,
                                                "quantized": case.quantized}}
        add_ratios(report["results"])
        env["wall_s"] = time.perf_counter() - begin
        write(out, report)
        print(f"{case.key}: {json.dumps({k: v for k, v in result.items() if k != 'step_s'})}", flush=True)
    env["wall_s"] = time.perf_counter() - begin
    write(out, report)
    return report


if __name__ == "__main__":
    main()
