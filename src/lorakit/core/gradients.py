"""Streaming gradient estimation for data-driven inits (LoRA-GA, LoRA-SB), at low memory.

The gradient of a linear layer ``y = W x`` over a batch is a sum of outer products,
``G = Σ_t dy_t x_tᵀ = dYᵀ X``.  A forward hook keeps each targeted layer's input X and a hook on its
output receives dY during backward, so a pass over the samples can reduce ``dYᵀ X`` to whatever the
method needs without autograd ever storing a weight gradient:

* `sketched_svd`: products ``G Ω`` and ``Gᵀ Q`` with thin matrices (subspace iteration, Halko et al.
  2011 Alg. 4.4), so no ``d_out × d_in`` matrix is ever formed; a few passes over the same samples.
* `dense_gradients`: the full G, for a group of layers at a time under a memory bound, re-running the
  samples once per group (LoRA-SB needs ``sign(G)`` element-wise, so G itself).

Passes run in train mode (as the papers' code does) with the adapters switched off, so G is the
gradient of the pretrained model; every batch is run under the same RNG seed in every pass, so
dropout masks, and hence G, are identical from pass to pass.  G is the MEAN over batches of the
gradient of each batch's loss (LoRA-GA's convention; LoRA-SB only uses its sign).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LorakitError
from . import progress
from .layer import AdapterLayer
from .linalg import orthonormalize, seeded_generator
from .loss import model_loss

LossFn = Callable[[nn.Module, Any], Tensor]
# on_grad(name, X (T×d_in), dY (T×d_out)): consumes one batch's contribution dYᵀX of one layer.
GradConsumer = Callable[[str, Tensor, Tensor], None]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@contextlib.contextmanager
def _probing(model: nn.Module, layers: Mapping[str, AdapterLayer], on_grad: GradConsumer,
             probe: Iterable[str]) -> Iterator[None]:
    """Adapters off, train mode, hooks that hand each probed layer's (X, dY) to ``on_grad``."""
    handles = []

    def make_hooks(name: str, d_in: int, d_out: int) -> tuple[Callable, Callable]:
        def pre(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if not x.requires_grad:  # nothing upstream is trainable: make dY reach this layer
                return (x.detach().requires_grad_(True), *args[1:])
            return None

        def post(module: nn.Module, args: tuple, out: Tensor) -> None:
            x = args[0].detach()

            def receive(grad: Tensor) -> None:
                on_grad(name, x.reshape(-1, d_in).float(), grad.reshape(-1, d_out).float())
            out.register_hook(receive)
        return pre, post

    was_training = model.training
    for name in probe:
        layer = layers[name]
        pre, post = make_hooks(name, layer.in_features, layer.out_features)
        handles.append(layer.base.register_forward_pre_hook(pre))
        handles.append(layer.base.register_forward_hook(post))
    for layer in layers.values():
        layer.disabled = True
    model.train()
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for layer in layers.values():
            layer.disabled = False
        model.train(was_training)


def gradient_pass(model: nn.Module, layers: Mapping[str, AdapterLayer], batches: list[Any],
                  loss_fn: LossFn | None, on_grad: GradConsumer, seed: int = 0,
                  probe: Iterable[str] | None = None) -> None:
    """One forward+backward over every batch; ``on_grad`` sees each probed layer's share of each batch's G.

    The ``.grad`` of every trainable parameter (e.g. a ``modules_to_save`` head) is left as it was, so the init
    passes never leak into the first optimizer step.
    """
    loss_fn = loss_fn or model_loss
    device = next(iter(layers.values())).base.weight.device
    devices = [device] if device.type == "cuda" else []
    grads_before = {p: None if p.grad is None else p.grad.clone() for p in model.parameters() if p.requires_grad}
    with _probing(model, layers, on_grad, layers if probe is None else probe), torch.enable_grad():
        try:
            for i, batch in progress.track(enumerate(batches), len(batches), "init: gradient passes"):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed + i)
                    loss = loss_fn(model, _to_device(batch, device))
                    if not torch.isfinite(loss):
                        raise LorakitError(f"the loss of init batch {i} is {loss.item()}: cannot initialise from it")
                    loss.backward()
        finally:
            for p, grad in grads_before.items():
                p.grad = grad


def materialize(data: Iterable[Any] | None, method: str) -> list[Any]:
    if data is None:
        raise LorakitError(f"{method} initialises from gradients: pass data= (batches)")
    batches = list(data)
    if not batches:
        raise LorakitError(f"{method}: the init data is empty; pass at least one batch")
    return batches


def sketched_svd(model: nn.Module, layers: Mapping[str, AdapterLayer], batches: list[Any],
                 loss_fn: LossFn | None, rank: int, width: int, niter: int, seed: int = 0,
                 ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Top-``rank`` SVD ``(U, S, Vh)`` of every layer's mean gradient, never forming G.

    Subspace iteration with a ``width``-column sketch: pass 1 computes ``G Ω``; each of ``niter``
    power iterations costs two passes (``Gᵀ Q`` then ``G P``); a last pass gives ``Qᵀ G``, whose small
    SVD yields the factors.  ``2 + 2·niter`` passes over the batches in all.
    """
    n = len(batches)
    device = next(iter(layers.values())).base.weight.device
    widths = {name: min(width, layer.in_features, layer.out_features) for name, layer in layers.items()}
    right = {name: torch.randn(layer.in_features, widths[name], generator=seeded_generator(seed, name)).to(device)
             for name, layer in layers.items()}

    def multiply(basis: dict[str, Tensor], transpose: bool) -> dict[str, Tensor]:
        """``G @ basis`` (or ``Gᵀ @ basis``) for every layer, from one pass."""
        acc = {name: torch.zeros(layer.in_features if transpose else layer.out_features, widths[name], device=device)
               for name, layer in layers.items()}

        def on_grad(name: str, x: Tensor, dy: Tensor) -> None:
            if transpose:   # Gᵀ M = Xᵀ (dY M)
                acc[name].add_(x.T @ (dy @ basis[name]))
            else:           # G M = dYᵀ (X M)
                acc[name].add_(dy.T @ (x @ basis[name]))
        gradient_pass(model, layers, batches, loss_fn, on_grad, seed)
        return {name: a / n for name, a in acc.items()}

    left = {name: orthonormalize(y) for name, y in multiply(right, transpose=False).items()}
    for _ in range(niter):
        right = {name: orthonormalize(z) for name, z in multiply(left, transpose=True).items()}
        left = {name: orthonormalize(y) for name, y in multiply(right, transpose=False).items()}
    projected = multiply(left, transpose=True)  # (Qᵀ G)ᵀ
    out = {}
    for name, z in projected.items():
        u_small, s, vh = torch.linalg.svd(z.T, full_matrices=False)
        out[name] = ((left[name] @ u_small)[:, :rank], s[:rank], vh[:rank])
    return out


def layer_groups(layers: Mapping[str, AdapterLayer], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of layers whose float32 gradients fit in ``max_bytes`` (at least one layer each)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, layer in layers.items():
        size = 4 * layer.in_features * layer.out_features
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _dense_group(model: nn.Module, layers: Mapping[str, AdapterLayer], group: list[str], batches: list[Any],
                 loss_fn: LossFn | None, seed: int) -> dict[str, Tensor]:
    device = layers[group[0]].base.weight.device
    acc = {name: torch.zeros(layers[name].out_features, layers[name].in_features, device=device) for name in group}

    def on_grad(name: str, x: Tensor, dy: Tensor) -> None:
        acc[name].addmm_(dy.T, x)
    gradient_pass(model, layers, batches, loss_fn, on_grad, seed, probe=group)
    return {name: g.div_(len(batches)) for name, g in acc.items()}


def dense_gradients(model: nn.Module, layers: Mapping[str, AdapterLayer], batches: list[Any],
                    loss_fn: LossFn | None, max_bytes: int, seed: int = 0) -> Iterator[dict[str, Tensor]]:
    """Yield ``{name: G}`` (mean gradient, ``d_out × d_in`` float32) one memory-bounded group at a time.

    Each group costs one pass over the batches; only the group the caller holds is in memory.
    """
    for group in layer_groups(layers, max_bytes):
        yield _dense_group(model, layers, group, batches, loss_fn, seed)
