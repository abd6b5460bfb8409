"""The layers import downwards only: the core (``conceptsmith/*.py``, ``conceptsmith/world/``; not
``conceptsmith/__main__.py``, the launcher of the CLI) imports none of the method packages, the evaluation
package or the CLI; ``erasure/`` and ``customization/`` import neither
``conceptsmith.evaluation`` nor ``conceptsmith.cli``. Every import statement counts: module-level,
function-local and ``if TYPE_CHECKING:`` ones (plugin discovery by name, ``registry.BUILTIN_PACKAGES``, is no
import statement)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Folder of the checkout -> the package it installs as.
PACKAGES = {"conceptsmith": "conceptsmith", "erasure": "conceptsmith.erasure",
            "customization": "conceptsmith.customization", "evaluation": "conceptsmith.evaluation"}
UPPER = ("conceptsmith.erasure", "conceptsmith.customization", "conceptsmith.evaluation", "conceptsmith.cli")


def module_name(path: Path) -> str:
    """``conceptsmith/world/check.py`` -> ``conceptsmith.world.check``; ``erasure/__init__.py`` -> ``conceptsmith.erasure``."""
    folder, *rest = path.relative_to(REPO).with_suffix("").parts
    return ".".join([PACKAGES[folder], *(part for part in rest if part != "__init__")])


def imported_names(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of everything ``source`` (the text of ``module``) imports, anywhere in the file.
    ``from a import b`` yields ``a`` and ``a.b`` (``b`` may be a submodule); relative imports are resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    """``file:line imports name`` for every import statement of a ``forbidden`` package (or a module inside it)."""
    found: dict[tuple[str, int], str] = {}
    for path in paths:
        names = imported_names(path.read_text(), module_name(path), path.name == "__init__.py")
        for line, name in names:
            hit = next((f for f in forbidden if name == f or name.startswith(f + ".")), None)
            where = (str(path.relative_to(REPO)), line)
            if hit and where not in found:  # one line per statement: its module, else the first name
                found[where] = f"{where[0]}:{line} imports {name} (layer {hit})"
    return [found[where] for where in sorted(found)]


def core_files() -> list[Path]:
    top = sorted(path for path in (REPO / "conceptsmith").glob("*.py") if path.name != "__main__.py")
    return top + sorted((REPO / "conceptsmith" / "world").rglob("*.py"))


def test_the_scan_sees_every_kind_of_import():
    source = '''
from typing import TYPE_CHECKING
import conceptsmith.evaluation.bench
from conceptsmith import cli
if TYPE_CHECKING:
    from conceptsmith.evaluation.attack_plugins import AttackContext
def f():
    from conceptsmith.customization.data import find_images
    from .. import erasure
'''
    names = [name for _, name in imported_names(source, "conceptsmith.world.check")]
    assert "conceptsmith.evaluation.bench" in names and "conceptsmith.cli" in names
    assert "conceptsmith.evaluation.attack_plugins" in names  # under TYPE_CHECKING
    assert "conceptsmith.customization.data" in names  # function-local
    assert "conceptsmith.erasure" in names  # relative: conceptsmith.world -> conceptsmith
    assert "conceptsmith.world" in [name for _, name in imported_names("from . import render", "conceptsmith.world",
                                                                        is_package=True)]
    assert module_name(REPO / "erasure" / "__init__.py") == "conceptsmith.erasure"
    assert module_name(REPO / "conceptsmith" / "world" / "check.py") == "conceptsmith.world.check"


def test_the_core_imports_no_layer_above_it():
    files = core_files()
    assert REPO / "conceptsmith" / "validate.py" in files and REPO / "conceptsmith" / "world" / "check.py" in files
    assert not any("cli" in path.relative_to(REPO / "conceptsmith").parts[:-1] for path in files)
    found = violations(files, UPPER)
    assert found == [], "the core imports a layer above it:\n" + "\n".join(found)


@pytest.mark.parametrize("folder", ["erasure", "customization"])
def test_method_packages_import_neither_evaluation_nor_the_cli(folder):
    files = sorted((REPO / folder).rglob("*.py"))
    assert files
    found = violations(files, ("conceptsmith.evaluation", "conceptsmith.cli"))
    assert found == [], f"{folder}/ imports a layer above it:\n" + "\n".join(found)
