"""docs/fidelity.md covers every registered method and Fed-SB, and every test it cites exists."""

import ast
import re
from pathlib import Path

import lorakit

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "fidelity.md"
CITATION = re.compile(r"\b(tests/[\w/]+\.py)::(\w+)")


def _sections() -> set[str]:
    """The first word of every ``## `` heading: the method name (``## lora-sb (pending: ...)`` -> ``lora-sb``)."""
    return {line[3:].split()[0] for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("## ")}


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_registered_method_and_fed_sb_has_a_section() -> None:
    sections = _sections()
    missing = sorted(set(lorakit.methods()) - sections)
    assert not missing, f"docs/fidelity.md has no section for {missing}"
    assert "Fed-SB" in sections


def test_every_cited_test_exists() -> None:
    citations = CITATION.findall(DOC.read_text(encoding="utf-8"))
    assert len(citations) > 40, "the page cites the tests that pin each method"
    names: dict[str, set[str]] = {}
    missing = []
    for file, name in citations:
        path = ROOT / file
        if file not in names:
            names[file] = _test_names(path) if path.is_file() else set()
        if name not in names[file]:
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/fidelity.md cites tests that do not exist: {missing}"
