"""Errors that name the problem: inputs longer than the model takes, the wrong kind of checkpoint, missing paths,
an output path that is a file, empty / broken / non-UTF-8 data files, a null text, and empty batches. Each used to end
in a library traceback (IndexError, AttributeError, "Repo id must be in the form ...", FileExistsError, ...)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_gpt2, tiny_llama, tiny_opt

from tint_hf import MesaLlamaForCausalLM, MesaOPTForCausalLM
from tint_hf.cli import console_main, main
from tint_hf.evaluation import PlainLM, block_perplexity, get_task, load_examples
from tint_hf.evaluation.data import DataError
from tint_hf.evaluation.prompts import Context
from tint_hf.evaluation.scoring import candidate_log_probs

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def test_prompts_longer_than_the_positions_name_the_length_the_limit_and_the_fix():
    model = tiny_opt(dtype=torch.float32)  # 64 learned positions
    long = Context(tuple(range(3, 63)) * 2, (0,) * 120, (0,) * 120)
    with pytest.raises(ValueError, match=r"Inputs of 120 tokens .* \(64 positions.*fewer shots"):
        candidate_log_probs(PlainLM(model), [long], [[5], [6]], progress=False)
    with pytest.raises(ValueError, match=r"Inputs of 80 tokens .* \(64 positions.*--block-size"):
        block_perplexity(PlainLM(model), torch.randint(3, 60, (2, 80)), 0.5, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, gpt2_tokenizer):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny"), gpt2_tokenizer, n_positions=64)


def test_the_commands_report_over_long_inputs(checkpoint, tmp_path, capsys):
    assert console_main(["ppl", "--model", str(checkpoint), "--block-size", "100", "--modes", "icl", "--quiet"]) == 2
    assert "Inputs of 100 tokens" in capsys.readouterr().err
    assert console_main(["eval", "--model", str(checkpoint), "--tasks", "MR", "--data-dir", str(FIXTURES),
                         "--shots", "8", "--seeds", "1", "--n-eval", "4", "--quiet", "--no-plot",
                         "--out", str(tmp_path / "run")]) == 2
    assert "fewer shots" in capsys.readouterr().err


def test_a_missing_model_path_and_a_non_tint_tint_model_are_named(checkpoint, tmp_path):
    base = ["eval", "--tasks", "MR", "--data-dir", str(FIXTURES), "--shots", "0", "--n-eval", "4", "--quiet",
            "--no-plot"]
    with pytest.raises(FileNotFoundError, match=r"--model no/such/model: no such local folder"):
        main(base + ["--model", "no/such/model", "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match=r"--tint-model .* holds a GPT2LMHeadModel, not a TinT checkpoint.*tint-hf "
                                         r"build"):
        main(base + ["--model", str(checkpoint), "--modes", "tint", "--tint-model", str(checkpoint),
                     "--out", str(tmp_path / "b")])


def test_an_output_path_that_is_a_file_is_named(checkpoint, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("x")
    assert console_main(["eval", "--model", str(checkpoint), "--tasks", "MR", "--data-dir", str(FIXTURES),
                         "--out", str(file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is a file"):
        main(["build", "--aux", str(checkpoint), "--out", str(file)])


@pytest.mark.parametrize("content, expected", [
    (b"", r"train.jsonl is empty"),
    (b'{"text": "good", "label": 1}\n{"text": "bad", "lab', r"train.jsonl could not be read as json"),
    ('{"text": "caf\u00e9", "label": 1}\n'.encode("latin-1"), r"train.jsonl could not be read as json"),
    (b'{"text": null, "label": 1}\n{"text": "fine", "label": 0}\n', r"train.jsonl \(MR train\), row 1: the text "
                                                                     r"\('text'\) is None"),
])
def test_damaged_data_files_are_named(content, expected, tmp_path):
    (tmp_path / "MR").mkdir()
    (tmp_path / "MR" / "train.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=expected):
        load_examples(get_task("MR"), "train", data_dir=tmp_path)


@pytest.mark.parametrize("model_fn", [lambda: MesaOPTForCausalLM.from_opt(tiny_opt(), mesa_layers=[1]),
                                      lambda: MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[1])],
                         ids=["opt", "llama"])
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batches_into_the_mesa_models_are_refused(model_fn, shape):
    model = model_fn()
    with pytest.raises(ValueError, match=rf"input_ids must be \(batch, length\) with batch >= 1 and length >= 1, "
                                         rf"got shape \({shape[0]}, {shape[1]}\)"):
        model(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \(batch, length, hidden\)"):
        model(inputs_embeds=torch.zeros(*shape, model.config.hidden_size, dtype=torch.float64))


def test_a_changed_block_size_on_resume_of_convert_mesa_is_refused(tmp_path, gpt2_tokenizer):
    """The CLI resumes a conversion only from the same text blocks (another --block-size gives other blocks)."""
    tiny_opt(dtype=torch.float32, vocab_size=50272, max_position_embeddings=128).save_pretrained(tmp_path / "m")
    gpt2_tokenizer.save_pretrained(tmp_path / "m")
    args = ["convert-mesa", "--model", str(tmp_path / "m"), "--layers", "1", "--stages", "calibrate",
            "--block-size", "64", "--no-plot", "--quiet", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "stages.json").read_text())["stages"].keys() == {"init", "calibrate"}
    args[args.index("--block-size") + 1] = "32"
    with pytest.raises(ValueError, match=r"computed from another train_blocks"):
        main(args)


@pytest.mark.parametrize("model_fn", [lambda: MesaOPTForCausalLM.from_opt(tiny_opt(), mesa_layers=[1]),
                                      lambda: MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[1])],
                         ids=["opt", "llama"])
def test_packed_positions_with_an_attention_mask_are_refused_by_the_mesa_models(model_fn):
    """Packed documents (positions restarting inside a row) with an attention_mask would attend to each other, as
    HF's Llama lets them: refused. Without the mask they are separated (tested in the model tests); left padding with
    a mask (positions restarting only across padding) stays fine."""
    model = model_fn()
    ids = torch.randint(3, 60, (1, 8))
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with pytest.raises(ValueError, match="position_ids restart inside a row .* attention_mask"):
        model(ids, attention_mask=torch.ones_like(ids), position_ids=packed)
    model(ids, position_ids=packed)  # packed without a mask: per-document
    padded = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    positions = (padded.cumsum(-1) - 1).clamp(min=0).masked_fill(padded == 0, 1)
    model(ids, attention_mask=padded, position_ids=positions)
