"""Memory and speed of quantized bases, of inits that move W0 and of gradient checkpointing (run by hand).

    python benchmarks/scale.py                    # every configuration (42 minutes on 2 shared cores, load 4-9)
    python benchmarks/scale.py --steps 3 --out /tmp/x --data /work/shared/data --model /tmp/smollm2-135m
    python benchmarks/scale.py --steps 1 --batch 1 --only lorakit-nf4 --only peft-qlora   # quick check, printed only
    python benchmarks/scale.py --attach --model /tmp/smollm2-135m --data /work/shared/data   # attach peaks only

A float copy of SmolLM2-135M (``--model``) loads in seconds instead of a minute (GGUF) and is quantized by
transformers while loading::

    m, t = lorakit.models.load_model("smollm2-135m", "causal-lm")
    m.hf_quantizer = None; m.config.__dict__.pop("quantization_config", None)  # else save_pretrained refuses (GGUF)
    m.save_pretrained("/tmp/smollm2-135m"); t.save_pretrained("/tmp/smollm2-135m")

SmolLM2-135M on GSM8K (``../shared/data/gsm8k``, batch 8, max length 256), r=8 on every linear layer of the
decoder, one torch thread.  Each configuration runs in its own process (peak RSS from ``/proc``, sampled every
millisecond; the load average is recorded before and after it):

* ``lorakit-float``, ``lorakit-nf4``, ``lorakit-int8``: lorakit LoRA on the float32 base and on its
  bitsandbytes nf4 / int8 copy (`lorakit.models.load_model(..., quantize=...)`);
* ``lorakit-float-gc``: ``lorakit-float`` with gradient checkpointing (the trainer's
  `enable_gradient_checkpointing`);
* ``peft-qlora``: PEFT's LoRA on the same bitsandbytes nf4 base (QLoRA without gradient checkpointing), run
  right after ``lorakit-nf4`` and again right before a second ``lorakit-nf4`` (A B B A), so that their step-time
  ratio is taken under the same load;
* ``lorakit-pissa``, ``lorakit-lora-ga``: attach plus one training step on the float base, against
  ``lorakit-float``'s attach plus one step (the inits that move W0 keep no second copy of it).

``--attach`` measures only the attach of LoRA, PiSSA, OLoRA and LoRA-GA (each in its own process, twice): live
heap (glibc ``mallinfo2``) and RSS peaks above the loaded model, the live heap right after each layer's W0 move,
and each init's extra over LoRA's in copies of the largest layer; it adds them to ``scale.json`` and ``scale.md``.

The peak RSS of loading is kept apart (``peak_rss_load_mib``); after loading, float tensors are copied out of
the memory-mapped checkpoint (whose pages would otherwise stay counted in RSS).
Step time is the median of ``--steps`` steps after one warm-up step.  Model-weight memory is counted
exactly (parameters, buffers and bitsandbytes' quantization state).  Activation memory per token is the
training peak above the RSS before training, less the adapter's gradients and AdamW moments.  The results
extrapolate each option to a 7B and a 70B Llama from these per-parameter and per-token figures, and report
the relative output error of ``merge_and_unload(requantize=True)`` on the nf4 base.  Written to
``<out>/scale.json`` and ``<out>/scale.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import speed
import torch
from speed import SMOL_TARGETS, PeakRSS, gsm8k_batches

import lorakit
from lorakit.core import quant
from lorakit.core.layer import AdapterLayer
from lorakit.core.loss import model_loss
from lorakit.models import load_model
from lorakit.train.trainer import enable_gradient_checkpointing

ROOT = Path(__file__).resolve().parents[1]
R = 8
ADAM_BYTES = 16  # per trainable float32 parameter: the weight, its gradient and AdamW's two moments


class Config(NamedTuple):
    quantize: str | None
    trainer: str  # "lorakit" or "peft"
    method: str
    checkpointing: bool = False


CONFIGS: dict[str, Config] = {
    "lorakit-float": Config(None, "lorakit", "lora"),
    "lorakit-float-gc": Config(None, "lorakit", "lora", checkpointing=True),
    "lorakit-nf4": Config("nf4", "lorakit", "lora"),
    "peft-qlora": Config("nf4", "peft", "lora"),
    "lorakit-int8": Config("int8", "lorakit", "lora"),
    "lorakit-pissa": Config(None, "lorakit", "pissa"),
    "lorakit-lora-ga": Config(None, "lorakit", "lora-ga"),
}
# the run order; the nf4 pair runs A B B A (the second round's results are kept under "<name>#2")
ORDER = ["lorakit-float", "lorakit-float-gc", "lorakit-nf4", "peft-qlora", "peft-qlora#2", "lorakit-nf4#2",
         "lorakit-int8", "lorakit-pissa", "lorakit-lora-ga"]


def load_average() -> float:
    """The 1-minute load average of the machine."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, bitsandbytes' 4-bit quantization state (absmax) included."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
            state = getattr(t, "quant_state", None)
            if state is not None:
                total += state.absmax.numel() * state.absmax.element_size()
            scales = getattr(t, "SCB", None)
            if scales is not None:
                total += scales.numel() * scales.element_size()
    for m in model.modules():  # int8 scales move into the layer's matmul state after a forward
        scb = getattr(getattr(m, "state", None), "SCB", None)
        if scb is not None and getattr(m.weight, "SCB", None) is None:
            total += scb.numel() * scb.element_size()
    return total


def child(name: str, steps: int, spec: str, batch_size: int) -> dict[str, Any]:
    """One configuration in this (fresh) process: load, attach, warm-up step, timed steps."""
    cfg = CONFIGS[name]
    load_before = load_average()
    with PeakRSS() as load_rss:
        model, tok = load_model(spec, "causal-lm", quantize=cfg.quantize)
        with torch.no_grad():  # float tensors into private memory: a safetensors load maps the file, which stays
            for p in [*model.parameters(), *model.buffers()]:  # counted in RSS while any tensor still uses it
                if type(p) in (torch.Tensor, torch.nn.Parameter):
                    p.data = p.data.clone()
    with PeakRSS() as rss:
        model.train()
        batches = gsm8k_batches(tok, 1 + (cfg.method == "lora-ga") + max(steps, 1), batch_size)
        weights = weight_bytes(model)
        loaded = rss.current()
        t = time.perf_counter()
        with PeakRSS() as attach_rss:
            if cfg.trainer == "peft":
                from peft import LoraConfig, get_peft_model
                model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules=SMOL_TARGETS,
                                                         lora_dropout=0.0))
            else:
                config = lorakit.get_method(cfg.method).config_class(r=R, alpha=2 * R,
                                                                     target_modules=tuple(SMOL_TARGETS))
                data = [batches.pop()] if cfg.method == "lora-ga" else None
                lorakit.attach(model, config, data=data)
        attach_s = time.perf_counter() - t
        if cfg.checkpointing:
            enable_gradient_checkpointing(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        with torch.no_grad():  # page in every weight (a safetensors load maps them lazily) before the baseline
            for t in [*model.parameters(), *model.buffers()]:
                t.sum()
        before_training = rss.current()
        times = []
        with PeakRSS() as train_rss:
            for i, batch in enumerate(batches):
                t = time.perf_counter()
                loss = model(**batch).loss if cfg.trainer == "peft" else model_loss(model, batch)  # PEFT's own loop
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - t)
                if i == 0:
                    first_step_peak = rss.peak
    residual_error = None
    if cfg.trainer == "lorakit" and cfg.quantize is not None:
        errors = [layer.residual_quant_error for layer in lorakit.adapter_layers(model).values()]
        residual_error = None if errors[0] is None else max(errors)
    adapter_params = sum(p.numel() for p in trainable)
    tokens = statistics.mean(b["input_ids"].numel() for b in batches)  # padded tokens per batch
    # RSS during training above the RSS before it: activations plus the gradients and AdamW moments
    activations = (train_rss.peak - before_training) * 2**20 - adapter_params * (ADAM_BYTES - 4)
    return {"name": name, "quantize": cfg.quantize, "trainer": cfg.trainer, "method": cfg.method,
            "checkpointing": cfg.checkpointing, "weight_mib": weights / 2**20, "rss_after_load_mib": loaded,
            "attach_s": attach_s, "peak_rss_attach_mib": attach_rss.peak, "rss_before_training_mib": before_training,
            "peak_rss_attach_step_mib": first_step_peak, "peak_rss_training_mib": train_rss.peak,
            "peak_rss_load_mib": load_rss.peak, "peak_rss_mib": max(rss.peak, load_rss.peak),
            "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "step_times_s": times, "adapter_params": adapter_params, "tokens_per_batch": tokens,
            "activation_bytes_per_token": activations / tokens, "residual_quant_error": residual_error,
            "load_average_before_after": [load_before, load_average()], "threads": torch.get_num_threads()}


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--data",
                          str(speed.DATA), "--model", args.model, "--batch", str(args.batch), "--threads",
                          str(args.threads)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- attach peak of the W0-moving inits (layer by layer) ----------------------------------------------------------
ATTACH_METHODS = ("lora", "pissa", "olora", "lora-ga")


class PeakHeap(speed.PeakRSS):
    """Peak bytes the C heap holds in live allocations (glibc ``mallinfo2``: in-use arena plus mmapped chunks),
    MiB, sampled every millisecond: unlike RSS it drops when a tensor is freed, so memory kept by malloc after
    a free does not count."""

    _libc = ctypes.CDLL("libc.so.6")

    class _Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    @staticmethod
    def current() -> float:
        PeakHeap._libc.mallinfo2.restype = PeakHeap._Info
        info = PeakHeap._libc.mallinfo2()
        return (info.uordblks + info.hblkhd) / 2**20


def attach_child(method: str, spec: str, batch_size: int) -> dict[str, Any]:
    """Attach ``method`` (r=8, SmolLM2's decoder linears) to the loaded float model in this fresh process: peak RSS
    and peak live heap above the loaded model, and the largest targeted layer's float32 bytes.  ``pissa:gram``:
    PiSSA with ``svd="gram"`` (any ``method:svd``)."""
    method, _, svd = method.partition(":")
    model, tok = load_model(spec, "causal-lm")
    with torch.no_grad():  # out of the memory-mapped checkpoint, as `child` does
        for p in [*model.parameters(), *model.buffers()]:
            if type(p) in (torch.Tensor, torch.nn.Parameter):
                p.data = p.data.clone()
    model.train()
    data = gsm8k_batches(tok, 1, batch_size) if method == "lora-ga" else None
    layers = [m for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in SMOL_TARGETS]
    largest = max(m.weight.numel() * 4 for m in layers)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed pages back, so RSS starts from the live heap
    rss_loaded, heap_loaded = speed.PeakRSS.current(), PeakHeap.current()
    config = lorakit.get_method(method).config_class(r=R, alpha=2 * R, target_modules=tuple(SMOL_TARGETS),
                                                     **({"svd": svd} if svd else {}))
    after_moves: list[float] = []  # live heap right after each layer's `move_base`: exact points, no sampling
    offsets = [0]
    move = AdapterLayer.move_base

    def recorded(layer: AdapterLayer, offset_B: torch.Tensor, offset_A: torch.Tensor) -> None:
        move(layer, offset_B, offset_A)
        offsets[0] += (layer.base_offset_B.numel() + layer.base_offset_A.numel()) * 4
        after_moves.append(PeakHeap.current() - offsets[0] / 2**20)
    AdapterLayer.move_base = recorded
    t = time.perf_counter()
    with speed.PeakRSS() as rss, PeakHeap() as heap:
        lorakit.attach(model, config, data=data)
    seconds = time.perf_counter() - t
    AdapterLayer.move_base = move
    return {"method": method + (f":{svd}" if svd else ""), "attach_s": seconds, "rss_loaded_mib": rss_loaded,
            "heap_loaded_mib": heap_loaded,
            "attach_peak_rss_over_loaded_mib": rss.peak - rss_loaded,
            "attach_peak_heap_over_loaded_mib": heap.peak - heap_loaded,
            "heap_after_attach_over_loaded_mib": PeakHeap.current() - heap_loaded,
            "moves": len(after_moves), "offsets_mib": offsets[0] / 2**20,
            # growth of the live heap from the first layer's move to the last, less the offsets the moves store
            "heap_growth_over_moves_mib": max(after_moves) - after_moves[0] if after_moves else 0.0,
            "largest_layer_float32_mib": largest / 2**20, "linear_float32_mib": sum(m.weight.numel() * 4
                                                                                    for m in layers) / 2**20,
            "batch": batch_size if method == "lora-ga" else None, "threads": torch.get_num_threads(),
            "load_average_before_after": None}


def run_attach(args: argparse.Namespace) -> dict[str, Any]:
    """Every `ATTACH_METHODS` attach in its own process, each twice (A B C D D C B A), then the extra peak of each
    over LoRA's in units of the largest layer's float32 weight."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in ATTACH_METHODS}
    for method in [*ATTACH_METHODS, *reversed(ATTACH_METHODS)]:
        before = load_average()
        out = subprocess.run([sys.executable, __file__, "--attach-child", method, "--model", args.model, "--data",
                              str(speed.DATA), "--batch", str(args.batch), "--threads", str(args.threads)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"attach {method} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["load_average_before_after"] = [before, load_average()]
        runs[method].append(r)
        print(json.dumps(r), flush=True)
    return {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
            "machine": f"{os.cpu_count()} CPU cores shared with other jobs, {args.threads} torch thread(s), "
                       f"torch {torch.__version__}", "runs": runs}


def attach_summary(attach: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per W0-moving method, its worse run (highest heap peak) against LoRA's better run: the extra peak of live
    heap over LoRA's, split into what stays after the attach (the saved offsets, plus any one-time library buffer)
    and the transient (peak less what stays, beyond LoRA's own transient), in MiB and in largest layers."""
    runs = attach["runs"]
    layer = runs["lora"][0]["largest_layer_float32_mib"]
    lora = min(runs["lora"], key=lambda r: r["attach_peak_heap_over_loaded_mib"])
    out = {}
    for method in ATTACH_METHODS[1:]:
        r = max(runs[method], key=lambda r: r["attach_peak_heap_over_loaded_mib"])
        peak = r["attach_peak_heap_over_loaded_mib"] - lora["attach_peak_heap_over_loaded_mib"]
        kept = r["heap_after_attach_over_loaded_mib"] - lora["heap_after_attach_over_loaded_mib"]
        transient = peak - kept
        out[method] = {"peak_over_lora_mib": peak, "peak_over_lora_layers": peak / layer,
                       "kept_over_lora_mib": kept, "offsets_mib": r["offsets_mib"],
                       "transient_over_lora_mib": transient, "transient_over_lora_layers": transient / layer,
                       "w0_growth_over_moves_mib": max(x["heap_growth_over_moves_mib"] for x in runs[method]),
                       "rss_peak_over_lora_mib": r["attach_peak_rss_over_loaded_mib"]
                       - lora["attach_peak_rss_over_loaded_mib"]}
    return out


def merge_error(spec: str, batch_size: int) -> dict[str, float]:
    """Relative output error of merge_and_unload on the nf4 base (dequantized to float, or re-quantized to nf4)
    against the unmerged adapted model: LoRA with B random at the size of a short fine-tune's update."""
    def adapted_model() -> tuple[torch.nn.Module, Any]:
        model, tok = load_model(spec, "causal-lm", quantize="nf4")
        lorakit.attach(model, lorakit.LoraConfig(r=R, alpha=2 * R, target_modules=tuple(SMOL_TARGETS),
                                                 init_weights=False))
        with torch.no_grad():
            for layer in lorakit.adapter_layers(model).values():
                layer.lora_B.mul_(0.01)  # an update of the size a short fine-tune makes
        return model, tok

    model, tok = adapted_model()
    batch = {k: v for k, v in gsm8k_batches(tok, 1, batch_size)[0].items() if k != "labels"}
    with torch.no_grad(), lorakit.disabled(model):
        base = model(**batch).logits.float()
    with torch.no_grad():
        adapted = model(**batch).logits.float()
        dequantized = lorakit.merge_and_unload(model)(**batch).logits.float()
        model, _ = adapted_model()
        requantized = lorakit.merge_and_unload(model, requantize=True)(**batch).logits.float()

    def rel(a: torch.Tensor) -> float:
        return float((a - adapted).norm() / adapted.norm())
    return {"adapter_effect_rel_output_change": rel(base),
            "dequantized_merge_rel_output_error": rel(dequantized),
            "requantized_merge_rel_output_error": rel(requantized)}


# -- extrapolation ------------------------------------------------------------------------------------------------
# Llama-2 7B / 70B: parameters in the decoder's linear layers and in the (untied) embedding + head, LoRA r=8
# parameters on every decoder linear layer, hidden size, layers and vocabulary.
MODELS = {"7B": {"linear": 6.48e9, "embed_head": 2 * 32000 * 4096, "hidden": 4096, "layers": 32, "vocab": 32000,
                 "lora8": 8 * 32 * (4 * 2 * 4096 + 3 * (4096 + 11008)), "largest_layer": 11008 * 4096},
          "70B": {"linear": 68.45e9, "embed_head": 2 * 32000 * 8192, "hidden": 8192, "layers": 80, "vocab": 32000,
                  "lora8": 8 * 80 * (2 * 2 * 8192 + 2 * (8192 + 1024) + 3 * (8192 + 28672)),
                  "largest_layer": 28672 * 8192}}
TOKENS = 8 * 256  # the batch the extrapolated activations are given for (this benchmark's batch at full length)


def attach_growth(r: dict[str, Any]) -> float:
    """MiB the attach's peak RSS rises above the loaded model (a LoRA attach keeps all it allocates, so for a
    run without the attach-only peak, the RSS before training bounds it)."""
    return r.get("peak_rss_attach_mib", r["rss_before_training_mib"]) - r["rss_after_load_mib"]


def per_unit(measured: dict[str, dict[str, Any]], smol: dict[str, int],
             attach: dict[str, Any] | None = None) -> dict[str, float]:
    """The measured per-parameter and per-token figures of SmolLM2 that the extrapolation scales.

    Activations per token split into the decoder layers' part (gc off minus gc on is L - 1 layers' worth, scaled
    by the hidden size) and the rest (loss head: logits on the supervised positions, scaled by the vocabulary),
    less the L float32 layer inputs that gradient checkpointing keeps (exactly L x hidden x 4 bytes per token).
    """
    f, gc = measured["lorakit-float"], measured["lorakit-float-gc"]
    layers, hidden, vocab = smol["layers"], smol["hidden"], smol["vocab"]
    layer = (f["activation_bytes_per_token"] - gc["activation_bytes_per_token"]) / (layers - 1)
    rest = gc["activation_bytes_per_token"] - layer - layers * hidden * 4
    other = smol["other"] * 4  # float32 embeddings and norms stay float in every option
    out = {"float32": f["weight_mib"] * 2**20 / (smol["linear"] + smol["other"])}
    for kind in ("nf4", "int8"):
        out[kind] = (measured[f"lorakit-{kind}"]["weight_mib"] * 2**20 - other) / smol["linear"]
    # LoRA-GA's attach runs forward and backward passes on its init batch: activations, extrapolated as such
    moved = {"pissa": (attach_growth(measured["lorakit-pissa"]) - attach_growth(f)) * 2**20 / smol["linear"]}
    in_layers = {}
    if attach is not None:  # the layer-by-layer attach (`--attach`): its extra peak in largest layers
        moved = {}
        in_layers = {m: v["transient_over_lora_layers"] for m, v in attach_summary(attach).items()
                     if m != "lora-ga"}
    return {"extra_attach_peak_largest_layers": in_layers,
            "weight_bytes_per_linear_param": out, "adapter_bytes_per_param": ADAM_BYTES,
            "activation_bytes_per_token_per_layer_per_hidden": layer / hidden,
            "activation_bytes_per_token_rest_per_vocab": rest / vocab,
            "extra_attach_peak_bytes_per_linear_param": moved}


def extrapolate(units: dict[str, Any]) -> dict[str, Any]:
    """GiB per option for a 7B and a 70B Llama: weights (linear layers at the measured bytes per parameter,
    embeddings and head in bf16), LoRA r=8 with AdamW, activations of `TOKENS` tokens (float32 compute, as
    measured) without and with gradient checkpointing."""
    w = units["weight_bytes_per_linear_param"]
    options = {"bf16": 2.0, "int8": w["int8"], "nf4": w["nf4"]}
    out: dict[str, Any] = {}
    for size, spec in MODELS.items():
        layer = units["activation_bytes_per_token_per_layer_per_hidden"] * spec["hidden"]
        rest = units["activation_bytes_per_token_rest_per_vocab"] * spec["vocab"]
        act_off = spec["layers"] * layer + rest
        act_on = spec["layers"] * spec["hidden"] * 4 + layer + rest
        adapter = spec["lora8"] * ADAM_BYTES
        row: dict[str, Any] = {"adapter+AdamW GiB": adapter / 2**30, "activations GiB (gc off)": TOKENS * act_off
                               / 2**30, "activations GiB (gc on)": TOKENS * act_on / 2**30}
        for option, b in options.items():
            weights = spec["linear"] * b + spec["embed_head"] * 2.0
            row[f"{option} weights GiB"] = weights / 2**30
            for gc_on, act in (("off", act_off), ("on", act_on)):
                row[f"{option} total GiB (gc {gc_on})"] = (weights + adapter + TOKENS * act) / 2**30
        for method, b in units["extra_attach_peak_bytes_per_linear_param"].items():
            row[f"{method} extra attach peak GiB"] = spec["linear"] * b / 2**30
        for method, n in units.get("extra_attach_peak_largest_layers", {}).items():
            # the saved offsets (one adapter's worth) plus the measured transient in largest layers, float32
            row[f"{method} extra attach peak GiB (float32)"] = (spec["lora8"] * 4 + max(n, 0.0)
                                                                * spec["largest_layer"] * 4) / 2**30
        out[size] = row
    return out


def verdict(value: float, limit: float) -> str:
    return f"{value:.3f} (target <= {limit}: {'MET' if value <= limit else 'NOT MET'})"


def targets(m: dict[str, dict[str, Any]]) -> dict[str, str]:
    f = m["lorakit-float"]
    pairs = [(m[f"lorakit-nf4{s}"]["step_s"], m[f"peft-qlora{s}"]["step_s"]) for s in ("", "#2")]
    ratio = sum(a for a, _ in pairs) / sum(b for _, b in pairs)

    def ratio_of(a: str, b: str, key: str) -> str:
        return f"{m[a][key] / m[b][key]:.3f}"
    return {
        "nf4 model-weight memory / float": verdict(m["lorakit-nf4"]["weight_mib"] / f["weight_mib"], 0.35),
        "int8 model-weight memory / float": ratio_of("lorakit-int8", "lorakit-float", "weight_mib"),
        "lorakit nf4 step / PEFT QLoRA step (both A B B A rounds)": verdict(ratio, 1.0) + " (rounds: "
        + ", ".join(f"{a / b:.3f}" for a, b in pairs) + ")",
        "lorakit nf4 peak RSS / PEFT QLoRA peak RSS": ratio_of("lorakit-nf4", "peft-qlora", "peak_rss_mib"),
        "PiSSA attach+step peak / LoRA": verdict(m["lorakit-pissa"]["peak_rss_attach_step_mib"]
                                                 / f["peak_rss_attach_step_mib"], 1.05),
        "LoRA-GA attach+step peak / LoRA": verdict(m["lorakit-lora-ga"]["peak_rss_attach_step_mib"]
                                                   / f["peak_rss_attach_step_mib"], 1.05),
        "gradient checkpointing: training peak RSS on / off": ratio_of("lorakit-float-gc", "lorakit-float",
                                                                        "peak_rss_training_mib"),
        "gradient checkpointing: step time on / off": ratio_of("lorakit-float-gc", "lorakit-float", "step_s"),
    }


def markdown(res: dict[str, Any]) -> str:
    m = res["configs"]
    lines = ["# Scale: quantized bases, moved-W0 inits, gradient checkpointing (SmolLM2-135M, GSM8K batch 8, r=8)",
             "", f"Command: `{res['command']}`; {res['machine']}.", "",
             f"Load average (1 min) over the run: {res['load_average']}; each configuration's before/after is in "
             "scale.json (`load_average_before_after`).", "",
             "| config | weights MiB | loading peak MiB | RSS loaded MiB | attach peak MiB | attach+1 step peak MiB "
             "| training peak MiB | s/step | activations KiB/token | load avg before/after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in m.items():
        load = "/".join(f"{x:.1f}" for x in r["load_average_before_after"])
        attach = f"{r['peak_rss_attach_mib']:.0f}" if "peak_rss_attach_mib" in r else "-"
        lines.append(f"| {name} | {r['weight_mib']:.0f} | {r['peak_rss_load_mib']:.0f} | {r['rss_after_load_mib']:.0f} "
                     f"| {attach} | {r['peak_rss_attach_step_mib']:.0f} | {r['peak_rss_training_mib']:.0f} "
                     f"| {r['step_s']:.2f} | {r['activation_bytes_per_token'] / 1024:.0f} | {load} |")
    lines += ["", "## Targets", ""] + [f"- {k}: {v}" for k, v in res["targets"].items()]
    lines += ["", "## Merge on the nf4 base (relative output error against the unmerged adapter)", ""]
    lines += [f"- {k}: {v:.4g}" for k, v in res["merge"].items()]
    u = res["per_unit"]
    lines += ["", "## Measured per-unit figures", "",
              "- weight bytes per linear-layer parameter: " + ", ".join(
                  f"{k} {v:.3f}" for k, v in u["weight_bytes_per_linear_param"].items()),
              f"- adapter + AdamW bytes per trainable parameter: {u['adapter_bytes_per_param']} (float32 weight, "
              "gradient, two moments)",
              f"- activations per token per decoder layer per hidden unit: "
              f"{u['activation_bytes_per_token_per_layer_per_hidden']:.1f} bytes; loss head per token per "
              f"vocabulary entry: {u['activation_bytes_per_token_rest_per_vocab']:.2f} bytes",
              *(["- attach peak above the loaded model, beyond LoRA's, per linear-layer parameter: " + ", ".join(
                  f"{k} {v:.3f} bytes" for k, v in u["extra_attach_peak_bytes_per_linear_param"].items())]
                if u["extra_attach_peak_bytes_per_linear_param"] else []),
              *(["- attach transient beyond LoRA's (its peak less what the attach keeps), in float32 copies of "
                 "the largest targeted layer: " + ", ".join(
                  f"{k} {v:.2f}" for k, v in u["extra_attach_peak_largest_layers"].items())]
                if u.get("extra_attach_peak_largest_layers") else []),
              "", f"## Extrapolated GiB (Llama-2 7B / 70B, LoRA r=8 all linear, AdamW, {TOKENS} tokens per step, "
              "float32 compute as measured)", ""]
    cols = list(res["extrapolation"]["7B"])
    lines += ["| quantity | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    lines += [f"| {c} | " + " | ".join(f"{res['extrapolation'][s][c]:.1f}" for s in MODELS) + " |" for c in cols]
    if "attach" in res:
        lines += attach_markdown(res["attach"])
    lines += ["", *res["notes"], ""]
    return "\n".join(lines)


def attach_markdown(attach: dict[str, Any]) -> list[str]:
    """The `--attach` section: every run, then each W0-moving init's extra peak over LoRA's."""
    runs, summary = attach["runs"], attach_summary(attach)
    layer = runs["lora"][0]["largest_layer_float32_mib"]
    lines = ["", "## Attach peak of the W0-moving inits (layer by layer)", "",
             f"Command: `{attach['command']}`; {attach['machine']}. Each attach ran in its own process. Largest "
             f"targeted layer (float32): {layer:.2f} MiB; all "
             f"targeted layers: {runs['lora'][0]['linear_float32_mib']:.0f} MiB.", "",
             "| method | attach s | peak live heap over loaded MiB | peak RSS over loaded MiB | live heap after attach "
             "over loaded MiB | heap growth over the moves, less offsets, MiB | load avg before/after |",
             "|---|---|---|---|---|---|---|"]
    for method, rs in runs.items():
        for i, r in enumerate(rs):
            load = "/".join(f"{x:.1f}" for x in r["load_average_before_after"])
            lines.append(f"| {method}{'#2' if i else ''} | {r['attach_s']:.1f} | "
                         f"{r['attach_peak_heap_over_loaded_mib']:.1f} | {r['attach_peak_rss_over_loaded_mib']:.1f} "
                         f"| {r['heap_after_attach_over_loaded_mib']:.1f} | {r['heap_growth_over_moves_mib']:.1f} "
                         f"| {load} |")
    lines += ["", "Extra over LoRA's attach (the method's run with the higher heap peak against LoRA's lower one; "
              "live heap, MiB; layers = float32 copies of the largest targeted layer):", "",
              "| method | extra peak | = kept after attach | of which saved offsets | + transient | transient in "
              "layers | W0 growth over the moves | extra RSS peak |", "|---|---|---|---|---|---|---|---|"]
    for method, v in summary.items():
        lines.append(f"| {method} | {v['peak_over_lora_mib']:.1f} ({v['peak_over_lora_layers']:.1f} layers) | "
                     f"{v['kept_over_lora_mib']:.1f} | {v['offsets_mib']:.1f} | {v['transient_over_lora_mib']:.1f} "
                     f"| {v['transient_over_lora_layers']:.2f} | {v['w0_growth_over_moves_mib']:.1f} | "
                     f"{v['rss_peak_over_lora_mib']:.1f} |")
    return lines


def smol_shape(spec: str) -> dict[str, int]:
    model, _ = load_model(spec, "causal-lm")
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in SMOL_TARGETS)
    c = model.config
    return {"linear": linear, "other": sum(p.numel() for p in model.parameters()) - linear,
            "hidden": c.hidden_size, "layers": c.num_hidden_layers, "vocab": c.vocab_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (8 for the results; 1 for a "
                                                             "quick check)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per configuration (CPU)")
    parser.add_argument("--only", action="append", choices=list(CONFIGS),
                        help="run only these configurations and print them (no results files)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--data", default=str(speed.DATA), help="the shared data folder (holds gsm8k/)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="SmolLM2-135M: the alias (its GGUF, quantized after loading) or a saved float copy "
                             "(quantized by transformers' BitsAndBytesConfig while loading; much faster to load)")
    parser.add_argument("--report", action="store_true", help="only rewrite scale.md from <out>/scale.json")
    parser.add_argument("--attach", action="store_true",
                        help="only measure the attach peak of the W0-moving inits against LoRA's (each in its own "
                             "process, twice), store it in <out>/scale.json and rewrite scale.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--attach-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        out = Path(args.out)
        res = json.loads((out / "scale.json").read_text())
        write(res | derived(res["configs"], res["smollm2"], res.get("attach")), out)
        return
    speed.DATA = Path(args.data)
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.model, args.batch)))
        return
    if args.attach_child:
        print(json.dumps(attach_child(args.attach_child, args.model, args.batch)))
        return
    if args.attach:
        out = Path(args.out)
        res = json.loads((out / "scale.json").read_text())
        res["attach"] = run_attach(args)
        write(res | derived(res["configs"], res["smollm2"], res["attach"]), out)
        return
    if args.only:
        for name in args.only:
            print(json.dumps(run_child(name, args)), flush=True)
        return
    start_load = load_average()
    measured = {}
    for name in ORDER:
        measured[name] = run_child(name.split("#")[0], args)
        measured[name]["name"] = name
        print(json.dumps(measured[name]), flush=True)
    merge = merge_error(args.model, args.batch)
    smol = smol_shape(args.model)
    res = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
           "machine": f"{os.cpu_count()} CPU cores shared with other jobs, {args.threads} torch thread(s) per "
                      f"configuration, torch {torch.__version__}",
           "load_average": f"{start_load:.1f} at the start, {load_average():.1f} at the end",
           "configs": measured, "merge": merge, "smollm2": smol, **derived(measured, smol),
           "quant_kinds": list(quant.QUANT_KINDS), "notes": []}
    write(res, Path(args.out))


def derived(measured: dict[str, dict[str, Any]], smol: dict[str, int],
            attach: dict[str, Any] | None = None) -> dict[str, Any]:
    """Targets, per-unit figures and the extrapolation, all computed from the measured configurations."""
    units = per_unit(measured, smol, attach)
    return {"targets": targets(measured), "per_unit": units, "extrapolation": extrapolate(units)}


def write(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "scale.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
