"""Differentially private local training (DP-SGD, Abadi et al. 2016) with Opacus, as in Fed-SB's private
setting (Singhal, Ponkshe et al. 2025, arXiv 2502.15436, §DP: Opacus, per-sample clipping, RDP accountant).

Each client calibrates its noise multiplier once, for its whole budget (``target ε``, ``δ``) over every
step it will take in the run (``rounds × local_steps`` at sampling rate ``batch / n``), then trains with
Poisson-sampled batches, per-sample gradients clipped to ``max_grad_norm`` and Gaussian noise.  The RDP
accountant's history is carried from round to round, so the ε reported after each round is what the
client has spent so far.  Per-sample gradients of lorakit's adapter layers come from grad samplers
registered with Opacus (`register_grad_sampler`), in closed form from the layer's input and output
gradient; Opacus' functorch fallback cannot run them, as it refuses layers holding buffers (the frozen
factors).  The guarantee covers local training only.  Fed-SB's init is computed without noise: the default
(``init_source = server``, ``init_data = train``) reads the train split's first ``init_samples`` rows and takes
them out of the pool the clients' shards are cut from (`local.client_pool`), so no client's data is in it; with
``init_overlap`` (as the official code, whose init reads 550 SNLI training rows its first client also trains on)
or the ``client`` / ``clients`` inits it uses rows a client holds and is outside the guarantee, which the run's
result states (``privacy``, ``init_source``).  Defaults follow the official Fed-SB DP script where it states them
(clip norm 0.1, ε 3 in its example); δ defaults to 1/n examples (the script uses 1/number of batches, a weaker δ).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..core.layer import AdapterLayer
from ..methods.lora import LoraLayer
from ..methods.lora_xs import CoreLayer
from .errors import FedConfigError, FedError

ACCOUNTANT = "rdp"


@dataclass
class PrivacyState:
    """One client's DP budget and what it has spent: ``history`` is Opacus' accountant history,
    ``[noise_multiplier, sample_rate, steps]`` per training call."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    history: list[list[float]] = field(default_factory=list)

    def epsilon(self) -> float:
        """ε spent so far at this client's δ (0 before any step)."""
        if not self.history:
            return 0.0
        from opacus.accountants import RDPAccountant
        accountant = RDPAccountant()
        accountant.history = [(float(s), float(q), int(n)) for s, q, n in self.history]
        return float(accountant.get_epsilon(self.delta))

    def to_record(self) -> dict[str, Any]:
        """Flat values for a Flower ``ConfigRecord`` (kept in the client's context between rounds)."""
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "delta": self.delta,
                "max_grad_norm": self.max_grad_norm,
                "history": [float(x) for entry in self.history for x in entry]}

    @classmethod
    def from_record(cls, record: Any) -> PrivacyState:
        flat = list(record["history"])
        history = [flat[i:i + 3] for i in range(0, len(flat), 3)]
        return cls(float(record["noise_multiplier"]), float(record["sample_rate"]), float(record["delta"]),
                   float(record["max_grad_norm"]), history)


def calibrate(target_epsilon: float, delta: float | None, n_examples: int, batch_size: int, total_steps: int,
              max_grad_norm: float) -> PrivacyState:
    """The noise multiplier that spends exactly ``target_epsilon`` over ``total_steps`` (RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier
    if n_examples < 1:
        raise FedConfigError("DP training needs at least one example per client")
    delta = 1.0 / n_examples if delta is None else delta
    if not 0.0 < delta < 1.0:
        raise FedConfigError(f"delta must be in (0, 1), got {delta}")
    sample_rate = min(1.0, batch_size / n_examples)
    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                 steps=total_steps, accountant=ACCOUNTANT)
    return PrivacyState(float(sigma), sample_rate, delta, max_grad_norm)


def _inputs(layer: AdapterLayer, activations: list[torch.Tensor], backprops: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's input ``x`` and output gradient ``dy``, float, each ``(n, tokens, d)``."""
    if not isinstance(layer.dropout, nn.Identity):
        raise FedConfigError("DP training needs adapter dropout 0: per-sample gradients are formed from the "
                             "layer input, which dropout would change")
    x, dy = activations[0].float(), backprops.float()
    return x.reshape(x.shape[0], -1, x.shape[-1]), dy.reshape(dy.shape[0], -1, dy.shape[-1])


def core_grad_sample(layer: CoreLayer, activations: list[torch.Tensor], backprops: torch.Tensor,
                     ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample ``∂L/∂R`` of ``y = W0 x + s·B R A x``: ``Σ_t (s Bᵀ dy_t)(A x_t)ᵀ``."""
    x, dy = _inputs(layer, activations, backprops)
    left = (dy @ layer.lora_B.float()) * layer.scale
    return {layer.lora_R: torch.einsum("nti,ntj->nij", left, x @ layer.lora_A.float().T).to(layer.lora_R.dtype)}


def lora_grad_sample(layer: LoraLayer, activations: list[torch.Tensor], backprops: torch.Tensor,
                     ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample ``∂L/∂B = Σ_t s dy_t (A x_t)ᵀ`` and ``∂L/∂A = Σ_t (s Bᵀ dy_t) x_tᵀ`` of ``y = W0 x + s·B A x``."""
    x, dy = _inputs(layer, activations, backprops)
    out = {}
    if layer.lora_B.requires_grad:
        h = (x @ layer.lora_A.float().T) * layer.scale
        out[layer.lora_B] = torch.einsum("nto,ntr->nor", dy, h).to(layer.lora_B.dtype)
    if layer.lora_A.requires_grad:
        left = (dy @ layer.lora_B.float()) * layer.scale
        out[layer.lora_A] = torch.einsum("ntr,nti->nri", left, x).to(layer.lora_A.dtype)
    return out


def _register_grad_samplers() -> None:
    from opacus.grad_sample import register_grad_sampler
    register_grad_sampler(CoreLayer)(core_grad_sample)
    register_grad_sampler(LoraLayer)(lora_grad_sample)


def _padded_dataset(features: list[dict[str, Any]], max_length: int, pad_id: int) -> TensorDataset:
    """Fixed-length tensors (Opacus' Poisson loader collates variable batch sizes, including empty ones)."""
    if any(not isinstance(f.get("labels"), int) for f in features):
        raise FedConfigError("DP training supports classification tasks (one integer label per example)")
    ids = torch.full((len(features), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), max_length), dtype=torch.long)
    for i, f in enumerate(features):
        seq = f["input_ids"][:max_length]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    labels = torch.tensor([f["labels"] for f in features])
    return TensorDataset(ids, mask, labels)


@contextlib.contextmanager
def _private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, state: PrivacyState,
             ) -> Iterator[tuple[nn.Module, Any, DataLoader, Any]]:
    """Opacus' private module, optimizer and loader; the model is unwrapped again on exit.

    The model is wrapped with ``strict=False``: Opacus refuses trainable layers that hold buffers (it has
    BatchNorm's running statistics in mind), and lorakit's frozen factors (LoRA-SB's B and A) are buffers.
    They are constants during training, and the registered grad samplers treat them as such.
    """
    from opacus import GradSampleModule, PrivacyEngine
    _register_grad_samplers()
    engine = PrivacyEngine(accountant=ACCOUNTANT)
    engine.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state.history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure RNG and "optimal" settings advice
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
        private_model, private_opt, private_loader = engine.make_private(
            module=wrapped, optimizer=optimizer, data_loader=loader, noise_multiplier=state.noise_multiplier,
            max_grad_norm=state.max_grad_norm, poisson_sampling=True)
    try:
        yield private_model, private_opt, private_loader, engine
    finally:
        private_model.remove_hooks()
        for p in model.parameters():
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None


def private_train(model: nn.Module, features: list[dict[str, Any]], state: PrivacyState, *, steps: int,
                  batch_size: int, lr: float, max_length: int, pad_id: int, seed: int) -> list[float]:
    """``steps`` DP-SGD steps (AdamW on the privatised gradients); updates ``state.history``; returns losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FedError("DP training found no trainable parameters")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(_padded_dataset(features, max_length, pad_id), batch_size=batch_size, generator=generator)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    was_training = model.training
    model.train()
    torch.manual_seed(seed)
    try:
        with _private(model, optimizer, loader, state) as (private_model, private_opt, private_loader, engine):
            while len(losses) < steps:
                for ids, mask, labels in private_loader:
                    if len(losses) == steps:
                        break
                    if len(labels) == 0:  # Poisson sampling drew no example (probability (1-q)^n)
                        continue
                    private_opt.zero_grad(set_to_none=True)
                    loss = private_model(input_ids=ids, attention_mask=mask, labels=labels).loss
                    loss.backward()
                    private_opt.step()
                    losses.append(float(loss))
            state.history = [[float(s), float(q), float(n)] for s, q, n in engine.accountant.history]
    finally:
        model.train(was_training)
    return losses
