"""Parity with Hugging Face PEFT 0.21's AdaLoRA: the same initial tensors, data and schedule give the same masks at
every step and the same outputs.

PEFT draws its P, Q from the global RNG, so its initial tensors are copied into lorakit's layers.  PEFT scales by
α / (r + 1e-5) where lorakit (and the paper) use α / r: lorakit's α is set to α_PEFT · r / (r + 1e-5) so the two
scales agree.  Both sides run AdamW; PEFT gets ``update_and_allocate(step)`` after ``optimizer.step()`` (its
documented use), lorakit ``hooks.after_step(step)`` at the same point.
"""

from __future__ import annotations

import copy

import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import get_peft_model
from peft.tuners.adalora import SVDLinear

import lorakit
from tests.tiny_models import KINDS, assert_close, output

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, TARGET, ALPHA = 4, 2, 8.0
T, TINIT, TFINAL, DELTA_T = 14, 2, 3, 2
ORTH = 0.3
STEP_TOL = 1e-4  # the two sides round differently ((A·E)ᵀ then B vs A, E, B): ~1e-7 per step, amplified by the model


def test_adalora_masks_and_outputs_match_peft() -> None:
    kind = KINDS["llama"]
    base = kind.build(0)
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), PeftAdaLoraConfig(
        init_r=R, target_r=TARGET, lora_alpha=ALPHA, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T, total_step=T,
        beta1=0.85, beta2=0.85, orth_reg_weight=ORTH, lora_dropout=0.0, target_modules=LLAMA_TARGETS,
        task_type="CAUSAL_LM"))  # with a task type PEFT's forward goes through AdaLoraModel, which adds γ·R
    ours = lorakit.attach(copy.deepcopy(base), lorakit.AdaLoraConfig(
        r=R, target_r=TARGET, alpha=ALPHA * R / (R + 1e-5), tinit=TINIT, tfinal=TFINAL, delta_t=DELTA_T,
        orth_reg_weight=ORTH, target_modules=tuple(LLAMA_TARGETS)))
    prefix = "base_model.model."
    peft_layers = {n[len(prefix):]: m for n, m in theirs.named_modules() if isinstance(m, SVDLinear)}
    layers = lorakit.adapter_layers(ours)
    assert set(peft_layers) == set(layers)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(peft_layers[name].lora_A["default"])
            layer.lora_B.copy_(peft_layers[name].lora_B["default"])
            layer.lora_E.copy_(peft_layers[name].lora_E["default"].view(-1))
    x = kind.inputs()
    assert_close(output(ours, x), output(theirs, x), 1e-6, "initial output")

    hooks = lorakit.hooks(ours)
    hooks.on_train_begin(T)
    params_theirs = [p for p in theirs.parameters() if p.requires_grad]
    params_ours = [p for p in ours.parameters() if p.requires_grad]
    assert len(params_theirs) == len(params_ours) == 3 * len(layers)
    opt_theirs = torch.optim.AdamW(params_theirs, lr=2e-2)
    opt_ours = torch.optim.AdamW(params_ours, lr=2e-2)
    batches = kind.batches(4)
    theirs.train()
    ours.train()
    masked_steps = 0
    for step in range(T):
        batch = batches[step % len(batches)]
        loss_theirs = theirs(**batch).loss  # PEFT adds γ·R inside its forward
        loss_theirs.backward()
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()

        loss_ours = ours(**batch).loss + hooks.regularizer()
        assert abs(float(loss_ours.detach()) - float(loss_theirs.detach())) <= 1e-5 * float(loss_theirs.detach()), step
        loss_ours.backward()
        opt_ours.step()
        hooks.after_step(step)
        opt_ours.zero_grad()

        for name, layer in layers.items():
            e_theirs = peft_layers[name].lora_E["default"].detach().view(-1)
            assert torch.equal(layer.lora_E.detach() == 0, e_theirs == 0), f"mask of {name} differs at step {step}"
            assert_close(layer.lora_E.detach(), e_theirs, STEP_TOL, f"λ of {name} at step {step}")
        masked_steps += int(any(bool((layer.lora_E == 0).any()) for layer in layers.values()))
    assert masked_steps > 0
    total = sum(layer.rank for layer in layers.values())
    assert total == hooks.target_budget == TARGET * len(layers)
    assert hooks.final_mask == {name: rank_idx for name, rank_idx in
                                ((n[:-len(".lora_E.default")], v)
                                 for n, v in theirs.peft_config["default"].rank_pattern.items())}
    theirs.eval()
    ours.eval()
    assert_close(output(ours, x), output(theirs, x), STEP_TOL, "output after training")
