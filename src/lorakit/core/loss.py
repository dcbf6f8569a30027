"""The training loss, computed where it is needed.

A causal LM fine-tuned on completions only needs logits at the supervised positions, yet
``model(**batch).loss`` projects every position onto the vocabulary (for SmolLM2, a 576 x 49152
matmul per token, forward and backward).  `model_loss` runs the decoder, then the output head on the
supervised positions only: the same mean cross-entropy as ``model(**batch).loss``, for less work.
It takes that path only for architectures whose head is a plain projection (no logit soft-capping or
scaling); anything else falls back to the model's own loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError

PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo", "olmo2", "smollm3"})
IGNORE_INDEX = -100


def _own_loss(model: nn.Module, batch: Mapping[str, Any], logits: bool) -> tuple[Tensor, Tensor | None]:
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise LorakitError("model(**batch) returned no loss: include labels in the batches or pass loss_fn=")
    if not logits:
        return loss, None
    return loss, out["logits"] if isinstance(out, Mapping) else out.logits


def supports_fast_loss(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in PLAIN_HEAD_MODELS
            and not getattr(config, "final_logit_softcapping", None)
            and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
            and getattr(model, "base_model", model) is not model)


def model_loss(model: nn.Module, batch: Any) -> Tensor:
    """Mean next-token cross-entropy over supervised tokens (causal LMs), else ``model(**batch).loss``."""
    return model_forward(model, batch, logits=False)[0]


def model_forward(model: nn.Module, batch: Any, logits: bool) -> tuple[Tensor, Tensor | None]:
    """`model_loss`, and with ``logits`` the logits of every position (on the supervised-positions path, the
    output head applied to the decoder's hidden states; else the model output's ``logits``)."""
    if not isinstance(batch, Mapping):
        raise LorakitError(f"the default loss needs dict batches (model(**batch).loss); got {type(batch).__name__}: "
                           "pass loss_fn=(model, batch) -> loss")
    labels = batch.get("labels")
    if labels is None or labels.ndim != 2 or not supports_fast_loss(model):
        return _own_loss(model, batch, logits)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    head = model.get_output_embeddings()
    loss = F.cross_entropy(head(hidden[:, :-1][keep]).float(), targets[keep])
    return loss, head(hidden) if logits else None
