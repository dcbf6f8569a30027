"""BA-LoRA (Chang et al. 2024, arXiv 2408.04556): PiSSA plus three regularisers against "catastrophic
inheritance" of pre-training noise and imbalance::

    L = L_task + λ1 L_consistency + λ2 L_diversity + λ3 L_SVD

on the logits of the fine-tuned model and of the frozen pre-trained model on the same batch (official
code cyp-jlu-ai/BA-LoRA ``train.py``, ``compute_loss`` and ``svd_regularization``; defaults λ = 1e-4, 3e-4, 1e-4,
k = 3 from there):

* NLU (logits ``batch × classes``): consistency = MSE of the L2-normalised logits; diversity = the squared
  off-diagonal covariance of the logits over the batch, ``Σ_{i≠j} C_ij² / d``; SVD = ``−Σ_{i≤k} σ_i / Σ σ_i`` of
  the logit matrix.
* NLG (logits ``batch × seq × vocab``): consistency = ``KL(p_pre ‖ p_ft)`` summed over positions and vocabulary,
  divided by the batch size (``batchmean``); diversity = minus the mean token entropy of ``p_ft``; SVD = the same
  top-k share per example (the ``seq × vocab`` matrix of each sequence), averaged.

Documented choices: the pre-trained model is this model with the adapter switched off (`lorakit.disabled`: the
original W0, no second copy in memory), run in eval mode without gradients; the KL uses log-softmax for both
distributions (the official ``softmax(...).log()`` can hit log 0); the official code flattens NLG logits to
``batch × (seq·vocab)`` and then indexes singular values per example, which fails, so the SVD term is taken per
sequence as its indexing intends.  The SVD term is differentiable: the official code takes the SVD under
``torch.no_grad()``, so there the term adds no gradient and only shifts the loss value, while the paper's loss adds
λ3 L_SVD as a regulariser.  ``task`` defaults to ``"nlg"`` (the official ``task_type`` default is ``nlu``): the
default targets causal-LM fine-tuning, whose logits are per-token distributions; classification runs set
``task="nlu"``.  The batch and the logits of every training forward reach the hooks through
``after_forward`` (``needs_logits``); each forward gets one regulariser value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.hooks import TrainingHooks
from ..core.layer import AdapterLayer
from ..core.registry import Method, register
from ..core.state import disabled
from ..errors import ConfigError, TrainingError
from .lora import lora_params
from .pissa import PissaConfig, PissaLayer

TASKS = ("nlg", "nlu")


@dataclass(frozen=True)
class BaLoraConfig(PissaConfig):
    """BA-LoRA: PiSSA's fields plus the regulariser weights λ1-λ3, ``top_k`` for the SVD term and ``task``
    (``"nlg"``: token distributions; ``"nlu"``: classification logits)."""

    method: ClassVar[str] = "ba-lora"
    lambda_consistency: float = 1e-4
    lambda_diversity: float = 3e-4
    lambda_svd: float = 1e-4
    top_k: int = 3
    task: str = "nlg"

    def validate(self) -> None:
        super().validate()
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")


def consistency_loss(fine: Tensor, pre: Tensor, task: str) -> Tensor:
    """NLU: MSE of L2-normalised logits.  NLG: ``KL(p_pre ‖ p_fine)``, ``batchmean``."""
    if task == "nlu":
        return F.mse_loss(F.normalize(fine, dim=-1), F.normalize(pre, dim=-1))
    return F.kl_div(F.log_softmax(fine, dim=-1), F.log_softmax(pre, dim=-1), reduction="batchmean", log_target=True)


def diversity_loss(fine: Tensor, task: str) -> Tensor:
    """NLU: ``Σ_{i≠j} Cov_ij² / d`` over the batch.  NLG: minus the mean entropy of the token distributions."""
    if task == "nlu":
        logits = fine.reshape(-1, fine.shape[-1])
        centered = logits - logits.mean(dim=0)
        cov = centered.T @ centered / (logits.shape[0] - 1)
        off = cov - torch.diag(torch.diag(cov))
        return off.square().sum() / logits.shape[1]
    probs = F.softmax(fine, dim=-1)
    entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=-1).mean()
    return -entropy


def svd_loss(fine: Tensor, k: int) -> Tensor:
    """``−mean(Σ_{i≤k} σ_i / Σ σ_i)``, per matrix (a 2-D logit tensor is one matrix; 3-D: one per sequence)."""
    s = torch.linalg.svdvals(fine.float())
    ratio = s[..., :k].sum(dim=-1) / (s.sum(dim=-1) + 1e-10)
    return -ratio.mean()


class BaLoraHooks(TrainingHooks):
    """Keeps each training forward's batch and logits (`after_forward`) and adds the three weighted regularisers
    on them (`regularizer`)."""

    state_attrs = ("last",)

    needs_logits = True

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: BaLoraConfig) -> None:
        super().__init__(model, layers, config)
        self._forward: tuple[Mapping[str, Any], Tensor] | None = None
        self.last: dict[str, float] = {}

    def after_forward(self, batch: Any, loss: Tensor, logits: Tensor | None) -> None:
        if logits is None or not isinstance(batch, Mapping):
            raise TrainingError("BA-LoRA regularises the logits of dict batches: the front end passed "
                                f"logits={type(logits).__name__}, batch={type(batch).__name__}")
        self._forward = ({k: v for k, v in batch.items() if k != "labels"}, logits)

    @torch.no_grad()
    def pretrained_logits(self, inputs: Mapping[str, Any]) -> Tensor:
        """The frozen pre-trained model's logits on ``inputs`` (adapter off, eval mode)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with disabled(self.model):
                return self.model(**inputs).logits.detach()
        finally:
            self.model.train(was_training)

    def regularizer(self) -> Tensor | None:
        if self._forward is None:
            return None
        inputs, fine = self._forward
        self._forward = None
        c = self.config
        pre = self.pretrained_logits(inputs)
        fine32, pre32 = fine.float(), pre.float()
        terms = {"consistency": consistency_loss(fine32, pre32, c.task), "diversity": diversity_loss(fine32, c.task),
                 "svd": svd_loss(fine32, c.top_k)}
        self.last = {f"ba_{k}": float(v.detach()) for k, v in terms.items()}
        return (c.lambda_consistency * terms["consistency"] + c.lambda_diversity * terms["diversity"]
                + c.lambda_svd * terms["svd"])

    def metrics(self) -> dict[str, float]:
        return dict(self.last)


register(Method(
    name="ba-lora", paper="Chang et al. 2024, BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate "
    "Catastrophic Inheritance in Large Language Models, arXiv 2408.04556", config_class=BaLoraConfig,
    layer_class=PissaLayer, trainable="A, B (PiSSA init; W0 residual frozen)", params_per_matrix=lora_params,
    hooks_class=BaLoraHooks, base_offsets="every-layer"))
