"""MesaOPT training: a Trainer run on the shipped text, the same run on two gloo processes, and LoRA via peft."""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_opt
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from tint_hf import MesaOPTForCausalLM
from tint_hf.assets import load_gpt2_tokenizer, sample_text

BLOCK = 64
TESTS_DIR = Path(__file__).resolve().parent


@functools.cache
def _compact_token_ids() -> tuple[torch.Tensor, int]:
    """The shipped text in GPT-2 tokens, renumbered densely (about 3.6k distinct tokens), and that vocabulary size.

    Renumbering keeps the text and its tokenisation but shrinks the LM head from 50k rows to 3.6k, for speed.
    """
    ids = torch.tensor(load_gpt2_tokenizer()(sample_text())["input_ids"])
    vocab, compact = torch.unique(ids, return_inverse=True)
    return compact, len(vocab)


def text_blocks(count: int, offset: int = 0) -> torch.Tensor:
    """``count`` consecutive blocks of BLOCK tokens of the shipped English text, from block ``offset``."""
    ids, _ = _compact_token_ids()
    blocks = ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)
    return blocks[offset : offset + count]


def small_mesa_lm(seed: int = 0) -> MesaOPTForCausalLM:
    """A float32 2-layer MesaOPT (d = 32, 4 heads): layer 0 mesa (CG), layer 1 softmax attention."""
    _, vocab_size = _compact_token_ids()
    opt = tiny_opt(seed=seed, dtype=torch.float32, vocab_size=vocab_size, max_position_embeddings=BLOCK)
    return MesaOPTForCausalLM.from_opt(opt, mesa_layers=[0], mesa_solver="cg", cg_steps=16, chunk_size=16)


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor) -> float:
    model.eval()
    return model(blocks, labels=blocks).loss.item()


def train_with_trainer(output_dir: str, max_steps: int, seed: int = 0) -> tuple[MesaOPTForCausalLM, Trainer]:
    """A Trainer run (AdamW, lr 1e-2, batch 8 x 64 tokens per process) on the first 160 blocks of the text."""
    model = small_mesa_lm(seed)
    train = text_blocks(160)
    dataset = Dataset.from_dict({"input_ids": train.tolist(), "labels": train.tolist()})
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=8, max_steps=max_steps, learning_rate=1e-2,
        warmup_steps=2, use_cpu=True, report_to=[], save_strategy="no", logging_steps=max_steps, seed=seed,
        ddp_find_unused_parameters=False, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return model, trainer


def test_trainer_lowers_held_out_loss(tmp_path):
    held_out = text_blocks(16, offset=200)
    before = held_out_loss(small_mesa_lm(), held_out)
    model, _ = train_with_trainer(str(tmp_path), max_steps=30)
    after = held_out_loss(model, held_out)
    assert after < before - 0.5, (before, after)


DDP_WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests_dir!r})
from test_mesa_training import train_with_trainer
model, trainer = train_with_trainer({output_dir!r}, max_steps=4)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
record = dict(world=dist.get_world_size(), processes=trainer.accelerator.state.num_processes,
              distributed_type=str(trainer.accelerator.state.distributed_type),
              max_rank_difference=max((g - flat).abs().max().item() for g in gathered),
              checksum=flat.double().sum().item(), loss=trainer.state.log_history[-1]["train_loss"])
with open({output_dir!r} + f"/rank{{dist.get_rank()}}.json", "w") as f:
    json.dump(record, f)
dist.barrier()
dist.destroy_process_group()  # an exit with the gloo group alive can abort ("terminate called ...") at teardown
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER.format(tests_dir=str(TESTS_DIR), output_dir=str(tmp_path)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for record in records:
        assert record["world"] == record["processes"] == 2
        assert record["distributed_type"] == "DistributedType.MULTI_CPU"
        assert record["max_rank_difference"] == 0.0
    assert records[0]["checksum"] == records[1]["checksum"]
    # the ranks trained: the weights moved away from the initial model
    initial = torch.cat([p.detach().flatten() for p in small_mesa_lm().parameters()]).double().sum().item()
    assert records[0]["checksum"] != initial


def test_lora_on_mesa_projections_trains_saves_and_reloads(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*layers\.0\.self_attn\.(q_proj|k_proj|v_proj|f_proj|b_proj)")
    model = get_peft_model(small_mesa_lm(), lora)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and ".layers.0.self_attn." in name for name in trainable)
    assert any("f_proj" in name for name in trainable) and any("b_proj" in name for name in trainable)
    train, held_out = text_blocks(64), text_blocks(16, offset=200)
    before = held_out_loss(model, held_out)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(15):
        batch = train[(step * 8) % 64 :][:8]
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_out_loss(model, held_out)
    assert after < before, (before, after)

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(small_mesa_lm(), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(held_out).logits, model.eval()(held_out).logits, rtol=0, atol=0)
    base = small_mesa_lm()
    assert held_out_loss(base, held_out) == before  # the base weights were left untouched


def test_ridge_lambda_is_kept_out_of_weight_decay(tmp_path):
    """The stock Trainer decays lambda_params (its name is no bias or norm); DecayAwareTrainer does not, with or
    without a peft wrapper, and still decays the projections."""
    from tint_hf.training import DecayAwareTrainer

    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, use_cpu=True, report_to=[])
    model = small_mesa_lm()
    assert any("lambda_params" in name for name in Trainer(model=model, args=args).get_decay_parameter_names(model))
    lora = get_peft_model(small_mesa_lm(), LoraConfig(target_modules=["q_proj"]))
    for name, param in lora.named_parameters():
        param.requires_grad_(param.requires_grad or name.endswith("lambda_params"))  # train lambda beside LoRA
    for candidate in (model, lora):
        trainer = DecayAwareTrainer(model=candidate, args=args)
        names = dict(candidate.named_parameters())
        decayed = {id(p) for group in trainer.create_optimizer().param_groups if group["weight_decay"] > 0
                   for p in group["params"]}
        lambdas = [n for n, p in names.items() if n.endswith("lambda_params") and p.requires_grad]
        assert lambdas and not any(id(names[n]) in decayed for n in lambdas)
        assert any("q_proj" in n and id(p) in decayed for n, p in names.items())
