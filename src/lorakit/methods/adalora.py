"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512, ICLR 2023): SVD-form updates whose singular values are pruned to a
global budget that shrinks on a cubic schedule.

Per adapted matrix (paper eq. 3), with ``P = lora_B`` (d_out×r), ``Λ = diag(lora_E)`` (r), ``Q = lora_A`` (r×d_in)::

    ΔW = (α/r) · P Λ Q,       y = W0 x + (α/r) · P (λ ⊙ (Q x))

λ = 0 at init (the output is unchanged), P, Q ~ N(0, 0.02²).  r is the initial rank and stays the divisor after
pruning (``ranknum`` in PEFT and the original code).

* Orthogonality (eq. 4, Frobenius norm as in the code): ``R = mean over matrices of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F``;
  the loss is ``L + γ R``.
* Importance (eq. 8-11), for every entry w of P, λ and Q, after each optimizer step with that step's gradients::

      I = |w · ∂L/∂w|,   Ī ← β1 Ī + (1 − β1) I,   Ū ← β2 Ū + (1 − β2) |I − Ī|,   s = Ī · Ū
      S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)                      (one score per triplet)

* Budget (eq. 12; b = singular values kept in the whole model, T = total steps)::

      b(t) = b(0)                                                       t ≤ t_i
      b(t) = ⌊b(T) + (b(0) − b(T)) (1 − (t − t_i)/(T − t_i − t_f))³⌋      t_i < t < T − t_f
      b(t) = b(T)                                                       t ≥ T − t_f

  Every ΔT steps (``t % ΔT == 0``) λ_i is zeroed for every triplet whose S_i is at or below the (b(0) − b(t))-th
  smallest score over ALL matrices (``torch.kthvalue``).  P and Q are kept, so a masked triplet may revive.  At
  ``t = T − t_f`` the mask becomes final (scores stop updating) and is re-applied after every later step.

Step numbering, the order of operations and the tie rule follow PEFT's ``RankAllocator`` and
``AdaLoraModel.update_and_allocate`` (which the original code shares), so the same seed, data and schedule give the
same masks (``tests/test_parity_adalora.py``).  Documented choices: the scale is α/r (PEFT divides by r + 1e-5);
γ = 0.1 by default (the paper's GLUE value; PEFT's default is 0.5); ``target_r=None`` means ⌊2r/3⌋ (the paper's
b(0) = 1.5·b(T); with r = 12 this is PEFT's init_r = 12, target_r = 8).

Defaults from the official code (QingruZhang/AdaLoRA@d10f5eb, ``NLU/scripts/run_debertav3_*.sh``; LoRA²'s scripts
reuse its schedules): α = 16 as SST-2, MNLI and QQP (CoLA, MRPC, QNLI, RTE and STS-B use 32), not PEFT's 8 and not
scale 1.  The scripts per task (``--lora_r`` / ``--target_rank`` / ``--lora_alpha`` / ``--reg_orth_coef`` /
``--init_warmup`` / ``--final_warmup`` / ``--mask_interval``; T = steps at batch 32; shares of T in brackets)::

    task   r  target  α   γ    t_i / t_f / ΔT                              T
    CoLA   3  1       32  0.1  800 (0.119) / 3500 (0.522) / 10 (0.0015)    6 700
    MNLI   3  1       16  0.1  8000 (0.093) / 50000 (0.582) / 100 (0.0012) 85 904
    MRPC   2  1       32  0.1  600 (0.174) / 1800 (0.522) / 1 (0.0003)     3 450
    QNLI   2  1       32  0.1  2000 (0.122) / 8000 (0.489) / 100 (0.0061)  16 370
    QQP    2  1       16  0.1  8000 (0.141) / 25000 (0.440) / 100 (0.0018) 56 855
    RTE    2  1       32  0.3  600 (0.154) / 1800 (0.462) / 1 (0.0003)     3 900
    SST-2  2  1       16  0.1  6000 (0.119) / 22000 (0.435) / 100 (0.0020) 50 520
    STS-B  2  1       32  0.3  800 (0.178) / 2000 (0.444) / 10 (0.0022)    4 500

The schedule scales with the run length T (``tinit``/``tfinal``/``delta_t`` = None): t_i = ⌊0.12 T⌋ and
ΔT = max(1, ⌊0.002 T⌋) are SST-2's shares; t_f = ⌊0.46 T⌋ is RTE's (SST-2's is 0.435; the scripts span
0.435-0.582).  r = 12 with ⌊2r/3⌋ = 8 kept is the paper's b(0) = 1.5 b(T), not the scripts' 2-3 -> 1.
Integers given in the config are used as they are.  The EMAs live in the hooks as tensors and
the mask state as JSON; the trainer's checkpoint carries both, so a resumed run continues bit for bit.
A layer's rank is its number of nonzero λ; `as_lora` returns exactly those triplets.

`SvdBudgetHooks` is shared with LoRA² (`lorakit.methods.lora2`): the layer says which tensors are scored
(`importance_tensors`), how their scores combine per singular value (`triplet_scores`) and what the orthogonality
terms are (`orth_terms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.hooks import TrainingHooks
from ..core.layer import AdapterLayer, init_skipped
from ..core.linalg import seeded_generator
from ..core.registry import Method, register
from ..errors import ConfigError, TrainingError
from .adaptive import RANK_PREFIX, keep_ranks

INIT_STD = 0.02  # N(0, 0.02²) for the singular vectors (PEFT / original code)
# the budget schedule's default t_i, t_f and ΔT as fractions of the run's steps (official GLUE scripts' ratios)
TINIT_FRACTION, TFINAL_FRACTION, DELTA_T_FRACTION = 0.12, 0.46, 0.002


@dataclass(frozen=True)
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA.  ``r``: initial rank per matrix; ``alpha``: scale numerator (16, official); ``target_r``: average
    final rank (``None``: ⌊2r/3⌋); ``tinit``/``tfinal``: steps before pruning starts / with the final mask;
    ``delta_t``: steps between masks (``None``: scaled with the run length, see the module docstring);
    ``beta1``/``beta2``: EMA factors; ``orth_reg_weight``: γ."""

    method: ClassVar[str] = "adalora"
    r: int = 12
    alpha: float | None = 16
    target_r: int | None = None
    tinit: int | None = None
    tfinal: int | None = None
    delta_t: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1

    @property
    def target_rank(self) -> int:
        return self.target_r if self.target_r is not None else max(1, (2 * self.r) // 3)

    def validate(self) -> None:
        if self.target_r is not None and self.target_r < 1:
            raise ConfigError(f"target_r={self.target_r} is a zero budget: every singular value would be pruned; "
                              "give target_r >= 1")
        if self.target_rank > self.r:
            raise ConfigError(f"target_r={self.target_rank} is larger than the initial rank r={self.r}: AdaLoRA only "
                              "prunes; raise r or lower target_r")
        if (self.tinit is not None and self.tinit < 0) or (self.tfinal is not None and self.tfinal < 0):
            raise ConfigError(f"tinit and tfinal must be >= 0 (or None: scaled with the run), got {self.tinit} and "
                              f"{self.tfinal}")
        if self.delta_t is not None and self.delta_t < 1:
            raise ConfigError(f"delta_t (steps between masks) must be >= 1, got {self.delta_t}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(f"beta1 and beta2 must be in (0, 1), got {self.beta1} and {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")


def normal(shape: tuple[int, ...], generator: torch.Generator, std: float = INIT_STD) -> Tensor:
    return torch.randn(*shape, generator=generator) * std


def gram_distance(m: Tensor, rows: bool) -> Tensor:
    """``‖M Mᵀ − I‖_F`` (``rows``: orthonormal rows) or ``‖Mᵀ M − I‖_F`` (orthonormal columns)."""
    gram = m @ m.T if rows else m.T @ m
    return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype))


class SvdLayer(AdapterLayer):
    """``lora_A`` = Q (r×d_in), ``lora_E`` = λ (r), ``lora_B`` = P (d_out×r); see the module docstring."""

    def __init__(self, base: nn.Module, config: AdaLoraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        r = config.r
        self.scale = config.scale
        device, dtype = self.adapter_device_dtype()
        gen = seeded_generator(config.seed, name)
        if init_skipped():
            A, E, B = torch.zeros(r, self.in_features), torch.zeros(r), torch.zeros(self.out_features, r)
        else:
            A, B = normal((r, self.in_features), gen), normal((self.out_features, r), gen)
            E = torch.zeros(r) if config.init_weights else torch.randn(r, generator=gen)
        self.lora_A = nn.Parameter(A.to(device, dtype))
        self.lora_E = nn.Parameter(E.to(device, dtype))
        self.lora_B = nn.Parameter(B.to(device, dtype))

    def delta(self, x: Tensor) -> Tensor:
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(h * (self.lora_E * self.scale), self.lora_B)

    def delta_weight(self) -> Tensor:
        return (self.lora_B * (self.lora_E * self.scale)) @ self.lora_A

    def as_lora(self) -> tuple[Tensor, Tensor]:
        """Only the triplets with λ ≠ 0 (the others contribute exactly nothing)."""
        return keep_ranks(self.lora_B * (self.lora_E * self.scale), self.lora_A, self.lora_E != 0)

    @property
    def rank(self) -> int:
        return int((self.lora_E != 0).sum())

    # -- what the budget hooks need ------------------------------------------------------------------------------
    def importance_tensors(self) -> dict[str, nn.Parameter]:
        """The tensors whose entries get a sensitivity score: all of P, λ, Q."""
        return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}

    @staticmethod
    def triplet_scores(s: dict[str, Tensor]) -> Tensor:
        """``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` (paper eq. 11)."""
        return s["lora_E"] + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)

    def orth_terms(self) -> list[Tensor]:
        return [gram_distance(self.lora_A, rows=True), gram_distance(self.lora_B, rows=False)]


class SvdBudgetHooks(TrainingHooks):
    """Orthogonality regularizer, sensitivity × uncertainty importance, cubic budget and global masking."""

    state_attrs = ("budget", "tinit", "tfinal", "delta_t", "final_mask", "allocation", "ema", "unc")

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: AdaLoraConfig) -> None:
        super().__init__(model, layers, config)
        self.budget = self.initial_budget
        self.tinit = self.tfinal = 0  # the schedule, set by on_train_begin
        self.delta_t = 1
        self.final_mask: dict[str, list[bool]] | None = None
        # ranks kept by the last mask (reported by `metrics`)
        self.allocation = {n: layer.lora_E.numel() for n, layer in self.svd_layers.items()}
        # Ī and Ū per "layer.tensor" (carried by the trainer's checkpoint)
        self.ema: dict[str, Tensor] = {}
        self.unc: dict[str, Tensor] = {}

    @property
    def svd_layers(self) -> dict[str, SvdLayer]:
        return {n: layer for n, layer in self.layers.items() if isinstance(layer, SvdLayer)}

    @property
    def initial_budget(self) -> int:
        return sum(layer.lora_E.numel() for layer in self.svd_layers.values())

    @property
    def target_budget(self) -> int:
        return self.config.target_rank * len(self.svd_layers)

    def scored_elements(self) -> int:
        """How many entries get a sensitivity/uncertainty EMA (the cost LoRA² cuts)."""
        return sum(t.numel() for layer in self.svd_layers.values() for t in layer.importance_tensors().values())

    def on_train_begin(self, total_steps: int) -> None:
        cfg = self.config
        self.tinit = cfg.tinit if cfg.tinit is not None else int(TINIT_FRACTION * total_steps)
        self.tfinal = cfg.tfinal if cfg.tfinal is not None else int(TFINAL_FRACTION * total_steps)
        self.delta_t = cfg.delta_t if cfg.delta_t is not None else max(1, int(DELTA_T_FRACTION * total_steps))
        if self.tinit >= total_steps - self.tfinal:
            raise TrainingError(f"the budget schedule (tinit={self.tinit} + tfinal={self.tfinal} steps) does not fit "
                                f"in {total_steps} training steps: no step is left to prune in; lower tinit/tfinal "
                                "or train longer")
        if self.target_budget > self.initial_budget:
            raise TrainingError(f"target budget {self.target_budget} exceeds the initial {self.initial_budget} "
                                "singular values")
        super().on_train_begin(total_steps)

    def schedule(self, step: int) -> tuple[int, bool]:
        """``(b(t), mask now?)`` for 0-based optimizer step ``step`` (PEFT's ``budget_schedule``)."""
        T = self.total_steps
        assert T is not None
        if step <= self.tinit:
            return self.initial_budget, False
        if step > T - self.tfinal:
            return self.target_budget, True
        coeff = 1 - (step - self.tinit) / (T - self.tfinal - self.tinit)
        budget = int((self.initial_budget - self.target_budget) * coeff**3 + self.target_budget)
        return budget, step % self.delta_t == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for name, layer in self.svd_layers.items():
            for key, p in layer.importance_tensors().items():
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs()
                k = f"{name}.{key}"
                ema = self.ema.get(k, torch.zeros_like(p))
                unc = self.unc.get(k, torch.zeros_like(p))
                self.ema[k] = b1 * ema + (1 - b1) * ipt
                self.unc[k] = b2 * unc + (1 - b2) * (ipt - self.ema[k]).abs()

    def scores(self) -> dict[str, Tensor]:
        """One score per singular value of every layer (zeros before any update)."""
        out = {}
        for name, layer in self.svd_layers.items():
            s = {key: self.ema[f"{name}.{key}"] * self.unc[f"{name}.{key}"] if f"{name}.{key}" in self.ema
                 else torch.zeros_like(p) for key, p in layer.importance_tensors().items()}
            out[name] = layer.triplet_scores(s)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero λ of every triplet scored at or below the global (b(0) − budget)-th smallest score."""
        scores = self.scores()
        k = self.initial_budget - budget
        keep = {name: [True] * s.numel() for name, s in scores.items()}
        if k <= 0:
            self.allocation = {name: len(kept) for name, kept in keep.items()}
            return keep
        device = next(iter(scores.values())).device
        threshold = torch.kthvalue(torch.cat([s.to(device) for s in scores.values()]), k).values.item()
        for name, layer in self.svd_layers.items():
            mask = scores[name] <= threshold
            layer.lora_E.masked_fill_(mask.to(layer.lora_E.device), 0.0)
            keep[name] = (~mask).tolist()
        self.allocation = {name: sum(k) for name, k in keep.items()}
        return keep

    @torch.no_grad()
    def apply_final_mask(self) -> None:
        assert self.final_mask is not None
        for name, layer in self.svd_layers.items():
            keep = torch.tensor(self.final_mask[name], device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep, 0.0)

    def after_step(self, step: int) -> None:
        if self.total_steps is None:
            raise TrainingError(f"{self.config.method} needs the number of training steps for its budget schedule: "
                                "call hooks.on_train_begin(total_steps) before training")
        final = self.total_steps - self.tfinal
        if step < final:
            self.update_importance()
            self.budget, mask_now = self.schedule(step)
            if mask_now:
                self.mask_to_budget(self.budget)
        elif step == final:
            self.budget = self.target_budget
            self.final_mask = self.mask_to_budget(self.budget)
            self.ema.clear()
            self.unc.clear()
        else:
            self.apply_final_mask()

    def check_state(self, values: dict[str, Any]) -> None:
        """A checkpoint's schedule, budget, masks and EMAs must fit these layers (PEFT's ``RankAllocator`` keeps the
        same: ``ipt``/``exp_avg_unc`` shaped like each parameter, non-negative)."""
        super().check_state(values)
        total = values.get("total_steps", self.total_steps) or 0
        tinit, tfinal = values.get("tinit", self.tinit), values.get("tfinal", self.tfinal)
        if tinit < 0 or tfinal < 0 or tinit >= total - tfinal:
            raise ValueError(f"tinit/tfinal must be >= 0 and leave steps to prune in {total}, got {tinit}/{tfinal}")
        if values.get("delta_t", self.delta_t) < 1:
            raise ValueError(f"delta_t must be a positive integer, got {values['delta_t']}")
        if not self.target_budget <= values.get("budget", self.budget) <= self.initial_budget:
            raise ValueError(f"budget must be in [{self.target_budget}, {self.initial_budget}], got {values['budget']}")
        sizes = {n: layer.lora_E.numel() for n, layer in self.svd_layers.items()}
        allocation = values.get("allocation", self.allocation)
        if set(allocation) != set(sizes) or any(not 0 <= k <= sizes[n] for n, k in allocation.items()):
            raise ValueError(f"allocation must give each of the {len(sizes)} layers a rank in [0, r], got "
                             f"{allocation!r:.200}")
        mask = values.get("final_mask")
        if mask is not None and (set(mask) != set(sizes) or any(
                len(m) != sizes[n] or not all(isinstance(b, bool) for b in m) for n, m in mask.items())):
            raise ValueError("final_mask must hold one list of r booleans per layer")
        shapes = {f"{n}.{key}": p.shape for n, layer in self.svd_layers.items()
                  for key, p in layer.importance_tensors().items()}
        ema, unc = values.get("ema", self.ema), values.get("unc", self.unc)
        if set(ema) != set(unc):
            raise ValueError("ema and unc must score the same tensors")
        for attr, scores in (("ema", ema), ("unc", unc)):
            for key, t in scores.items():
                if key not in shapes or t.shape != shapes[key] or not t.is_floating_point():
                    raise ValueError(f"{attr}[{key!r}] does not fit a tensor of these layers (shape "
                                     f"{list(t.shape)})")
                if bool((t < 0).any()) or not bool(torch.isfinite(ema[key] * unc[key]).all()):
                    raise ValueError(f"{attr}[{key!r}] must be >= 0 with finite scores (ema x unc)")

    def regularizer(self) -> Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        terms = [t for layer in self.svd_layers.values() for t in layer.orth_terms()]
        return self.config.orth_reg_weight * torch.stack([t.float() for t in terms]).mean()

    def metrics(self) -> dict[str, float]:
        """The budget and the ranks the last mask allocated (between masks, with ΔT > 1, masked λ may revive:
        ``layer.rank`` and the export count those too)."""
        ranks = {f"{RANK_PREFIX}{n}": float(k) for n, k in self.allocation.items()}
        return {"budget": float(self.budget), "total_rank": float(sum(self.allocation.values())), **ranks}


def adalora_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    return config.r * (d_in + d_out + 1)


register(Method(
    name="adalora", paper="Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient "
    "Fine-Tuning, arXiv 2303.10512", config_class=AdaLoraConfig, layer_class=SvdLayer, trainable="P, λ, Q",
    params_per_matrix=adalora_params, hooks_class=SvdBudgetHooks))
