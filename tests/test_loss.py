"""`model_loss` computes the head only on supervised positions and must equal the model's own loss."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lorakit.core.loss import model_loss, supports_fast_loss


def _models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)),
        GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                   eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    ]


@pytest.mark.parametrize("model", _models(), ids=["llama", "gpt2"])
def test_fast_loss_equals_model_loss_and_gradients(model: torch.nn.Module) -> None:
    assert supports_fast_loss(model)
    x = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[:, :4] = -100  # prompt
    labels[0, -2:] = -100  # padding
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    batch = {"input_ids": x, "attention_mask": mask, "labels": labels}
    fast = model_loss(model, batch)
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    own = model(**batch).loss
    own.backward()
    assert torch.allclose(fast, own, atol=1e-6)
    for a, p in zip(fast_grads, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_other_models_use_their_own_loss() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=4, intermediate_size=64)).eval()
    assert not supports_fast_loss(model)
    batch = {"input_ids": torch.randint(0, 50, (2, 5)), "labels": torch.tensor([0, 1])}
    assert torch.equal(model_loss(model, batch), model(**batch).loss)
