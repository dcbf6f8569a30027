"""Structured pruning of a Llama-architecture causal LM in the LLM-Pruner setting (Ma et al. 2023, arXiv 2305.11627),
the starting point of RankAdaptor's recovery fine-tune.

Importance is LLM-Pruner's first-order Taylor score (its ``--pruner_type taylor --taylor param_first``):
``I(w) = |w · ∂L/∂w|`` with the gradient of the LM loss summed over a few calibration batches, and a group's
importance the sum over its weights (LLM-Pruner's default ``sum`` aggregation).  Two kinds of groups:

* an MLP channel ``j``: row ``j`` of ``gate_proj`` and ``up_proj`` and column ``j`` of ``down_proj``;
  ``round(ratio · intermediate_size)`` channels of lowest importance are removed in every pruned block;
* a query head: its ``head_dim`` rows of ``q_proj`` and columns of ``o_proj``.  Grouped-query attention stays valid
  by removing the same number, ``round(ratio · q_per_kv)`` (at least one head kept), of query heads from every
  KV group, the least important within each group; K/V heads are all kept (a KV group has no importance of its
  own in LLM-Pruner's head-level pruning, and removing whole groups is too coarse for 3 KV heads).

``ratio`` is LLM-Pruner's ``--pruning_ratio``: the share of each pruned block's channels, not of the whole model;
`PruneReport` gives the parameter share actually removed.  LLM-Pruner keeps the first 4 and the last 2 decoder
layers unpruned (``--block_*_layer_start 4 --block_*_layer_end 30`` on 32-layer LLaMA): ``first=4, last=2``.

Blocks then have different widths, which one ``LlamaConfig`` cannot describe: the saved directory is a standard
``config.json`` (it loads with ``from_pretrained``) plus ``lorakit_pruned_layers`` (each block's query heads and
MLP width) and safetensors weights; `load_pruned` rebuilds the model from both, and `lorakit.models.load_model`
(so ``lorakit train --model DIR``) calls it on a directory whose config has that key.  Nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import ConfigError, LorakitError

PRUNED_KEY = "lorakit_pruned_layers"


class PruneError(LorakitError):
    """A model that cannot be pruned, or a pruned directory that cannot be loaded."""


@dataclass(frozen=True)
class PruneReport:
    """``params_before``/``params_after``: all parameters (tied embeddings once); ``layers``: each block's
    ``{"heads": query heads, "intermediate": MLP width}`` after pruning; ``pruned_blocks``: the blocks pruned."""

    ratio: float
    params_before: int
    params_after: int
    pruned_blocks: tuple[int, ...]
    layers: tuple[dict[str, int], ...]

    @property
    def removed_share(self) -> float:
        return 1 - self.params_after / self.params_before


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    config = getattr(model, "config", None)
    if layers is None or getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2"):
        raise PruneError(f"structured pruning needs a Llama-architecture causal LM (model.model.layers); got "
                         f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})")
    return layers


def _select(linear: nn.Linear, keep: Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` with the output rows (``dim=0``) or input columns (``dim=1``) ``keep`` of ``linear``."""
    weight = linear.weight.detach().index_select(dim, keep.to(linear.weight.device))
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, keep.to(bias.device))
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def taylor_scores(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``|w · Σ_batches ∂L/∂w|`` for every linear weight of the decoder blocks (float32)."""
    layers = _decoder_layers(model)
    weights = {f"{i}.{n}": m.weight for i, layer in enumerate(layers) for n, m in layer.named_modules()
               if isinstance(m, nn.Linear)}
    flags = {name: w.requires_grad for name, w in weights.items()}
    grads = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    seen = 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            if loss is None or not torch.isfinite(loss):
                raise PruneError(f"calibration batch {seen} gave loss {loss}; batches need labels and finite values")
            loss.backward()
            for name, w in weights.items():
                grads[name] += w.grad.float()
            seen += 1
    finally:
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(flags[name])
    if seen == 0:
        raise PruneError("no calibration batch: pass at least one batch with input_ids and labels")
    return {name: (weights[name].detach().float() * g).abs() for name, g in grads.items()}


@torch.no_grad()
def prune_llama(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], ratio: float, first: int = 4,
                last: int = 2) -> PruneReport:
    """Prune query heads and MLP channels of blocks ``first .. L−last−1`` in place (module docstring)."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"pruning ratio must be in (0, 1), got {ratio}")
    layers = _decoder_layers(model)
    config = model.config
    n = len(layers)
    if first < 0 or last < 0 or first + last >= n:
        raise ConfigError(f"first={first} and last={last} unpruned blocks leave nothing to prune in {n} blocks")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    before = _num_params(model)
    with torch.enable_grad():
        scores = taylor_scores(model, batches)
    pruned = tuple(range(first, n - last))
    shapes = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        heads = attn.q_proj.out_features // head_dim
        kv = attn.k_proj.out_features // head_dim
        width = mlp.gate_proj.out_features
        if i in pruned:
            per_group = heads // kv
            drop = min(per_group - 1, int(ratio * per_group + 0.5))
            head_score = (scores[f"{i}.self_attn.q_proj"].view(heads, head_dim, -1).sum((1, 2))
                          + scores[f"{i}.self_attn.o_proj"].view(-1, heads, head_dim).sum((0, 2)))
            keep_heads = torch.cat([g * per_group + head_score.view(kv, per_group)[g].argsort(descending=True)
                                    [:per_group - drop].sort().values for g in range(kv)])
            rows = (keep_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            attn.q_proj = _select(attn.q_proj, rows, 0)
            attn.o_proj = _select(attn.o_proj, rows, 1)
            attn.num_key_value_groups = per_group - drop
            channel = (scores[f"{i}.mlp.gate_proj"].sum(1) + scores[f"{i}.mlp.up_proj"].sum(1)
                       + scores[f"{i}.mlp.down_proj"].sum(0))
            keep = channel.argsort(descending=True)[:width - int(ratio * width + 0.5)].sort().values
            mlp.gate_proj, mlp.up_proj = _select(mlp.gate_proj, keep, 0), _select(mlp.up_proj, keep, 0)
            mlp.down_proj = _select(mlp.down_proj, keep, 1)
            heads, width = len(keep_heads), len(keep)
        shapes.append({"heads": heads, "intermediate": width})
    setattr(config, PRUNED_KEY, shapes)
    return PruneReport(ratio, before, _num_params(model), pruned, tuple(shapes))


def calibration_batches(tokenizer: Any, task: str = "arith", samples: int = 10, max_length: int = 128,
                        data_dir: str | Path | None = None, seed: int = 0) -> list[dict[str, Tensor]]:
    """``samples`` training examples of ``task`` as single-example causal-LM batches (LLM-Pruner uses 10)."""
    from .train.data import collate, encode_causal_lm, load_task

    if samples < 1:
        raise ConfigError(f"calibration samples must be >= 1, got {samples}")
    _, examples = load_task(task, "train", data_dir, seed=seed, limit=samples)
    features = encode_causal_lm(examples[:samples], tokenizer, max_length, chat_template=False)
    return [collate([f], tokenizer.pad_token_id).inputs for f in features]


def _reshape(model: nn.Module, shapes: Any, source: str) -> None:
    """Give each block of a freshly built model the widths recorded in ``shapes``."""
    layers = _decoder_layers(model)
    config = model.config
    if (not isinstance(shapes, list) or len(shapes) != len(layers)
            or not all(isinstance(s, dict) and isinstance(s.get("heads"), int) and isinstance(s.get("intermediate"),
                                                                                              int) for s in shapes)):
        raise PruneError(f"{source}: {PRUNED_KEY} must list {{'heads': int, 'intermediate': int}} for each of the "
                         f"{len(layers)} blocks, got {str(shapes)[:200]}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads
    for i, (layer, shape) in enumerate(zip(layers, shapes)):
        heads, width = shape["heads"], shape["intermediate"]
        if not (1 <= heads <= config.num_attention_heads and heads % kv == 0
                and 1 <= width <= config.intermediate_size):
            raise PruneError(f"{source}: block {i} has {heads} heads and MLP width {width}; expected a multiple of "
                             f"{kv} KV heads up to {config.num_attention_heads} and a width up to "
                             f"{config.intermediate_size}")
        attn, mlp = layer.self_attn, layer.mlp
        rows, cols = torch.arange(heads * head_dim), torch.arange(width)
        attn.q_proj, attn.o_proj = _select(attn.q_proj, rows, 0), _select(attn.o_proj, rows, 1)
        attn.num_key_value_groups = heads // kv
        mlp.gate_proj, mlp.up_proj = _select(mlp.gate_proj, cols, 0), _select(mlp.up_proj, cols, 0)
        mlp.down_proj = _select(mlp.down_proj, cols, 1)


def save_pruned(model: nn.Module, out: str | Path, tokenizer: Any = None) -> Path:
    """``config.json`` (with `PRUNED_KEY`), ``model.safetensors`` and the tokenizer, under ``out``."""
    if getattr(model.config, PRUNED_KEY, None) is None:
        raise PruneError("this model was not pruned by lorakit.prune (its config has no "
                         f"{PRUNED_KEY}); save it with save_pretrained instead")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # config + safetensors written directly: save_pretrained refuses models dequantized from GGUF
    model.config.save_pretrained(out)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares the embedding's memory; load_pruned ties it back
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_pruned(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model `save_pruned` wrote, in eval mode (weights loaded from safetensors only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise PruneError(f"{directory} has no config.json; give a directory written by `lorakit prune`")
    shapes = json.loads(config_file.read_text()).get(PRUNED_KEY)
    if shapes is None:
        raise PruneError(f"{config_file} has no {PRUNED_KEY}: not a pruned model; load it with load_model")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise PruneError(f"{directory} has no .safetensors weights")
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _reshape(model, shapes, str(config_file))
    state: dict[str, Tensor] = {}
    for file in weights:
        state.update(load_file(str(file)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor whose shape differs from the recorded widths
        raise PruneError(f"{directory}: weights do not fit the recorded shapes: {str(err)[:300]}") from err
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise PruneError(f"{directory}: weights do not fit the recorded shapes (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    return model.to(dtype).eval()


__all__ = ["PruneError", "PruneReport", "calibration_batches", "load_pruned", "prune_llama", "save_pruned",
           "taylor_scores"]
