"""The package imports one way: errors/config -> core -> methods -> api/io -> train/fed/integrations -> cli.

Every ``import`` of every module under ``src/lorakit`` (function-level imports included) is read with `ast`, and
each must go to a module of the same layer or a lower one.  The one exception is the registry's lazy import of
``lorakit.methods``, which registers the method modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorakit

ROOT = Path(lorakit.__file__).parent
# first dotted component under lorakit -> layer; the package's __init__ is the public API (api/io layer)
LAYERS = {"errors": 0, "config": 0, "calibration_text": 0, "stats": 0, "ray_loopback": 0, "core": 1, "methods": 2, "api": 3, "io": 3, "weighted": 3, "": 3,
          "models": 4, "prune": 4, "train": 4, "fed": 4, "integrations": 4, "sweep": 4, "cli": 5}
ALLOWED = {("lorakit.core.registry", "lorakit.methods")}  # importing the methods registers them


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The lorakit modules ``name`` imports (``from x import y``: ``x.y`` when that is a module, else ``x``)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return {m for m in found if m == "lorakit" or m.startswith("lorakit.")}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def test_every_module_imports_only_its_layer_or_below() -> None:
    modules = _modules()
    assert {m.split(".")[1] for m in modules if "." in m} <= set(LAYERS), "a new top-level module needs a layer"
    upward = sorted(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
                    for name, path in modules.items() for target in _imports(name, path, modules)
                    if _layer(target) > _layer(name) and (name, target) not in ALLOWED)
    assert not upward, "\n".join(upward)


def test_the_scan_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: a relative import inside a function is resolved and counted."""
    path = tmp_path / "driver.py"
    path.write_text("def f():\n    from ..api import get_state\n    from . import hooks\n")
    modules = {"lorakit.api": path, "lorakit.core.hooks": path}
    assert _imports("lorakit.core.driver", path, modules) == {"lorakit.api", "lorakit.core.hooks"}
