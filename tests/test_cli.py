"""The tint-hf command line: the embedded demo and `tint-hf build` round trips."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
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


def test_build_without_num_prefixes_uses_the_library_default(tmp_path):
    """The CLI hard-coded 256 before, which is no divisor of SmolLM2's d = 576; now it leaves P to the config."""
    from tint_hf.models.tint.configuration_tint import nearest_divisor

    tiny_llama(dtype=torch.float32, hidden_size=48).save_pretrained(tmp_path / "aux")
    assert main(["build", "--aux", str(tmp_path / "aux"), "--out", str(tmp_path / "tint")]) == 0
    assert TinTForCausalLM.from_pretrained(tmp_path / "tint").config.num_prefixes == nearest_divisor(48, 16) == 16


BAD_NUMBERS = [
    (["eval", "--lrs=-1e-4"], "--lrs", ">= 0"), (["eval", "--lrs", "nan"], "--lrs", "finite"),
    (["eval", "--label-lrs=-1"], "--label-lrs", ">= 0"), (["eval", "--shots=-1"], "--shots", ">= 0"),
    (["eval", "--seeds", "1,1"], "--seeds", "repeated"), (["eval", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["eval", "--num-steps", "0"], "--num-steps", ">= 1"), (["eval", "--layers", "2.5"], "--layers", "integer"),
    (["ppl", "--block-size", "1"], "--block-size", ">= 2"), (["ppl", "--train-fraction", "1.5"], "--train-fraction",
                                                             "between 0 and 1"),
    (["build", "--inner-lr", "-1"], "--inner-lr", "> 0"), (["build", "--fd-scale", "0"], "--fd-scale", "> 0"),
    (["build", "--num-prefixes", "0"], "--num-prefixes", ">= 1"),
    (["demo", "--lr", "-1"], "--lr", "> 0"), (["demo", "--lr", "inf"], "--lr", "finite"),
    (["convert-mesa", "--transfer-steps", "-5"], "--transfer-steps", ">= 0"),
    (["convert-mesa", "--finetune-lr", "0"], "--finetune-lr", "> 0"),
    (["convert-mesa", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["synthetic", "regression", "--seeds", "0", "0"], "--seeds", "repeated"),
    (["synthetic", "regression", "--lr=-1e-3"], "--lr", "> 0"),
    (["synthetic", "plateau", "--mix-fraction", "2"], "--mix-fraction", "between 0 and 1"),
]
REQUIRED = {"eval": ["--model", "m", "--out", "o"], "ppl": ["--model", "m"], "build": ["--aux", "a", "--out", "o"],
            "demo": [], "convert-mesa": ["--model", "m", "--layers", "1", "--out", "o"], "synthetic": []}


@pytest.mark.parametrize("argv, option, says", BAD_NUMBERS, ids=[" ".join(a) for a, _, _ in BAD_NUMBERS])
def test_bad_numbers_are_refused_by_the_parser(argv, option, says, capsys):
    """Negative learning rates (gradient ascent), negative shots or steps, empty batches and repeated seeds stop at
    the parser, with the option and what is allowed."""
    from tint_hf.cli import build_parser

    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv + REQUIRED[argv[0]])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert option in error and says in error


@pytest.mark.parametrize("command", ["demo", "build", "push", "eval", "ppl", "prepare-data", "synthetic",
                                     "convert-mesa"])
def test_help_shows_the_defaults_declared_where_they_are_used(command, capsys):
    """Every option with a default shows it in --help, and the defaults are those of the class that uses them:
    ConversionSettings / MesaOPTConfig for convert-mesa, TinTConfig for build, DEFAULTS for eval / ppl."""
    from tint_hf.commands.common import DEFAULTS
    from tint_hf.conversion import ConversionSettings
    from tint_hf.models.tint import TinTConfig

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    expected = {
        "convert-mesa": [f"(default: {ConversionSettings.transfer_steps})", "(default: cg)",
                         f"(default: {','.join(ConversionSettings.stages)})"],
        "build": [f"(default: {TinTConfig.inner_lr})", f"(default: {TinTConfig.fd_scale})"],
        "eval": [f"(default: {DEFAULTS['lrs'][0]};", f"(default: {','.join(map(str, DEFAULTS['shots']))};"],
        "ppl": ["(default: 256)", "(default: 8)"],
    }.get(command, [])
    for fragment in expected:
        assert fragment in text, fragment
    assert "(default: None)" not in text and "(default: False)" not in text
