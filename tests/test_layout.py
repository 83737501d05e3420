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


@pytest.mark.parametrize("folder", ["tint", "mesa"])
def test_model_folders_import_only_torch_transformers_and_siblings(folder):
    """Each model folder uploads as remote code: no import of tint_hf outside the folder itself."""
    for path in (PACKAGE / "models" / folder).glob("*.py"):
        outside = [name for name in imported_modules(path)
                   if name.startswith("tint_hf") and not name.startswith(f"tint_hf.models.{folder}")]
        assert not outside, (path.name, outside)


def test_the_package_has_no_links():
    """Every source file is a real file: links are skipped by linters and duplicate finders and break on checkouts
    without symlink support."""
    assert not [str(path) for path in PACKAGE.rglob("*") if path.is_symlink()]


def test_importing_the_package_loads_each_mesa_source_file_once():
    """One file, one module: the mesa op, mixer and config fields are imported under one name each (the model
    classes, the cache layer registered for "mesa" and ``tint_hf.ops`` all see the same objects)."""
    import subprocess
    import sys

    code = ("import sys, tint_hf, tint_hf.ops, tint_hf.conversion, tint_hf.synthetic\n"
            "files = [getattr(m, '__file__', None) for m in list(sys.modules.values())]\n"
            "print('\\n'.join(f for f in files if f and 'tint_hf' in f))")
    files = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    mesa = [Path(f).resolve() for f in files if "mesa" in Path(f).name]
    assert mesa and len(mesa) == len(set(mesa)), sorted(map(str, mesa))
    import tint_hf.ops
    from tint_hf.models.mesa import mesa_op
    assert tint_hf.ops.chunk_mesa is mesa_op.chunk_mesa
