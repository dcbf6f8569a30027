"""Tiny seeded models for the conformance suite: a random Llama, BERT (with a classifier head), GPT-2
(transformers' ``Conv1D``) and a plain MLP, each with a fixed input batch and a few labelled batches
for data-driven inits.  Every model is float32 with dropout 0 and built in eval mode.

`KINDS` maps a kind name to a `ModelKind`; ``kind.build(seed)`` returns a fresh model (a deep copy of
a cached one, so building is cheap), ``kind.inputs()`` the fixed forward batch, ``kind.batches()``
the init/training batches (dicts with labels, passed as ``model(**batch)``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 128
SEQ = 8
# weight std of the transformers models: 0.2 (not 0.02) so a 32-wide random model has O(1) activations and
# gradients, as a trained model does; with 0.02 every signal is ~1e-3 and tolerances would test nothing.
INIT_STD = 0.2


@dataclass
class MLPOutput:
    logits: Tensor
    loss: Tensor | None = None


class TinyMLP(nn.Module):
    """``16 -> 32 -> 32 -> 8`` with ReLUs; ``forward(input, labels=None)`` returns ``.logits`` and ``.loss``
    (cross-entropy over 8 classes when labels are given), so data-driven inits can use it."""

    def __init__(self, d_in: int = 16, hidden: int = 32, n_classes: int = 8) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, hidden)
        self.act0 = nn.ReLU()
        self.lin1 = nn.Linear(hidden, hidden)
        self.act1 = nn.ReLU()
        self.lin2 = nn.Linear(hidden, n_classes)

    def forward(self, input: Tensor, labels: Tensor | None = None) -> MLPOutput:
        logits = self.lin2(self.act1(self.lin1(self.act0(self.lin0(input)))))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return MLPOutput(logits=logits, loss=loss)


def _llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, bos_token_id=0,
        eos_token_id=1, pad_token_id=2, initializer_range=INIT_STD))


def _bert() -> nn.Module:
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
        max_position_embeddings=64, num_labels=3, pad_token_id=0, initializer_range=INIT_STD))


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, bos_token_id=0, eos_token_id=1,
        initializer_range=INIT_STD))


def _mlp() -> nn.Module:
    return TinyMLP()


def _token_inputs(seed: int, batch: int = 2, labels: bool = False, classes: int | None = None,
                  attention_mask: bool = False) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, SEQ), generator=g)
    out: dict[str, Tensor] = {"input_ids": ids}
    if attention_mask:
        mask = torch.ones(batch, SEQ, dtype=torch.long)
        mask[0, -2:] = 0  # some padding, so the mask matters
        out["attention_mask"] = mask
    if labels:
        out["labels"] = torch.randint(0, classes, (batch,), generator=g) if classes else ids.clone()
    return out


def _mlp_inputs(seed: int, batch: int = 4, labels: bool = False) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"input": torch.randn(batch, 16, generator=g)}
    if labels:
        out["labels"] = torch.randint(0, 8, (batch,), generator=g)
    return out


@dataclass(frozen=True)
class ModelKind:
    """A tiny model family: how to build it and what to feed it."""

    name: str
    factory: Callable[[], nn.Module]
    make_inputs: Callable[[int, bool], dict[str, Tensor]]  # (seed, labels) -> batch
    modules_to_save: tuple[str, ...] = ()
    hf: bool = True  # a transformers PreTrainedModel (gradient checkpointing, ...)

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        """A fresh model with the weights that ``seed`` gives (independent of the global RNG state)."""
        model = copy.deepcopy(_cached(self.name, seed))
        return model.to(dtype) if dtype != torch.float32 else model

    def inputs(self, seed: int = 100, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The fixed forward batch (no labels); floating inputs in ``dtype``."""
        return _cast(self.make_inputs(seed, False), dtype)

    def batches(self, n: int = 3, seed: int = 200, dtype: torch.dtype = torch.float32) -> list[dict[str, Tensor]]:
        """``n`` labelled batches (for data-driven inits and training steps)."""
        return [_cast(self.make_inputs(seed + i, True), dtype) for i in range(n)]


def _cast(batch: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


KINDS: dict[str, ModelKind] = {
    "llama": ModelKind("llama", _llama, lambda s, lab: _token_inputs(s, labels=lab)),
    "bert": ModelKind("bert", _bert, lambda s, lab: _token_inputs(s, labels=lab, classes=3, attention_mask=True),
                      modules_to_save=("classifier",)),
    "gpt2": ModelKind("gpt2", _gpt2, lambda s, lab: _token_inputs(s, labels=lab)),
    "mlp": ModelKind("mlp", _mlp, lambda s, lab: _mlp_inputs(s, labels=lab), hf=False),
}


@functools.cache
def _cached(name: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = KINDS[name].factory()
    return model.float().eval()


def output(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """The model's logits for ``inputs`` (no grad), float32."""
    with torch.no_grad():
        return model(**inputs).logits.float()


# -- adapter helpers shared by the suites -----------------------------------------------------------------
R = 4  # small rank: every tiny layer has min(d_in, d_out) >= 8 = 2R (LoRA-GA needs 2r)


def make_config(method: Any, kind: ModelKind, seed: int = 0, **changes: Any) -> Any:
    """``method``'s config at rank `R` on every linear layer of ``kind`` (its head in modules_to_save)."""
    kwargs: dict[str, Any] = {"r": R, "target_modules": "all-linear", "modules_to_save": kind.modules_to_save,
                              "seed": seed}
    if method.name == "lora-sb":
        kwargs["init_lr"] = 1e-3  # η of the approximated first step: the bare API needs it given
    if method.name == "lora2":  # the default N(0, 0.02²) planes scale a perturbed core's update on these 8-wide
        kwargs["plane_init"] = "orthogonal"  # toys to ~1e-5, under the checks' resolution (default: test_adaptive_rank)
    kwargs.update(changes)
    return method.config_class(**kwargs)


def attach(model: nn.Module, method: Any, kind: ModelKind, seed: int = 0, **changes: Any) -> nn.Module:
    """`lorakit.attach` with ``kind``'s batches as init data where the method needs data."""
    import lorakit

    config = make_config(method, kind, seed=seed, **changes)
    dtype = next(model.parameters()).dtype
    data = kind.batches(dtype=dtype) if method.needs_data else None
    return lorakit.attach(model, config, data=data)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 7, std: float = 0.05) -> None:
    """A non-identity init for any method: seeded noise on every trainable tensor (adapter and saved heads)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(trainable(model).items()):
        p.add_(std * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str = "") -> None:
    """``max|a - b| <= tol · max(1, max|b|)``: absolute for O(1) outputs, relative for larger ones."""
    scale = max(1.0, expected.float().abs().max().item())
    diff = max_diff(actual, expected)
    assert diff <= tol * scale, f"{what}: max |diff| = {diff:.3g} > {tol:g} * {scale:.3g}"


def state_snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_steps(model: nn.Module, batches: list[dict[str, Tensor]], steps: int = 3, lr: float = 1.0) -> None:
    """``steps`` plain SGD steps on the trainable tensors, calling the method's training hooks as the trainer does."""
    import lorakit

    hooks = lorakit.hooks(model)
    hooks.on_train_begin(steps)
    opt = torch.optim.SGD(list(trainable(model).values()), lr=lr)
    model.train()
    for step in range(steps):
        hooks.before_forward(step)
        batch = batches[step % len(batches)]
        out = model(**batch)
        loss = out.loss
        hooks.after_forward(batch, loss.detach().float(), out.logits if hooks.needs_logits else None)
        reg = hooks.regularizer()
        if reg is not None:
            loss = loss + reg
        loss.backward()
        hooks.after_backward(step)
        opt.step()
        hooks.after_step(step)
        opt.zero_grad(set_to_none=True)
    model.eval()


def save_tiny_lm(out: Path, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 num_attention_heads: int) -> Path:
    """Save a random GQA Llama (2 KV heads, seed 0) with a real (BERT WordPiece) tokenizer as a local model
    directory ``out``, the stand-in for a hub model in CLI tests."""
    from transformers import AutoTokenizer

    from lorakit.models import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                         num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.cls_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
