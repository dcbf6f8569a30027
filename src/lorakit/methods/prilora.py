"""PRILoRA (Benedek & Wolf 2024, arXiv 2401.11316, Findings of EACL 2024): pruned and rank-increasing LoRA.

1. Rank rising linearly with depth (paper §3.1): the layer at depth position l of L gets
   ``r_l = round(r_min + (r_max − r_min) · l / (L − 1))``, e.g. 4 in the first block to 12 in the last.
2. Ongoing importance pruning of A (§3.2, after Wanda): with ``n_j`` an exponential moving average of the L2 norm
   of input feature j over the tokens of each training batch, the importance of ``A_ij`` is ``|A_ij| · n_j``;
   after every ``prune_interval``-th optimizer step the ``⌊prune_ratio · d_in⌋`` lowest-importance entries of each
   row of A are set to zero.  Pruning stops for the last ``final_steps`` steps.  Pruned entries stay trainable (a
   zero entry may regrow and be pruned again): the pruning shapes A, it is not a fixed mask.

LoRA update otherwise: ``ΔW = (α/r) B A`` with A Kaiming-uniform, B = 0, r = r_max (``alpha=None``: α = r_max).

Depth comes from the adapted module's name: its first purely numeric component (``model.layers.7.mlp.up_proj``
-> block 7).  Modules without one (e.g. a pooler after the last block) get r_max; a model with no numbered blocks
at all (a plain MLP) uses the order of its adapted modules as depth.  Every layer stores r_max-sized
factors and a ``rank_mask`` buffer (the first r_l entries are 1), so a saved adapter loads into freshly attached
layers; the forward and `as_lora` use only the first r_l ranks, and the export writes r_l (PEFT ``rank_pattern``)
or pads to r_max.

Choices where the paper could not be checked ([unconfirmed]): ``r_min = None`` means ⌊r_max/3⌋ (the paper's
4 -> 12); ``prune_ratio = 0.1`` per row; ``prune_interval = 1``; EMA factor 0.9.  Each layer notes its input's
column norms in its own forward (train mode with gradients only); the training hooks fold them into the EMA in
``after_forward``, once per training forward.  The EMAs are training statistics: not saved with the adapter,
carried by the trainer's checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.hooks import TrainingHooks
from ..core.layer import AdapterLayer
from ..core.registry import Method, register
from ..errors import ConfigError, TrainingError
from .adaptive import block_index, rank_metrics
from .lora import LoraLayer, lora_params


@dataclass(frozen=True)
class PriLoraConfig(AdapterConfig):
    """PRILoRA.  ``r``: rank of the deepest layer (r_max); ``r_min``: rank of the first (``None``: ⌊r/3⌋);
    ``prune_ratio``: share of each row of A zeroed per pruning; ``prune_interval``: steps between prunings;
    ``final_steps``: last steps without pruning; ``ema_beta``: EMA factor of the input norms."""

    method: ClassVar[str] = "prilora"
    r_min: int | None = None
    prune_ratio: float = 0.1
    prune_interval: int = 1
    final_steps: int = 0
    ema_beta: float = 0.9

    @property
    def min_rank(self) -> int:
        return self.r_min if self.r_min is not None else max(1, self.r // 3)

    def validate(self) -> None:
        if not 1 <= self.min_rank <= self.r:
            raise ConfigError(f"r_min must be in [1, r={self.r}] (ranks rise from r_min to r), got {self.r_min}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ConfigError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if self.prune_interval < 1 or self.final_steps < 0:
            raise ConfigError(f"prune_interval must be >= 1 and final_steps >= 0, got {self.prune_interval} "
                              f"and {self.final_steps}")
        if not 0.0 <= self.ema_beta < 1.0:
            raise ConfigError(f"ema_beta must be in [0, 1), got {self.ema_beta}")


def depth_ranks(names: Iterable[str], r_min: int, r_max: int) -> dict[str, int]:
    """``r_l`` rising linearly with depth from ``r_min`` (first block) to ``r_max`` (last); see the module docstring."""
    names = list(names)
    depth = {n: block_index(n) for n in names}
    if all(d is None for d in depth.values()):
        depth = {n: i for i, n in enumerate(names)}
    levels = sorted({d for d in depth.values() if d is not None})
    span = len(levels) - 1
    position = {d: (i / span if span else 1.0) for i, d in enumerate(levels)}
    return {n: r_max if d is None else round(r_min + (r_max - r_min) * position[d]) for n, d in depth.items()}


class PriLoraLayer(LoraLayer):
    """LoRA factors of rank r_max of which the first ``layer_rank`` are used (``rank_mask`` buffer, set at attach)."""

    def __init__(self, base: nn.Module, config: PriLoraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        self.register_buffer("rank_mask", torch.ones(config.r, device=self.lora_A.device, dtype=self.lora_A.dtype))
        self.layer_rank = config.r
        self.input_norms: Tensor | None = None  # of the last training forward's input, until the hooks take it

    @torch.no_grad()
    def set_rank(self, rank: int) -> None:
        self.rank_mask.zero_()
        self.rank_mask[:rank] = 1
        self.layer_rank = rank

    @property
    def rank(self) -> int:
        return self.layer_rank

    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        super().load_adapter_state(state)
        self.layer_rank = int(self.rank_mask.sum())

    def delta(self, x: Tensor) -> Tensor:
        # Not in backward: gradient checkpointing reruns the forward there, and each batch counts once.
        # (torch's private graph-task id is -1 outside backward; torch's own FSDP tests it the same way.  Under
        # torch.compile this Python runs once, when traced: the graph's backward replays no attribute write.)
        if self.training and torch.is_grad_enabled() and (torch.compiler.is_compiling()
                                                          or torch._C._current_graph_task_id() == -1):
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            self.input_norms = torch.linalg.vector_norm(flat, dim=0)
        k = self.layer_rank
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A[:k])
        return F.linear(h * self.scale, self.lora_B[:, :k])

    def as_lora(self) -> tuple[Tensor, Tensor]:
        k = self.layer_rank
        return self.lora_B[:, :k] * self.scale, self.lora_A[:k]

    def delta_weight(self) -> Tensor:
        B, A = self.as_lora()
        return B @ A


def initialize_ranks(model: nn.Module, layers: dict[str, AdapterLayer], config: PriLoraConfig,
                     data: Any = None, loss_fn: Any = None) -> None:
    """Give each layer its depth rank (run by `attach`; `load` restores ``rank_mask`` from the file instead)."""
    for name, rank in depth_ranks(layers, config.min_rank, config.r).items():
        layer = layers[name]
        if isinstance(layer, PriLoraLayer):
            layer.set_rank(rank)


class PriLoraHooks(TrainingHooks):
    """EMA of the input-feature norms (noted by the layers, folded in `after_forward`) and the per-row pruning of A
    after optimizer steps."""

    state_attrs = ("input_norm_ema",)

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: PriLoraConfig) -> None:
        super().__init__(model, layers, config)
        self.input_norm_ema: dict[str, Tensor] = {}

    def prilora_layers(self) -> dict[str, PriLoraLayer]:
        return {n: layer for n, layer in self.layers.items() if isinstance(layer, PriLoraLayer)}

    def on_train_begin(self, total_steps: int) -> None:
        if self.config.final_steps >= total_steps:
            raise TrainingError(f"final_steps={self.config.final_steps} leaves no step to prune in a training of "
                                f"{total_steps} steps; lower final_steps or train longer")
        super().on_train_begin(total_steps)

    def after_forward(self, batch: Any, loss: Tensor, logits: Tensor | None) -> None:
        """Fold each layer's input norms of this forward into its EMA: ``n ← β·n + (1 − β)·‖x_j‖``."""
        beta = self.config.ema_beta
        for name, layer in self.prilora_layers().items():
            norms, layer.input_norms = layer.input_norms, None
            if norms is None:
                continue
            previous = self.input_norm_ema.get(name)
            if previous is not None:
                norms = beta * previous.to(norms.device) + (1 - beta) * norms
            self.input_norm_ema[name] = norms

    @torch.no_grad()
    def share_norms(self) -> None:
        """Under torchrun each rank's EMA saw only its share of the batches: all take the ranks' mean, so that every
        rank prunes the same entries (else their adapters drift apart)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for name, layer in self.prilora_layers().items():
            norms = self.input_norm_ema.get(name)
            total = torch.zeros(layer.in_features + 1, device=layer.lora_A.device)  # sum of EMAs, ranks holding one
            if norms is not None:
                total[:-1], total[-1] = norms, 1.0
            dist.all_reduce(total)
            if total[-1] > 0:
                self.input_norm_ema[name] = total[:-1] / total[-1]

    @torch.no_grad()
    def prune(self) -> None:
        """Zero the ⌊ratio·d_in⌋ entries of lowest ``|A_ij| · n_j`` in each used row of every A."""
        self.share_norms()
        for name, layer in self.prilora_layers().items():
            norms = self.input_norm_ema.get(name)
            n_prune = int(self.config.prune_ratio * layer.in_features)
            if norms is None or n_prune == 0:
                continue
            A = layer.lora_A[:layer.layer_rank]
            importance = A.abs() * norms.to(A.device, A.dtype)[None, :]
            lowest = torch.topk(importance, n_prune, dim=1, largest=False).indices
            A.scatter_(1, lowest, 0.0)

    def after_step(self, step: int) -> None:
        if self.total_steps is None:
            raise TrainingError("PRILoRA needs the number of training steps: call hooks.on_train_begin(total_steps) "
                                "before training")
        if step < self.total_steps - self.config.final_steps and step % self.config.prune_interval == 0:
            self.prune()

    def metrics(self) -> dict[str, float]:
        return rank_metrics(self.layers)


register(Method(
    name="prilora", paper="Benedek & Wolf 2024, PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation, "
    "arXiv 2401.11316", config_class=PriLoraConfig, layer_class=PriLoraLayer,
    trainable="A, B (rank rising with depth; A pruned by |A|·‖x‖)", params_per_matrix=lora_params,
    hooks_class=PriLoraHooks, initialize=initialize_ranks))
