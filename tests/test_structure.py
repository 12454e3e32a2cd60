"""The package's import structure: no private name imported across subpackages, no private module
of a parent package imported, no import from an ancestor package's ``__init__`` (an upward import:
the ``__init__`` aggregates its subpackages, so importing it from below makes cycles and hides
what a module really uses). Read from the source with ``ast``, so every module counts, lazy
imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG_DIR = Path(__file__).resolve().parent.parent / "dcp_ext"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG_DIR.rglob("*.py")):
        parts = list(path.relative_to(PKG_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _package_of(module: str) -> str:
    return module if module in PACKAGES else module.rpartition(".")[0]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(module: str, path: Path):
    """(line, imported module, imported names or None) of every import in ``module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _package_of(module)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            yield node.lineno, source, [a.name for a in node.names]


def structure_problems(modules: dict[str, Path]) -> list[str]:
    """Every violation of the rules in the module docstring, as ``module:line: what``."""
    problems = []
    for module, path in modules.items():
        here = _package_of(module)
        for line, source, names in _imports(module, path):
            if not (source == "dcp_ext" or source.startswith("dcp_ext.")):
                continue
            where = f"{module}:{line}"
            names = names or []
            # a name may be a submodule: `from .. import _forkserver_guard`
            targets = [source] + [f"{source}.{n}" for n in names if f"{source}.{n}" in modules]
            for target in targets:
                tpkg = _package_of(target)
                last = target.rpartition(".")[2]
                if _private(last) and tpkg != here and here.startswith(tpkg + "."):
                    problems.append(f"{where}: imports {target}, a private module of the parent package {tpkg}")
            src_pkg = _package_of(source)
            for n in names:
                if _private(n) and f"{source}.{n}" not in modules and src_pkg != here:
                    problems.append(f"{where}: imports the private name {n} from {source} (another package)")
            if source in PACKAGES and source != here and here.startswith(source + "."):
                problems.append(f"{where}: imports from {source}, the __init__ of an ancestor package "
                                f"(import the module that defines the name)")
    return problems


def test_package_imports_follow_the_structure_rules():
    assert structure_problems(MODULES) == []


@pytest.mark.parametrize("source, expected", [
    ("from ..storage import _private_helper\n", "imports the private name _private_helper from dcp_ext.storage"),
    ("from .. import _forkserver_guard\n", "a private module of the parent package dcp_ext"),
    ("import dcp_ext._forkserver_guard\n", "a private module of the parent package dcp_ext"),
    ("from .. import tier_status\n", "the __init__ of an ancestor package"),
    ("def f():\n    from ..storage.commit import _hidden\n", "imports the private name _hidden"),
])
def test_the_rules_catch_each_kind_of_violation(tmp_path, source, expected):
    """The checker itself: a module of a subpackage with each kind of bad import is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    problems = structure_problems({**MODULES, "dcp_ext.tiered.bad": bad})
    assert any(expected in p and p.startswith("dcp_ext.tiered.bad:") for p in problems), problems


def test_imports_inside_one_package_and_public_names_are_allowed(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("from .records import FastCommit\nfrom ..storage.commit import is_committed\n"
                  "from ..errors import DcpExtError\nimport torch\n")
    problems = structure_problems({**MODULES, "dcp_ext.tiered.ok": ok})
    assert [p for p in problems if p.startswith("dcp_ext.tiered.ok:")] == []
