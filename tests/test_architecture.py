"""The import graph runs one way (docs/architecture.md): every module's imports, read from its source.

Packages, lowest first: the bundle contract and the synthetic parts below everything; training -> export;
engines beside them, needing only the contract; the station (appliance) downstream of engines; provisioning
and tools on top. Inside the station: threads -> inference -> settings -> camera -> station -> reporting ->
runtime / doctor / cli. A module may import its own package and anything listed below it, never upward,
and never a private (_underscore) name of another package. Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level package -> the packages of ours it may import.
ALLOWED: dict[str, set[str]] = {
    "bundle": set(),
    "synthetic": {"bundle"},
    "training": {"bundle", "synthetic"},
    "export": {"bundle", "training"},
    "engines": {"bundle"},
    "appliance": {"bundle", "synthetic", "engines"},
    "provisioning": {"bundle", "appliance"},
    "tools": {"bundle", "synthetic", "training", "export", "engines", "appliance", "provisioning", "tools"},
}
OURS = set(ALLOWED) | {"tests"}

# The station's layers, lowest first; a module is in the layer of its longest matching prefix.
APPLIANCE_LAYERS: list[set[str]] = [
    {"appliance", "appliance.threads"},
    {"appliance.inference"},
    {"appliance.settings"},
    {"appliance.camera"},
    {"appliance.station"},
    {"appliance.reporting"},
    {"appliance.review"},
    {"appliance.http"},
    {"appliance.runtime", "appliance.doctor", "appliance.cli"},
]


def _modules() -> list[tuple[str, Path]]:
    found = []
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append((".".join(parts), path))
    return found


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every absolute or relative import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                is_package = path.name == "__init__.py"
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, target] if target else base)
            out.append((node.lineno, target, [alias.name for alias in node.names]))
    return out


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, layer in enumerate(APPLIANCE_LAYERS):
        for prefix in layer:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _violations() -> list[str]:
    problems = []
    for module, path in _modules():
        top = module.split(".")[0]
        where = f"{path.relative_to(ROOT)}"
        for line, target, names in _imports(module, path):
            target_top = target.split(".")[0]
            if target_top not in OURS:
                continue  # the standard library or a third-party package
            if target_top == "tests":
                problems.append(f"{where}:{line}: {module} imports the tests ({target})")
                continue
            if target_top != top and target_top not in ALLOWED[top]:
                problems.append(f"{where}:{line}: {module} imports {target}: {top} may not import {target_top}")
            if target_top != top:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                private += [p for p in target.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
                if private:
                    problems.append(f"{where}:{line}: {module} takes private {private} from {target}")
            if top == "appliance" and target_top == "appliance":
                mine, theirs = _layer(module), _layer(target)
                if mine is not None and theirs is not None and theirs > mine:
                    problems.append(f"{where}:{line}: {module} (layer {mine}) imports {target} (layer {theirs}): "
                                    "upward in the station")
    return problems


def test_every_package_imports_only_downstream_and_no_private_names() -> None:
    problems = _violations()
    assert not problems, "imports against docs/architecture.md:\n" + "\n".join(problems)


def test_every_station_module_has_a_layer() -> None:
    unplaced = [m for m, _ in _modules() if m.startswith("appliance") and _layer(m) is None]
    assert not unplaced, f"add these to APPLIANCE_LAYERS (and docs/architecture.md): {unplaced}"


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty copy of the package layout for the checker to read instead of the repository."""
    for package in ALLOWED:
        (tmp_path / package).mkdir()
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    return tmp_path


@pytest.mark.parametrize("source, message", [
    ("from appliance.runtime import run\n", "bundle may not import appliance"),
    ("import training.trainer\n", "bundle may not import training"),
    ("from engines.tensorrt import _secret\n", "takes private"),
])
def test_the_rule_catches_an_upward_or_private_import(tree: Path, source: str, message: str) -> None:
    (tree / "bundle" / "bad.py").write_text(source)
    problems = _violations()
    assert any(message in p and "bundle/bad.py:1" in p for p in problems), problems


def test_a_lazy_upward_import_inside_the_station_is_caught(tree: Path) -> None:
    (tree / "appliance" / "station").mkdir()
    (tree / "appliance" / "station" / "pipeline.py").write_text(
        "def f():\n    from appliance.reporting.fanout import FanOut\n")
    problems = _violations()
    assert any("upward in the station" in p and "pipeline.py:2" in p for p in problems), problems
