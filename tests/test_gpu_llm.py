"""``benchmarks/gpu_llm.py --tiny``: the GPU benchmark's code on CPU with toy shapes, so it is ready for a lent GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_llm", ROOT / "benchmarks" / "gpu_llm.py")
gpu_llm = importlib.util.module_from_spec(_spec)
sys.modules["gpu_llm"] = gpu_llm  # its dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(gpu_llm)

CASES = ["tiny/peft-lora", "tiny/lorakit-lora", "tiny/lorakit-lora-compiled", "tiny/peft-adalora",
         "tiny/lorakit-adalora", "tiny/peft-lora-ckpt", "tiny/lorakit-lora-ckpt", "tiny/lorakit-lora-ga"]


def test_tiny_run_writes_every_case_with_ratios_to_peft(tmp_path: Path) -> None:
    torch._dynamo.reset()
    report = gpu_llm.main(["--tiny", "--steps", "2", "--warmup", "1", "--backend", "aot_eager", "--out", str(tmp_path),
                           "--only", ",".join(CASES)])
    assert json.loads((tmp_path / "llm.json").read_text()) == json.loads(json.dumps(report))
    markdown = (tmp_path / "llm.md").read_text()
    results = report["results"]
    assert list(results) == CASES
    for key in CASES:
        r = results[key]
        assert "error" not in r and "skipped" not in r, (key, r)
        assert r["tokens_per_s"] > 0 and math.isfinite(r["last_loss"]) and len(r["step_s"]) == 2
        assert f"| {key} |" in markdown
        if r["case"]["library"] == "lorakit" and key != "tiny/lorakit-lora-ga":
            assert r["vs_peft"]["tokens_per_s"] > 0 and r["vs_peft"]["init_s"] > 0
    assert results["tiny/lorakit-lora-compiled"]["vs_peft"]["peft_case"] == "tiny/peft-lora"  # against PEFT eager
    assert "vs_peft" not in results["tiny/lorakit-lora-ga"] or results["tiny/lorakit-lora-ga"]["vs_peft"][
        "tokens_per_s"] is None
    # Same batches, same loss: LoRA (B = 0) starts at the base model's loss in both libraries.
    assert abs(results["tiny/lorakit-lora"]["last_loss"] - results["tiny/peft-lora"]["last_loss"]) < 1e-2


def test_budget_skips_cases_and_says_so(tmp_path: Path) -> None:
    report = gpu_llm.main(["--tiny", "--budget", "0", "--out", str(tmp_path)])
    assert report["results"] and all("budget" in r["skipped"] for r in report["results"].values())
    assert "budget" in (tmp_path / "llm.md").read_text()


def test_llm_shapes_are_built_in_bf16_without_materializing() -> None:
    """The 8B model is created directly in bf16 on the target device (here 'meta': no memory at all), so no float32
    copy of its 8 billion weights ever exists on the host."""
    for shape, params in (("llama-3-8b", 8_030_261_248), ("llama-3.2-1b", 1_235_814_400)):
        model = gpu_llm.build_model(shape, torch.device("meta"))
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert sum(p.numel() for p in model.parameters()) == params
