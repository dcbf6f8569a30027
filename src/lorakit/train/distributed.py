"""torchrun for `lorakit.train.trainer.train`: the process group and the collectives of a step (`Ranks`), and FSDP2
sharding of the frozen base weights (`shard_frozen_base`, which the Hugging Face integration uses too).

Data parallelism: every rank computes its share of each micro-batch (`Ranks.share`), weighting its mean loss so that
the sum over ranks is exactly the single-process mean, and the gradients are summed over ranks before clipping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..api import STATE_ATTR, AdapterState
from ..errors import ConfigError, TrainingError
from ..io.persistence import adapter_tensors
from .data import IGNORE_INDEX


def _targets(feature: Mapping[str, Any]) -> int:
    """How many terms the example adds to the mean loss: supervised next tokens, or 1 for a class label."""
    labels = feature.get("labels")
    if isinstance(labels, list):
        return sum(1 for t in labels[1:] if t != IGNORE_INDEX)
    return 1


class Share(NamedTuple):
    """This rank's part of a micro-batch."""

    indices: list[int]  # the examples this rank computes
    weight: float  # its mean loss's share of the batch's mean loss
    counted: bool  # False for FSDP's stand-in example (its tokens are not the batch's)


class Ranks:
    """torchrun data parallelism: rank, world size and the collectives of a step (a single process without it)."""

    def __init__(self, device: torch.device):
        self.created = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.created = True
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.device = device

    def share(self, indices: list[int], features: Sequence[Mapping[str, Any]], fsdp: bool) -> Share | None:
        """This rank's examples of the batch ``indices`` and their weight: the rank's share of the batch's loss
        terms, so that the weighted means summed over ranks are exactly the single-process mean.

        A short last batch of an epoch can leave a rank without examples: None (nothing to compute), or under FSDP,
        where every rank must run the forward and backward (their all-gathers), one stand-in example at weight 0."""
        shard = indices[self.rank::self.world]
        if not shard:
            return Share(indices[:1], 0.0, False) if fsdp else None
        everyone = sum(_targets(features[i]) for i in indices)
        mine = sum(_targets(features[i]) for i in shard)
        return Share(shard, mine / everyone if everyone else len(shard) / len(indices), True)

    def sum_(self, tensor: Tensor) -> None:
        if self.active:
            dist.all_reduce(tensor)

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Sum gradients over ranks (`reduce_gradients`)."""
        if self.active:
            reduce_gradients(params, self.device)

    def gather(self, value: Any) -> list[Any]:
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def check_same_start(self, model: nn.Module) -> None:
        """Every rank must start from the same adapter (or trainable parameters): same seeds and init data."""
        if not self.active:
            return
        tensors = (adapter_tensors(model).values() if getattr(model, STATE_ATTR, None) is not None
                   else [p for p in model.parameters() if p.requires_grad])
        checksum = float(sum(t.detach().double().sum() for t in tensors))
        if len(set(self.gather(checksum))) > 1:
            raise TrainingError("the ranks start from different adapters: build the model and attach the adapter "
                                "identically on every rank (same seed, same init data)")

    def check_fsdp(self, model: nn.Module) -> None:
        """``fsdp=True`` needs several ranks and a model that `shard_frozen_base` has not sharded yet."""
        if not self.active:
            raise ConfigError("fsdp=True shards the model across torchrun ranks: launch with torchrun "
                              "--nproc_per_node N (N >= 2), or train without fsdp")
        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise ConfigError("fsdp=True: the model is already sharded; give train() the unsharded model with "
                              "its adapter attached, and it shards the frozen base weights itself")

    def close(self) -> None:
        if self.created:
            dist.destroy_process_group()


def shard_frozen_base(model: nn.Module, device: torch.device) -> None:
    """FSDP2 (``fully_shard``) over the torchrun ranks: each transformers block (``_no_split_modules``), the decoder,
    the output head and the rest are units whose frozen weights each rank holds 1/world of and all-gathers for its
    forward and backward.

    The adapter (every parameter of an adapter layer but its base, and every trainable parameter) is left out of
    the sharding (``ignored_params``): it is small, every rank keeps the whole of it, and `Ranks.sum_grads`
    sums its gradients as under plain data parallelism, so hooks, optimizer, checkpoints and `save` see ordinary
    tensors and the run matches a single-process one.  What the base weights gain is 1/world of their memory.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    state: AdapterState | None = getattr(model, STATE_ATTR, None)
    kept = {p for p in model.parameters() if p.requires_grad}
    if state is not None:
        kept |= {p for layer in state.layers.values() for n, p in layer.named_parameters() if not n.startswith("base.")}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if m is not model and type(m).__name__ in block_names]
    # The decoder and the output head are units of their own: `model_loss` calls them one after the other.
    decoder = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is not model:
        units.append(decoder)
    if head is not None:
        tied = any(head.weight is p for p in decoder.parameters()) if decoder is not model else False
        if tied:
            kept.add(head.weight)  # shared with the input embedding: kept whole on every rank
        else:
            units.append(head)
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=kept)
    # The root is a unit only if weights remain: a root unit must run first, and `model_loss` never calls it.
    if any(p not in kept and not isinstance(p, DTensor) for p in model.parameters()):
        fully_shard(model, mesh=mesh, ignored_params=kept)


def reduce_gradients(params: list[nn.Parameter], device: torch.device, average: bool = False) -> None:
    """Sum (or average, as DDP does) the replicated parameters' gradients over the ranks, one flat all-reduce per
    dtype in a fixed order; a parameter that no rank touched keeps ``None``, one that only some ranks touched counts
    zero elsewhere."""
    touched = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(touched)
    live = [p for p, t in zip(params, touched.tolist()) if t > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for dtype in sorted({p.dtype for p in live}, key=str):  # the same order on every rank
        group = [p for p in live if p.dtype == dtype]
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        if average:
            flat /= dist.get_world_size()
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
            offset += p.numel()
