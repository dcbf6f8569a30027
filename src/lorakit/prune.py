"""Structured pruning of a Llama-architecture causal LM as LLM-Pruner does it (Ma et al. 2023, arXiv 2305.11627;
official code ``horseee/LLM-Pruner@128a07d``: ``hf_prune.py``, ``llama3.py``, ``LLMPruner/pruner/hf_llama_pruner.py``),
the starting point of RankAdaptor's recovery fine-tune.

Importance is LLM-Pruner's first-order Taylor score (``--pruner_type taylor``, default ``--taylor param_first``):
``I(w) = |w · ∂L/∂w|`` (``TaylorImportance``: ``salience.abs().sum(1)`` per output row, ``.sum(0)`` per input
column), and a group's importance the sum over all its weights (``--grouping_strategy sum``; ``MetaPruner`` sums
the ``head_dim`` channels of a head, ``imp.view(-1, consecutive_groups).sum(1)``).  The groups, in every pruned
block (``--block_wise``):

* an MLP channel ``j``: row ``j`` of ``gate_proj`` and ``up_proj`` and column ``j`` of ``down_proj`` (root
  ``gate_proj``);
* an attention group: on standard attention (as many KV heads as query heads: LLaMA-7B, Vicuna-7B), one whole head,
  its ``head_dim`` rows of ``q_proj``, ``k_proj`` and ``v_proj`` and columns of ``o_proj``, scored over all four
  (``hf_prune.py`` lines 104-112: root ``q_proj``, ``consecutive_groups = head_dim``); on grouped-query attention, one
  whole KV group, its rows of ``k_proj``/``v_proj`` and the rows of ``q_proj`` and columns of ``o_proj`` of the query
  heads that share it (``llama3.py`` lines 107-115: root ``k_proj``, ``consecutive_groups = head_dim``; line 164
  recomputes ``num_key_value_heads``). So a KV group *is* LLM-Pruner's unit of importance on GQA models (an earlier
  lorakit docstring said it had none and pruned query heads inside each group, which on standard attention pruned no
  head); its score here sums the group's own query heads (Hugging Face's ``repeat_kv`` layout, head ``h`` reads KV
  head ``h // n_rep``), where the official ``TaylorImportance`` folds query channels onto KV channels by
  ``imp.view(len // min, min).sum(0)`` (``hf_llama_pruner.py``, the ``aligned_group_imp`` loop), i.e. by position
  modulo ``n_kv · head_dim``.

How many: ``MetaPruner.prune_local`` (``metapruner.py`` lines 249-278) removes ``n = C − int(C · (1 − ratio))`` of a
root's ``C`` output channels, rounded down to whole heads (``n // head_dim``); we do the same per block (``C`` = MLP
width, query channels on standard attention, KV channels on GQA) and keep at least one group of each kind (the
official code would leave an empty attention). On SmolLM2-135M (3 KV groups of 64 channels) ratio 0.25 therefore
removes no KV group (``192 − int(144) = 48 < 64``) and 0.635 removes one.

Calibration (`general_calibration`, the default): LLM-Pruner's ``get_examples('bookcorpus', tokenizer, 10,
seq_len=64)`` (``hf_prune.py`` line 128, one forward with ``labels=example_prompts``), 10 random 64-token windows of
distinct general-text documents, one batch, LM loss on every token. lorakit draws the windows from prose shipped in
the package (`lorakit.calibration_text`), not BookCorpus (no download at run time). Task data (`calibration_batches`)
stays available (``lorakit prune --calibration task``).

``ratio`` is LLM-Pruner's ``--pruning_ratio``, the share of each pruned block's groups, not of the whole model (its
"~20% of parameters" LLaMA-7B run uses 0.25); `PruneReport` gives the parameter share actually removed.  LLM-Pruner
keeps the first 4 and the last 2 decoder layers unpruned (``--block_*_layer_start 4 --block_*_layer_end 30`` on
32-layer LLaMA): ``first=4, last=2``.

Blocks then have different widths, which one ``LlamaConfig`` cannot describe: the saved directory is a standard
``config.json`` plus ``lorakit_pruned_layers`` (each block's query heads, KV heads and MLP width) and one
``model.safetensors``; `load_pruned` validates both (types, ranges, shapes, dtypes, finiteness) before it builds the
model at its pruned widths, and `lorakit.models.load_model` (so ``lorakit train --model DIR``) calls it on a
directory whose config has that key.  Nothing is pickled.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .core.files import read_json_object, write_files
from .errors import ConfigError, LorakitError

PRUNED_KEY = "lorakit_pruned_layers"
WEIGHTS = "model.safetensors"  # the one weights file save_pruned writes and load_pruned reads
MODEL_TYPES = ("llama", "mistral", "qwen2")
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_CONFIG_BYTES = 1 << 20


class PruneError(LorakitError):
    """A model that cannot be pruned, or a pruned directory that cannot be loaded."""


@dataclass(frozen=True)
class PruneReport:
    """``params_before``/``params_after``: all parameters (tied embeddings once); ``layers``: each block's
    ``{"heads", "kv_heads", "intermediate"}`` after pruning; ``pruned_blocks``: the blocks pruned."""

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
    if layers is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        raise PruneError(f"structured pruning needs a Llama-architecture causal LM (model.model.layers); got "
                         f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r})")
    return layers


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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


def _rows(heads: Tensor, head_dim: int) -> Tensor:
    """The channel indices of ``heads`` (each ``head_dim`` consecutive rows)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _set_attention(attn: nn.Module, q_heads: Tensor, kv_heads: Tensor, head_dim: int) -> None:
    """Keep query heads ``q_heads`` (q rows, o columns) and KV heads ``kv_heads`` (k, v rows) of ``attn``."""
    q_rows, kv_rows = _rows(q_heads, head_dim), _rows(kv_heads, head_dim)
    attn.q_proj, attn.o_proj = _select(attn.q_proj, q_rows, 0), _select(attn.o_proj, q_rows, 1)
    attn.k_proj, attn.v_proj = _select(attn.k_proj, kv_rows, 0), _select(attn.v_proj, kv_rows, 0)
    attn.num_key_value_groups = len(q_heads) // len(kv_heads)


def _set_mlp(mlp: nn.Module, keep: Tensor) -> None:
    mlp.gate_proj, mlp.up_proj = _select(mlp.gate_proj, keep, 0), _select(mlp.up_proj, keep, 0)
    mlp.down_proj = _select(mlp.down_proj, keep, 1)


def removed_groups(groups: int, size: int, ratio: float) -> int:
    """LLM-Pruner's count (``MetaPruner.prune_local``): of ``C = groups · size`` channels it removes
    ``C − int(C · (1 − ratio))``, in whole groups of ``size``; at least one group is kept."""
    channels = groups * size
    return min(groups - 1, (channels - int(channels * (1 - ratio))) // size)


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
    """Prune attention groups and MLP channels of blocks ``first .. L−last−1`` in place (module docstring)."""
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"pruning ratio must be in (0, 1), got {ratio}")
    layers = _decoder_layers(model)
    config = model.config
    n = len(layers)
    if first < 0 or last < 0 or first + last >= n:
        raise ConfigError(f"first={first} and last={last} unpruned blocks leave nothing to prune in {n} blocks")
    head_dim = _head_dim(config)
    before = _num_params(model)
    with torch.enable_grad():
        scores = taylor_scores(model, batches)
    pruned = tuple(range(first, n - last))
    shapes = []
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        heads, kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
        width = mlp.gate_proj.out_features
        if i in pruned:
            rep = heads // kv  # 1 on standard attention: a group is one head
            s = {name: scores[f"{i}.self_attn.{name}"] for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
            group = (s["q_proj"].sum(1).view(kv, rep * head_dim).sum(1) + s["o_proj"].sum(0).view(kv, -1).sum(1)
                     + s["k_proj"].sum(1).view(kv, head_dim).sum(1) + s["v_proj"].sum(1).view(kv, head_dim).sum(1))
            drop = removed_groups(kv, head_dim, ratio)  # root q_proj (standard) or k_proj (GQA)
            keep_kv = group.argsort(descending=True)[:kv - drop].sort().values
            keep_q = (keep_kv[:, None] * rep + torch.arange(rep)).flatten()
            _set_attention(attn, keep_q, keep_kv, head_dim)
            channel = (scores[f"{i}.mlp.gate_proj"].sum(1) + scores[f"{i}.mlp.up_proj"].sum(1)
                       + scores[f"{i}.mlp.down_proj"].sum(0))
            keep = channel.argsort(descending=True)[:width - removed_groups(width, 1, ratio)].sort().values
            _set_mlp(mlp, keep)
            heads, kv, width = len(keep_q), len(keep_kv), len(keep)
        shapes.append({"heads": heads, "kv_heads": kv, "intermediate": width})
    setattr(config, PRUNED_KEY, shapes)
    return PruneReport(ratio, before, _num_params(model), pruned, tuple(shapes))


def general_calibration(tokenizer: Any, samples: int = 10, seq_len: int = 64,
                        seed: int = 0) -> list[dict[str, Tensor]]:
    """LLM-Pruner's calibration (``get_bookcorpus``): ``samples`` random ``seq_len``-token windows, each from a
    different paragraph of `lorakit.calibration_text` long enough for it, as one batch with labels on every token."""
    from .calibration_text import PARAGRAPHS

    if samples < 1 or seq_len < 2:
        raise ConfigError(f"calibration needs samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    tokens = [tokenizer(text)["input_ids"] for text in PARAGRAPHS]
    long_enough = [ids for ids in tokens if len(ids) >= seq_len]
    if len(long_enough) < samples:
        raise ConfigError(f"the shipped calibration text has {len(long_enough)} paragraphs of at least {seq_len} "
                          f"tokens under this tokenizer, fewer than samples={samples}; lower --samples or "
                          "--max-length, or calibrate on task data (--calibration task)")
    rng = random.Random(seed)
    windows = []
    for ids in rng.sample(long_enough, samples):
        start = rng.randint(0, len(ids) - seq_len)
        windows.append(ids[start:start + seq_len])
    ids = torch.tensor(windows, dtype=torch.long)
    return [{"input_ids": ids, "labels": ids.clone()}]


def calibration_batches(tokenizer: Any, task: str = "arith", samples: int = 10, max_length: int = 128,
                        data_dir: str | Path | None = None, seed: int = 0) -> list[dict[str, Tensor]]:
    """``samples`` training examples of ``task`` as single-example causal-LM batches (task-data calibration)."""
    from .train.data import collate, encode_causal_lm, load_task

    if samples < 1:
        raise ConfigError(f"calibration samples must be >= 1, got {samples}")
    _, examples = load_task(task, "train", data_dir, seed=seed, limit=samples)
    features = encode_causal_lm(examples[:samples], tokenizer, max_length, chat_template=False)
    return [collate([f], tokenizer.pad_token_id).inputs for f in features]


# -- saving and loading ------------------------------------------------------------------------------------------
def save_pruned(model: nn.Module, out: str | Path, tokenizer: Any = None) -> Path:
    """``config.json`` (with `PRUNED_KEY`), ``model.safetensors`` and the tokenizer, under ``out``."""
    if getattr(model.config, PRUNED_KEY, None) is None:
        raise PruneError("this model was not pruned by lorakit.prune (its config has no "
                         f"{PRUNED_KEY}); save it with save_pretrained instead")
    # config + safetensors written directly: save_pretrained refuses models dequantized from GGUF
    config = model.config.to_json_string(use_diff=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares the embedding's memory; load_pruned ties it back

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(config)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_files(out, write, last="config.json")  # all or nothing; planted symlinks replaced, not followed


def _read_config(file: Path) -> dict[str, Any]:
    """``config.json`` as a dict, read only from a regular file of bounded size."""
    if not file.is_file():
        raise PruneError(f"{file.parent} has no config.json (a regular file); give a directory written by "
                         "`lorakit prune`")
    return read_json_object(file, MAX_CONFIG_BYTES, PruneError)


def _int(raw: Mapping[str, Any], key: str, source: str, low: int = 1, default: Any = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PruneError(f"{source}: {key} must be an integer >= {low}, got {str(value)[:80]}")
    return value


def _check_config(raw: Mapping[str, Any], source: str) -> list[dict[str, int]]:
    """Types and ranges of every field the model is built from; returns the validated per-block shapes."""
    if raw.get("model_type") not in MODEL_TYPES:
        raise PruneError(f"{source}: model_type must be one of {MODEL_TYPES}, got {str(raw.get('model_type'))[:80]}")
    sizes = {k: _int(raw, k, source) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                               "num_hidden_layers", "num_attention_heads", "max_position_embeddings")}
    heads = sizes["num_attention_heads"]
    kv = _int(raw, "num_key_value_heads", source, default=heads)
    if heads % kv:
        raise PruneError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    if raw.get("head_dim") is not None:
        _int(raw, "head_dim", source)
    elif sizes["hidden_size"] % heads:
        raise PruneError(f"{source}: hidden_size={sizes['hidden_size']} is not a multiple of {heads} heads")
    eps = raw.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise PruneError(f"{source}: rms_norm_eps must be a finite number > 0, got {str(eps)[:80]}")
    from transformers.activations import ACT2FN

    act = raw.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACT2FN:
        raise PruneError(f"{source}: hidden_act must be one of transformers' activations, got {str(act)[:80]}")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if key in raw and not isinstance(raw[key], bool):
            raise PruneError(f"{source}: {key} must be true or false, got {str(raw[key])[:80]}")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        ids = raw.get(key)
        for token in ids if isinstance(ids, list) else [ids]:
            if token is not None and (isinstance(token, bool) or not isinstance(token, int)
                                      or not 0 <= token < sizes["vocab_size"]):
                raise PruneError(f"{source}: {key} must be a token id in [0, vocab_size={sizes['vocab_size']}) or "
                                 f"null, got {str(ids)[:80]}")
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key)
        if rope is not None and (not isinstance(rope, dict) or not all(
                isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
                or (isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))
                for v in rope.values())):
            raise PruneError(f"{source}: {key} must be null or an object of strings and finite numbers, got "
                             f"{str(rope)[:120]}")
        if rope is not None:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            kind, factor = rope.get("rope_type", rope.get("type", "default")), rope.get("factor", 1.0)
            if kind not in ("default", *ROPE_INIT_FUNCTIONS) or not isinstance(factor, (int, float)) or factor < 1:
                raise PruneError(f"{source}: {key} needs a rope_type among default, {', '.join(ROPE_INIT_FUNCTIONS)} "
                                 f"and a factor >= 1, got {str(rope)[:120]}")
    shapes = raw.get(PRUNED_KEY)
    if not isinstance(shapes, list) or len(shapes) != sizes["num_hidden_layers"]:
        raise PruneError(f"{source}: {PRUNED_KEY} must list one entry for each of the num_hidden_layers="
                         f"{sizes['num_hidden_layers']} blocks, got {str(shapes)[:120]}")
    out = []
    for i, shape in enumerate(shapes):
        if not isinstance(shape, dict) or not {"heads", "intermediate"} <= set(shape) <= {"heads", "kv_heads",
                                                                                            "intermediate"}:
            raise PruneError(f"{source}: {PRUNED_KEY}[{i}] must be {{'heads', 'kv_heads', 'intermediate'}}, got "
                             f"{str(shape)[:120]}")
        where = f"{source}: {PRUNED_KEY}[{i}]"
        # directories from before whole-KV-group pruning have no kv_heads: they kept every KV head
        block = {"heads": _int(shape, "heads", where), "kv_heads": _int(shape, "kv_heads", where, default=kv),
                 "intermediate": _int(shape, "intermediate", where)}
        if not (block["heads"] <= heads and block["kv_heads"] <= kv and block["heads"] % block["kv_heads"] == 0
                and block["intermediate"] <= sizes["intermediate_size"]):
            raise PruneError(f"{where}: block {i} has {block['heads']} heads, {block['kv_heads']} KV heads and MLP "
                             f"width {block['intermediate']}; expected a multiple of its KV heads up to {heads}, "
                             f"at most {kv} KV heads and a width up to {sizes['intermediate_size']}")
        out.append(block)
    return out


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name -> (shape, dtype)`` from the safetensors header, without reading the tensors."""
    if not file.is_file():
        raise PruneError(f"{file.parent} has no {WEIGHTS} (a regular file); give a directory written by "
                         "`lorakit prune`")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise PruneError(f"{file} is not a readable safetensors file: {str(err)[:200]}") from err


def _build(config: Any, shapes: list[dict[str, int]], dtype: torch.dtype) -> nn.Module:
    """The model at its pruned widths, on the meta device (no memory): weights come from `load_pruned`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head_dim = _head_dim(config)
    for layer, shape in zip(model.model.layers, shapes):
        rep = shape["heads"] // shape["kv_heads"]
        kv = torch.arange(shape["kv_heads"])
        _set_attention(layer.self_attn, (kv[:, None] * rep + torch.arange(rep)).flatten(), kv, head_dim)
        _set_mlp(layer.mlp, torch.arange(shape["intermediate"]))
    return model


def load_pruned(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model `save_pruned` wrote, in eval mode: ``config.json`` and ``model.safetensors`` only, each checked
    (config types and ranges, tensor names, shapes, float dtypes, finite values) before anything is built."""
    from transformers import AutoConfig

    directory = Path(directory)
    config_file = directory / "config.json"
    raw = _read_config(config_file)
    if PRUNED_KEY not in raw:
        raise PruneError(f"{config_file} has no {PRUNED_KEY}: not a pruned model; load it with load_model")
    shapes = _check_config(raw, str(config_file))
    header = _header(directory / WEIGHTS)
    blocks = {int(k.split(".")[2]) for k in header if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    if blocks != set(range(len(shapes))):
        raise PruneError(f"{directory / WEIGHTS} holds blocks {sorted(blocks)[:8]}... but {config_file} records "
                         f"{len(shapes)}; the two files do not belong together")
    try:
        config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("transformers_version",)})
        model = _build(config, shapes, dtype)
        rotary = model.model.rotary_emb
        with torch.device("cpu"):
            model.model.rotary_emb = type(rotary)(config=config)  # its buffers are computed, not saved
    except LorakitError:
        raise
    except Exception as err:  # transformers' own config checks (rope parameters, ...): one clear error
        raise PruneError(f"{config_file} is not a valid {raw['model_type']} config: {type(err).__name__}: "
                         f"{str(err)[:200]}") from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        if "lm_head.weight" in header:
            raise PruneError(f"{config_file} ties lm_head to the embeddings (tie_word_embeddings: true) but "
                             f"{WEIGHTS} holds a separate lm_head.weight; the two files do not belong together")
        expected.pop("lm_head.weight", None)
    got = {k: shape for k, (shape, _) in header.items()}
    if got != expected:
        wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        raise PruneError(f"{directory}: weights do not fit the recorded shapes: "
                         + ", ".join(f"{k} {got.get(k)} (expected {expected.get(k)})" for k in wrong[:4]))
    bad = sorted(k for k, (_, dt) in header.items() if dt not in FLOAT_DTYPES)
    if bad:
        raise PruneError(f"{directory / WEIGHTS}: {bad[0]} has dtype {header[bad[0]][1]}; weights must be one of "
                         f"{sorted(FLOAT_DTYPES)}")
    state = load_file(str(directory / WEIGHTS))
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise PruneError(f"{directory / WEIGHTS}: {name} holds NaN or infinite values")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise PruneError(f"{directory}: some weights were not loaded")
    return model.to(dtype).eval()


__all__ = ["PruneError", "PruneReport", "calibration_batches", "general_calibration", "load_pruned", "prune_llama",
           "removed_groups", "save_pruned", "taylor_scores"]
