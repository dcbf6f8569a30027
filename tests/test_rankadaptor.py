"""RankAdaptor: per-block ranks (attach, save/load, PEFT export), the performance-model search, and the
LLM-Pruner-style structured pruning it recovers from (`lorakit.prune`, `lorakit prune`)."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError, LorakitError
from lorakit.methods.rankadaptor import (
    PREDICTORS,
    RankAdaptorConfig,
    block_costs,
    block_inputs,
    fit_predictor,
    layer_features,
    pruning_rates,
    rank_penalty,
    reward,
    sample_configurations,
    search_ranks,
)
from lorakit.prune import (
    PRUNED_KEY,
    PruneError,
    general_calibration,
    load_pruned,
    prune_llama,
    removed_groups,
    save_pruned,
    taylor_scores,
)
from tests.tiny_models import KINDS, output, perturb


def _llama(blocks: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """A random GQA Llama: 6 query heads in 2 KV groups, MLP width 64."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=blocks, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True, initializer_range=0.2)).eval()


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, 64, (2, 10), generator=g)), "labels": ids} for _ in range(n)]


# -- the adapter -------------------------------------------------------------------------------------------------
def test_block_ranks_shape_every_layer_and_export_both_forms(tmp_path: Path) -> None:
    kind = KINDS["llama"]
    model = lorakit.attach(kind.build(0), RankAdaptorConfig(r=4, block_ranks=(2, 4), seed=3))
    perturb(model)
    for name, layer in lorakit.api.adapter_layers(model).items():
        assert layer.rank == (2 if ".0." in name else 4), name
        assert layer.lora_A.shape[0] == layer.lora_B.shape[1] == layer.rank
    ours = output(model, kind.inputs())
    lorakit.save(model, tmp_path / "saved")
    loaded = lorakit.load(kind.build(0), tmp_path / "saved")
    torch.testing.assert_close(output(loaded, kind.inputs()), ours)
    for pattern in (True, False):
        out = tmp_path / f"peft-{pattern}"
        lorakit.export_peft(model, out, rank_pattern=pattern)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == 4
        assert (len(cfg["rank_pattern"]) == 7) if pattern else cfg["rank_pattern"] == {}  # block 0's 7 matrices
        theirs = output(PeftModel.from_pretrained(kind.build(0), str(out)), kind.inputs())
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_bad_block_ranks_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"block_ranks\[1\] must be an integer in \[1, r=4\], got 8"):
        RankAdaptorConfig(r=4, block_ranks=(2, 8))
    model = KINDS["llama"].build(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"block_ranks has 1 entries but module 'model\.layers\.1"):
        lorakit.attach(model, RankAdaptorConfig(r=4, block_ranks=(2,)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # attach rolled back


# -- the search --------------------------------------------------------------------------------------------------
def test_samples_respect_the_uniform_parameter_budget_and_fixed_blocks() -> None:
    costs = [10, 30, 30, 30, 10]
    configs = sample_configurations(200, costs, 8, {0: 8, 4: 8}, random.Random(0))
    assert len(set(configs)) > 100
    for c in configs:
        assert sum(k * w for k, w in zip(c, costs)) <= 8 * sum(costs)
        assert c[0] == c[4] == 8 and set(c) <= {2, 4, 6, 8, 10, 12, 14, 16}
    with pytest.raises(ConfigError, match="no configuration fits"):
        sample_configurations(1, costs, 1, {}, random.Random(0))


def test_block_costs_count_lora_parameters_per_unit_rank() -> None:
    model = _llama(blocks=2)
    prune_llama(model, _batches(1), 0.5, first=1, last=0)
    shapes = [(n, m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")]
    costs = block_costs(shapes)
    assert costs[0] > costs[1]  # the pruned block is narrower
    lorakit.attach(model, RankAdaptorConfig(r=4, block_ranks=(1, 1)))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(costs)


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_predictor_fits_and_ranks_configurations(predictor: str) -> None:
    rng = random.Random(0)
    configs = list(dict.fromkeys(tuple(rng.choice([2, 8, 16]) for _ in range(4)) for _ in range(40)))
    configs = [c for c in configs if c not in ((8, 2, 16, 8), (8, 16, 2, 8))]  # the two held out below
    scores = [float(c[1] - c[2]) for c in configs]
    state = torch.random.get_rng_state()
    predict, mse = fit_predictor(configs, scores, [[0.5, -1.0]] * 4, [0.0, 0.25, 0.25, 0.0], predictor)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert mse < 0.05
    low, high = predict([(8, 2, 16, 8), (8, 16, 2, 8)])
    assert high > low and high - low > 14  # in the scores' own units (true difference 28)


def test_reward_is_the_official_formula() -> None:
    # LLaMA-7B's 32 layers, budget 8 * 32 = 256; n(x) = 10 (x - 64) / (512 - 64)
    assert rank_penalty([8] * 32) == pytest.approx(math.log(2))  # d = 0 counts as over: (0 + 1)^2
    assert rank_penalty([2] * 32) == pytest.approx(math.log(1 + 30 / 7))  # d = -30/7: |d|
    assert rank_penalty([16] * 32) == pytest.approx(math.log(1 + (40 / 7 + 1) ** 2))  # d = 40/7: (d + 1)^2
    assert reward(0.6, [8] * 32) == pytest.approx(60 - 1.2 * math.log(2))
    assert reward(0.6, [6] + [8] * 31) > reward(0.6, [8] * 32) > reward(0.6, [10] * 32)  # just under budget is best


def test_block_inputs_carry_rank_pruning_rate_and_svd_features() -> None:
    model = _llama()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(model.model.layers[2].self_attn, name).weight.mul_(3)
    prune_llama(model, _batches(), 0.25, first=1, last=1)
    features = layer_features(model.model.layers, bins=4)
    assert torch.tensor(features).shape == (4, 4)
    assert torch.tensor(features).mean().abs() < 1e-5 and torch.tensor(features).std() == pytest.approx(1, abs=1e-4)
    assert sum(features[2]) > max(sum(features[b]) for b in (0, 1, 3))  # larger singular values, larger profile
    rates = pruning_rates(model.model.layers, 64)
    assert rates == [0.0, 0.25, 0.25, 0.0]  # 64 - int(48) = 16 of 64 channels
    x = block_inputs([(8, 2, 16, 8), (8, 8, 8, 8)], features, rates)
    assert x.shape == (2, 4, 2 + 4)
    torch.testing.assert_close(x[0, :, 0], torch.tensor([6 / 14, 0.0, 1.0, 6 / 14]))  # (r - 2) / 14
    torch.testing.assert_close(x[1, :, 1], torch.tensor(rates))
    torch.testing.assert_close(x[0, :, 2:], torch.tensor(features))
    with pytest.raises(ConfigError, match="one pruning rate and one feature row per block"):
        block_inputs([(8, 8, 8, 8)], features[:3], rates)


def test_search_finds_a_better_allocation_than_uniform_within_budget() -> None:
    costs = [1] * 6
    target = (8, 16, 2, 16, 2, 8)  # rank sum 52 > the budget 48: the search must trade off

    def score(ranks: tuple[int, ...]) -> float:
        return -sum(abs(a - b) for a, b in zip(ranks, target))

    calls: list[tuple[int, ...]] = []
    result = search_ranks(lambda c: calls.append(c) or score(c), costs, 8, fixed_blocks=(0, 5), rounds=4,
                          per_round=6, pool=500, seed=0)
    assert len(calls) == 1 + 4 * 6 == len(result.history) and calls[0] == (8,) * 6
    assert len(set(calls)) == len(calls)  # never the same configuration twice
    assert result.best_score > score((8,) * 6) and result.best_score == max(s for _, s in result.history)
    assert all(sum(c) <= 48 and c[0] == c[5] == 8 for c in calls)
    assert len(result.predictor_fit) == 3
    again = search_ranks(score, costs, 8, fixed_blocks=(0, 5), rounds=4, per_round=6, pool=500, seed=0)
    assert again.history == result.history  # reproducible from the seed


# -- pruning -----------------------------------------------------------------------------------------------------
def _attention_llama(kv_heads: int, heads: int = 4, tied: bool = False) -> LlamaForCausalLM:
    """A random 4-block Llama, head_dim 8, MLP width 64: standard attention when ``kv_heads == heads``."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=4, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=32, tie_word_embeddings=tied,
        initializer_range=0.2)).eval()


def _group_scores(model: LlamaForCausalLM, block: int, rep: int) -> torch.Tensor:
    """Each KV group's Taylor importance summed over q, k, v rows and o columns, computed independently."""
    scores = taylor_scores(model, _batches())
    s = {n: scores[f"{block}.self_attn.{n}"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    kv = s["k_proj"].shape[0] // 8
    per_q = s["q_proj"].view(kv * rep, 8, -1).sum((1, 2)) + s["o_proj"].view(-1, kv * rep, 8).sum((0, 2))
    return per_q.view(kv, rep).sum(1) + s["k_proj"].view(kv, -1).sum(1) + s["v_proj"].view(kv, -1).sum(1)


@pytest.mark.parametrize("heads", [4, 8], ids=["standard-attention", "grouped-query"])
def test_prune_removes_whole_heads_or_kv_groups_and_round_trips(heads: int, tmp_path: Path) -> None:
    kv_heads, rep = 4, heads // 4
    model = _attention_llama(kv_heads, heads, tied=heads == 8)
    with torch.no_grad():  # MLP channel 5 of block 1 does nothing: Taylor score zero
        model.model.layers[1].mlp.down_proj.weight[:, 5] = 0
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    weakest = _group_scores(copy.deepcopy(model), 1, rep).argmin().item()
    report = prune_llama(model, _batches(), 0.25, first=1, last=1)
    # LLM-Pruner's count: C - int(0.75 C) channels of the root (q_proj: 4 heads x 8; k_proj: 4 KV groups x 8)
    # -> one head of 4 (standard), one KV group of 4 (GQA, 2 query heads each); MLP 64 - 48 = 16 channels
    kept_kv = kv_heads - 1
    assert [s["kv_heads"] for s in report.layers] == [kv_heads, kept_kv, kept_kv, kv_heads]
    assert [s["heads"] for s in report.layers] == [heads, kept_kv * rep, kept_kv * rep, heads]
    assert [s["intermediate"] for s in report.layers] == [64, 48, 48, 64]
    for block in (1, 2):
        attn = model.model.layers[block].self_attn
        assert attn.q_proj.out_features == attn.o_proj.in_features == kept_kv * rep * 8
        assert attn.k_proj.out_features == attn.v_proj.out_features == kept_kv * 8
        assert attn.num_key_value_groups == rep
    assert model.model.layers[0].self_attn.k_proj.out_features == kv_heads * 8  # unpruned blocks untouched
    # block 1 lost exactly its least important group (q, k, v rows and o columns together), the rest in order
    kept = [g for g in range(kv_heads) if g != weakest]
    q_rows = torch.cat([torch.arange(g * rep * 8, (g + 1) * rep * 8) for g in kept])
    kv_rows = torch.cat([torch.arange(g * 8, (g + 1) * 8) for g in kept])
    attn, prefix = model.model.layers[1].self_attn, "model.layers.1.self_attn"
    assert torch.equal(attn.q_proj.weight, original[f"{prefix}.q_proj.weight"][q_rows])
    assert torch.equal(attn.k_proj.weight, original[f"{prefix}.k_proj.weight"][kv_rows])
    assert torch.equal(attn.v_proj.weight, original[f"{prefix}.v_proj.weight"][kv_rows])
    assert torch.equal(attn.o_proj.weight, original[f"{prefix}.o_proj.weight"][:, q_rows])
    assert not (model.model.layers[1].mlp.down_proj.weight == 0).all(0).any()  # the dead channel is gone
    ids = _batches(1)[0]["input_ids"]
    logits = output(model, {"input_ids": ids})
    assert torch.isfinite(logits).all()
    save_pruned(model, tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = AutoConfig.from_pretrained(tmp_path)  # a standard Llama config plus the recorded widths
    assert getattr(config, PRUNED_KEY)[1] == {"heads": kept_kv * rep, "kv_heads": kept_kv, "intermediate": 48}
    loaded = load_pruned(tmp_path)
    torch.testing.assert_close(output(loaded, {"input_ids": ids}), logits)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == (heads == 8)  # tied only where configured


def test_removed_groups_follow_llm_pruner_count() -> None:
    # LLaMA-7B (32 heads of 128, MLP 11008) at the paper's per-block ratios 0.25 and 0.635
    assert (removed_groups(32, 128, 0.25), removed_groups(11008, 1, 0.25)) == (8, 2752)
    assert (removed_groups(32, 128, 0.635), removed_groups(11008, 1, 0.635)) == (20, 6991)
    assert removed_groups(3, 64, 0.25) == 0 and removed_groups(3, 64, 0.635) == 1  # SmolLM2's 3 KV groups
    assert removed_groups(2, 8, 0.99) == 1  # one group always stays


def test_general_calibration_is_llm_pruners_windows_of_shipped_text() -> None:
    from transformers import AutoTokenizer

    from lorakit.calibration_text import PARAGRAPHS
    from lorakit.models import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    batches = general_calibration(tokenizer)
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (10, 64)
    assert torch.equal(batches[0]["labels"], batches[0]["input_ids"])  # loss on every token
    sources = [tokenizer(t)["input_ids"] for t in PARAGRAPHS]

    def source(window: list[int]) -> int:
        return next(i for i, ids in enumerate(sources)
                    if any(ids[j:j + 64] == window for j in range(len(ids) - 63)))

    found = [source(w) for w in batches[0]["input_ids"].tolist()]
    assert len(set(found)) == 10  # ten different paragraphs
    assert torch.equal(general_calibration(tokenizer)[0]["input_ids"], batches[0]["input_ids"])
    assert not torch.equal(general_calibration(tokenizer, seed=1)[0]["input_ids"], batches[0]["input_ids"])
    with pytest.raises(ConfigError, match="fewer than samples=40"):
        general_calibration(tokenizer, samples=40)


def test_prune_and_load_refuse_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pruning ratio must be in \(0, 1\), got 1.5"):
        prune_llama(_llama(), _batches(), 1.5)
    with pytest.raises(ConfigError, match="leave nothing to prune in 4 blocks"):
        prune_llama(_llama(), _batches(), 0.2, first=2, last=2)
    with pytest.raises(PruneError, match="Llama-architecture"):
        prune_llama(KINDS["gpt2"].build(0), _batches(), 0.2)
    with pytest.raises(PruneError, match="no calibration batch"):
        prune_llama(_llama(), [], 0.2, first=1, last=1)
    with pytest.raises(PruneError, match=r"not pruned by lorakit\.prune"):
        save_pruned(_llama(), tmp_path / "x")
    _llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(PruneError, match="not a pruned model"):
        load_pruned(tmp_path / "plain")
    model = _llama()
    prune_llama(model, _batches(), 0.5, first=1, last=1)
    save_pruned(model, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    cfg[PRUNED_KEY][1]["intermediate"] = 40
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PruneError, match="do not fit the recorded shapes"):
        load_pruned(tmp_path / "p")
    cfg[PRUNED_KEY][1].update(heads=5, kv_heads=2)
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PruneError, match="block 1 has 5 heads"):
        load_pruned(tmp_path / "p")
    assert issubclass(PruneError, LorakitError)


def test_cli_prune_reports_a_missing_model_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_save_pruned_replaces_planted_symlinks_instead_of_writing_through(tmp_path: Path) -> None:
    model = _llama()
    prune_llama(model, _batches(), 0.5, first=1, last=1)
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("keep me")
    for name in ("config.json", "model.safetensors"):
        (out / name).symlink_to(victim)
    save_pruned(model, out)
    assert victim.read_text() == "keep me"
    assert not (out / "config.json").is_symlink() and not (out / "model.safetensors").is_symlink()
    torch.testing.assert_close(output(load_pruned(out), {"input_ids": _batches(1)[0]["input_ids"]}),
                               output(model, {"input_ids": _batches(1)[0]["input_ids"]}))
