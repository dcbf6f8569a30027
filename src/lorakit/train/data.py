"""Tasks (built-in, local files, Hugging Face datasets), answer scoring, encoding and batching."""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import logging
import random
import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import ConfigError, LorakitError, TrainingError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens, padding)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its model type, how it is scored, and (classification) how many classes."""

    name: str
    type: Literal["causal-lm", "classification"]
    metric: Literal["exact_match", "accuracy", "nll"]
    num_labels: int | None = None
    conversational: bool = False  # rows are `messages` conversations (`encode_conversations`)


@dataclass
class Example:
    """``prompt``/``completion`` for generation tasks, ``text``/``label`` for classification, ``messages`` for
    conversations (TRL's conversational format: role/content turns ending with an assistant turn, whose content is
    also the ``completion``).

    ``answer`` is the exact answer that `exact_match` checks a generated completion against.
    """

    prompt: str = ""
    completion: str = ""
    text: str = ""
    label: int | None = None
    answer: str | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def context(self) -> str | list[dict[str, str]]:
        """What evaluation generates from: the prompt, or the conversation (`prompt_ids` cuts its final turn)."""
        return self.messages if self.messages is not None else self.prompt


class Examples(list):
    """A list of `Example` that also reports the rows skipped while loading (1-based line numbers)."""

    def __init__(self, items: Iterable[Example] = (), source: str = "", skipped_lines: Sequence[int] = ()):
        super().__init__(items)
        self.source = source
        self.skipped_lines = list(skipped_lines)

    @property
    def skipped(self) -> int:
        return len(self.skipped_lines)


BUILTIN_TASKS = {
    "arith": TaskSpec("arith", "causal-lm", "exact_match"),
    "gsm8k": TaskSpec("gsm8k", "causal-lm", "exact_match"),
    "sst2": TaskSpec("sst2", "classification", "accuracy", 2),
    "trec": TaskSpec("trec", "classification", "accuracy", 6),
}
ARITH_SIZES = {"train": 2000, "dev": 100, "test": 100}
_SPLITS = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "val": "dev", "test": "test"}
# Local layout under data_dir: (file pattern, row kind).  Hub fallback: (dataset, config, row mapping).
# TREC's hub labels use the hub's own class order, not the local files' order of first appearance.
_LOCAL = {"sst2": ("sst2/{split}.txt", "label"), "trec": ("trec/{split}.txt", "label"),
          "gsm8k": ("gsm8k/{split}.jsonl", "qa")}
_HUB = {"sst2": ("stanfordnlp/sst2", None, lambda r: {"text": r["sentence"], "label": r["label"]}),
        "trec": ("CogComp/trec", None, lambda r: {"text": r["text"], "label": r["coarse_label"]}),
        "gsm8k": ("openai/gsm8k", "main", lambda r: r)}
# Row kinds and the fields each needs.
_KINDS = {"completion": ("prompt", "completion"), "label": ("text", "label"), "qa": ("question", "answer"),
          "messages": ("messages",)}

Row = tuple[int, Any]  # (1-based line or row number, parsed row or None when it could not be parsed)


# ---------------------------------------------------------------------------------------------- scoring

_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def extract_final_number(text: str) -> str | None:
    """The scorer's rule: the LAST number in ``text``, commas removed (``"so 1,234."`` -> ``"1234"``).

    Handles a leading minus (not the one in ``10-3``), thousands separators, decimals and a trailing
    full stop, so that a model is judged on its answer and not on how it phrases it.
    """
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _as_number(text: str) -> Decimal | None:
    text = text.strip().replace(",", "")
    return Decimal(text) if re.fullmatch(r"-?\d+(?:\.\d+)?", text) else None


def exact_match(completion: str, answer: str) -> bool:
    """Whether the last number in ``completion`` equals ``answer`` numerically (``"7.0"`` matches ``"7"``).

    A non-numeric ``answer`` is compared with the whole stripped completion.
    """
    target = _as_number(answer)
    if target is None:
        return completion.strip() == answer.strip()
    predicted = extract_final_number(completion)
    return predicted is not None and Decimal(predicted) == target


# ---------------------------------------------------------------------------------------------- arith

_NAMES = ("Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Zoe", "Ben")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "coins")
_TEMPLATES = (  # (question, +1 for a sum, -1 for a difference)
    ("What is {a} + {b}?", 1),
    ("What is {a} - {b}?", -1),
    ("{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", 1),
    ("{name} has {a} {item} and gives {b} to a friend. How many {item} does {name} have left?", -1),
    ("A box holds {a} {item}. {name} puts in {b} more. How many {item} are in the box now?", 1),
    ("There are {a} {item} on a table. {name} takes {b} of them. How many {item} are left?", -1),
)
_ARITH_MAX = 100_000


def _arith_split_of(question: str) -> str:
    """Each question belongs to one split for good (a hash of its text): 5% test, 5% dev, 90% train."""
    bucket = zlib.crc32(question.encode()) % 20
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


def arith_examples(split: str, n: int, seed: int = 0) -> Examples:
    """``n`` distinct two-digit addition/subtraction problems (non-negative answers) of one split.

    Deterministic for ``(split, seed)``; splits never share a question whatever the seeds and sizes.
    """
    if not 1 <= n <= _ARITH_MAX:
        raise ConfigError(f"arith size must be between 1 and {_ARITH_MAX}, got {n}")
    rng = random.Random(f"arith-{split}-{seed}")
    seen: set[str] = set()
    out = Examples(source="arith")
    while len(out) < n:
        template, sign = rng.choice(_TEMPLATES)
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if sign < 0 and a < b:
            a, b = b, a
        question = template.format(a=a, b=b, name=rng.choice(_NAMES), item=rng.choice(_ITEMS))
        if question in seen or _arith_split_of(question) != split:
            continue
        seen.add(question)
        answer = str(a + sign * b)
        out.append(Example(prompt=f"Question: {question}\nAnswer: ", completion=answer, answer=answer))
    return out


# ---------------------------------------------------------------------------------------------- loading


def _read(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 become U+FFFD (with a warning) rather than failing."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LorakitError(f"data file {path} does not exist; check the path (or --data-dir)") from None
    except OSError as err:
        raise LorakitError(f"cannot read data file {path} ({err}); pass a readable file") from err
    try:
        return data.decode("utf-8-sig")  # -sig: drop a byte-order mark (spreadsheet exports)
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="replace")
        logger.warning("%s is not valid UTF-8; %d undecodable character(s) replaced by U+FFFD",
                       path, text.count("\ufffd"))
        return text


def _file_rows(path: Path) -> list[Row]:
    """Rows of a ``.jsonl``, ``.csv`` or ``LABEL TEXT`` ``.txt`` file; blank lines are ignored."""
    text = _read(path)
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        try:
            return [(reader.line_num, row) for row in reader]
        except csv.Error as err:
            raise LorakitError(f"{path}: the row after line {reader.line_num} is not valid CSV ({err}); expected a "
                               f"header row, then rows of fields under {csv.field_size_limit():,} characters each"
                               ) from None
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                rows.append((number, json.loads(line)))
            except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply to be a row
                rows.append((number, None))
        else:
            label, _, sentence = line.partition(" ")
            rows.append((number, {"label": label, "text": sentence}))
    return rows


def _hub_rows(dataset: str, config: str | None, split: str) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise LorakitError(f"loading {dataset!r} from the Hugging Face Hub needs the `datasets` package: "
                           "pip install datasets, or pass --data-dir with local files") from None
    hub_split = "validation" if split == "dev" else split
    try:
        rows = datasets.load_dataset(dataset, config, split=hub_split)
    except Exception as err:  # datasets raises many types (network, missing split, script errors)
        raise LorakitError(f"could not load Hugging Face dataset {dataset!r} split {hub_split!r}: {err}") from err
    return list(enumerate(rows, 1))


MAX_CLASSES = 10_000  # a sane bound on a classification head (a label of 10**12 would exhaust memory)


def _label(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    return None


def _conversation(row: dict[str, Any]) -> Example | None:
    """A ``messages`` row (a list of ``{"role", "content"}`` turns, strings) up to its last assistant turn, or None
    when it is malformed or has no assistant turn with content: the final assistant turn is what evaluation scores,
    and the turns after it would train nothing."""
    turns = row["messages"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                              and isinstance(t.get("content"), str) for t in turns):
        return None
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant" and t["content"].strip()), default=None)
    if last is None:
        return None
    messages = [{"role": t["role"], "content": t["content"]} for t in turns[:last + 1]]
    answer = row.get("answer")
    return Example(completion=messages[-1]["content"], messages=messages,
                   answer=None if answer is None else str(answer))


def _parse(row: Any, kind: str, num_labels: int | None, where: str) -> Example | None:
    """One row as an `Example`, or None when it is malformed.  A label beyond `MAX_CLASSES` is an error: the
    classification head has one output per class up to the largest label."""
    if kind == "messages":
        return _conversation(row) if isinstance(row, dict) else None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), (str, int)) for k in _KINDS[kind]):
        return None
    if kind == "label":
        label, text = _label(row["label"]), str(row["text"]).strip()
        if label is not None and label >= MAX_CLASSES:
            raise LorakitError(f"{where}: label {label} is out of range; labels are class numbers 0, 1, 2, ... "
                               f"below {MAX_CLASSES} (lorakit's maximum number of classes)")
        if label is None or label < 0 or (num_labels is not None and label >= num_labels) or not text:
            return None
        return Example(text=text, label=label)
    if kind == "qa":
        question, solution = str(row["question"]), str(row["answer"])
        if "####" not in solution:
            return None
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
        return Example(prompt=f"Question: {question}\nAnswer: ", completion=solution, answer=answer)
    if not str(row["completion"]).strip():
        return None
    answer = row.get("answer")
    return Example(prompt=str(row["prompt"]), completion=str(row["completion"]),
                   answer=None if answer is None else str(answer))


def _collect(rows: list[Row], kind: str, source: str, num_labels: int | None = None) -> Examples:
    good: list[Example] = []
    bad: list[int] = []
    for number, row in rows:
        example = _parse(row, kind, num_labels, f"{source} line {number}")
        if example is None:
            bad.append(number)
        else:
            good.append(example)
    if bad:
        logger.warning("%s: skipped %d malformed row(s), at line(s) %s%s", source, len(bad),
                       ", ".join(map(str, bad[:5])), " ..." if len(bad) > 5 else "")
    if not good:
        raise LorakitError(f"{source} has no usable rows (expected {'/'.join(_KINDS[kind])} rows, found "
                           f"{len(rows)} row(s), {len(bad)} malformed); check the file or task name")
    return Examples(good, source, bad)


def _detect_kind(rows: list[Row], source: str) -> str:
    if not rows:
        raise LorakitError(f"{source} is empty; expected rows with prompt/completion, text/label, "
                           "question/answer or messages fields")
    for _, row in rows:
        if isinstance(row, dict):
            for kind, keys in _KINDS.items():
                if all(k in row for k in keys):
                    return kind
    raise LorakitError(f"{source}: no row has the fields prompt/completion, text/label, question/answer or messages "
                       "(a list of role/content turns); rename the columns to one of these")


def _generic_spec(name: str, kind: str, examples: Examples) -> TaskSpec:
    if kind == "label":
        return TaskSpec(name, "classification", "accuracy", max(2, max(e.label for e in examples) + 1))
    scored = all(e.answer is not None for e in examples)
    return TaskSpec(name, "causal-lm", "exact_match" if scored else "nll", conversational=kind == "messages")


def load_task(name: str, split: str, data_dir: str | Path | None = None, seed: int = 0,
              limit: int | None = None) -> tuple[TaskSpec, Examples]:
    """Load a task's split as ``(spec, examples)``.

    ``name``: a built-in (``arith``, ``sst2``, ``trec``, ``gsm8k``), a ``.jsonl``/``.csv`` file (fields
    prompt/completion[/answer], text/label, question/answer or messages[/answer] (TRL's conversational format, see
    `encode_conversations`); ``{split}`` in the path is replaced by the split), or a Hugging Face dataset name
    (``name`` or ``name:config``, needs ``datasets``).
    Built-ins other than ``arith`` read ``data_dir/<task>/<split>.{txt,jsonl}``, or the hub when
    ``data_dir`` is None. ``split``: train, dev (or validation) or test.
    ``seed`` picks the ``arith`` problems; ``limit`` is the ``arith`` size (default `ARITH_SIZES`) and
    keeps the first ``limit`` rows of any other task. Malformed rows are skipped with a warning and
    listed in ``examples.skipped_lines``.
    """
    split = _SPLITS.get(split, split)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of examples, got {limit}")
    if name == "arith":
        if split not in ARITH_SIZES:
            raise ConfigError(f"arith has splits {', '.join(ARITH_SIZES)}, got {split!r}")
        return BUILTIN_TASKS["arith"], arith_examples(split, limit or ARITH_SIZES[split], seed)

    if name in BUILTIN_TASKS:
        spec = BUILTIN_TASKS[name]
        pattern, kind = _LOCAL[name]
        if data_dir is None:
            dataset, config, mapping = _HUB[name]
            rows = [(n, mapping(r)) for n, r in _hub_rows(dataset, config, split)]
            examples = _collect(rows, kind, f"{dataset} ({split})", spec.num_labels)
        else:
            path = Path(data_dir) / pattern.format(split=split)
            examples = _collect(_file_rows(path), kind, str(path), spec.num_labels)
    elif name.endswith((".jsonl", ".csv")):
        path = Path(name.replace("{split}", split))
        rows = _file_rows(path)
        kind = _detect_kind(rows, str(path))
        examples = _collect(rows, kind, str(path))
        spec = _generic_spec(name, kind, examples)
    elif Path(name).is_file():
        raise LorakitError(f"{name} is a file of an unsupported type; use .jsonl or .csv (or a built-in task: "
                           f"{', '.join(BUILTIN_TASKS)})")
    else:
        dataset, _, config = name.partition(":")
        rows = _hub_rows(dataset, config or None, split)
        kind = _detect_kind(rows, dataset)
        examples = _collect(rows, kind, f"{dataset} ({split})")
        spec = _generic_spec(name, kind, examples)
    if limit is not None:
        examples = Examples(examples[:limit], examples.source, examples.skipped_lines)
    return spec, examples


# ---------------------------------------------------------------------------------------------- encoding


# lorakit's plain conversation format, for a tokenizer without a chat template (``chat_template=False``): one
# "Role: content" line per turn, the tokenizer's EOS ending each assistant turn (what the model learns to stop at).
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}Assistant:{% endif %}")


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], chat_template: bool,
            generation_prompt: bool) -> str:
    """The conversation as text: the tokenizer's chat template, or `PLAIN_CHAT_TEMPLATE`."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise LorakitError("conversations (messages) go through the tokenizer's chat template and this tokenizer has "
                           "none: use a chat model's tokenizer, or pass --no-chat-template (chat_template=False) for "
                           "lorakit's plain format ('User: ...' lines, EOS after each assistant turn)")
    try:
        return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                             add_generation_prompt=generation_prompt,
                                             chat_template=None if chat_template else PLAIN_CHAT_TEMPLATE)
    except Exception as err:  # jinja2's TemplateError (a template refusing a role order) and friends
        raise LorakitError(f"the chat template cannot render the conversation {list(messages)!r:.200} "
                           f"({type(err).__name__}: {err}); check its roles and their order") from None


def conversation_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]],
                     chat_template: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and the ``[start, end)`` token range of each assistant turn.

    An assistant turn is the text the template adds for it after the conversation before it with the generation
    prompt (its content and end-of-turn marker, not the assistant header): what the model writes at inference.
    The whole conversation is tokenized once (as TRL's ``assistant_only_loss`` does) and a token belongs to a turn
    when its characters overlap the turn's text.  A template that renders earlier turns differently once later
    ones follow (not prefix-preserving) is refused: no token range would be what the model wrote.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise LorakitError("conversations need a fast (Rust) tokenizer, whose character offsets place each assistant "
                           "turn; load the tokenizer with use_fast=True")
    full = _render(tokenizer, messages, chat_template, generation_prompt=False)
    chars = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], chat_template, generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1], chat_template, generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise LorakitError(f"the chat template does not render assistant turn {i} after the conversation before it "
                               "unchanged (it is not prefix-preserving), so lorakit cannot tell which tokens that turn "
                               "wrote; use a template that keeps earlier turns as they were")
        chars.append((len(before), len(through)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    spans = []
    for a, b in chars:
        inside = [t for t, (s, e) in enumerate(offsets) if s < b and e > a]
        if inside:
            spans.append((inside[0], inside[-1] + 1))
    return ids, spans


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[Mapping[str, str]],
               chat_template: bool) -> list[int]:
    """The prompt's token ids as training sees them; use the same ids to generate at evaluation.

    A conversation (a list of turns, ending with the assistant turn to be written) gives its tokens before that
    turn, as `encode_conversations` encodes them (``chat_template``: the tokenizer's template, else the plain format).
    For a text prompt, with ``chat_template`` (and a tokenizer that has one) the prompt is a user turn followed by
    the assistant header; otherwise the plain text with the tokenizer's own special tokens (e.g. BOS).
    """
    if not isinstance(prompt, str):
        ids, spans = conversation_ids(tokenizer, prompt, chat_template)
        return ids[:spans[-1][0]] if spans else ids
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def encode_conversations(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int,
                         chat_template: bool = True, final_turn_only: bool = False) -> list[dict[str, list[int]]]:
    """``input_ids`` = the conversation through its chat template (`conversation_ids`), ``labels`` = the tokens of
    every assistant turn (with ``final_turn_only``, of the final one: what evaluation scores), -100 elsewhere.

    ``chat_template=False`` uses `PLAIN_CHAT_TEMPLATE` instead of the tokenizer's template; a tokenizer without
    a template otherwise is an error, never a silent concatenation.  Sequences are cut to ``max_length``; a
    conversation with no supervised token left is dropped (with a warning).
    """
    features, dropped = [], 0
    for example in examples:
        if example.messages is None:
            raise LorakitError(f"encode_conversations needs messages examples, got {example!r}; use encode_causal_lm "
                               "for prompt/completion data")
        ids, spans = conversation_ids(tokenizer, example.messages, chat_template)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans[-1:] if final_turn_only else spans:
            labels[start:end] = ids[start:end]
        if all(label == IGNORE_INDEX for label in labels[:max_length]):
            dropped += 1
            continue
        features.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    if dropped:
        logger.warning("dropped %d of %d conversations with no assistant token within max_length=%d tokens",
                       dropped, len(examples), max_length)
    return features


def encode_causal_lm(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int,
                     chat_template: bool) -> list[dict[str, list[int]]]:
    """``input_ids`` = prompt + completion + EOS, ``labels`` = the same with the prompt set to -100.

    Sequences are cut to ``max_length``; an example whose prompt alone fills ``max_length`` has nothing
    to learn from and is dropped (with a warning).
    """
    if tokenizer.eos_token_id is None:
        raise LorakitError("the tokenizer has no EOS token, which ends every completion; set tokenizer.eos_token")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        logger.warning("chat_template=True but the tokenizer has no chat template; using plain prompts")
    features, dropped = [], 0
    for example in examples:
        if not example.completion:
            raise LorakitError("encode_causal_lm needs prompt/completion examples, got one without a completion "
                               f"({example!r}); use encode_classification for text/label data")
        prompt = prompt_ids(tokenizer, example.prompt, chat_template)
        if len(prompt) >= max_length:
            dropped += 1
            continue
        completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        features.append({"input_ids": (prompt + completion)[:max_length],
                         "labels": ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]})
    if dropped:
        logger.warning("dropped %d of %d examples whose prompt alone is >= max_length=%d tokens",
                       dropped, len(examples), max_length)
    return features


def encode_classification(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase,
                          max_length: int) -> list[dict[str, Any]]:
    """``input_ids`` (with the tokenizer's special tokens, cut to ``max_length``) and an integer label."""
    if any(e.label is None for e in examples):
        raise LorakitError("encode_classification needs text/label examples, got one without a label; "
                           "use encode_causal_lm for prompt/completion data")
    ids = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": i, "labels": e.label} for i, e in zip(ids, examples)]


# ---------------------------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Padded tensors for ``model(**batch.inputs)``, plus token counts for throughput."""

    inputs: dict[str, torch.Tensor]
    real_tokens: int
    epoch: int = 0
    indices: list[int] = field(default_factory=list)

    @property
    def padded_tokens(self) -> int:
        return self.inputs["input_ids"].numel()

    def to(self, device: torch.device | str) -> Batch:
        self.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return self


def collate(features: Sequence[dict[str, Any]], pad_token_id: int,
            padding_side: Literal["right", "left"] = "right") -> Batch:
    """Pad ``input_ids`` with ``pad_token_id`` and token ``labels`` with -100; build ``attention_mask``.

    Pad on the right for training, on the left for batched generation.
    """
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(f["input_ids"]) for f in features)

    def pad(seq: list[int], value: int) -> list[int]:
        fill = [value] * (width - len(seq))
        return seq + fill if padding_side == "right" else fill + seq

    inputs = {"input_ids": torch.tensor([pad(f["input_ids"], pad_token_id) for f in features]),
              "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features])}
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        inputs["labels"] = torch.tensor([pad(x, IGNORE_INDEX) for x in labels] if isinstance(labels[0], list)
                                        else labels)
    return Batch(inputs, real_tokens=sum(len(f["input_ids"]) for f in features))


# ---------------------------------------------------------------------------------------------- packing


def pack(features: Sequence[Mapping[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Causal-LM features packed into rows of at most ``max_length`` tokens, each example whole.

    Best-fit decreasing, as TRL's default ``packing_strategy="bfd"``: longest example first, each into the row with
    the least room that still holds it.  A row carries ``position_ids`` restarting at 0 for each example (how the
    model tells them apart, as transformers' ``DataCollatorWithFlattening``) and each example's first label is -100
    (it would be predicted from the previous example).  Deterministic for a given input order.
    """
    if max_length < 1:
        raise ConfigError(f"max_length must be a positive number of tokens per packed row, got {max_length}")
    if not features:
        raise TrainingError("no training features to pack; the data set is empty after encoding")
    if not all(isinstance(f.get("labels"), list) for f in features):
        raise ConfigError("packing needs causal-LM features with token labels (input_ids, labels lists); a "
                          "classification task has one label per example: train it without packing")
    lengths = [len(f["input_ids"]) for f in features]
    if max(lengths) > max_length:
        raise ConfigError(f"an example has {max(lengths)} tokens, more than the packed rows' max_length={max_length}; "
                          "cut the examples to max_length first (lorakit train does) or raise max_length")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, row), sorted
    for i in sorted(range(len(features)), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            rows.append([i])
            free, row = max_length - lengths[i], len(rows) - 1
        else:
            free, row = room.pop(k)
            rows[row].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, row))
    return [{"input_ids": [t for i in row for t in features[i]["input_ids"]],
             "labels": [t for i in row for t in [IGNORE_INDEX, *features[i]["labels"][1:]]],
             "position_ids": [p for i in row for p in range(lengths[i])]} for row in rows]


def packing_mask(model: Any) -> torch.dtype | None:
    """How ``model`` keeps packed examples apart: None when it does so from the restarting position ids alone
    (flash attention's variable-length path; and models whose masks come from ``transformers.masking_utils``, which
    turns them into a block-diagonal mask for sdpa, eager and flex attention when no KV cache is built); else the
    dtype of the explicit block-diagonal mask `collate_packed` must give it: bool for sdpa, the model's float
    dtype (added to the attention scores) for eager attention."""
    from transformers import masking_utils

    config = getattr(model, "config", None)
    implementation = str(getattr(config, "_attn_implementation", None) or "eager")
    if implementation.startswith("flash"):
        return None
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        if getattr(module, "create_causal_mask", None) is masking_utils.create_causal_mask:
            return None
    return torch.bool if implementation == "sdpa" else next(model.parameters()).dtype


def collate_packed(features: Sequence[Mapping[str, Any]], pad_token_id: int, mask: torch.dtype | None = None,
                   ) -> Batch:
    """Packed rows (`pack`) into one batch: ``input_ids``, ``labels`` and ``position_ids`` padded on the right to the
    longest row (the padding is one more sequence, unsupervised), ``use_cache=False`` (a KV cache would hide the
    packing from transformers' masks) and, when ``mask`` is a dtype (`packing_mask`), a ``(rows, 1, L, L)``
    block-diagonal causal ``attention_mask``: True / 0 where a token may attend, False / the dtype's minimum
    elsewhere.  No attention across examples either way."""
    width = max(len(f["input_ids"]) for f in features)
    fill = [width - len(f["input_ids"]) for f in features]
    position_ids = torch.tensor([list(f["position_ids"]) + list(range(n)) for f, n in zip(features, fill)])
    inputs: dict[str, Any] = {
        "input_ids": torch.tensor([list(f["input_ids"]) + [pad_token_id] * n for f, n in zip(features, fill)]),
        "labels": torch.tensor([list(f["labels"]) + [IGNORE_INDEX] * n for f, n in zip(features, fill)]),
        "position_ids": position_ids, "use_cache": False}
    if mask is not None:
        example = (position_ids == 0).cumsum(-1)  # which example (or the padding) each token belongs to
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = ((example[:, :, None] == example[:, None, :]) & causal)[:, None]
        inputs["attention_mask"] = allowed if mask == torch.bool else (
            torch.zeros(allowed.shape, dtype=mask).masked_fill(~allowed, torch.finfo(mask).min))
    return Batch(inputs, real_tokens=sum(len(f["input_ids"]) for f in features))


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch of shuffled index batches (the last one may be short)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           megabatch: int = 50) -> list[list[int]]:
    """One epoch of index batches whose examples have similar lengths, so that little padding is needed.

    Shuffle, cut into chunks of ``megabatch`` batches, sort each chunk by length, split it into batches,
    and shuffle the order of all batches. Every index appears exactly once.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = megabatch * batch_size
    batches = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start:start + size], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_indices(features: Sequence[dict[str, Any]], batch_size: int, seed: int,
                  group_by_length: bool = True) -> Iterator[tuple[int, list[int]]]:
    """``(epoch, indices)`` of every batch, forever: `batches`' order without collating (the trainer shards each
    batch over its ranks, and skips the batches a checkpoint has drawn already)."""
    if not features:
        raise TrainingError("no training features to batch; the data set is empty after encoding")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    lengths = [len(f["input_ids"]) for f in features] if group_by_length else None

    def epochs() -> Iterator[tuple[int, list[int]]]:
        rng = random.Random(seed)
        for epoch in itertools.count():
            epoch_seed = rng.getrandbits(64)
            order = (length_grouped_batches(lengths, batch_size, epoch_seed) if lengths is not None
                     else random_batches(len(features), batch_size, epoch_seed))
            for indices in order:
                yield epoch, indices

    return epochs()


def batches(features: Sequence[dict[str, Any]], batch_size: int, seed: int, group_by_length: bool = True, *,
            pad_token_id: int, padding_side: Literal["right", "left"] = "right") -> Iterator[Batch]:
    """Collated batches forever, epoch after epoch; each epoch covers every feature once, reshuffled.

    Deterministic for a seed; ``batch.epoch`` counts epochs from 0. Stop after your step budget.
    """
    for epoch, indices in batch_indices(features, batch_size, seed, group_by_length):
        batch = collate([features[i] for i in indices], pad_token_id, padding_side)
        batch.epoch, batch.indices = epoch, indices
        yield batch
