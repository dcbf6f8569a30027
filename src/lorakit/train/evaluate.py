"""Evaluation: classifier accuracy, per-token answer NLL, and exact match of greedy generations.

Every function runs the model in eval mode without gradients, on the model's device, and puts the
model back in the mode it was in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ..core import progress
from ..core.loss import supports_fast_loss
from ..errors import LorakitError
from . import data
from .data import IGNORE_INDEX, Example

logger = logging.getLogger(__name__)

N_SAMPLES = 5  # sample completions returned by `exact_match`


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[torch.device]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _pad_id(model: nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return pad_token_id
    return getattr(getattr(model, "config", None), "pad_token_id", None) or 0


def _chunks(items: Sequence[Any], size: int, desc: str) -> Iterator[Sequence[Any]]:
    """``items`` in batches of ``size``, with a progress bar named ``desc`` when bars are on."""
    if size < 1:
        raise LorakitError(f"batch_size must be a positive integer, got {size}")
    for start in progress.track(range(0, len(items), size), -(-len(items) // size), desc):
        yield items[start:start + size]


def accuracy(model: nn.Module, features: Sequence[Mapping[str, Any]], batch_size: int = 64,
             pad_token_id: int | None = None) -> float:
    """Share of ``features`` (``input_ids`` + integer ``labels``) whose argmax logit is the label.

    Pads with ``pad_token_id`` (default: the model config's, which sequence classifiers use to find
    the last token).
    """
    if not features:
        raise LorakitError("accuracy: no evaluation features")
    pad = _pad_id(model, pad_token_id)
    correct = 0
    with _inference(model) as device:
        for chunk in _chunks(features, batch_size, "eval (accuracy)"):
            inputs = data.collate(chunk, pad).to(device).inputs
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(features)


def _nll_sum(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[float, int]:
    """Sum of next-token NLL over supervised positions, and their count (head applied to those only)."""
    labels = inputs.pop("labels")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if supports_fast_loss(model):
        hidden = model.base_model(**inputs).last_hidden_state[:, :-1][keep]
        logits = model.get_output_embeddings()(hidden)
    else:
        logits = model(**inputs).logits[:, :-1][keep]
    nll = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return float(nll), int(keep.sum())


def answer_nll(model: nn.Module, features: Sequence[Mapping[str, Any]], batch_size: int = 16,
               pad_token_id: int | None = None) -> float:
    """Mean NLL per completion token: ``Σ -log p(token) / #tokens`` over label positions that are not -100,
    each predicted from the tokens before it (causal-LM shift).  Lower is better."""
    if not features:
        raise LorakitError("answer_nll: no evaluation features")
    pad = _pad_id(model, pad_token_id)
    total, count = 0.0, 0
    with _inference(model) as device:
        for chunk in _chunks(features, batch_size, "eval (nll)"):
            nll, n = _nll_sum(model, data.collate(chunk, pad).to(device).inputs)
            total, count = total + nll, count + n
    if count == 0:
        raise LorakitError("answer_nll: no supervised (label != -100) tokens in the features")
    return total / count


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str | list[dict[str, str]]],
             max_new_tokens: int, batch_size: int = 16, chat_template: bool = False) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches, prompt ids as training encodes them; a conversation
    is completed from before its final assistant turn, `data.prompt_ids`)."""
    if tokenizer.pad_token_id is None:
        raise LorakitError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token)")
    features = [{"input_ids": data.prompt_ids(tokenizer, p, chat_template)} for p in prompts]
    completions: list[str] = []
    with _inference(model) as device:
        for chunk in _chunks(features, batch_size, "eval (generating)"):
            inputs = data.collate(chunk, tokenizer.pad_token_id, padding_side="left").to(device).inputs
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            completions += tokenizer.batch_decode(new, skip_special_tokens=True)
    return completions


def exact_match(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                max_new_tokens: int = 32, batch_size: int = 16, chat_template: bool = False,
                ) -> tuple[float, list[str]]:
    """Share of ``examples`` whose greedy completion has the right final number (`data.exact_match`),
    and the first few completions as ``"prompt -> completion (expected answer)"`` lines."""
    if not examples:
        raise LorakitError("exact_match: no evaluation examples")
    completions = generate(model, tokenizer, [e.context for e in examples], max_new_tokens, batch_size,
                           chat_template)
    answers = [e.answer if e.answer is not None else e.completion for e in examples]
    hits = [data.exact_match(c, a) for c, a in zip(completions, answers)]
    shown = [e.prompt if e.messages is None else e.messages[-2]["content"] if len(e.messages) > 1 else ""
             for e in examples]
    samples = [f"{p!r} -> {c!r} (expected {a})"
               for p, c, a in list(zip(shown, completions, answers))[:N_SAMPLES]]
    return sum(hits) / len(examples), samples
