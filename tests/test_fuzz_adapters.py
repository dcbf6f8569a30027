"""Hostile adapter files: mutated copies of saved adapters, each loaded into a fresh tiny Llama in a forked child
with a time limit.  Every load must end in a `LorakitError` that leaves the model untouched, or in a correct load
(finite outputs; equal to the original adapter's outputs when the mutation does not change the adapter).

The mutator is shared with ``benchmarks/reliability_adapters.py``, which runs a larger campaign.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import select
import shutil
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.errors import LorakitError
from tests.tiny_models import KINDS, make_config, output, perturb

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# Neutral mutations must reproduce the original outputs; float64 <-> float32 round trips are exact, so only
# the summation order differs.
NEUTRAL_TOL = 1e-5
TIME_LIMIT_S = 30.0
OUTCOMES = ("clean error", "correct load", "wrong exception", "silent bad load", "hang")


@dataclass(frozen=True)
class Mutation:
    """``apply(directory)`` edits a copy of a saved adapter.  ``expect``: ``"error"`` (must be refused),
    ``"neutral"`` (must load with the original outputs) or ``"any"`` (refused, or loaded with finite outputs)."""

    name: str
    expect: str
    apply: Callable[[Path], None]


# -- file edits -----------------------------------------------------------------------------------------------
def edit_json(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        data = json.loads((directory / CONFIG).read_text())
        edit(data)
        (directory / CONFIG).write_text(json.dumps(data))  # NaN/Infinity written as JSON's extensions
    return apply


def write_config_text(text: str | bytes) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / CONFIG
        path.write_bytes(text.encode() if isinstance(text, str) else text)
    return apply


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        tensors = load_file(directory / WEIGHTS)
        edit(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / WEIGHTS, metadata={"format": "lorakit"})
    return apply


def edit_bytes(edit: Callable[[bytearray], bytes | bytearray]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / WEIGHTS
        path.write_bytes(bytes(edit(bytearray(path.read_bytes()))))
    return apply


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _delete(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1], None)
    return edit


def _tensor_edit(key: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        new = fn(tensors[key].clone())
        if new is None:
            del tensors[key]
        else:
            tensors[key] = new
    return edit


def _poke(value: float, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[index % t.numel()] = value
        return t
    return fn


# -- the mutator ------------------------------------------------------------------------------------------------
WRONG_TYPES: dict[type, list[Any]] = {  # JSON values of the wrong type for a field whose default has this type
    bool: ["no", -1, 1, 0, None, "true", [], 1.0],
    int: ["4", 4.5, True, None, [4], {"a": 1}, 1e300],
    float: ["x", True, None, [], {}, float("inf"), float("-inf"), float("nan")],
    str: [5, None, [], True, 1.5, {"a": "b"}],
    tuple: [5, None, "x", True, {"a": 1}],
}
IN_TYPE: dict[type, list[Any]] = {  # values of the right type, possibly out of range
    bool: [True, False],
    int: [-1, 0, 1, 2, 3, 10**30, 2**63, -(10**20)],
    float: [-1.0, 0.0, 1e-30, 0.5, 3.0, 1e30, 1e308, -1e308],
    str: ["", "x", "all-linear", "a" * 5000],
    tuple: [[], ["q_proj"], ["x"], [""]],
}
HOSTILE_REGEXES = ["(.*)*X", "(.|.)*q", "a{1000000}", "((a{100}){100}){100}", "(", "[a-", "(?P<x>a)(?P=y)",
                   "\\", "a" * 2000]


def mutations(directory: Path, rng: random.Random) -> list[Mutation]:
    """Every mutation kind once, with random targets (a field, a tensor, an entry) drawn from ``rng``."""
    data = json.loads((directory / CONFIG).read_text())
    tensors = load_file(directory / WEIGHTS)
    method = lorakit.get_method(data["method"])
    defaults = {f.name: f.default for f in dataclasses.fields(method.config_class)}
    keys = sorted(tensors)
    layers = sorted(data["fingerprint"])
    offsets = [k for k in keys if ".base_offset_" in k]
    plain = [k for k in keys if ".base_offset_" not in k]
    out: list[Mutation] = []

    def add(name: str, expect: str, apply: Callable[[Path], None]) -> None:
        out.append(Mutation(name, expect, apply))

    # config values: wrong types must be refused; right types may load (finite) or be refused
    for field_name, default in defaults.items():
        kind = tuple if isinstance(default, tuple) else type(default)
        if field_name == "alpha":
            kind = float
        if kind in WRONG_TYPES:
            bad = rng.choice(WRONG_TYPES[kind])
            if not (kind is float and field_name == "alpha" and bad is None):
                add(f"config.{field_name}={bad!r:.30} (wrong type)", "error", edit_json(_set(["config", field_name], bad)))
            value = rng.choice(IN_TYPE[kind])
            add(f"config.{field_name}={value!r:.30}", "any", edit_json(_set(["config", field_name], value)))
        else:  # X | None defaults: any value of any type must be handled cleanly
            value = rng.choice(WRONG_TYPES[str] + IN_TYPE[int] + IN_TYPE[float])
            add(f"config.{field_name}={value!r:.30}", "any", edit_json(_set(["config", field_name], value)))
    add("config.alpha=1e30", "any", edit_json(_set(["config", "alpha"], 1e30)))  # refused unless ΔW is normalised
    add("config.alpha=Infinity", "error", edit_json(_set(["config", "alpha"], float("inf"))))
    add("config.r=10**12", "error", edit_json(_set(["config", "r"], 10**12)))
    add("config: unknown key", "neutral", edit_json(_set(["config", "not_a_field"], [1, 2])))
    add("config: null", "error", edit_json(_set(["config"], None)))
    add("config: list", "error", edit_json(_set(["config"], [])))
    add(f"config: drop {rng.choice(['r', 'target_modules'])}", "error",
        edit_json(_delete(["config", rng.choice(["r", "target_modules"])])))
    add("target_modules: same modules as a regex", "neutral",
        edit_json(_set(["config", "target_modules"], r"model\.layers\.\d+\.(self_attn|mlp)\.[a-z]+_proj")))
    add("target_modules: same modules as a list", "neutral", edit_json(_set(
        ["config", "target_modules"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])))
    add("target_modules: fewer modules", "error", edit_json(_set(["config", "target_modules"], ["q_proj"])))
    regex = rng.choice(HOSTILE_REGEXES)
    add(f"target_modules: hostile regex {regex[:20]!r}", "error", edit_json(_set(["config", "target_modules"], regex)))
    add("modules_to_save: a module", "error", edit_json(_set(["config", "modules_to_save"], ["lm_head"])))

    # top-level keys
    for key, values in {"method": [[], 5, None, "nope", {"a": 1}], "lorakit_format_version": ["1", True, 0, 2, 1.5, None],
                        "fingerprint": [None, [], "x", 5], "base_model": [5, None, []],
                        "modules_to_save": [5, "x", [1]], "base_offsets": [5, [], {"x": 1}, "x"]}.items():
        add(f"{key}={rng.choice(values)!r:.30}", "error", edit_json(_set([key], rng.choice(values))))
    add("method: another method", "any", edit_json(_set(["method"], rng.choice(sorted(lorakit.methods())))))
    add("base_model: another name", "neutral", edit_json(_set(["base_model"], "someone/else")))
    add("unknown top-level key", "neutral", edit_json(_set(["comment"], {"nested": [1, 2, 3]})))
    add(f"drop {rng.choice(['method', 'config', 'fingerprint', 'lorakit_format_version'])}", "error",
        edit_json(_delete([rng.choice(["method", "config", "fingerprint", "lorakit_format_version"])])))
    layer = rng.choice(layers)
    entry = rng.choice(["shape", "norm", "probe"])
    bad_entry = rng.choice({"shape": [[1], "x", [0, 4], [True, 4], None], "norm": ["x", float("nan"), -1.0, None, []],
                            "probe": [[], [0.0] * 15, ["x"] * 16, [float("inf")] * 16, None]}[entry])
    add(f"fingerprint.{entry}={bad_entry!r:.30}", "error", edit_json(_set(["fingerprint", layer, entry], bad_entry)))
    add("fingerprint: entry null", "error", edit_json(_set(["fingerprint", layer], None)))
    add("fingerprint: drop a layer", "error", edit_json(_delete(["fingerprint", layer])))
    add("fingerprint: another norm", "error", edit_json(_set(["fingerprint", layer, "norm"], 123.0)))
    depth = rng.choice([1000, 100_000])
    add(f"JSON nested {depth} deep", "error", write_config_text("[" * depth + "]" * depth))
    add("JSON: a list", "error", write_config_text("[1, 2]"))
    add("JSON: truncated", "error", write_config_text(json.dumps(data)[: rng.randrange(1, 200)]))
    add("JSON: not UTF-8", "error", write_config_text(b"\xff\xfe\x00{"))
    add("JSON: pretty-printed", "neutral", write_config_text(json.dumps(data, indent=4, sort_keys=True)))

    # base offsets: the method declares which layers carry them
    if method.base_offsets == "none":
        target = rng.choice(layers)
        d_out, d_in = data["fingerprint"][target]["shape"]

        def inject(t: dict[str, torch.Tensor], target: str = target) -> None:
            t[f"{target}.base_offset_B"] = 0.1 * torch.randn(d_out, 2)
            t[f"{target}.base_offset_A"] = 0.1 * torch.randn(2, d_in)
        add("base offsets injected", "error", edit_tensors(inject))
        add("base_offsets record injected", "error", edit_json(_set(["base_offsets"], {target: 2})))
    if offsets:
        key = rng.choice(offsets)
        pair = key.rsplit(".", 1)[0]
        add("base offset: one factor removed", "error", edit_tensors(_tensor_edit(key, lambda t: None)))
        add("base offsets: one layer removed", "error", edit_tensors(
            lambda t, pair=pair: [t.pop(f"{pair}.base_offset_A"), t.pop(f"{pair}.base_offset_B")] and None))
        add("base offsets: all removed", "error", edit_tensors(
            lambda t: [t.pop(k) for k in [k for k in t if ".base_offset_" in k]] and None))
        add("base offset: integer", "error", edit_tensors(_tensor_edit(key, lambda t: t.to(torch.int32))))
        add("base offset: wrong rank", "error", edit_tensors(_tensor_edit(key, lambda t: torch.cat([t, t], dim=-1))))
        add("base offset: NaN", "error", edit_tensors(_tensor_edit(key, _poke(float("nan"), rng.randrange(1000)))))
        add("base_offsets record dropped", "neutral" if method.moves_base else "error",
            edit_json(_delete(["base_offsets"])))
        add("base_offsets record: another rank", "error",
            edit_json(_set(["base_offsets", pair], data.get("base_offsets", {}).get(pair, 4) + 1)))

    # tensor values, dtypes, shapes, names
    for _ in range(3):
        key = rng.choice(plain)
        value = rng.choice([float("nan"), float("inf"), float("-inf"), 3e38, -3e38])
        add(f"{key}: one entry {value}", "error", edit_tensors(_tensor_edit(key, _poke(value, rng.randrange(10**6)))))
    key = rng.choice(plain)
    add(f"{key}: all 3e38", "error", edit_tensors(_tensor_edit(key, lambda t: torch.full_like(t, 3e38))))
    key = rng.choice(plain)
    scale = rng.choice([1e6, 1e12, 1e30])
    add(f"{key}: times {scale:g}", "any", edit_tensors(_tensor_edit(key, lambda t, s=scale: t * s)))
    key = rng.choice(plain)
    factor = rng.choice([0.5, 2.0])
    add(f"{key}: times {factor}", "any", edit_tensors(_tensor_edit(key, lambda t, f=factor: t * f)))
    key = rng.choice(plain)
    add(f"{key}: zeros", "any", edit_tensors(_tensor_edit(key, torch.zeros_like)))
    key = rng.choice(keys)
    dtype = rng.choice([torch.int32, torch.int64, torch.bool, torch.uint8, torch.int8, torch.float8_e4m3fn])
    add(f"{key}: dtype {dtype}", "error", edit_tensors(_tensor_edit(key, lambda t, d=dtype: t.to(d))))
    add("every tensor float64", "neutral", edit_tensors(lambda t: t.update({k: v.double() for k, v in t.items()})))
    key = rng.choice(keys)
    add(f"{key}: bfloat16", "any", edit_tensors(_tensor_edit(key, lambda t: t.to(torch.bfloat16))))
    key = rng.choice(keys)
    add(f"{key}: removed", "error", edit_tensors(_tensor_edit(key, lambda t: None)))
    key = rng.choice(plain)
    add(f"{key}: transposed/reshaped", "error", edit_tensors(_tensor_edit(
        key, lambda t: t.T.contiguous() if t.ndim == 2 and t.shape[0] != t.shape[1] else t.reshape(-1)[:-1])))
    key = rng.choice(plain)
    add(f"{key}: empty", "error", edit_tensors(_tensor_edit(key, lambda t: t.reshape(-1)[:0])))
    key = rng.choice(plain)
    add(f"{key}: a row added", "error", edit_tensors(_tensor_edit(key, lambda t: torch.cat([t, t[:1]]) if t.ndim else t[None])))
    extra = rng.choice([f"{rng.choice(layers)}.lora_C", "modules_to_save.lm_head.weight", "model.embed_tokens.weight",
                        f"{rng.choice(layers)}.base.weight"])
    add(f"extra tensor {extra}", "error", edit_tensors(lambda t, k=extra: t.update({k: torch.zeros(4, 4)})))
    key = rng.choice(keys)
    add(f"{key}: renamed", "error", edit_tensors(lambda t, k=key: t.update({k + "_x": t.pop(k)})))

    # raw bytes of the safetensors file
    size = (directory / WEIGHTS).stat().st_size
    header = struct.unpack("<Q", (directory / WEIGHTS).read_bytes()[:8])[0]
    cut = rng.randrange(0, size)
    add(f"safetensors truncated at {cut}", "error", edit_bytes(lambda b, c=cut: b[:c]))
    pos = rng.randrange(8, 8 + header)
    add(f"safetensors header byte {pos} flipped", "any", edit_bytes(lambda b, p=pos: b[:p] + bytes([b[p] ^ 0xFF]) + b[p + 1:]))
    pos = rng.randrange(8 + header, size)
    add(f"safetensors data byte {pos} flipped", "any", edit_bytes(lambda b, p=pos: b[:p] + bytes([b[p] ^ 0xFF]) + b[p + 1:]))
    add("safetensors header length huge", "error", edit_bytes(lambda b: struct.pack("<Q", 2**62) + b[8:]))
    add("safetensors: garbage", "error", edit_bytes(lambda b: bytes(rng.randrange(256) for _ in range(64))))
    add("safetensors: a pickle", "error", edit_bytes(lambda b: b"\x80\x04\x95" + b[:100]))
    add("safetensors removed", "error", lambda d: (d / WEIGHTS).unlink())
    return out


# -- running one mutation in a forked child ----------------------------------------------------------------------
@dataclass
class Target:
    """A fresh base model, its state (to check a failed load left it untouched), the inputs and the reference
    outputs of the original adapter."""

    model: nn.Module
    inputs: dict[str, torch.Tensor]
    reference: torch.Tensor

    def __post_init__(self) -> None:
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.base_out = output(self.model, self.inputs)


def judge(target: Target, directory: Path, expect: str) -> str:
    """Load ``directory`` into ``target.model`` (in this process) and classify the result."""
    model = target.model
    try:
        lorakit.load(model, directory)
    except LorakitError:
        unchanged = getattr(model, "_lorakit", None) is None and all(
            torch.equal(v, target.state[k]) for k, v in model.state_dict().items())
        unchanged = unchanged and torch.equal(output(model, target.inputs), target.base_out)
        return "clean error" if unchanged else "silent bad load"
    except BaseException as err:  # any other exception is what this test looks for
        return f"wrong exception: {type(err).__name__}: {str(err)[:120]}"
    out = output(model, target.inputs)
    if not torch.isfinite(out).all() or expect == "error":
        return "silent bad load"
    if expect == "neutral":
        diff = (out - target.reference).abs().max().item()
        if diff > NEUTRAL_TOL * max(1.0, target.reference.abs().max().item()):
            return f"silent bad load: outputs differ by {diff:.3g}"
    return "correct load"


def run_forked(target: Target, directory: Path, expect: str, time_limit: float = TIME_LIMIT_S) -> str:
    """`judge` in a forked child (the parent's torch and model are shared copy-on-write), killed after
    ``time_limit`` seconds (outcome ``"hang"``)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_fd)
        try:
            verdict = judge(target, directory, expect)
        except BaseException as err:
            verdict = f"wrong exception: {type(err).__name__} while judging"
        os.write(write_fd, verdict.encode()[:4000])
        os._exit(0)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], time_limit)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            return "hang"
        verdict = os.read(read_fd, 4096).decode() or "wrong exception: the child died"
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    return verdict


def outcome(verdict: str) -> str:
    """The campaign's category of a verdict."""
    return next(o for o in OUTCOMES if verdict.startswith(o))


# -- the original adapters -----------------------------------------------------------------------------------
def saved_adapter(method_name: str, directory: Path) -> Target:
    """A trained-looking adapter of ``method_name`` on the tiny Llama, saved to ``directory``; XGBLoRA and COLA
    with a merged round on half of their layers.  Returns a fresh base model and the adapter's outputs."""
    kind = KINDS["llama"]
    method = lorakit.get_method(method_name)
    model = kind.build(0)
    data = kind.batches() if method.needs_data else None
    lorakit.attach(model, make_config(method, kind, r=4, modules_to_save=()), data=data)  # lora-sb's init_lr too
    perturb(model, std=0.1)
    if method.base_offsets == "merged-rounds":
        layers = lorakit.get_state(model).layers
        for name in sorted(layers)[::2]:
            layers[name].merge_booster(1.0)  # type: ignore[operator]
        perturb(model, seed=8, std=0.1)
    lorakit.save(model, directory)
    return Target(kind.build(0), kind.inputs(), output(model, kind.inputs()))


def campaign(methods: list[str], per_method: int, root: Path, seed: int = 0,
             progress: Callable[[str, str, str], None] | None = None) -> dict[str, dict[str, Any]]:
    """``per_method`` mutated directories of each method (the mutator's list, repeated with fresh random
    choices), each judged in a forked child.  Returns method -> {"verdicts": Counter, "problems": [...]}."""
    results: dict[str, dict[str, Any]] = {}
    for method_name in methods:
        original = root / method_name / "original"
        target = saved_adapter(method_name, original)
        rng = random.Random(f"{seed}-{method_name}")
        counts: Counter[str] = Counter()
        problems: list[str] = []
        seconds = 0.0
        done = 0
        while done < per_method:
            for mutation in mutations(original, rng):
                if done == per_method:
                    break
                work = root / method_name / f"m{done}"
                shutil.copytree(original, work)
                mutation.apply(work)
                start = time.perf_counter()
                verdict = run_forked(target, work, mutation.expect)
                seconds += time.perf_counter() - start
                shutil.rmtree(work)
                counts[outcome(verdict)] += 1
                if outcome(verdict) not in ("clean error", "correct load"):
                    problems.append(f"{mutation.name} [{mutation.expect}]: {verdict}")
                if progress:
                    progress(method_name, mutation.name, verdict)
                done += 1
        results[method_name] = {"verdicts": counts, "problems": problems, "seconds": seconds}
    return results


# -- the test -------------------------------------------------------------------------------------------------------
FUZZ_METHODS = ["lora", "dora", "pissa", "xgblora", "adalora", "lora-xs"]


def test_fuzz_mutated_adapters(tmp_path: Path) -> None:
    """~300 mutated adapter directories over six methods: only clean errors and correct loads, no hang."""
    results = campaign(FUZZ_METHODS, per_method=50, root=tmp_path)
    problems = [f"{m}: {p}" for m, r in results.items() for p in r["problems"]]
    counts = sum((r["verdicts"] for r in results.values()), Counter())
    assert sum(counts.values()) == 300
    assert counts["clean error"] > 150 and counts["correct load"] > 20, counts
    assert not problems, "\n".join(problems)
