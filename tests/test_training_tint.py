"""Training TinT with Trainer (examples/finetune_tint.py): optimiser steps against hand-computed autograd steps,
gradient accumulation, LoRA through peft, bf16 autocast fidelity, activation checkpointing, the script end to end;
and the MesaOPT script (examples/finetune_mesa_opt.py), which shares its Trainer / peft plumbing."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_opt
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM

from tint_hf import TinTForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune_mesa_opt  # noqa: E402
import finetune_tint  # noqa: E402

VOCAB, SEQ = 64, 16


def tiny_tint(backward: str = "fd", dtype: torch.dtype = torch.float32, family=tiny_opt) -> TinTForCausalLM:
    return TinTForCausalLM.from_auxiliary(family(dtype=dtype), num_prefixes=8, inner_lr=0.1, backward=backward)


def random_blocks(n: int, seed: int = 0) -> DatasetDict:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    return DatasetDict(train=data, eval=data)


def cli_args(tmp_path: Path, *extra: str):
    return finetune_tint.build_parser().parse_args(["--output-dir", str(tmp_path), *extra])


def sgd_reference(model: TinTForCausalLM, data: Dataset, lr: float, autocast: bool = False) -> dict[str, torch.Tensor]:
    """One plain SGD step on the mean eval-part loss of the whole dataset, by autograd."""
    model = copy.deepcopy(model).train()
    ids = torch.tensor(data["input_ids"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        return {name: p - lr * p.grad for name, p in model.named_parameters()}


def base_name(peft_name: str) -> str:
    """The base model's name of a parameter / module inside a ``PeftModel`` (wrappers may be nested)."""
    return re.sub(r"(\.base_layer)+", "", peft_name.removeprefix("base_model.model."))


def assert_params_close(model: torch.nn.Module, expected: dict[str, torch.Tensor], atol: float) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(params[name].detach(), value, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("backward", ["fd", "exact"])
def test_trainer_sgd_step_equals_an_autograd_step_through_the_simulated_update(tmp_path, backward):
    model, data = tiny_tint(backward, torch.float64), random_blocks(2)
    expected = sgd_reference(model, data["train"], lr=0.5)
    assert any((expected[n] - p).abs().max() > 1e-4 for n, p in model.named_parameters())  # the step moves weights
    args = cli_args(tmp_path, "--optim", "sgd", "--learning-rate", "0.5", "--max-steps", "1", "--max-grad-norm", "0")
    finetune_tint.make_trainer(model, None, data, args, use_cpu=True).train()
    assert_params_close(model, expected, atol=1e-12)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """The loss is a mean over the batch, so batch 2 == 2 accumulated batches of 1 (Trainer must divide by 2)."""
    data = random_blocks(2, seed=1)
    full, accumulated = tiny_tint(dtype=torch.float64), tiny_tint(dtype=torch.float64)
    common = ("--optim", "sgd", "--learning-rate", "0.5", "--max-steps", "1", "--max-grad-norm", "0")
    finetune_tint.make_trainer(full, None, data, cli_args(tmp_path, *common), use_cpu=True).train()
    args = cli_args(tmp_path, *common, "--batch-size", "1", "--grad-accum", "2")
    finetune_tint.make_trainer(accumulated, None, data, args, use_cpu=True).train()
    assert_params_close(accumulated, dict(full.named_parameters()), atol=1e-10)


def test_bf16_autocast_trainer_step_matches_an_autocast_autograd_step(tmp_path):
    model, data = tiny_tint(), random_blocks(2, seed=2)
    expected = sgd_reference(model, data["train"], lr=0.5, autocast=True)
    args = cli_args(tmp_path, "--optim", "sgd", "--learning-rate", "0.5", "--max-steps", "1", "--max-grad-norm", "0",
                    "--bf16")
    trainer = finetune_tint.make_trainer(model, None, data, args, use_cpu=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_params_close(model, expected, atol=1e-5)


@pytest.mark.parametrize("family", [tiny_opt, tiny_gpt2])
def test_bf16_keeps_the_simulated_step_close_to_float64(family):
    """The documented precision rules: bf16 autocast is fine with either backward; bf16 weights need "exact"."""
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))

    def logit_change(model: TinTForCausalLM, autocast: bool = False) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, return_logits_before=True)
        return (out.logits - out.logits_before).double()

    for backward in ("fd", "exact"):
        reference = logit_change(tiny_tint(backward, torch.float64, family))
        autocast = logit_change(tiny_tint(backward, torch.float32, family), autocast=True)
        assert (autocast - reference).norm() / reference.norm() < 5e-2, backward
    reference = logit_change(tiny_tint("exact", torch.float64, family))
    bf16_weights = logit_change(tiny_tint("exact", torch.float32, family).to(torch.bfloat16))
    assert (bf16_weights - reference).norm() / reference.norm() < 5e-2


def test_lora_trains_only_the_adapter_and_reloads(tmp_path):
    from peft import PeftModel

    base, data = tiny_tint(), random_blocks(4, seed=4)
    ids = torch.tensor(data["train"]["input_ids"])
    with torch.no_grad():
        base_logits = base(ids).logits
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    args = cli_args(tmp_path, "--peft", "lora", "--lora-r", "4", "--max-steps", "3", "--learning-rate", "1e-2",
                    "--batch-size", "4")
    targets = finetune_tint.tint_lora_targets(base)
    model = finetune_tint.apply_peft(base, args, targets, ia3_targets=None)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits)  # LoRA starts as the identity
    trainer = finetune_tint.make_trainer(model, None, data, args, use_cpu=True)
    trainer.train()
    trainer.save_model()
    adapted = {base_name(name.split(".lora_")[0]) for name, _ in model.named_parameters() if "lora_" in name}
    if "target_parameters" in targets:  # one adapter per prefix slot of every layer
        assert adapted == {f"model.layers.{i}.prefixes" for i in range(2)}
    else:
        assert adapted == {"model.embed_positions"}
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
        else:
            assert not p.requires_grad and torch.equal(p, frozen[base_name(name)]), name
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        assert (trained - base_logits).abs().max() > 1e-4
        reloaded = PeftModel.from_pretrained(tiny_tint(), tmp_path).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained)
        torch.testing.assert_close(reloaded.merge_and_unload()(ids).logits, trained, atol=1e-5, rtol=0)
    with pytest.raises(SystemExit, match="ia3 needs nn.Linear"):
        finetune_tint.apply_peft(tiny_tint(), cli_args(tmp_path, "--peft", "ia3"), {}, ia3_targets=None)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    grads = []
    for checkpointing in (False, True):
        model = tiny_tint().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_example_script_trains_the_tiny_default_and_saves_a_loadable_checkpoint(tmp_path, capsys):
    trainer = finetune_tint.main(["--output-dir", str(tmp_path), "--max-steps", "3", "--block-size", "32",
                                  "--max-blocks", "8", "--eval-blocks", "2", "--learning-rate", "3e-3"])
    before, after = (float(x) for x in capsys.readouterr().out.split("eval loss ")[1].split(";")[0].split(" -> "))
    assert after < before
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is TinTForCausalLM and (tmp_path / "modeling_tint.py").exists()
    ids = torch.tensor(trainer.eval_dataset["input_ids"])
    trained = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits)


def test_mesa_example_trains_ia3_with_activation_checkpointing_and_the_adapter_reloads(tmp_path, capsys):
    from peft import PeftModel

    argv = ["--output-dir", str(tmp_path), "--max-steps", "3", "--block-size", "32", "--max-blocks", "8",
            "--eval-blocks", "2", "--learning-rate", "0.05", "--peft", "ia3", "--activation-checkpointing"]
    trainer = finetune_mesa_opt.main(argv)
    before, after = (float(x) for x in capsys.readouterr().out.split("eval loss ")[1].split(";")[0].split(" -> "))
    assert after < before
    model = trainer.model.eval()
    assert model.get_base_model().is_activation_checkpointing
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("ia3_l" in name for name in trainable)
    assert {name.split(".")[-3] for name in trainable} == {"k_proj", "v_proj", "fc2"}
    base, _ = finetune_mesa_opt.load_mesa_opt(finetune_mesa_opt.build_parser().parse_args(argv))
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    ids = torch.tensor(trainer.eval_dataset["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_tint_example_takes_a_checkpoints_runtime_settings_and_refuses_its_construction_ones(tmp_path,
                                                                                                gpt2_tokenizer):
    """Given a built TinT, --inner-lr / --backward apply to it, while --num-prefixes and --num-simulation-layers (fixed
    by its construction) are refused instead of being silently ignored."""
    tint = tiny_tint()
    tint.save_pretrained(tmp_path / "tint")
    gpt2_tokenizer.save_pretrained(tmp_path / "tint")
    model, _ = finetune_tint.load_tint(cli_args(tmp_path / "out", "--model", str(tmp_path / "tint"),
                                                "--inner-lr", "0.05", "--backward", "exact"))
    assert (model.config.inner_lr, model.config.backward) == (0.05, "exact")
    model, _ = finetune_tint.load_tint(cli_args(tmp_path / "out", "--model", str(tmp_path / "tint")))
    assert model.config.inner_lr == 0.1  # the checkpoint's own
    for flag in ("--num-prefixes", "--num-simulation-layers"):
        with pytest.raises(SystemExit, match=f"{flag}: .* is a built TinT"):
            finetune_tint.load_tint(cli_args(tmp_path / "out", "--model", str(tmp_path / "tint"), flag, "1"))


def test_the_mesa_example_takes_a_checkpoints_solver_settings_and_refuses_its_mesa_layers(tmp_path, gpt2_tokenizer):
    from tint_hf import MesaOPTForCausalLM

    MesaOPTForCausalLM.from_opt(tiny_opt(dtype=torch.float32), mesa_layers=[1]).save_pretrained(tmp_path / "mesa")
    gpt2_tokenizer.save_pretrained(tmp_path / "mesa")
    parse = finetune_mesa_opt.build_parser().parse_args
    model, _ = finetune_mesa_opt.load_mesa_opt(parse(["--output-dir", str(tmp_path / "out"), "--model",
                                                      str(tmp_path / "mesa"), "--mesa-solver", "exact"]))
    assert model.config.mesa_solver == "exact" and model.config.mesa_layers == [1]
    with pytest.raises(SystemExit, match="--mesa-layers: .* MesaOPT checkpoint"):
        finetune_mesa_opt.load_mesa_opt(parse(["--output-dir", str(tmp_path / "out"), "--model",
                                               str(tmp_path / "mesa"), "--mesa-layers", "0"]))
