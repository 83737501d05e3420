"""Structural rules of the code base that keep its claims checkable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tint_hf"


def imported_modules(path: Path) -> list[str]:
    """Absolute names of the modules a file imports (relative imports resolved against the package layout)."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "simulate").glob("*.py")), ids=lambda p: p.name)
def test_the_reference_imports_nothing_from_the_model_it_checks(path):
    """tint_hf.simulate is the oracle of TinT's fidelity tests: sharing code with tint_hf.models would let a bug in
    weight extraction, RoPE or the target convention appear on both sides unseen."""
    assert not [name for name in imported_modules(path) if name.startswith("tint_hf.models")]


@pytest.mark.parametrize("folder", ["tint", "mesa_opt"])
def test_model_folders_import_only_torch_transformers_and_siblings(folder):
    """Each model folder uploads as remote code: no import of tint_hf outside the folder itself."""
    for path in (PACKAGE / "models" / folder).glob("*.py"):
        outside = [name for name in imported_modules(path)
                   if name.startswith("tint_hf") and not name.startswith(f"tint_hf.models.{folder}")]
        assert not outside, (path.name, outside)


def test_the_mesa_model_folder_links_the_op_instead_of_copying_it():
    """One mesa op: the model folder's mesa_op.py (shipped as remote code) is a link to tint_hf/ops/mesa.py."""
    link = PACKAGE / "models" / "mesa_opt" / "mesa_op.py"
    assert link.is_symlink() and link.resolve() == (PACKAGE / "ops" / "mesa.py").resolve()
