"""The tint-hf command line: the embedded demo and `tint-hf build` round trips."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2
from transformers import AutoModelForCausalLM

from tint_hf import TinTForCausalLM
from tint_hf.cli import main


def test_demo_runs_offline_and_reports_all_three_steps(capsys):
    assert main(["demo", "--seq-len", "64", "--blocks", "2"]) == 0
    out = capsys.readouterr().out
    for line in ("after exact SGD", "after TinT's approximate SGD", "TinT transformer, one forward pass",
                 "TinT transformer vs its reference"):
        assert line in out


def test_build_command_writes_a_loadable_checkpoint(tmp_path, gpt2_tokenizer, capsys):
    aux = tiny_gpt2(dtype=torch.float32)
    aux.save_pretrained(tmp_path / "aux")
    gpt2_tokenizer.save_pretrained(tmp_path / "aux")
    assert main(["build", "--aux", str(tmp_path / "aux"), "--out", str(tmp_path / "tint"), "--num-prefixes", "8",
                 "--inner-lr", "0.01", "--backward", "exact"]) == 0
    assert "authors' dense construction would have" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tint", dtype=torch.float32)
    direct = TinTForCausalLM.from_auxiliary(aux, num_prefixes=8, inner_lr=0.01, backward="exact")
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, direct(ids).logits, atol=1e-6)
    assert (tmp_path / "tint" / "tokenizer.json").exists() or (tmp_path / "tint" / "vocab.json").exists()
    with pytest.raises(SystemExit, match="not empty"):
        main(["build", "--aux", str(tmp_path / "aux"), "--out", str(tmp_path / "tint")])
