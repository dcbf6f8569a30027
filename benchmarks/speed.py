"""Speed and memory of lorakit against Hugging Face PEFT on the same work (run by hand, CPU or CUDA).

    python benchmarks/speed.py                      # everything (about 25 minutes on 2 CPU cores)
    python benchmarks/speed.py --only minilm        # or smollm2, init, pissa, methods
    python benchmarks/speed.py --steps 6 --out /tmp/x

Parts, each written to ``<out>/speed.json`` and ``<out>/speed.md``:

* steps: median step time of PEFT LoRA r=8 and lorakit LoRA r=8, LoRA-SB, LoRA-GA, LoRA-XS, plus the
  frozen-base floor (forward + backward to the inputs, no weight gradients), INTERLEAVED in one
  process (one step of each in turn), on MiniLM-L6 (batch 32 SST-2, max length 64) and SmolLM2-135M
  (batch 8 GSM8K, max length 256).  Peak RSS of each configuration in its own subprocess.
* init: time and peak RSS of the LoRA-GA (sketched, and ``exact=True``) and LoRA-SB inits (same samples as
  one training batch) against one lorakit LoRA step and PEFT's ``preprocess_loraga`` + LoRA-GA init.
* methods: the step part on MiniLM for DoRA and MiSS (lorakit's Bone ``variant="miss"``, r=64) against PEFT's
  ``use_dora`` and ``MissConfig``, and LoRA-RITE and LoRA-Pro (each with its hooks and optimizer, as the trainer
  runs them) against a LoRA r=8 step.
* pissa: PiSSA init on SmolLM2 (all-linear, r=32): lorakit's randomized SVD against PEFT's
  ``"pissa"`` (full SVD) and ``"pissa_niter_4"``, with the principal-angle cosines to the exact SVD.

Data come from ``../shared/data`` (the repository's sibling folder), like the PEFT anchors.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.core.driver import step_loss
from lorakit.core.linalg import principal_cosines, truncated_svd
from lorakit.models import load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # on CUDA, memory is the allocator's peak
MINILM_TARGETS = ["query", "key", "value", "dense"]
SMOL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- measurement helpers ---------------------------------------------------------------------------
class PeakRSS:
    """Peak resident set size (MiB) while the block runs, sampled every millisecond from /proc."""

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    @staticmethod
    def current() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())
        self.cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def sst2_batches(tokenizer: Any, n: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    rows = [line.rstrip("\n").split(" ", 1) for line in open(DATA / "sst2" / "train.txt")]
    out = []
    for i in range(n):
        chunk = rows[i * batch_size:(i + 1) * batch_size]
        enc = tokenizer([t for _, t in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
        out.append({**enc, "labels": torch.tensor([int(y) for y, _ in chunk])})
    return out


def gsm8k_batches(tokenizer: Any, n: int, batch_size: int, length: int = 256,
                  fixed: bool = False) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of GSM8K question + answer (prompt masked), each row cut to ``length`` tokens and padded to the
    batch's longest, or to ``length`` itself with ``fixed`` (one shape for every batch)."""
    rows = [json.loads(line) for line in open(DATA / "gsm8k" / "train.jsonl")]
    pad = tokenizer.pad_token_id
    out = []
    for i in range(n):
        ids, labels = [], []
        for r in rows[i * batch_size:(i + 1) * batch_size]:
            p = tokenizer(f"Question: {r['question']}\nAnswer: ").input_ids
            a = tokenizer(r["answer"] + tokenizer.eos_token).input_ids
            ids.append((p + a)[:length])
            labels.append(([-100] * len(p) + a)[:length])
        width = length if fixed else max(map(len, ids))
        x = torch.tensor([s + [pad] * (width - len(s)) for s in ids])
        y = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        out.append({"input_ids": x, "attention_mask": (x != pad) | (y != -100), "labels": y})
    return out


def load(which: str) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The model in train mode and its benchmark batches (as in the PEFT anchor scripts)."""
    torch.manual_seed(0)
    if which == "minilm":
        from transformers import AutoModelForSequenceClassification
        _, tok = load_model("minilm-l6", "classification", num_labels=2)
        model = AutoModelForSequenceClassification.from_pretrained(str(lorakit.models.minilm_dir()), num_labels=2)
        batches = sst2_batches(tok, 4, 32)
    else:
        model, tok = load_model("smollm2-135m", "causal-lm")
        batches = gsm8k_batches(tok, 4, 8)
    return model.to(DEVICE).train(), [{k: v.to(DEVICE) for k, v in b.items()} for b in batches]


# -- configurations --------------------------------------------------------------------------------
def peft_lora(model: torch.nn.Module, which: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    targets = MINILM_TARGETS if which == "minilm" else SMOL_TARGETS
    extra = {"modules_to_save": ["classifier"]} if which == "minilm" else {}
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0, **extra))


def peft_model(name: str, model: torch.nn.Module, which: str) -> torch.nn.Module:
    from peft import LoraConfig, MissConfig, get_peft_model
    if name == "peft-lora8":
        return peft_lora(model, which)
    targets = MINILM_TARGETS if which == "minilm" else SMOL_TARGETS
    extra = {"modules_to_save": ["classifier"]} if which == "minilm" else {}
    if name == "peft-dora8":
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                                                use_dora=True, **extra))
    return get_peft_model(model, MissConfig(r=64, target_modules=targets, **extra))  # peft-miss


def lorakit_config(method: str, which: str) -> lorakit.AdapterConfig:
    targets = tuple(MINILM_TARGETS if which == "minilm" else SMOL_TARGETS)
    common: dict[str, Any] = {"target_modules": targets}
    if which == "minilm":
        common["modules_to_save"] = ("classifier",)
    core_rank = 16 if which == "minilm" else 32
    return {
        "lora": lambda: lorakit.LoraConfig(r=8, alpha=16, **common),
        "lora-sb": lambda: lorakit.LoraSbConfig(r=core_rank, init_lr=1e-6, **common),
        "lora-xs": lambda: lorakit.LoraXsConfig(r=core_rank, **common),
        "lora-ga": lambda: lorakit.LoraGaConfig(r=8, alpha=16, **common),
        "lora-ga-exact": lambda: lorakit.LoraGaConfig(r=8, alpha=16, exact=True, **common),
        "dora": lambda: lorakit.DoraConfig(r=8, alpha=16, **common),
        "bone": lambda: lorakit.BoneConfig(r=64, **common),  # PEFT MissConfig's default r
        "lora-rite": lambda: lorakit.LoraRiteConfig(r=8, alpha=16, **common),
        "lora-pro": lambda: lorakit.LoraProConfig(r=8, alpha=16, **common),
    }[method]()


def build(name: str, model: torch.nn.Module, which: str, batches: list[dict]) -> tuple[torch.nn.Module, Callable]:
    """A configured model and its training-step closure."""
    if name == "floor":
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))

        def floor_step(batch: dict) -> float:
            loss = model(**batch).loss
            loss.backward()
            return loss.item()
        return model, floor_step
    if name.startswith("peft-"):
        model = peft_model(name, model, which)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def peft_step(batch: dict) -> float:  # PEFT's usual loop
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return model, peft_step
    method = name.removeprefix("lorakit-")
    data = batches[:1] if lorakit.get_method(method).needs_data else None
    lorakit.attach(model, lorakit_config(method, which), data=data)
    hooks = lorakit.hooks(model)
    hooks.on_train_begin(1000)
    optimizer = hooks.build_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    counter = iter(range(10**9))

    def step(batch: dict) -> float:  # the lorakit trainer's step: the method's hooks and optimizer
        i = next(counter)
        hooks.before_forward(i)
        loss, reg = step_loss(model, batch, hooks)
        (loss if reg is None else loss + reg).backward()
        hooks.after_backward(i)
        optimizer.step()
        hooks.after_step(i)
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return model, step


STEP_CONFIGS = ["peft-lora8", "lorakit-lora", "lorakit-lora-sb", "lorakit-lora-ga", "lorakit-lora-xs", "floor"]
# issue 5: DoRA and MiSS against PEFT's own, LoRA-RITE and LoRA-Pro against a LoRA step (MiniLM)
METHOD_CONFIGS = ["peft-lora8", "lorakit-lora", "peft-dora8", "lorakit-dora", "peft-miss", "lorakit-bone",
                  "lorakit-lora-rite", "lorakit-lora-pro", "floor"]


def bench_steps(which: str, steps: int, configs: list[str] = STEP_CONFIGS) -> dict[str, Any]:
    base, batches = load(which)
    runners = {name: build(name, copy.deepcopy(base), which, batches)[1] for name in configs}
    del base
    times: dict[str, list[float]] = {name: [] for name in configs}
    for i in range(steps + 1):  # the first round warms up
        for name, step in runners.items():
            t = time.perf_counter()
            step(batches[i % len(batches)])
            if i:
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(t) for name, t in times.items()}
    memory = {name: memory_of(which, name) for name in configs}
    return {"median_step_s": med, "peak_rss_mib": memory,
            "step_ratio_vs_peft_lora8": {n: med[n] / med["peft-lora8"] for n in med},
            "overhead_vs_floor": {n: med[n] / med["floor"] - 1 for n in med},
            "rss_ratio_vs_peft_lora8": {n: memory[n] / memory["peft-lora8"] for n in memory}}


def memory_of(which: str, name: str) -> float:
    """Peak RSS (MiB) of 3 steps of one configuration, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--memory", which, name], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def memory_child(which: str, name: str) -> None:
    base, batches = load(which)
    with PeakRSS() as rss:
        _, step = build(name, base, which, batches)
        for batch in batches[:3]:
            step(batch)
    print(json.dumps({"peak_rss_mib": rss.cuda_peak if DEVICE.type == "cuda" else rss.peak}))


# -- data-driven init against a training step and PEFT ---------------------------------------------
def init_child(which: str, what: str) -> None:
    """One measurement per process: a LoRA step, lorakit's LoRA-GA / LoRA-SB init, or PEFT's LoRA-GA."""
    model, batches = load(which)
    samples = batches[:1]
    repeats = 1
    t = time.perf_counter()
    with PeakRSS() as rss:
        if what == "lora-step":  # a warm step: one untimed, then the mean of two
            _, step = build("lorakit-lora", model, which, batches)
            step(samples[0])
            t = time.perf_counter()
            step(samples[0])
            step(samples[0])
            repeats = 2
        elif what == "peft-lora-ga":
            from peft import LoraConfig, get_peft_model
            from peft.tuners.lora.config import LoraGAConfig
            from peft.tuners.lora.loraga import preprocess_loraga
            targets = MINILM_TARGETS if which == "minilm" else SMOL_TARGETS
            config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights="lora_ga",
                                lora_ga_config=LoraGAConfig(), lora_dropout=0.0)

            def train_step() -> None:
                for b in samples:
                    model(**b).loss.backward()
            preprocess_loraga(model, config, train_step)
            get_peft_model(model, config)
        else:
            lorakit.attach(model, lorakit_config(what, which), data=samples)
    print(json.dumps({"seconds": (time.perf_counter() - t) / repeats, "peak_rss_mib": rss.peak}))


def bench_init(which: str) -> dict[str, Any]:
    results = {}
    for what in ["lora-step", "lora-ga", "lora-ga-exact", "lora-sb", "peft-lora-ga"]:
        out = subprocess.run([sys.executable, __file__, "--init", which, what], capture_output=True, text=True,
                             check=True)
        results[what] = json.loads(out.stdout.strip().splitlines()[-1])
    step = results["lora-step"]
    for what in ["lora-ga", "lora-ga-exact", "lora-sb", "peft-lora-ga"]:
        results[what]["time_in_steps"] = results[what]["seconds"] / step["seconds"]
        results[what]["rss_vs_lora_step"] = results[what]["peak_rss_mib"] / step["peak_rss_mib"]
    for what in ["lora-ga", "lora-ga-exact"]:
        results[what]["rss_vs_peft_lora_ga"] = results[what]["peak_rss_mib"] / results["peft-lora-ga"]["peak_rss_mib"]
    return results


# -- PiSSA init --------------------------------------------------------------------------------------
def bench_pissa(r: int = 32) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    base, _ = load("smollm2")
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(tuple(SMOL_TARGETS))}
    exact = {n: truncated_svd(w, r) for n, w in weights.items()}
    results: dict[str, Any] = {}

    def agreement(factors: dict[str, torch.Tensor]) -> dict[str, float]:
        cos = [float(principal_cosines(b, exact[n][0]).min()) for n, b in factors.items()]
        return {"min_cosine": min(cos), "median_cosine": statistics.median(cos)}

    for init in ["pissa", "pissa_niter_4"]:
        model = copy.deepcopy(base)
        t = time.perf_counter()
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=SMOL_TARGETS,
                                                 init_lora_weights=init, lora_dropout=0.0))
        seconds = time.perf_counter() - t
        factors = {n: model.get_submodule("base_model.model." + n).lora_B["default"].weight.detach()
                   for n in weights}
        results[f"peft-{init}"] = {"seconds": seconds, **agreement(factors)}
    for label, options in [("gram", {"svd": "gram"}), ("niter4", {"svd_niter": 4}), ("niter8", {"svd_niter": 8})]:
        model = copy.deepcopy(base)
        t = time.perf_counter()
        lorakit.attach(model, lorakit.PissaConfig(r=r, target_modules=tuple(SMOL_TARGETS), **options))
        seconds = time.perf_counter() - t
        factors = {n: layer.lora_B.detach() for n, layer in lorakit.adapter_layers(model).items()}
        results[f"lorakit-pissa-{label}"] = {"seconds": seconds, **agreement(factors)}
    full = results["peft-pissa"]["seconds"]
    for v in results.values():
        v["speedup_vs_peft_full_svd"] = full / v["seconds"]
    return results


# -- report ------------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    # on CUDA the per-configuration peak is torch's allocator peak (the field keeps its name)
    peak, peak_vs = ("peak CUDA MiB", "CUDA") if "CUDA" in results["machine"] else ("peak RSS MiB", "RSS")
    lines = ["# Speed and memory: lorakit vs PEFT (same process, same batches)", "",
             f"Machine: {results['machine']}. Command: `{results.get('command', 'python benchmarks/speed.py')}`.", ""]
    for which in ("minilm", "smollm2", "methods"):
        if which not in results:
            continue
        r = results[which]
        lines += [f"## Training step, {which}" if which != "methods" else
                  "## Training step, other methods on MiniLM (issue 5: DoRA, MiSS vs PEFT's own; LoRA-RITE, LoRA-Pro "
                  "vs a LoRA step)", "",
                  f"| config | median s/step | vs PEFT LoRA r=8 | over frozen floor | {peak} | {peak_vs} vs PEFT |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for n in r["median_step_s"]:
            lines.append(f"| {n} | {r['median_step_s'][n]:.3f} | {r['step_ratio_vs_peft_lora8'][n]:.3f}x | "
                         f"{100 * r['overhead_vs_floor'][n]:+.1f}% | {r['peak_rss_mib'][n]:.0f} | "
                         f"{r['rss_ratio_vs_peft_lora8'][n]:.3f}x |")
        lines.append("")
    for key in (k for k in results if k.startswith("init-")):
        r = results[key]
        lines += [f"## Data-driven init, {key[5:]} (samples = one training batch)", "",
                  "| what | seconds | in LoRA steps | peak RSS MiB | RSS vs LoRA step |",
                  "| --- | --- | --- | --- | --- |"]
        for what, v in r.items():
            lines.append(f"| {what} | {v['seconds']:.2f} | {v.get('time_in_steps', 1.0):.2f} | "
                         f"{v['peak_rss_mib']:.0f} | {v.get('rss_vs_lora_step', 1.0):.3f}x |")
        lines.append("")
    if "pissa" in results:
        lines += ["## PiSSA init, SmolLM2-135M all-linear r=32", "",
                  "| init | seconds | speed-up vs PEFT full SVD | min cos | median cos |",
                  "| --- | --- | --- | --- | --- |"]
        for what, v in results["pissa"].items():
            lines.append(f"| {what} | {v['seconds']:.2f} | {v['speedup_vs_peft_full_svd']:.1f}x | "
                         f"{v['min_cosine']:.5f} | {v['median_cosine']:.5f} |")
        lines.append("")
    lines += ["## Targets", ""] + [f"- {line}" for line in targets(results)]
    return "\n".join(lines) + "\n"


def targets(results: dict[str, Any]) -> list[str]:
    """The issues' speed and memory targets that ``results`` holds, each with its figure and held / not held."""
    def verdict(ok: bool) -> str:
        return "**held**" if ok else "**not held**"

    out = []
    for which in ("minilm", "smollm2"):
        if which in results:
            ratio = results[which]["step_ratio_vs_peft_lora8"]["lorakit-lora"]
            out.append(f"{which}: lorakit LoRA r=8 step <= 0.95x PEFT LoRA r=8: {ratio:.3f}x: {verdict(ratio <= 0.95)}")
    if "minilm" in results:
        over, peft = (results["minilm"]["overhead_vs_floor"][k] for k in ("lorakit-lora", "peft-lora8"))
        out.append(f"minilm: lorakit LoRA r=8 overhead over the frozen floor <= 5%: {100 * over:+.1f}% "
                   f"(PEFT: {100 * peft:+.1f}%): {verdict(over <= 0.05)}")
    for key in (k for k in results if k.startswith("init-")):
        r = results[key]
        for what in ("lora-ga", "lora-ga-exact", "lora-sb"):
            if what in r:
                steps = r[what]["time_in_steps"]
                out.append(f"{key[5:]}: {what} init <= 4 training steps: {steps:.2f}: {verdict(steps <= 4)}")
        for what in ("lora-ga", "lora-ga-exact"):
            if what in r:
                rss, peft = r[what]["rss_vs_lora_step"], r[what]["rss_vs_peft_lora_ga"]
                out.append(f"{key[5:]}: {what} init peak RSS <= 1.1x a LoRA step and below PEFT's LoRA-GA init: "
                           f"{rss:.3f}x a step, {peft:.3f}x PEFT's: {verdict(rss <= 1.1 and peft < 1.0)}")
    if "pissa" in results:
        for what, v in results["pissa"].items():
            if what.startswith("lorakit"):
                ok = v["speedup_vs_peft_full_svd"] >= 5 and v["min_cosine"] >= 0.999
                out.append(f"PiSSA {what} >= 5x faster than PEFT's full SVD with cosines >= 0.999: "
                           f"{v['speedup_vs_peft_full_svd']:.1f}x, min cosine {v['min_cosine']:.4f}: {verdict(ok)}")
    if "methods" in results:
        step = results["methods"]["median_step_s"]
        for ours, theirs in (("lorakit-dora", "peft-dora8"), ("lorakit-bone", "peft-miss")):
            ratio = step[ours] / step[theirs]
            out.append(f"{ours} no slower than {theirs}: {ratio:.3f}x: {verdict(ratio <= 1.0)}")
        for ours in ("lorakit-lora-rite", "lorakit-lora-pro"):
            ratio = step[ours] / step["lorakit-lora"]
            out.append(f"{ours} step <= 1.5x a LoRA step: {ratio:.3f}x: {verdict(ratio <= 1.5)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["minilm", "smollm2", "init", "pissa", "methods"], action="append")
    parser.add_argument("--steps", type=int, default=10)
    threads = int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1)))
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch threads on CPU (default: $OMP_NUM_THREADS, else 2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--init", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help="only rewrite speed.md from <out>/speed.json")
    args = parser.parse_args()
    if args.report:
        out = Path(args.out)
        (out / "speed.md").write_text(markdown(json.loads((out / "speed.json").read_text())))
        return
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the memory/init subprocesses too
    if args.memory:
        return memory_child(*args.memory)
    if args.init:
        return init_child(*args.init)
    parts = args.only or ["minilm", "smollm2", "init", "pissa", "methods"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speed.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = (f"{os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads), "
                          f"torch {torch.__version__}, peft {importlib.metadata.version('peft')}, "
                          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    results["command"] = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    for part in parts:
        print(f"== {part}", flush=True)
        if part in ("minilm", "smollm2"):
            results[part] = bench_steps(part, args.steps)
        elif part == "methods":
            results[part] = bench_steps("minilm", args.steps, METHOD_CONFIGS)
        elif part == "init":
            results["init-minilm"] = bench_init("minilm")
            results["init-smollm2"] = bench_init("smollm2")
        else:
            results["pissa"] = bench_pissa()
        path.write_text(json.dumps(results, indent=2) + "\n")
        (out / "speed.md").write_text(markdown(results))
        print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
