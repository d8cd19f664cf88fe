"""Which way imports run between the rooms of the package (docs/architecture.md), read from
every module's source: a component reaches the others only through the contract, the step and
the optimizer know no component, and reading a checkpoint needs nothing of training."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "megatron_ext"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every megatron_ext module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("megatron_ext")}


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}
COMPONENTS = "megatron_ext.training.components"


def _in(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def _offending(importers, forbidden) -> list[str]:
    return sorted(
        f"{m} imports {i}"
        for m, imports in MODULES.items()
        if importers(m)
        for i in imports
        if forbidden(m, i) and i in MODULES  # a module, not a name inside one
    )


def test_the_rooms_exist():
    for room in (COMPONENTS, "megatron_ext.checkpoint", "megatron_ext.resilience",
                 "megatron_ext.planning", "megatron_ext.training.contract"):  # fmt: skip
        assert room in MODULES, room


@pytest.mark.parametrize(
    "rule, importers, forbidden",
    [
        (
            "a component imports no other component, nor the trainer",
            lambda m: _in(m, COMPONENTS) and m != COMPONENTS,
            lambda m, i: (
                (_in(i, COMPONENTS) and i not in (m, COMPONENTS))
                or _in(i, "megatron_ext.training.trainer")
            ),
        ),
        (
            "the step and the optimizer import no component",
            lambda m: m in ("megatron_ext.training.step", "megatron_ext.training.optimizer"),
            lambda m, i: _in(i, COMPONENTS),
        ),
        (
            "checkpoint/ imports nothing of training/ or planning/",
            lambda m: _in(m, "megatron_ext.checkpoint"),
            lambda m, i: _in(i, "megatron_ext.training") or _in(i, "megatron_ext.planning"),
        ),
        (
            "export/ reads checkpoints through checkpoint/ alone",
            lambda m: _in(m, "megatron_ext.export"),
            lambda m, i: _in(i, "megatron_ext.training"),
        ),
        (
            "resilience/ and platform/ import nothing of training/",
            lambda m: _in(m, "megatron_ext.resilience") or _in(m, "megatron_ext.platform"),
            lambda m, i: _in(i, "megatron_ext.training"),
        ),
        (
            "only the contract, the components and the trainer know the components' contract",
            lambda m: not (_in(m, "megatron_ext.training") or _in(m, "megatron_ext.cli")),
            lambda m, i: _in(i, "megatron_ext.training.contract"),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_imports_run_one_way(rule, importers, forbidden):
    offenders = _offending(importers, forbidden)
    assert not offenders, f"{rule}: {offenders}"


def test_the_rule_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The reader finds an import inside a function, so the rules above can fail."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from megatron_ext.training.trainer import Trainer\n")
    assert "megatron_ext.training.trainer" in _imports(source)
