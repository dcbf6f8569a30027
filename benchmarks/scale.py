"""Memory and speed of quantized bases and of inits that move W0 (run by hand, CPU or CUDA).

    python benchmarks/scale.py                    # every configuration (about 10 minutes on 2 CPU cores)
    python benchmarks/scale.py --steps 3 --out /tmp/x --data /work/shared/data --model /tmp/smollm2-135m

SmolLM2-135M on GSM8K (``../shared/data/gsm8k``, batch 8, max length 256), r=8 on every linear layer of the
decoder.  Each configuration runs in its own process (peak RSS from ``/proc``, sampled every millisecond):

* ``lorakit-float``, ``lorakit-nf4``, ``lorakit-int8``: lorakit LoRA on the float32 base and on its
  bitsandbytes nf4 / int8 copy (`lorakit.models.load_model(..., quantize=...)`);
* ``peft-qlora``: PEFT's LoRA on the same bitsandbytes nf4 base (QLoRA without gradient checkpointing);
* ``lorakit-pissa``, ``lorakit-lora-ga``: attach plus one training step on the float base, against
  ``lorakit-float``'s attach plus one step (the inits that move W0 keep no second copy of it).

Step time is the median of ``--steps`` steps after one warm-up step.  Model-weight memory is counted
exactly (parameters, buffers and bitsandbytes' quantization state).  The results extrapolate each option to
a 7B and a 70B Llama.  Written to ``<out>/scale.json`` and ``<out>/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import speed
import torch
from speed import SMOL_TARGETS, PeakRSS, gsm8k_batches

import lorakit
from lorakit.core import quant
from lorakit.core.loss import model_loss
from lorakit.models import load_model

ROOT = Path(__file__).resolve().parents[1]
R = 8
# name -> (base quantization, who trains, method).  Gradient checkpointing on/off is the next axis of this
# table: give each configuration a "checkpointing" flag and enable it in `child` after the model is built.
CONFIGS: dict[str, tuple[str | None, str, str]] = {
    "lorakit-float": (None, "lorakit", "lora"),
    "lorakit-nf4": ("nf4", "lorakit", "lora"),
    "lorakit-int8": ("int8", "lorakit", "lora"),
    "peft-qlora": ("nf4", "peft", "lora"),
    "lorakit-pissa": (None, "lorakit", "pissa"),
    "lorakit-lora-ga": (None, "lorakit", "lora-ga"),
}


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


def child(name: str, steps: int, spec: str) -> dict[str, Any]:
    """One configuration in this (fresh) process: load, attach, warm-up step, timed steps."""
    kind, who, method = CONFIGS[name]
    with PeakRSS() as rss:
        model, tok = load_model(spec, "causal-lm", quantize=kind)
        model.train()
        batches = gsm8k_batches(tok, 1 + (1 if method == "lora-ga" else 0) + max(steps, 1), 8)
        weights = weight_bytes(model)
        loaded = rss.current()
        t = time.perf_counter()
        if who == "peft":
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules=SMOL_TARGETS,
                                                     lora_dropout=0.0))
        else:
            config = lorakit.get_method(method).config_class(r=R, alpha=2 * R, target_modules=tuple(SMOL_TARGETS))
            data = [batches.pop()] if method == "lora-ga" else None
            lorakit.attach(model, config, data=data)
        attach_s = time.perf_counter() - t
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for i, batch in enumerate(batches):
            t = time.perf_counter()
            (model(**batch).loss if who == "peft" else model_loss(model, batch)).backward()  # PEFT's own loop
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            if i == 0:
                first_step_peak = rss.peak
    residual_error = None
    if who == "lorakit" and kind is not None:
        errors = [layer.residual_quant_error for layer in lorakit.adapter_layers(model).values()]
        residual_error = None if errors[0] is None else max(errors)
    return {"name": name, "quantize": kind, "trainer": who, "method": method, "weight_mib": weights / 2**20,
            "rss_after_load_mib": loaded, "attach_s": attach_s, "peak_rss_attach_step_mib": first_step_peak,
            "peak_rss_mib": rss.peak, "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "residual_quant_error": residual_error}


def run_child(name: str, steps: int, spec: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps), "--data",
                          str(speed.DATA), "--model", spec], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge_error(spec: str) -> dict[str, float]:
    """Relative output error of merge_and_unload(requantize=True) on the nf4 base, LoRA with random B."""
    model, tok = load_model(spec, "causal-lm", quantize="nf4")
    batch = gsm8k_batches(tok, 1, 8)[0]
    lorakit.attach(model, lorakit.LoraConfig(r=R, alpha=2 * R, target_modules=tuple(SMOL_TARGETS),
                                             init_weights=False))
    with torch.no_grad():
        for layer in lorakit.adapter_layers(model).values():
            layer.lora_B.mul_(0.01)  # an update of the size a short fine-tune makes
        adapted = model(**batch).logits.float()
        float_merged = lorakit.merge_and_unload(model)
        dequantized = float_merged(**batch).logits.float()
    model, _ = load_model(spec, "causal-lm", quantize="nf4")
    lorakit.attach(model, lorakit.LoraConfig(r=R, alpha=2 * R, target_modules=tuple(SMOL_TARGETS),
                                             init_weights=False))
    with torch.no_grad():
        for layer in lorakit.adapter_layers(model).values():
            layer.lora_B.mul_(0.01)
        requantized = lorakit.merge_and_unload(model, requantize=True)(**batch).logits.float()

    def rel(a: torch.Tensor) -> float:
        return float((a - adapted).norm() / adapted.norm())
    return {"dequantized_merge_rel_output_error": rel(dequantized),
            "requantized_merge_rel_output_error": rel(requantized)}


# -- extrapolation ------------------------------------------------------------------------------------------------
# Llama-2 7B / 70B: parameters in the decoder's linear layers and in the (untied) embedding + head.
MODELS = {"7B": {"linear": 6.48e9, "embed_head": 2 * 32000 * 4096, "hidden": 4096, "layers": 32,
                 "lora8": 8 * 32 * (4 * 2 * 4096 + 3 * (4096 + 11008))},
          "70B": {"linear": 68.45e9, "embed_head": 2 * 32000 * 8192, "hidden": 8192, "layers": 80,
                  "lora8": 8 * 80 * (2 * 2 * 8192 + 2 * (8192 + 1024) + 3 * (8192 + 28672))}}


def extrapolate(measured: dict[str, dict[str, Any]], smol_linear: int, smol_other: int) -> dict[str, Any]:
    """GiB of weights per option (bytes per linear parameter measured on SmolLM2, embeddings in bf16) plus
    LoRA r=8 with AdamW (fp32 weights, gradients and two moments: 16 bytes per adapter parameter)."""
    per_param = {}
    float_linear = 4.0
    for name in ("lorakit-nf4", "lorakit-int8"):
        other_bytes = smol_other * 4  # float32 embeddings / norms stay float
        per_param[name] = (measured[name]["weight_mib"] * 2**20 - other_bytes) / smol_linear
    options = {"bf16": 2.0, "nf4 (measured bytes/param)": per_param["lorakit-nf4"],
               "int8 (measured bytes/param)": per_param["lorakit-int8"]}
    out: dict[str, Any] = {"bytes_per_linear_param": {"float32": float_linear, **{k: v for k, v in options.items()}}}
    for size, spec in MODELS.items():
        row = {}
        adapter = spec["lora8"] * 16
        for option, b in options.items():
            weights = spec["linear"] * b + spec["embed_head"] * 2.0
            row[option] = round((weights + adapter) / 2**30, 1)
        row["pissa/lora-ga extra before this change (bf16 W0 copy)"] = round(spec["linear"] * 2.0 / 2**30, 1)
        out[size] = row
    return out


def markdown(res: dict[str, Any]) -> str:
    m = res["configs"]
    lines = ["# Scale: quantized bases and moved-W0 inits (SmolLM2-135M, GSM8K batch 8, r=8)", "",
             f"Command: `{res['command']}`; {res['threads']} threads; torch {res['torch']}.", "",
             "| config | weights MiB | peak RSS MiB | attach+1 step peak MiB | s/step | attach s |",
             "|---|---|---|---|---|---|"]
    for name, r in m.items():
        lines.append(f"| {name} | {r['weight_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_attach_step_mib']:.0f} | {r['step_s']:.2f} | {r['attach_s']:.1f} |")
    t = res["targets"]
    lines += ["", "## Targets", ""]
    for key, value in t.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "## Merge on the nf4 base", ""]
    for key, value in res["merge"].items():
        lines.append(f"- {key}: {value:.4f}")
    lines += ["", "## Extrapolated GiB (weights + LoRA r=8 AdamW state; activations not included)", "",
              "| model | " + " | ".join(k for k in res["extrapolation"]["7B"]) + " |",
              "|---" * (1 + len(res["extrapolation"]["7B"])) + "|"]
    for size in MODELS:
        lines.append(f"| {size} | " + " | ".join(str(v) for v in res["extrapolation"][size].values()) + " |")
    lines += ["", "Bytes per linear-layer parameter: " + ", ".join(
        f"{k} {v:.3f}" for k, v in res["extrapolation"]["bytes_per_linear_param"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--data", default=str(speed.DATA), help="the shared data folder (holds gsm8k/)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="SmolLM2-135M: the alias (its GGUF, quantized after loading) or a saved float copy "
                             "(quantized by transformers' BitsAndBytesConfig while loading; much faster to load)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    speed.DATA = Path(args.data)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.model)))
        return
    measured = {}
    for name in CONFIGS:
        measured[name] = run_child(name, args.steps, args.model)
        print(json.dumps(measured[name]), flush=True)
    model, _ = load_model(args.model, "causal-lm")
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in SMOL_TARGETS)
    other = sum(p.numel() for p in model.parameters()) - linear
    del model
    f, q = measured["lorakit-float"], measured
    targets = {
        "nf4 model-weight memory / float (target <= 0.35)": round(q["lorakit-nf4"]["weight_mib"] / f["weight_mib"], 3),
        "int8 model-weight memory / float": round(q["lorakit-int8"]["weight_mib"] / f["weight_mib"], 3),
        "lorakit nf4 step / PEFT QLoRA step (target <= 1)": round(q["lorakit-nf4"]["step_s"]
                                                                 / q["peft-qlora"]["step_s"], 3),
        "lorakit nf4 peak RSS / PEFT QLoRA peak RSS": round(q["lorakit-nf4"]["peak_rss_mib"]
                                                             / q["peft-qlora"]["peak_rss_mib"], 3),
        "PiSSA attach+step peak / LoRA (target <= 1.05)": round(q["lorakit-pissa"]["peak_rss_attach_step_mib"]
                                                                / f["peak_rss_attach_step_mib"], 3),
        "LoRA-GA attach+step peak / LoRA (target <= 1.05)": round(q["lorakit-lora-ga"]["peak_rss_attach_step_mib"]
                                                                  / f["peak_rss_attach_step_mib"], 3),
    }
    res = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "configs": measured, "targets": targets, "merge": merge_error(args.model),
           "extrapolation": extrapolate(measured, linear, other), "quant_kinds": list(quant.QUANT_KINDS)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "scale.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
