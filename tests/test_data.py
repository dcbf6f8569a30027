"""Tasks, scoring, encoding and batching (lorakit.train.data)."""

import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lorakit.errors import LorakitError
from lorakit.models import minilm_dir
from lorakit.train.data import (
    IGNORE_INDEX,
    Example,
    batches,
    collate,
    encode_causal_lm,
    encode_classification,
    exact_match,
    extract_final_number,
    length_grouped_batches,
    load_task,
    prompt_ids,
    random_batches,
)

DATA = Path(__file__).parent / "data"  # slices of the full sets (tests/data/README.md); benchmarks read ../shared


@pytest.fixture
def tok():
    """A real WordPiece tokenizer that ships with the MiniLM package (no hub access), with an EOS."""
    t = AutoTokenizer.from_pretrained(minilm_dir())
    t.eos_token = "[SEP]"
    return t


# ---------------------------------------------------------------------------------------------- arith


def test_arith_is_deterministic_for_a_seed():
    spec, a = load_task("arith", "train", seed=3, limit=50)
    _, b = load_task("arith", "train", seed=3, limit=50)
    _, c = load_task("arith", "train", seed=4, limit=50)
    assert spec.type == "causal-lm" and spec.metric == "exact_match"
    assert a == b and len(a) == 50
    assert a != c
    assert len({e.prompt for e in a}) == 50  # no duplicates within a split


def test_arith_splits_are_disjoint_whatever_the_seeds_and_sizes():
    _, train = load_task("arith", "train", seed=0)
    _, dev = load_task("arith", "dev", seed=0)
    _, test = load_task("arith", "test", seed=1, limit=1000)
    assert (len(train), len(dev), len(test)) == (2000, 100, 1000)
    train_q, dev_q, test_q = ({e.prompt for e in s} for s in (train, dev, test))
    assert not train_q & test_q and not train_q & dev_q and not dev_q & test_q


def test_arith_answers_are_right():
    _, examples = load_task("arith", "test", seed=0, limit=300)
    kinds = set()
    for e in examples:
        a, b = map(int, re.findall(r"\d+", e.prompt)[:2])
        plus = "+" in e.prompt or "buys" in e.prompt or "puts in" in e.prompt
        kinds.add(plus)
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert e.answer == e.completion == str(a + b if plus else a - b)
        assert int(e.answer) >= 0
        assert exact_match(f"The answer is {e.answer}.", e.answer)
    assert kinds == {True, False}
    assert any(e.prompt.startswith("Question: What is") for e in examples)
    assert any("How many" in e.prompt for e in examples)


# ---------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(("text", "expected"), [
    ("19", "19"),
    ("The answer is 19.", "19"),
    ("12 + 7 = 19", "19"),
    ("She has 1,234 apples.", "1234"),
    ("1,234,567 and then 12345", "12345"),
    ("It costs $3.50 each", "3.50"),
    ("x = -5.", "-5"),
    ("10-3=7", "7"),
    ("10-3", "3"),
    ("1,2,3", "3"),
    ("no number here", None),
    ("", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_exact_match_compares_numbers():
    assert exact_match("So the total is 72.", "72")
    assert exact_match("72.0", "72")
    assert exact_match("#### 1,234", "1234")
    assert exact_match("-3", "-3")
    assert not exact_match("71", "72")
    assert not exact_match("seventy-two", "72")
    assert not exact_match("72 apples and 3 pears", "72")  # the LAST number counts
    assert exact_match(" Paris ", "Paris") and not exact_match("Paris, France", "Paris")


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize(("task", "split", "rows"), [
    ("sst2", "train", 800), ("sst2", "dev", 200), ("sst2", "validation", 200), ("sst2", "test", 200),
    ("trec", "train", 400), ("trec", "test", 100), ("gsm8k", "train", 100), ("gsm8k", "test", 50),
])
def test_data_files_load_completely(task, split, rows):
    spec, examples = load_task(task, split, data_dir=DATA)
    assert len(examples) == rows and examples.skipped == 0
    if spec.type == "classification":
        labels = {e.label for e in examples}
        assert labels <= set(range(spec.num_labels)) and len(labels) >= 2
        assert split != "train" or labels == set(range(spec.num_labels))  # the TREC test slice lacks class 2
        assert all(e.text for e in examples)
    else:
        assert all(e.prompt.startswith("Question: ") and e.prompt.endswith("\nAnswer: ") for e in examples)
        assert all(re.fullmatch(r"-?\d+(\.\d+)?", e.answer) for e in examples)


def test_gsm8k_answer_is_the_number_after_hashes():
    _, examples = load_task("gsm8k", "train", data_dir=DATA, limit=3)
    assert len(examples) == 3
    first = examples[0]
    assert first.prompt.startswith("Question: Natalia sold clips to 48 of her friends")
    assert first.completion.endswith("#### 72") and first.answer == "72"
    assert exact_match(first.completion, first.answer)


def test_builtin_split_without_file_names_it():
    with pytest.raises(LorakitError, match=r"trec/dev\.txt"):
        load_task("trec", "dev", data_dir=DATA)


def test_hub_fallback_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(LorakitError, match=r"--data-dir") as err:
        load_task("sst2", "train")
    assert "pip install datasets" in str(err.value)


# ---------------------------------------------------------------------------------------------- files


def test_malformed_jsonl_rows_are_skipped_and_reported(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"prompt": "Q1", "completion": "1"}),
        "{not json",
        json.dumps({"prompt": "Q3"}),  # no completion
        "",  # blank lines are not rows
        json.dumps({"prompt": "Q5", "completion": "5", "answer": 5}),
        json.dumps(["a", "list"]),
        json.dumps({"prompt": "Q7", "completion": "7"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="lorakit.train.data"):
        spec, examples = load_task(str(path), "train")
    assert [e.prompt for e in examples] == ["Q1", "Q5", "Q7"]
    assert examples[1].answer == "5"
    assert examples.skipped == 3 and examples.skipped_lines == [2, 3, 6]
    assert "skipped 3 malformed row(s)" in caplog.text and "2, 3, 6" in caplog.text
    assert spec.type == "causal-lm" and spec.metric == "nll"  # not every row has an answer


def test_malformed_csv_rows_are_skipped_and_reported(tmp_path, caplog):
    path = tmp_path / "data.csv"
    path.write_text("text,label\ngood movie,1\nbad movie,zero\n,1\n\"multi\nline\",0\nshort row\nfine,2\n")
    with caplog.at_level(logging.WARNING, logger="lorakit.train.data"):
        spec, examples = load_task(str(path), "train")
    assert [(e.text, e.label) for e in examples] == [("good movie", 1), ("multi\nline", 0), ("fine", 2)]
    assert examples.skipped_lines == [3, 4, 7]
    assert "skipped 3 malformed row(s)" in caplog.text
    assert spec.type == "classification" and spec.num_labels == 3 and spec.metric == "accuracy"


def test_malformed_label_lines_are_skipped(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.txt").write_text("1 great\n0\nx not a label\n2 out of range\n-1 negative\n0 awful\n")
    _, examples = load_task("sst2", "train", data_dir=tmp_path)
    assert [(e.text, e.label) for e in examples] == [("great", 1), ("awful", 0)]
    assert examples.skipped_lines == [2, 3, 4, 5]


def test_split_placeholder_and_question_answer_files(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        rows = [{"question": f"q{i}", "answer": f"work\n#### 1,00{i}"} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec, test = load_task(str(tmp_path / "{split}.jsonl"), "test")
    _, train = load_task(str(tmp_path / "{split}.jsonl"), "train", limit=2)
    assert len(test) == 2 and len(train) == 2
    assert test[1].prompt == "Question: q1\nAnswer: " and test[1].answer == "1001"
    assert spec.metric == "exact_match"


@pytest.mark.parametrize("content", ["", "\n\n", "text,label\n", json.dumps({"a": 1}) + "\n"])
def test_empty_or_unusable_file_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / ("data.csv" if content.startswith("text") else "data.jsonl")
    path.write_text(content)
    with pytest.raises(LorakitError, match=re.escape(str(path))):
        load_task(str(path), "train")


def test_all_rows_malformed_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": -2}\n')
    with pytest.raises(LorakitError, match=r"no usable rows.*2 malformed"):
        load_task(str(path), "train")


def test_missing_or_unreadable_file_is_an_error(tmp_path):
    with pytest.raises(LorakitError, match=r"missing\.jsonl does not exist"):
        load_task(str(tmp_path / "missing.jsonl"), "train")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(LorakitError, match=r"cannot read data file .*dir\.jsonl"):
        load_task(str(tmp_path / "dir.jsonl"), "train")
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(LorakitError, match=r"unsupported type"):
        load_task(str(tmp_path / "data.json"), "train")


def test_invalid_utf8_is_replaced_not_fatal(tmp_path, caplog):
    (tmp_path / "trec").mkdir()
    (tmp_path / "trec" / "test.txt").write_bytes(b"4 sister\xf0city ?\n0 How ?\n")
    with caplog.at_level(logging.WARNING, logger="lorakit.train.data"):
        _, examples = load_task("trec", "test", data_dir=tmp_path)
    assert [e.label for e in examples] == [4, 0] and "\ufffd" in examples[0].text
    assert "not valid UTF-8" in caplog.text


# ---------------------------------------------------------------------------------------------- encoding


def test_causal_lm_labels_mask_the_prompt(tok):
    examples = [Example(prompt="what is 12 plus 7 ?", completion="19"),
                Example(prompt="name a colour", completion="dark blue")]
    features = encode_causal_lm(examples, tok, max_length=64, chat_template=False)
    for example, f in zip(examples, features):
        prompt = prompt_ids(tok, example.prompt, chat_template=False)
        completion = tok(example.completion, add_special_tokens=False)["input_ids"]
        assert f["input_ids"] == prompt + completion + [tok.eos_token_id]
        assert f["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]
    assert tok.decode([t for t in features[1]["labels"] if t != IGNORE_INDEX]) == "dark blue [SEP]"


def test_causal_lm_with_chat_template(tok):
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    features = encode_causal_lm([Example(prompt="hello there", completion="hi")], tok, 64, chat_template=True)
    f = features[0]
    n_prompt = f["labels"].count(IGNORE_INDEX)
    assert tok.decode(f["input_ids"][:n_prompt]) == "< user > hello there < assistant >"
    assert tok.decode(f["input_ids"][n_prompt:]) == "hi [SEP]"
    assert f["input_ids"][0] != tok.cls_token_id  # the template text is not wrapped in special tokens again


def test_causal_lm_truncates_and_drops_prompt_only_examples(tok, caplog):
    examples = [Example(prompt="one two", completion="three four five six seven"),
                Example(prompt=" ".join(["word"] * 20), completion="end")]
    with caplog.at_level(logging.WARNING, logger="lorakit.train.data"):
        features = encode_causal_lm(examples, tok, max_length=6, chat_template=True)  # no template: warns
    assert len(features) == 1
    assert len(features[0]["input_ids"]) == len(features[0]["labels"]) == 6
    assert features[0]["labels"][:4] == [IGNORE_INDEX] * 4  # [CLS] one two [SEP]
    assert "no chat template" in caplog.text and "dropped 1 of 2" in caplog.text


def test_encoders_reject_the_wrong_kind_of_example(tok):
    tok.eos_token = None
    with pytest.raises(LorakitError, match="no EOS"):
        encode_causal_lm([Example(prompt="a", completion="b")], tok, 16, chat_template=False)
    with pytest.raises(LorakitError, match="encode_causal_lm"):
        encode_classification([Example(prompt="a", completion="b")], tok, 16)


def test_encode_classification(tok):
    features = encode_classification([Example(text="a fine film", label=1),
                                      Example(text=" ".join(["long"] * 50), label=0)], tok, max_length=8)
    assert features[0]["labels"] == 1 and features[1]["labels"] == 0
    assert tok.decode(features[0]["input_ids"]) == "[CLS] a fine film [SEP]"
    assert len(features[1]["input_ids"]) == 8


# ---------------------------------------------------------------------------------------------- batching


def test_collate_pads_right_and_left():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(features, pad_token_id=0)
    assert right.inputs["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right.inputs["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert right.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert (right.real_tokens, right.padded_tokens) == (4, 6)
    left = collate(features, pad_token_id=0, padding_side="left")
    assert left.inputs["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left.inputs["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    cls = collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}], pad_token_id=9)
    assert cls.inputs["labels"].tolist() == [1, 0] and cls.inputs["labels"].dtype == torch.long


def _padded(batch_list, lengths):
    return sum(len(b) * max(lengths[i] for i in b) for b in batch_list)


def test_length_grouping_reduces_padding_on_sst2(tok):
    _, examples = load_task("sst2", "train", data_dir=DATA)
    lengths = [len(f["input_ids"]) for f in encode_classification(examples, tok, max_length=128)]
    grouped = length_grouped_batches(lengths, batch_size=32, seed=0)
    shuffled = random_batches(len(lengths), batch_size=32, seed=0)
    for epoch in (grouped, shuffled):
        assert sorted(i for b in epoch for i in b) == list(range(len(lengths)))
        assert sum(len(b) != 32 for b in epoch) <= 1  # one short batch at most
    assert _padded(grouped, lengths) < 0.7 * _padded(shuffled, lengths)
    assert length_grouped_batches(lengths, 32, seed=0) == grouped
    assert length_grouped_batches(lengths, 32, seed=1) != grouped


def test_batches_cover_every_example_once_per_epoch_and_reshuffle():
    lengths = [1 + (i * 7) % 13 for i in range(103)]
    features = [{"input_ids": [i + 1] * n, "labels": i % 2} for i, n in enumerate(lengths)]
    for group in (True, False):
        stream = batches(features, batch_size=8, seed=5, group_by_length=group, pad_token_id=0)
        epochs: dict[int, list[int]] = {}
        orders = []
        for _ in range(3 * 13):  # 13 batches per epoch (12 full, 1 of 7)
            batch = next(stream)
            seen = (batch.inputs["input_ids"][:, 0] - 1).tolist()
            assert seen == batch.indices
            epochs.setdefault(batch.epoch, []).extend(seen)
            orders.append(batch.indices)
        assert sorted(epochs) == [0, 1, 2]
        assert all(sorted(v) == list(range(103)) for v in epochs.values())
        assert orders[:13] != orders[13:26]  # each epoch reshuffles
        again = batches(features, batch_size=8, seed=5, group_by_length=group, pad_token_id=0)
        assert [next(again).indices for _ in range(13)] == orders[:13]
