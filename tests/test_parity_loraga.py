"""LoRA-GA against Hugging Face PEFT 0.21 (`init_lora_weights="lora_ga"` + `preprocess_loraga`).

PEFT 0.21 deviates from the official code (B carries S[r:2r]; the stable factor is on B only), so the
parity run uses ``peft_compat=True`` with the exact gradient.  SVD signs are arbitrary, so compare the
sign-invariant quantities: initial output, the projectors B Bᵀ and AᵀA, and the output after one step.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import LoraGAConfig
from peft.tuners.lora.loraga import preprocess_loraga

import lorakit
from tests.test_init_properties import make_batches, tiny_llama


def sgd_step(model: torch.nn.Module, batches: list[dict], lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for b in batches:
        (model(**b).loss / len(batches)).backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


def test_lora_ga_matches_peft() -> None:
    # hidden 16 and r = 4: PEFT's svd_lowrank(q = 4r) then spans the whole space, i.e. it is exact
    base, batches = tiny_llama(hidden=16), make_batches()
    x = batches[0]["input_ids"]
    targets = ["q_proj", "v_proj", "up_proj"]
    theirs = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(), lora_dropout=0.0)

    def train_step() -> None:
        for b in batches:
            theirs(**b).loss.backward()
    torch.manual_seed(0)
    preprocess_loraga(theirs, config, train_step)
    theirs = get_peft_model(theirs, config)
    ours = lorakit.attach(copy.deepcopy(base), lorakit.LoraGaConfig(
        r=4, alpha=8, target_modules=tuple(targets), exact=True, peft_compat=True), data=batches)

    with torch.no_grad():
        assert torch.allclose(ours(x).logits, theirs(x).logits, atol=1e-5)
    for name, layer in lorakit.adapter_layers(ours).items():
        peft_layer = theirs.get_submodule("base_model.model." + name)
        A, B = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        assert torch.allclose(layer.lora_B @ layer.lora_B.T, B @ B.T, atol=1e-4, rtol=1e-3), name
        assert torch.allclose(layer.lora_A.T @ layer.lora_A, A.T @ A, atol=1e-4, rtol=1e-3), name

    sgd_step(ours, batches, 1e-3)
    sgd_step(theirs, batches, 1e-3)
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
    assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6
