"""Federated pieces without a network: aggregation (hand-computed), Fed-SB's exactness against centralised
LoRA-SB, communication accounting, partitions, update screening, checkpoints and DP-SGD."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lorakit import api
from lorakit.fed import checkpoint, comm, dp, local, partition, validate
from lorakit.fed.errors import CheckpointError, FedConfigError, FedError
from lorakit.fed.strategies import STRATEGIES, aggregate, fed_sb, fedex_lora, fedit, fedsb_shared_init, ffa_lora
from lorakit.io.persistence import adapter_tensors
from lorakit.models import load_model
from lorakit.train.data import Example, collate
from lorakit.train.trainer import TrainConfig, train
from tests.test_fed_common import save_tiny_classifier, tiny_config

# Two clients, one layer "l" (d_out = d_in = 2, r = 1), sample counts 1 and 3 (weights 1/4, 3/4).
A1, B1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
A2, B2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])
COUNTS = [1, 3]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-bert"))


def test_fedit_averages_each_factor() -> None:
    out = fedit([{"l.lora_A": A1, "l.lora_B": B1}, {"l.lora_A": A2, "l.lora_B": B2}], COUNTS)
    assert torch.equal(out.tensors["l.lora_A"], torch.tensor([[0.25, 0.75]]))
    assert torch.equal(out.tensors["l.lora_B"], torch.tensor([[0.25], [0.75]]))
    assert out.residuals == {}


def test_ffa_lora_averages_b_only_and_refuses_a() -> None:
    head1, head2 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    out = ffa_lora([{"l.lora_B": B1, "modules_to_save.classifier.bias": head1},
                    {"l.lora_B": B2, "modules_to_save.classifier.bias": head2}], COUNTS)
    assert torch.equal(out.tensors["l.lora_B"], torch.tensor([[0.25], [0.75]]))
    assert torch.equal(out.tensors["modules_to_save.classifier.bias"], torch.tensor([0.5, 3.0]))
    with pytest.raises(FedError, match="freezes A"):
        ffa_lora([{"l.lora_A": A1, "l.lora_B": B1}], [1])


def test_fedex_lora_folds_the_exact_residual() -> None:
    scale = 2.0
    out = fedex_lora([{"l.lora_A": A1, "l.lora_B": B1}, {"l.lora_A": A2, "l.lora_B": B2}], COUNTS, scale)
    # mean(B_i A_i) = diag(1/4, 3/4); mean(B) mean(A) = [[1/16, 3/16], [3/16, 9/16]]
    expected = scale * torch.tensor([[0.1875, -0.1875], [-0.1875, 0.1875]])
    assert torch.allclose(out.residuals["l"], expected, atol=1e-7)
    # folded into W, the model equals the exact weighted average of the clients' updates
    exact = scale * (0.25 * B1 @ A1 + 0.75 * B2 @ A2)
    folded = scale * out.tensors["l.lora_B"] @ out.tensors["l.lora_A"] + out.residuals["l"]
    assert torch.allclose(folded, exact, atol=1e-7)


def test_fed_sb_average_of_r_equals_average_of_full_updates() -> None:
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g)
    Rs = [torch.randn(3, 3, generator=g) for _ in range(4)]
    counts = [5, 1, 2, 8]
    out = fed_sb([{"l.lora_R": R} for R in Rs], counts)
    w = [c / sum(counts) for c in counts]
    full = sum(wi * B @ R @ A for wi, R in zip(w, Rs))
    assert torch.allclose(B @ out.tensors["l.lora_R"] @ A, full, atol=1e-6)
    assert aggregate(STRATEGIES["fed-sb"], [{"l.lora_R": R} for R in Rs], counts).tensors.keys() == {"l.lora_R"}


def test_aggregation_refuses_mismatched_keys_and_counts() -> None:
    with pytest.raises(FedError):
        fedit([{"l.lora_A": A1}, {"l.lora_B": B1}], [1, 1])
    with pytest.raises(FedError):
        fedit([{"l.lora_A": A1}], [0])


def test_fed_sb_one_step_equals_centralised_lora_sb(tiny_dir, tmp_path) -> None:
    """Full participation, identical data on each client, one local step: the Fed-SB aggregate (init from the
    sum of the clients' gradient sums, R averaged) is centralised LoRA-SB training, within 1e-6."""
    cfg = tiny_config(tiny_dir, tmp_path, strategy="fed-sb", local_steps=1, lr=1e-2)
    ws = local.workspace(cfg)
    features = local.client_features(cfg, 0, cfg.clients)
    clients = cfg.clients

    model, tokenizer = load_model(str(tiny_dir), "classification", num_labels=2)
    init_batches = [collate(features[:cfg.init_samples][i:i + cfg.batch_size], tokenizer.pad_token_id).inputs
                    for i in range(0, cfg.init_samples, cfg.batch_size)]
    api.attach(model, api.get_state(ws.model).config, data=init_batches)
    head = {k: v.detach().clone() for k, v in adapter_tensors(model).items() if k.startswith("modules_to_save.")}
    train(model, features, TrainConfig(steps=1, batch_size=cfg.batch_size, lr=1e-2, schedule="constant", warmup_steps=0,
                                       seed=local.local_seed(cfg, 1, 0), log_every=0, progress=False, save_adapter=False),
          pad_token_id=tokenizer.pad_token_id)
    central = adapter_tensors(model)

    init = fedsb_shared_init([local.gradient_sum(ws, features) for _ in range(clients)], api.get_state(ws.model).config)
    leaked = [name for name, p in ws.model.named_parameters() if p.grad is not None]
    assert not leaked, f"the gradient-sum passes left .grad on {leaked[:3]}"  # it would enter the local step
    updates = []
    for _ in range(clients):
        local.load_tensors(ws, {**init, **head})
        local.train_round(ws, features, 1, 0)
        updates.append(local.select(ws, "trainable"))
    federated = fed_sb(updates, [len(features)] * clients).tensors
    for key in init:  # the server-built init is LoRA-SB's centralised init (B, A; R before the step)
        if not key.endswith("lora_R"):
            assert torch.allclose(central[key], init[key], atol=1e-6), key
    assert set(federated) == {k for k in central if STRATEGIES["fed-sb"].is_trainable(k)}
    for key, value in federated.items():
        assert torch.allclose(central[key], value, atol=1e-6), key
    moved = max(float((federated[k] - init[k]).abs().max()) for k in init if k.endswith("lora_R"))
    assert moved > 1e-4  # the step did change R: the comparison is not between two untouched inits


def test_comm_accounting_and_fed_sb_upload_formula() -> None:
    ledger = comm.CommLedger()
    ledger.add(1, 7, down=100, what="trainable")
    ledger.add(1, 7, up=40)
    ledger.add(1, 8, up=40, down=100)
    ledger.add(2, 7, up=40, down=60)
    assert ledger.per_round() == {1: {"up": 80, "down": 200}, 2: {"up": 40, "down": 60}}
    assert ledger.per_client(1) == {"7": {"up": 40, "down": 100}, "8": {"up": 40, "down": 100}}
    assert ledger.totals() == {"up": 120, "down": 260} and ledger.totals(1) == {"up": 80, "down": 200}
    assert comm.CommLedger.from_json(ledger.to_json()).per_round() == ledger.per_round()
    assert comm.core_upload_bytes(16, 36) == 16 * 16 * 36 * 4
    assert comm.lora_upload_bytes(8, [(384, 384), (1536, 384)]) == 8 * (768 + 1920) * 4


def test_fed_sb_upload_is_r_squared_per_matrix_whatever_the_client_count(tiny_dir, tmp_path) -> None:
    for clients in (2, 5):
        cfg = tiny_config(tiny_dir, tmp_path, strategy="fed-sb", clients=clients)
        ws = local.workspace(cfg)
        cores = {k: v for k, v in local.select(ws, "trainable").items() if k.endswith("lora_R")}
        matrices = len(ws.layers)
        assert comm.payload_bytes(cores) == comm.core_upload_bytes(cfg.r, matrices, 4) == 4 * 4 * matrices * 4
    lora = local.select(local.workspace(tiny_config(tiny_dir, tmp_path, strategy="fedit")), "trainable")
    shapes = [(layer.out_features, layer.in_features) for layer in ws.layers.values()]
    assert comm.payload_bytes({k: v for k, v in lora.items() if "lora_" in k}) == comm.lora_upload_bytes(4, shapes)


def _examples(labels: list[int]) -> list[Example]:
    return [Example(text=f"s{i}", label=y) for i, y in enumerate(labels)]


def test_iid_partition_is_a_balanced_deterministic_cover() -> None:
    shards = partition.iid(103, 10, seed=3)
    assert sorted(i for s in shards for i in s) == list(range(103))
    assert {len(s) for s in shards} <= {10, 11}
    assert partition.iid(103, 10, seed=3) == shards and partition.iid(103, 10, seed=4) != shards


def test_dirichlet_partition_skews_labels_and_covers_everything() -> None:
    labels = [i % 2 for i in range(2000)]
    examples = _examples(labels)
    skewed = partition.partition(examples, 10, "dirichlet", 0.1, seed=0)
    flat = partition.partition(examples, 10, "dirichlet", 1000.0, seed=0)
    for shards in (skewed, flat):
        assert sorted(i for s in shards for i in s) == list(range(2000)) and min(map(len, shards)) >= 1

    def mean_skew(shards: list[list[int]]) -> float:
        counts = partition.label_counts(examples, shards, 2)
        return sum(abs(a - b) / (a + b) for a, b in counts) / len(counts)
    assert mean_skew(skewed) > 0.6 > 0.1 > mean_skew(flat)
    assert partition.partition(examples, 10, "dirichlet", 0.1, seed=0) == skewed
    with pytest.raises(FedConfigError, match="no labels"):
        partition.partition([Example(prompt="p", completion="c")] * 4, 2, "dirichlet", 0.5, 0)
    with pytest.raises(FedConfigError):
        partition.iid(3, 5, 0)


def test_screen_excludes_each_kind_of_malformed_update_with_a_reason() -> None:
    ref = {"l.lora_R": torch.zeros(2, 2)}
    good = {"l.lora_R": torch.full((2, 2), 0.1)}
    updates = {
        "ok1": good, "ok2": {"l.lora_R": torch.full((2, 2), 0.12)}, "ok3": {"l.lora_R": torch.full((2, 2), 0.09)},
        "shape": {"l.lora_R": torch.zeros(3, 2)},
        "dtype": {"l.lora_R": torch.zeros(2, 2, dtype=torch.float64)},
        "nan": {"l.lora_R": torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])},
        "inf": {"l.lora_R": torch.tensor([[float("inf"), 0.0], [0.0, 0.0]])},
        "keys": {"l.lora_A": torch.zeros(2, 2)},
        "huge": {"l.lora_R": torch.full((2, 2), 1e6)},
        "outlier": {"l.lora_R": torch.full((2, 2), 50.0)},
    }
    rejected = validate.screen(updates, ref, max_norm=1e3, factor=10.0)
    assert set(rejected) == {"shape", "dtype", "nan", "inf", "keys", "huge", "outlier"}
    assert "wrong shape" in rejected["shape"] and "wrong dtype" in rejected["dtype"]
    assert "non-finite" in rejected["nan"] and "non-finite" in rejected["inf"] and "wrong keys" in rejected["keys"]
    assert "max_update_norm" in rejected["huge"] and "median" in rejected["outlier"]


class _SilentGrid:
    """A Flower grid with two connected nodes that never answer (as when every client is slower than the limit)."""

    def get_node_ids(self) -> list[int]:
        return [11, 22]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        self.sent, self.timeout = list(messages), timeout
        return []


def test_shared_init_without_gradient_sums_names_every_client_and_the_time_limit(tiny_dir, tmp_path, caplog,
                                                                                 monkeypatch) -> None:
    """The ``clients`` init waits init_timeout (not round_timeout); if nothing usable arrives, the error and the
    log name each client left out and why.  The ``client`` init asks the designated client only."""
    from lorakit.fed import server
    # outside a Flower run a Message cannot be built (no run id): the grid above only counts what it is sent
    monkeypatch.setattr(server, "Message", lambda content, message_type, dst_node_id: (message_type, dst_node_id))
    cfg = tiny_config(tiny_dir, tmp_path, strategy="fed-sb", clients=2, round_timeout=5.0, init_timeout=77.0,
                      init_source="clients")
    grid = _SilentGrid()
    with caplog.at_level("WARNING", logger="lorakit.fed.server"), pytest.raises(FedError) as err:
        server.shared_init(grid, cfg, local.workspace(cfg), checkpoint.ServerState())  # type: ignore[arg-type]
    assert grid.timeout == 77.0 and sorted(grid.sent) == [(server.GRADSUM, 11), (server.GRADSUM, 22)]
    for node in ("11", "22"):
        assert f"client {node}: no gradient sum within init_timeout (77 s)" in str(err.value)
    logged = [r.getMessage() for r in caplog.records if "excluded client" in r.getMessage()]
    assert len(logged) == 2 and all("init_timeout (77 s)" in m for m in logged), logged
    with pytest.raises(FedError, match="client 11: no B, R, A within init_timeout"):
        server.shared_init(grid, cfg.replace(init_source="client"), local.workspace(cfg), checkpoint.ServerState())
    assert grid.sent == [(server.FEDSB_INIT, 11)]


def test_server_init_uses_the_servers_sample_and_uploads_nothing(tiny_dir, tmp_path) -> None:
    """The default (official) init: LoRA-SB's B, R, A from the first init_samples examples the server holds (a
    split, or the same examples in a .jsonl file); no message goes out, no byte is counted."""
    from lorakit.fed import server
    from lorakit.train.data import load_task
    cfg = tiny_config(tiny_dir, tmp_path, strategy="fed-sb", init_samples=16)  # two equal batches: sum = mean
    assert cfg.init_source == "server" and cfg.init_data == "train"
    ws = local.workspace(cfg)
    local.reset(ws)  # the cached model may carry an earlier test's training, as a server's does after a run
    grid = _SilentGrid()
    state = checkpoint.ServerState(tensors=local.select(ws, "trainable"))
    assert server.shared_init(grid, cfg, ws, state) == {}  # type: ignore[arg-type]
    assert not hasattr(grid, "sent") and state.ledger.totals() == {"up": 0, "down": 0}
    assert set(state.frozen) == {f"{n}.lora_{m}" for n in ws.layers for m in "BA"}
    assert all(f"{n}.lora_R" in state.tensors for n in ws.layers)

    model, tokenizer = load_model(str(tiny_dir), "classification", num_labels=2)
    _, examples = load_task("sst2", "train", cfg.data_dir, limit=16)
    batches = [collate(local.init_features(cfg)[i:i + cfg.batch_size], tokenizer.pad_token_id).inputs
               for i in range(0, 16, cfg.batch_size)]
    api.attach(model, api.get_state(ws.model).config, data=batches)  # centralised LoRA-SB on the same sample
    central = adapter_tensors(model)
    for key, value in state.frozen.items():
        assert torch.allclose(central[key], value, atol=1e-6), key

    path = tmp_path / "init.jsonl"
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
    from_file = checkpoint.ServerState(tensors=local.select(ws, "trainable"))
    server.shared_init(grid, cfg.replace(init_data=str(path)), ws, from_file)  # type: ignore[arg-type]
    for key, value in state.frozen.items():
        assert torch.allclose(from_file.frozen[key], value, atol=1e-6), key


_GONE = object()  # a metric the crafted reply leaves out


class _Reply:
    """What `LowRankStrategy.aggregate_train` reads of a Flower reply (a Message needs a running federation)."""

    def __init__(self, node: int, tensors: dict[str, torch.Tensor], count: object, **metrics: object) -> None:
        from flwr.app import ArrayRecord
        self.metadata = SimpleNamespace(src_node_id=node)
        record = {"num-examples": count, "train-loss": 0.5, **metrics}
        self.content = {"arrays": ArrayRecord(tensors), "metrics": {k: v for k, v in record.items() if v is not _GONE}}

    def has_error(self) -> bool:
        return False


@pytest.mark.parametrize("weighting, expected", [("uniform", 2.0), ("examples", 2.5)])
def test_untrusted_sample_counts_are_excluded_and_weighting_is_a_choice(caplog, weighting, expected) -> None:
    """``inf`` (NaN average), ``1e12`` (all the weight), 0, a negative, a string and more than the largest
    partition are excluded with a reason; the rest are averaged unweighted (default) or by sample count."""
    from lorakit.fed.config import FedConfig
    from lorakit.fed.server import LowRankStrategy
    cfg = FedConfig(strategy="fed-sb", weighting=weighting)
    state = checkpoint.ServerState(tensors={"l.lora_R": torch.zeros(2, 2)})
    strategy = LowRankStrategy(cfg, state, 1.0, max_count=100)
    counts = {1: 1, 2: 3, 3: float("inf"), 4: 1e12, 5: 0, 6: -4, 7: "12", 8: 101, 9: float("nan")}
    replies = [_Reply(node, {"l.lora_R": torch.full((2, 2), {1: 1.0, 2: 3.0}.get(node, 9.0))}, c)
               for node, c in counts.items()]
    with caplog.at_level("WARNING", logger="lorakit.fed.server"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert torch.allclose(arrays.to_torch_state_dict()["l.lora_R"], torch.full((2, 2), expected))
    excluded = strategy.excluded[1]
    assert sorted(excluded) == ["3", "4", "5", "6", "7", "8", "9"]
    assert all(r.startswith("untrusted sample count") for r in excluded.values())
    assert "finite and positive, got inf" in excluded["3"] and "exceeds" in excluded["4"]
    assert "must be a number, got str" in excluded["7"] and "101 exceeds" in excluded["8"]
    assert len([r for r in caplog.records if "excluded client" in r.getMessage()]) == 7
    assert metrics["num-examples"] == 4 and metrics["clients"] == 2


@pytest.mark.parametrize("dp", [False, True])
def test_untrusted_losses_and_epsilons_are_excluded_not_recorded(caplog, dp) -> None:
    """A missing, string, NaN, inf or negative ``train-loss`` and (under DP) a missing, string, NaN, negative or
    over-budget ``epsilon`` exclude that client with a reason; the round's loss and ε come from the others and are
    finite.  Without DP an ``epsilon`` key is not read at all."""
    from lorakit.fed.config import FedConfig
    from lorakit.fed.server import LowRankStrategy
    cfg = FedConfig(strategy="fed-sb", dp_epsilon=3.0 if dp else None)
    state = checkpoint.ServerState(tensors={"l.lora_R": torch.zeros(2, 2)})
    strategy = LowRankStrategy(cfg, state, 1.0, max_count=100)
    crafted: dict[int, dict[str, object]] = {
        3: {"train-loss": _GONE}, 4: {"train-loss": "0.3"}, 5: {"train-loss": float("nan")},
        6: {"train-loss": float("inf")}, 7: {"train-loss": -1.0}, 8: {"train-loss": True}}
    if dp:
        crafted.update({9: {"epsilon": _GONE}, 10: {"epsilon": "1"}, 11: {"epsilon": float("nan")},
                        12: {"epsilon": -0.5}, 13: {"epsilon": 4.0}, 14: {"epsilon": float("inf")}})
    good = {1: {"train-loss": 0.25, "epsilon": 1.0}, 2: {"train-loss": 0.75, "epsilon": 2.0}}
    replies = [_Reply(node, {"l.lora_R": torch.full((2, 2), float(node))}, 1,
                      **({"epsilon": 1.5} | metrics if dp else metrics))
               for node, metrics in {**good, **crafted}.items()]
    if not dp:
        replies.append(_Reply(20, {"l.lora_R": torch.full((2, 2), 3.0)}, 1,
                              **{"train-loss": 0.75, "epsilon": float("nan")}))
    with caplog.at_level("WARNING", logger="lorakit.fed.server"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    excluded = strategy.excluded[1]
    assert sorted(map(int, excluded)) == sorted(crafted)
    assert all(r.startswith("untrusted metrics: ") for r in excluded.values()), excluded
    assert "train-loss missing" in excluded["3"] and "train-loss must be a number, got str" in excluded["4"]
    assert "got nan" in excluded["5"] and "got inf" in excluded["6"] and "got -1" in excluded["7"]
    assert "got bool" in excluded["8"]
    kept = [1, 2] if dp else [1, 2, 20]
    assert metrics["clients"] == len(kept)
    assert metrics["train-loss"] == pytest.approx(sum({1: 0.25, 2: 0.75, 20: 0.75}[n] for n in kept) / len(kept))
    assert torch.allclose(arrays.to_torch_state_dict()["l.lora_R"], torch.full((2, 2), 1.5 if dp else 2.0))
    if dp:
        assert metrics["epsilon"] == 2.0  # the largest trusted client's ε
        assert "epsilon missing" in excluded["9"] and "epsilon must be a number, got str" in excluded["10"]
        assert "got nan" in excluded["11"] and "got -0.5" in excluded["12"] and "[0, 3.03], got 4" in excluded["13"]
    else:
        assert "epsilon" not in metrics
    logged = [r.getMessage() for r in caplog.records if "excluded client" in r.getMessage()]
    assert len(logged) == len(crafted)


def test_privacy_note_names_the_inits_source_and_what_the_dp_guarantee_leaves_out() -> None:
    from lorakit.fed.config import FedConfig
    from lorakit.fed.server import privacy_note
    assert privacy_note(FedConfig()).startswith("no differential privacy")
    assert "the server's first 128 examples of the train split, held out of every client's shard" in privacy_note(
        FedConfig())
    held = privacy_note(FedConfig(dp_epsilon=3.0))
    assert "held out of every client's shard" in held and "OUTSIDE" not in held
    assert "OUTSIDE" not in privacy_note(FedConfig(dp_epsilon=3.0, init_data="dev"))
    assert "of the dev split, which no client holds" in privacy_note(FedConfig(init_data="dev"))
    assert "not checked against the clients' data" in privacy_note(FedConfig(init_data="init.jsonl"))
    overlap = privacy_note(FedConfig(dp_epsilon=3.0, init_overlap=True))
    assert "which the clients' shards also hold" in overlap and "OUTSIDE this guarantee" in overlap
    for source in ("client", "clients"):
        assert "OUTSIDE this guarantee" in privacy_note(FedConfig(dp_epsilon=3.0, init_source=source))
    assert "init" not in privacy_note(FedConfig(strategy="fedit", dp_epsilon=3.0, init_source="clients"))
    assert FedConfig().dp_max_grad_norm == 0.1  # the official Fed-SB DP script's clip norm


@pytest.mark.parametrize("task, scheme", [("sst2", "iid"), ("sst2", "dirichlet"), ("arith", "iid")])
def test_no_client_holds_a_row_of_the_servers_init_by_default(tiny_dir, tmp_path, task, scheme) -> None:
    """Fed-SB's default init reads the train split's first init_samples rows; the clients' pool starts after them
    (and still holds train_limit rows), so no shard holds an init row; ``init_overlap`` puts them back."""
    from lorakit.train.data import load_task
    cfg = tiny_config(tiny_dir, tmp_path, strategy="fed-sb", task=task, partition=scheme, init_samples=40,
                      train_limit=300)
    _, init_rows = load_task(task, "train", cfg.data_dir, seed=cfg.seed, limit=cfg.init_samples)
    _, train = load_task(task, "train", cfg.data_dir, seed=cfg.seed)
    pool = local.client_pool(cfg)
    assert len(pool) == 300 and pool == list(train[40:340]) and list(init_rows) == list(train[:40])
    shards = partition.partition(pool, cfg.clients, scheme, cfg.alpha, cfg.seed)
    held = {repr(pool[i]) for shard in shards for i in shard}
    assert len(held) == 300 and not held & {repr(e) for e in init_rows}  # the slices' rows are all distinct
    assert local.shard_sizes(cfg) == [len(s) for s in shards]
    assert local.client_pool(cfg.replace(init_overlap=True)) == list(train[:300])  # the official overlap
    assert local.client_pool(cfg.replace(init_data="dev")) == list(train[:300])  # nothing of train to hold out
    assert local.client_pool(cfg.replace(strategy="fedit")) == list(train[:300])  # no init at all
    with pytest.raises(FedConfigError, match="none is left for the clients"):
        local.client_pool(cfg.replace(task="sst2", train_limit=None, init_samples=800))


def test_checkpoint_round_trip_and_refusals(tiny_dir, tmp_path) -> None:
    cfg = tiny_config(tiny_dir, tmp_path)
    ledger = comm.CommLedger()
    ledger.add(1, 5, up=10, down=20)
    state = checkpoint.ServerState(3, {"l.lora_R": torch.randn(2, 2)}, {"l.lora_B": torch.randn(4, 2)},
                                   {"l": torch.randn(4, 4)}, 2, ledger, [{"round": 3, "loss": 0.5}])
    where = checkpoint.save(tmp_path, state, cfg)
    assert sorted(p.name for p in where.iterdir()) == ["state.json", "state.safetensors"]
    back = checkpoint.load(tmp_path, cfg)
    assert back is not None and back.round == 3 and back.offsets_version == 2 and back.history == state.history
    for group in ("tensors", "frozen", "offsets"):
        for k, v in getattr(state, group).items():
            assert torch.equal(getattr(back, group)[k], v)
    assert back.ledger.per_round() == ledger.per_round()
    assert checkpoint.load(tmp_path / "nothing", cfg) is None
    with pytest.raises(CheckpointError, match="differ"):
        checkpoint.load(tmp_path, cfg.replace(strategy="fedit"))
    (where / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path, cfg)


@pytest.mark.parametrize("strategy", ["fed-sb", "fedit"])
def test_dp_grad_samplers_match_autograd(tiny_dir, tmp_path, strategy) -> None:
    """The per-sample gradients lorakit registers with Opacus sum to the batch gradient."""
    from opacus import GradSampleModule
    cfg = tiny_config(tiny_dir, tmp_path, strategy=strategy)
    ws = local.workspace(cfg)
    features = local.client_features(cfg, 0, cfg.clients)
    if strategy == "fed-sb":
        local.load_tensors(ws, fedsb_shared_init([local.gradient_sum(ws, features)], api.get_state(ws.model).config))
    dp._register_grad_samplers()
    inputs = collate(features[:4], ws.pad_id).inputs
    wrapped = GradSampleModule(ws.model, batch_first=True, loss_reduction="sum", strict=False)
    ws.model.train()
    try:
        ws.model.zero_grad(set_to_none=True)
        logits = wrapped(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, inputs["labels"], reduction="sum").backward()
        checked = 0
        for name, p in ws.model.named_parameters():
            if p.requires_grad and ".lora_" in name:
                assert p.grad_sample.shape == (4, *p.shape)
                assert torch.allclose(p.grad_sample.sum(0), p.grad, atol=1e-5, rtol=1e-4), name
                checked += 1
        assert checked == len(ws.layers) * (1 if strategy == "fed-sb" else 2)
    finally:
        ws.model.eval()
        wrapped.remove_hooks()
        for p in ws.model.parameters():
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None


def test_dp_training_reports_epsilon_each_round_within_budget(tiny_dir, tmp_path) -> None:
    """DP-SGD over two rounds; the accountant travels between rounds as the client keeps it (a ConfigRecord)."""
    from flwr.app import ConfigRecord
    cfg = tiny_config(tiny_dir, tmp_path, strategy="fedit", dp_epsilon=3.0, rounds=2, local_steps=3)
    ws = local.workspace(cfg)
    features = local.client_features(cfg, 0, cfg.clients)
    start = local.select(ws, "trainable")
    state = dp.calibrate(3.0, None, len(features), cfg.batch_size, cfg.rounds * cfg.local_steps, cfg.dp_max_grad_norm)
    eps = []
    for round_ in (1, 2):
        local.load_tensors(ws, start)
        metrics = local.train_round(ws, features, round_, 0, state)
        eps.append(metrics["epsilon"])
        state = dp.PrivacyState.from_record(ConfigRecord(state.to_record()))
        moved = max(float((local.select(ws, "trainable")[k] - start[k]).abs().max()) for k in start)
        assert moved > 0
    assert 0 < eps[0] < eps[1] <= 3.0 * 1.01
    assert state.noise_multiplier > 0 and sum(h[2] for h in state.history) == 2 * cfg.local_steps
    assert abs(state.epsilon() - eps[1]) < 1e-9
    with pytest.raises(FedConfigError):
        dp.calibrate(3.0, 1.5, 10, 2, 4, 1.0)
