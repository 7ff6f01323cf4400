"""The dependency rule of the README: pure packages never import transformers; compressor never imports evals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "compressor"
PURE = ("quantize", "allocation", "analysis")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_do_not_import_transformers(package):
    for path in (ROOT / package).rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("transformers", "accelerate")}
        assert not bad, f"{path} imports {bad}"


def test_compressor_never_imports_evals():
    for path in ROOT.rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.split(".")[0] == "evals"}
        assert not bad, f"{path} imports {bad}"


def test_gptqmodel_stays_an_evals_peer():
    """GPTQModel (evals/peers, its own venv) is imported nowhere else and is no dependency, not even an extra."""
    import tomllib

    repo = ROOT.parent
    for path in [repo / "cli.py", *ROOT.rglob("*.py"), *(repo / "evals").rglob("*.py"), *(repo / "tests").rglob("*.py")]:
        if "peers" in path.relative_to(repo).parts:
            continue
        bad = {m for m in imported_modules(path) if m.split(".")[0] == "gptqmodel"}
        assert not bad, f"{path} imports {bad}"
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for ds in project.get("optional-dependencies", {}).values() for d in ds]
    assert not [d for d in deps if d.lower().startswith("gptqmodel")]
