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


@pytest.mark.parametrize("folder", ["tint", "mesa_opt", "mesa_llama"])
def test_model_folders_import_only_torch_transformers_and_siblings(folder):
    """Each model folder uploads as remote code: no import of tint_hf outside the folder itself."""
    for path in (PACKAGE / "models" / folder).glob("*.py"):
        outside = [name for name in imported_modules(path)
                   if name.startswith("tint_hf") and not name.startswith(f"tint_hf.models.{folder}")]
        assert not outside, (path.name, outside)


SHARED_MESA_FILES = {"mesa_op.py": "ops/mesa.py", "mesa_attention.py": "layers/mesa_attention.py",
                     "mesa_config.py": "layers/mesa_config.py"}


@pytest.mark.parametrize("folder", ["models/mesa_opt", "models/mesa_llama", "layers"])
def test_mesa_folders_link_the_shared_files_instead_of_copying_them(folder):
    """One mesa op, one mesa mixer, one set of mesa config fields: each model folder's copies (shipped as remote
    code) are links to tint_hf/ops and tint_hf/layers."""
    for name, target in SHARED_MESA_FILES.items():
        path = PACKAGE / folder / name
        if folder == "layers" and target.startswith("layers/"):
            assert path.is_file() and not path.is_symlink(), name
            continue
        assert path.is_symlink() and path.resolve() == (PACKAGE / target).resolve(), name
