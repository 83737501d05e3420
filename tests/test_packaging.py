"""The built wheel carries the shipped data and the remote-code model folders, and works outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["tint_hf/data/gpt2_bpe/vocab.json", "tint_hf/data/gpt2_bpe/merges.txt", "tint_hf/data/gpt2_bpe/LICENSE",
           "tint_hf/data/sotu.txt", "tint_hf/data/results/tint_fidelity.json",
           "tint_hf/data/results/mesa_conversion.json", "tint_hf/data/results/tint_smollm2.json", "tint_hf/models/tint/modeling_tint.py",
           "tint_hf/models/mesa/modeling_mesa_opt.py", "tint_hf/models/mesa/modeling_mesa_llama.py",
           "tint_hf/models/mesa/mesa_op.py", "tint_hf/models/mesa/mesa_layer.py",
           "tint_hf/models/tint/simulated_modules.py"]


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_its_demo_runs_outside_the_repo(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("tint_hf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [name for name in SHIPPED if name not in names]
    assert not [name for name in names if name.startswith(("tests/", "bench/", "examples/"))]

    # A fresh venv: tint_hf only from the wheel; the (pinned) dependencies are read from this venv's site-packages,
    # whose .pth files (the editable tint_hf) a path entry does not run.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = subprocess.check_output([python, "-c", "import tint_hf; print(tint_hf.__file__)"], text=True, cwd=tmp_path,
                                    env=env).strip()
    assert Path(where).is_relative_to(site), where
    demo = subprocess.run([venv / "bin" / "tint-hf", "demo", "--seq-len", "64", "--blocks", "2"], cwd=tmp_path,
                          env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "TinT transformer, one forward pass" in demo.stdout
