"""The mesa conversion recipe (tint_hf.conversion): each stage lowers its own objective on tiny OPT and Llama
teachers, the pipeline resumes after its last finished stage, and its checkpoints load and generate."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_opt
from transformers import AutoModelForCausalLM

from tint_hf.conversion import ActivationRecorder as Recorder
from tint_hf.conversion import (
    ConversionSettings,
    calibrate,
    convert,
    decoder_layers,
    distillation_loss,
    finetune,
    head_rms,
    init_student,
    transfer,
    transfer_loss,
)
from tint_hf.runstore import RunStoreError

TEACHERS = {"opt": lambda: tiny_opt(dtype=torch.float32), "llama": lambda: tiny_llama(dtype=torch.float32)}


def blocks(n=24, length=16, seed=0):
    return torch.randint(3, 64, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_calibration_matches_the_teachers_head_rms(family):
    teacher = TEACHERS[family]()
    student = init_student(teacher, [1], mesa_solver="cg", cg_steps=8)
    data = blocks()
    calibrate(student, teacher, data)
    rms = {}
    for name, model in (("teacher", teacher), ("student", student)):
        recorder = Recorder(model, [1])
        with torch.no_grad():
            model(data)
        recorder.close()
        rms[name] = head_rms(recorder.heads[1], decoder_layers(student)[1].self_attn.num_heads)
    torch.testing.assert_close(rms["student"], rms["teacher"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_attention_transfer_and_lora_kl_lower_their_objectives(family):
    teacher = TEACHERS[family]()
    student = init_student(teacher, [0, 1], mesa_solver="cg", cg_steps=8)
    train, held_out = blocks(), blocks(8, seed=1)
    original = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    with torch.no_grad():
        before = float(transfer_loss(student, teacher, held_out))
    losses = transfer(student, teacher, train, steps=20, lr=1e-2, progress=False)
    with torch.no_grad():
        after = float(transfer_loss(student, teacher, held_out))
    assert len(losses) == 20 and after < 0.9 * before, (before, after)
    seen = train[:8]  # random tokens: the objective can only fall on the data it is fitted to
    with torch.no_grad():
        kl_before = float(distillation_loss(student, teacher, seen, 1.0))
    student, losses = finetune(student, teacher, train[:8], steps=20, lr=3e-3, rank=4, progress=False)
    with torch.no_grad():
        kl_after = float(distillation_loss(student, teacher, seen, 1.0))
    assert kl_after < kl_before, (kl_before, kl_after)
    assert not any("lora" in name for name, _ in student.named_parameters())  # merged
    assert all(torch.equal(p, original[name]) for name, p in teacher.named_parameters())  # the teacher never trains


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_mlp_lora_finetunes_a_plain_model_on_the_chosen_layers_only(family):
    """The trained removed-attention control: a plain model (no mesa layers) whose layer-1 attention output is zeroed,
    LoRA on that layer's feed-forward projections only; the objective falls and nothing else changes."""
    teacher = (tiny_opt if family == "opt" else tiny_llama)(dtype=torch.float32)
    control = copy.deepcopy(teacher)
    decoder_layers(control)[1].self_attn.register_forward_hook(
        lambda module, args, output: (torch.zeros_like(output[0]),) + tuple(output[1:]))
    original = {name: p.detach().clone() for name, p in control.named_parameters()}
    seen = blocks()[:8]
    with torch.no_grad():
        before = float(distillation_loss(control, teacher, seen, 1.0))
    control, _ = finetune(control, teacher, seen, steps=20, lr=3e-3, rank=4, progress=False, layers=[1], target="mlp")
    with torch.no_grad():
        after = float(distillation_loss(control, teacher, seen, 1.0))
    assert after < before, (before, after)
    changed = {name for name, p in control.named_parameters() if not torch.equal(p, original[name])}
    mlp = ("fc1", "fc2") if family == "opt" else ("gate_proj", "up_proj", "down_proj")
    assert changed and all(".layers.1." in name and name.split(".")[-2] in mlp for name in changed), changed
    with pytest.raises(ValueError, match="needs layers"):
        finetune(teacher, teacher, seen, steps=1, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="target='ffn'"):
        finetune(control, teacher, seen, steps=1, lr=1e-3, progress=False, layers=[1], target="ffn")


@pytest.mark.parametrize("family", sorted(TEACHERS))
def test_convert_saves_each_stage_resumes_and_refuses_other_settings(family, tmp_path):
    teacher = TEACHERS[family]()
    settings = ConversionSettings(mesa_layers=[1], mesa=dict(mesa_solver="cg", cg_steps=8), transfer_steps=6,
                                  finetune_steps=4, lora_rank=2)
    out = tmp_path / "conv"
    model = convert(teacher, blocks(), out, settings, eval_blocks=blocks(4, seed=2), progress=False)
    record = json.loads((out / "stages.json").read_text())
    assert list(record["stages"]) == ["init", "calibrate", "transfer", "finetune"]
    assert all("perplexity" in facts for facts in record["stages"].values()) and "teacher_perplexity" in record
    # an interrupted run: the last stage is missing; the rerun redoes only that one
    lines = (out / "stages.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["teacher", "init", "calibrate", "transfer", "finetune"]
    (out / "stages.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    again = convert(teacher, blocks(), out, settings, eval_blocks=blocks(4, seed=2), progress=False)
    redone = json.loads((out / "stages.json").read_text())
    assert redone["stages"]["transfer"] == record["stages"]["transfer"] and "finetune" in redone["stages"]
    # ... and ends where the uninterrupted run ended: the LoRA initialisation drew the same random numbers
    ids = blocks(2, 6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="other settings"):
        convert(teacher, blocks(), out, ConversionSettings(mesa_layers=[0]), progress=False)
    # the final checkpoint loads as a mesa model and generates the same with and without its cache
    loaded = AutoModelForCausalLM.from_pretrained(out / "finetune")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    kwargs = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(loaded.generate(ids, **kwargs), loaded.generate(ids, use_cache=False, **kwargs))
    expected = {"opt": "MesaOPTForCausalLM", "llama": "MesaLlamaForCausalLM"}[family]
    assert type(model).__name__ == type(loaded).__name__ == expected


@pytest.mark.parametrize("change", ["teacher", "dtype", "train", "eval", "no eval"])
def test_a_resumed_conversion_refuses_other_inputs(change, tmp_path):
    """Resuming with another teacher (weights or dtype) or other training / held-out blocks would train later stages
    against other inputs and list perplexities of different held-out sets side by side: refused, naming the input."""
    settings = ConversionSettings(mesa_layers=[1], stages=("calibrate",), lora_rank=2)
    out = tmp_path / "conv"
    convert(tiny_opt(), blocks(), out, settings, eval_blocks=blocks(4, seed=2), progress=False)
    (out / "stages.jsonl").write_text("\n".join((out / "stages.jsonl").read_text().splitlines()[:2]) + "\n")
    teacher, train, held_out = tiny_opt(), blocks(), blocks(4, seed=2)
    name = {"teacher": "teacher", "dtype": "teacher", "train": "train_blocks", "eval": "eval_blocks",
            "no eval": "eval_blocks"}[change]
    if change == "teacher":
        teacher = tiny_opt(seed=5)
    elif change == "dtype":
        teacher = teacher.float()
    elif change == "train":
        train = blocks(seed=7)
    elif change == "eval":
        held_out = blocks(4, seed=8)
    else:
        held_out = None
    with pytest.raises(RunStoreError, match=rf"computed from another {name} .*delete"):
        convert(teacher, train, out, settings, eval_blocks=held_out, progress=False)


@pytest.mark.parametrize("damage", ["missing folder", "cut weights", "cut rng", "cut line", "stages.json only"])
def test_damaged_conversion_folders_are_named(damage, tmp_path):
    settings = ConversionSettings(mesa_layers=[1], stages=("calibrate",), lora_rank=2)
    out = tmp_path / "conv"
    first = convert(tiny_opt(), blocks(), out, settings, progress=False)
    records = out / "stages.jsonl"
    lines = records.read_text().splitlines()
    records.write_text(lines[0] + "\n")  # init finished, calibrate to redo
    if damage == "missing folder":
        shutil.rmtree(out / "init")
        expected = r"no checkpoint in .*init.*delete its line in .*stages.jsonl"
    elif damage == "cut weights":
        weights = out / "init" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        expected = r"checkpoint of the finished stage 'init' .* does not load"
    elif damage == "cut rng":
        (out / "init" / "rng_state.pt").write_bytes(b"\x00\x01")
        expected = r"rng_state.pt is missing or damaged"
    elif damage == "cut line":  # a kill during the write of calibrate's line: dropped and redone
        records.write_text(lines[0] + "\n" + lines[1][:10])
        with pytest.warns(UserWarning, match="cut short"):
            again = convert(tiny_opt(), blocks(), out, settings, progress=False)
        ids = blocks(2, 6, seed=3)
        torch.testing.assert_close(again(ids).logits, first(ids).logits, rtol=0, atol=0)
        return
    else:
        records.unlink()
        (out / "run.json").unlink()
        expected = r"stages.json but no stages.jsonl records \(a conversion written by an older tint_hf"
    with pytest.raises(RunStoreError, match=expected):
        convert(tiny_opt(), blocks(), out, settings, progress=False)


def test_convert_refuses_empty_blocks(tmp_path):
    settings = ConversionSettings(mesa_layers=[1], stages=("calibrate",))
    with pytest.raises(ValueError, match=r"train_blocks is empty"):
        convert(tiny_opt(), torch.zeros(0, 8, dtype=torch.long), tmp_path, settings, progress=False)
    with pytest.raises(ValueError, match=r"eval_blocks must be a \(N, T\) tensor"):
        convert(tiny_opt(), blocks(), tmp_path, settings, eval_blocks=[], progress=False)


def test_bad_conversion_requests_are_refused():
    with pytest.raises(TypeError, match="OPT and Llama-family"):
        init_student(tiny_gpt2(), [0])
    with pytest.raises(ValueError, match="unknown"):
        ConversionSettings(mesa_layers=[0], stages=("distil",))
    with pytest.raises(ValueError, match="order"):
        ConversionSettings(mesa_layers=[0], stages=("transfer", "calibrate"))
    with pytest.raises(ValueError, match="empty"):
        ConversionSettings(mesa_layers=[])
    with pytest.raises(ValueError, match="lora_target='ffn'"):
        ConversionSettings(mesa_layers=[0], lora_target="ffn")


def test_convert_mesa_cli_runs_every_stage_on_a_local_model(tmp_path, capsys):
    from tint_hf.assets import load_gpt2_tokenizer, tiny_demo_model
    from tint_hf.cli import console_main

    tokenizer = load_gpt2_tokenizer()
    tiny_demo_model(len(tokenizer)).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    out = tmp_path / "mesa"
    argv = ["convert-mesa", "--model", str(tmp_path / "opt"), "--layers", "1", "--cg-steps", "4",
            "--transfer-steps", "2", "--finetune-steps", "2", "--lora-rank", "2", "--block-size", "64",
            "--batch-size", "2", "--out", str(out), "--no-plot", "--quiet"]
    assert console_main(argv) == 0
    printed = capsys.readouterr().out
    assert "teacher perplexity" in printed and "finetune   perplexity" in printed
    assert "transfer: 2 steps x 2 x 64 tokens = 256 training tokens" in printed
    loaded = AutoModelForCausalLM.from_pretrained(out / "finetune")
    assert loaded.config.mesa_layers == [1] and (out / "finetune" / "tokenizer.json").exists()
    assert loaded.config.mesa_window == 0
    hybrid = tmp_path / "hybrid"
    assert console_main([*argv[:-4], "--window", "8", "--stages", "transfer", "--out", str(hybrid), "--no-plot",
                         "--quiet"]) == 0
    transferred = AutoModelForCausalLM.from_pretrained(hybrid / "transfer")
    assert transferred.config.mesa_window == 8
    assert transferred.model.decoder.layers[1].self_attn.older_log_weight.abs().sum() > 0  # trained in the transfer
    capsys.readouterr()
    assert console_main([*argv[:-4], "--window-only", "--out", str(tmp_path / "w"), "--no-plot", "--quiet"]) == 2
    assert "--window W" in capsys.readouterr().err
    # the window-only control has no parameters of its own: the transfer trains nothing (and says so by no losses)
    control = tmp_path / "control"
    assert console_main([*argv[:-4], "--window", "8", "--window-only", "--stages", "transfer", "--out", str(control),
                         "--no-plot", "--quiet"]) == 0
    assert json.loads((control / "stages.json").read_text())["stages"]["transfer"]["losses"] == []
    assert console_main(argv[:-4] + ["--lora-rank", "3", "--out", str(out), "--no-plot", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_convert_mesa_cli_holds_out_a_shipped_address(tmp_path, capsys):
    """--held-out-address 1964: the teacher's recorded perplexity is HF's own loss on the 1964 address alone."""
    from tint_hf.assets import load_gpt2_tokenizer, sample_speeches, tiny_demo_model
    from tint_hf.cli import console_main

    tokenizer = load_gpt2_tokenizer()
    teacher = tiny_demo_model(len(tokenizer)).eval()
    teacher.save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    common = ["convert-mesa", "--model", str(tmp_path / "opt"), "--layers", "1", "--cg-steps", "4", "--stages",
              "calibrate", "--block-size", "64", "--batch-size", "8", "--no-plot", "--quiet"]
    assert console_main([*common, "--held-out-address", "1964", "--out", str(tmp_path / "mesa")]) == 0
    record = json.loads((tmp_path / "mesa" / "stages.json").read_text())
    text = sample_speeches()["1964_lyndon_b_johnson_d"]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    held_out = ids[: ids.numel() // 64 * 64].view(-1, 64)
    with torch.no_grad():  # every block has 63 targets, so the mean of the block means is the mean over tokens
        expected = torch.stack([teacher(block[None], labels=block[None]).loss for block in held_out]).mean().exp()
    assert record["teacher_perplexity"] == pytest.approx(float(expected), rel=1e-5)

    assert console_main([*common, "--held-out-address", "1999", "--out", str(tmp_path / "x")]) == 2
    assert "--held-out-address" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text(text)
    assert console_main([*common, "--held-out-address", "1964", "--text-file", str(tmp_path / "t.txt"), "--out",
                         str(tmp_path / "y")]) == 2
    assert "--held-out-address" in capsys.readouterr().err
    assert console_main([*common, "--held-out-address", "1964", "--eval-fraction", "0.3", "--out",
                         str(tmp_path / "z")]) == 2
    assert "--eval-fraction" in capsys.readouterr().err


@pytest.mark.parametrize("field, bad", [("transfer_steps", -5), ("finetune_steps", 2.5), ("finetune_lr", -1e-3),
                                        ("transfer_lr", float("nan")), ("kl_weight", -1.0), ("batch_size", 0),
                                        ("lora_rank", 0)])
def test_conversion_settings_are_typed(field, bad):
    """Before: transfer_steps=-5 recorded a finished stage with no losses."""
    with pytest.raises(ValueError, match=rf"{field}="):
        ConversionSettings(mesa_layers=[0], **{field: bad})
