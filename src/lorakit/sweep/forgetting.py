"""Forgetting, for causal LMs: the NLL per token of a fixed general-text sample under the base model and under
the trained adapter, as PEFT's ``method_comparison`` suite reports it (the figure users fear from fine-tuning).

The sample (`GENERAL_TEXT`) is short plain encyclopedic prose written for lorakit, so that every sweep scores the
same tokens without a download.
"""

from __future__ import annotations

import functools
from typing import Any

from ..train.run import FULL, RunConfig, RunResult

GENERAL_TEXT = (
    "The river rises in the northern hills and flows south for about three hundred kilometres before it reaches "
    "the sea.",
    "Bread is made from flour, water, salt and yeast; the dough is kneaded, left to rise, shaped and baked.",
    "In the early nineteenth century most people in Europe still lived in the countryside and worked on farms.",
    "The heart pumps blood through the arteries to every part of the body, and the veins carry it back.",
    "A library lends books, newspapers and recordings, and many also offer quiet rooms for reading and study.",
    "Water boils at one hundred degrees Celsius at sea level, and at a lower temperature high in the mountains.",
    "The committee met on Tuesday to discuss the budget, but the final decision was postponed until next month.",
    "Bees collect nectar from flowers and turn it into honey, which they store in wax cells inside the hive.",
    "The train to the capital leaves every hour from the main station and takes a little under two hours.",
    "Photosynthesis lets plants use the energy of sunlight to turn carbon dioxide and water into sugar and oxygen.",
    "She opened the window, looked at the grey sky and decided to take an umbrella with her to work.",
    "The museum's collection includes paintings, sculptures, coins and tools from many periods of history.",
)


def sample_features(tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """Each sentence as one sequence whose every token after the first is scored."""
    features = []
    for text in GENERAL_TEXT:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
        features.append({"input_ids": ids, "labels": ids})
    return features


@functools.cache
def _base_nll(model: str, dtype: str, device: str, quantize: str | None, max_length: int) -> float:
    """The base model's NLL on the sample (once per worker process and base)."""
    from ..models import load_model
    from ..train.evaluate import answer_nll
    base, tokenizer = load_model(model, "causal-lm", dtype=dtype, device=device, quantize=quantize)
    return answer_nll(base, sample_features(tokenizer, max_length), pad_token_id=tokenizer.pad_token_id)


def forgetting(run: RunConfig, result: RunResult) -> dict[str, float | None]:
    """``forgetting_nll_before`` / ``_after`` for a finished causal-LM adapter run (None otherwise: classification
    has no language-model head to score text with, and full fine-tuning saves no adapter to reload)."""
    from ..models import load_model
    from ..train.data import load_task
    from ..train.evaluate import answer_nll
    spec, _ = load_task(run.task, "train", run.data_dir, seed=run.seed, limit=1)
    if spec.type != "causal-lm" or run.method == FULL or result.adapter_dir is None:
        return {"forgetting_nll_before": None, "forgetting_nll_after": None}
    from .. import load
    before = _base_nll(run.model, run.dtype, run.device, run.quantize, run.max_length)
    model, tokenizer = load_model(run.model, "causal-lm", dtype=run.dtype, device=run.device, quantize=run.quantize)
    load(model, result.adapter_dir)
    after = answer_nll(model, sample_features(tokenizer, run.max_length), pad_token_id=tokenizer.pad_token_id)
    return {"forgetting_nll_before": before, "forgetting_nll_after": after}
