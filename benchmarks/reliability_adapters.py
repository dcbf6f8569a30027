"""Reliability of `lorakit.load` on hostile adapter files: a mutation campaign (run by hand, CPU).

    python benchmarks/reliability_adapters.py                    # every method, 90 mutations each (~5 min, 2 cores)
    python benchmarks/reliability_adapters.py --methods lora,dora --per-method 300 --out /tmp/x

Each method's adapter (rank 4, every linear layer of the tiny random Llama of the test suite, perturbed so it is
not the identity; XGBLoRA and COLA with a merged round on half of their layers) is saved, then copied and
mutated by the fuzz test's mutator (``tests/test_fuzz_adapters.py``: config values of wrong types and out of
range, top-level keys, fingerprint entries, deep or broken JSON, hostile ``target_modules`` regexes, base
offsets injected, removed or of the wrong dtype or rank, non-finite, huge, non-float, misshapen, missing, extra
and renamed tensors, truncated or flipped safetensors bytes, ...).  Each mutated directory is loaded into a
fresh model in a forked child with a time limit and classified:

* clean error: a `LorakitError`, and the model exactly as before (weights, modules, outputs);
* correct load: finite outputs, equal to the original adapter's where the mutation does not change the adapter;
* wrong exception: any other exception;  silent bad load: a load that should have failed, non-finite or wrong
  outputs, or a failed load that changed the model;  hang: no answer within the time limit.

Writes ``<out>/reliability-adapters.json`` and ``<out>/reliability-adapters.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lorakit  # noqa: E402
from tests.test_fuzz_adapters import OUTCOMES, TIME_LIMIT_S, campaign  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(lorakit.methods()), help="comma-separated method names")
    parser.add_argument("--per-method", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = args.methods.split(",")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = campaign(methods, args.per_method, Path(tmp), seed=args.seed)
    seconds = time.perf_counter() - start

    total: Counter[str] = Counter()
    for r in results.values():
        total.update(r["verdicts"])
    report = {
        "command": "python benchmarks/reliability_adapters.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}",
        "seconds": round(seconds, 1),
        "tried": sum(total.values()),
        "totals": {o: total[o] for o in OUTCOMES},
        "methods": {m: {"tried": sum(r["verdicts"].values()), **{o: r["verdicts"][o] for o in OUTCOMES},
                        "problems": r["problems"]} for m, r in results.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability-adapters.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "reliability-adapters.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    head = "| method | tried | " + " | ".join(OUTCOMES) + " |"
    lines = [
        "# Reliability: hostile adapter files",
        "",
        f"`{report['command']}` ({report['machine']}; {report['seconds']:.0f} s).  Mutated adapter directories of "
        f"the tiny random Llama, each loaded in a forked child with a {TIME_LIMIT_S:.0f} s limit; categories as in the "
        "script's docstring.  Target: 0 wrong exceptions, 0 silent bad loads, 0 hangs.",
        "",
        head,
        "|" + "---|" * (len(OUTCOMES) + 2),
    ]
    for name, row in report["methods"].items():
        lines.append(f"| {name} | {row['tried']} | " + " | ".join(str(row[o]) for o in OUTCOMES) + " |")
    lines.append(f"| **all** | **{report['tried']}** | "
                 + " | ".join(f"**{report['totals'][o]}**" for o in OUTCOMES) + " |")
    problems = [f"- {m}: {p}" for m, row in report["methods"].items() for p in row["problems"]]
    lines += ["", "Problems:" if problems else "No problem found.", *problems, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
