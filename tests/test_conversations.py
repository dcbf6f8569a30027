"""Conversational (`messages`) data: the assistant-turn label mask, token by token and against TRL's own
``assistant_only_loss`` masking; the plain format for tokenizers without a chat template; ``lorakit train``/``eval``
end to end on a multi-turn ``.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trl
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.models import minilm_dir
from lorakit.train.data import IGNORE_INDEX, Example, encode_conversations, load_task, prompt_ids
from tests.tiny_models import save_tiny_lm

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"}]
LLAMA3 = (Path(trl.__file__).parent / "chat_templates" / "llama3.jinja").read_text()  # Llama 3's own template
# A template over tokens a BERT WordPiece vocabulary already has: the tiny CLI model needs no new embeddings.
TINY_TEMPLATE = ("{% for m in messages %}[CLS]{{ m['role'] }}: {{ m['content'] }}[SEP]{% endfor %}"
                 "{% if add_generation_prompt %}[CLS]assistant:{% endif %}")


@pytest.fixture(scope="module")
def llama3_tokenizer() -> PreTrainedTokenizerBase:
    """A WordPiece tokenizer with Llama 3's header/end-of-turn special tokens and its chat template."""
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>"]})
    tokenizer.eos_token, tokenizer.bos_token, tokenizer.chat_template = "<|eot_id|>", "[CLS]", LLAMA3
    return tokenizer


def shown(tokenizer: PreTrainedTokenizerBase, feature: dict[str, list[int]]) -> list[str]:
    """The supervised tokens by name, ``_`` for the ones the loss skips."""
    return ["_" if label == IGNORE_INDEX else tokenizer.convert_ids_to_tokens(label) for label in feature["labels"]]


def test_every_assistant_turn_is_supervised_token_by_token(llama3_tokenizer: PreTrainedTokenizerBase) -> None:
    feature = encode_conversations([Example(messages=CONVERSATION, completion="6")], llama3_tokenizer, 100)[0]
    tokens = llama3_tokenizer.convert_ids_to_tokens(feature["input_ids"])
    assert tokens == ["[CLS]", "<|start_header_id|>", "system", "<|end_header_id|>", "be", "brief", ".", "<|eot_id|>",
                      "<|start_header_id|>", "user", "<|end_header_id|>", "what", "is", "2", "+", "2", "?",
                      "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "it", "is", "4", ".",
                      "<|eot_id|>", "<|start_header_id|>", "user", "<|end_header_id|>", "and", "3", "+", "3", "?",
                      "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "6", "<|eot_id|>"]
    # both assistant turns, content and end-of-turn token; never the headers, the system or the user turns
    assert shown(llama3_tokenizer, feature) == ["_"] * 21 + ["it", "is", "4", ".", "<|eot_id|>"] + ["_"] * 12 + [
        "6", "<|eot_id|>"]

    final = encode_conversations([Example(messages=CONVERSATION, completion="6")], llama3_tokenizer, 100,
                                 final_turn_only=True)[0]
    assert final["input_ids"] == feature["input_ids"]
    assert shown(llama3_tokenizer, final) == ["_"] * 38 + ["6", "<|eot_id|>"]
    # evaluation generates from exactly the tokens before the final assistant turn
    assert prompt_ids(llama3_tokenizer, CONVERSATION, chat_template=True) == feature["input_ids"][:38]

    cut = encode_conversations([Example(messages=CONVERSATION, completion="6")] * 2, llama3_tokenizer, 23)
    assert [shown(llama3_tokenizer, f)[21:] for f in cut] == [["it", "is"]] * 2  # cut at max_length, still trained
    assert encode_conversations([Example(messages=CONVERSATION, completion="6")], llama3_tokenizer, 21) == []


def test_mask_equals_trl_assistant_only_loss(llama3_tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """TRL's SFTTrainer(assistant_only_loss=True) swaps in its {% generation %}-marked Llama 3 template and masks
    with transformers' assistant masks; lorakit finds the turns from the original template's renderings."""
    from datasets import Dataset

    conversations = [CONVERSATION, CONVERSATION[1:3], [*CONVERSATION[1:3], {"role": "user", "content": "Why?"},
                                                       {"role": "assistant", "content": "Because 2 and 2 make 4."}]]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(llama3_tokenizer), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = trl.SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=None, report_to=[],
                         use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=llama3_tokenizer,
                             train_dataset=Dataset.from_list([{"messages": m} for m in conversations]))
    ours = encode_conversations([Example(messages=m, completion=m[-1]["content"]) for m in conversations],
                                llama3_tokenizer, 1000)
    for row, feature in zip(trainer.train_dataset, ours):
        assert feature["input_ids"] == row["input_ids"]
        assert feature["labels"] == row["labels"]


def test_no_chat_template_is_an_error_or_the_plain_format() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.eos_token = "[SEP]"
    example = Example(messages=CONVERSATION, completion="6")
    with pytest.raises(LorakitError, match="no-chat-template"):
        encode_conversations([example], tokenizer, 100)
    feature = encode_conversations([example], tokenizer, 100, chat_template=False)[0]
    assert tokenizer.decode(feature["input_ids"]) == ("system : be brief. user : what is 2 + 2? assistant : it is 4. "
                                                      "[SEP] user : and 3 + 3? assistant : 6 [SEP]")
    assert shown(tokenizer, feature) == ["_"] * 15 + ["it", "is", "4", ".", "[SEP]"] + ["_"] * 9 + ["6", "[SEP]"]


def test_a_template_that_rewrites_earlier_turns_is_refused(llama3_tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))  # renders the turn count before the conversation
    tokenizer.chat_template = ("{{ messages | length }}{% for m in messages %} {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} >{% endif %}")
    with pytest.raises(LorakitError, match="prefix-preserving"):
        encode_conversations([Example(messages=CONVERSATION, completion="6")], tokenizer, 100)


def test_messages_rows_load_up_to_the_last_assistant_turn(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [*CONVERSATION, {"role": "user", "content": "Thanks"}]},  # the trailing user turn goes
            {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn: skipped
            {"messages": "not a list"}, {"messages": [{"role": "assistant"}]},  # malformed: skipped
            {"messages": CONVERSATION[1:3]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec, examples = load_task(str(path), "train")
    assert spec.conversational and spec.type == "causal-lm" and spec.metric == "nll"
    assert examples.skipped_lines == [2, 3, 4]
    assert [e.messages for e in examples] == [CONVERSATION, CONVERSATION[1:3]]
    assert [e.completion for e in examples] == ["6", "It is 4."]
    path.write_text(json.dumps({"messages": CONVERSATION, "answer": 6}) + "\n")
    spec, examples = load_task(str(path), "train")
    assert spec.metric == "exact_match" and examples[0].answer == "6"


@pytest.fixture(scope="module")
def tiny_chat_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLI Llama, its tokenizer given a chat template."""
    out = save_tiny_lm(tmp_path_factory.mktemp("tiny-chat"), 32, 64, 2, 4)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    tokenizer.chat_template = TINY_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def test_cli_trains_and_evaluates_multi_turn_messages(tiny_chat_lm: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    questions = [(a, b) for a in range(2, 9) for b in range(2, 6)]
    for split, part in (("train", questions[:20]), ("test", questions[20:])):
        with open(tmp_path / f"chat-{split}.jsonl", "w") as f:
            for a, b in part:
                turns = [{"role": "system", "content": "Answer with a number."},
                         {"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)},
                         {"role": "user", "content": f"And {a}*{b}?"}, {"role": "assistant", "content": str(a * b)}]
                f.write(json.dumps({"messages": turns}) + "\n")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_chat_lm), "--task", str(tmp_path / "chat-{split}.jsonl"), "--method", "lora",
            "--steps", "3", "--batch-size", "2", "--max-length", "64", "--lr", "1e-2", "--warmup-steps", "0",
            "--packing", "--output-dir", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["metric"] == "nll" and run["config"]["packing"] is True and len(run["train"]["losses"]) == 3
    assert run["score_after"] < run["score_before"]  # the final assistant turn's NLL falls
    capsys.readouterr()
    assert main(["eval", str(out / "adapter"), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metric"] == "nll" and report["score"] == pytest.approx(run["score_after"], rel=1e-5)
    assert main(["eval", str(out / "adapter"), "--device", "cpu", "--metric", "exact_match",
                 "--max-new-tokens", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metric"] == "exact_match" and 0.0 <= report["score"] <= 1.0
    assert report["samples"][0].startswith("'And 7*2?' -> ")


def test_cli_without_a_chat_template_says_so_or_uses_the_plain_format(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model = save_tiny_lm(tmp_path / "plain-lm", 32, 64, 2, 4)  # its tokenizer has no chat template
    task = tmp_path / "chat.jsonl"
    task.write_text("".join(json.dumps({"messages": CONVERSATION[1:3]}) + "\n" for _ in range(4)))
    args = ["train", "--model", str(model), "--task", str(task), "--eval-split", "train", "--method", "lora",
            "--steps", "1", "--batch-size", "2", "--output-dir", str(tmp_path / "run")]
    assert main(args) == 2
    assert "--no-chat-template" in capsys.readouterr().err
    assert main([*args, "--no-chat-template"]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["chat_template"] is False
