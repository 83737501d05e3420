"""Two-process training on CPU (gloo): DDP through Trainer, FSDP2 with ``fully_shard``, and the example script under
``accelerate launch`` with examples/accelerate/ddp.yaml. Every run is compared with single-process autograd steps on
the whole batch (the ranks see one sequence each, and the losses are means over equally many targets).

Workers are *spawned* fresh processes joined by a gloo FileStore, as ``accelerate.debug_launcher`` does, but without
its fork: a process forked from a pytest run that already used torch's thread pools can deadlock."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_opt
from datasets import Dataset, DatasetDict

from tint_hf import MesaOPTForCausalLM, TinTForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import finetune_tint  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts processes

LR, STEPS = 0.5, 2
BLOCKS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def tint_model() -> TinTForCausalLM:
    return TinTForCausalLM.from_auxiliary(tiny_opt(dtype=torch.float64), num_prefixes=8, inner_lr=0.1).train()


def mesa_model() -> MesaOPTForCausalLM:
    return MesaOPTForCausalLM.from_opt(tiny_opt(dtype=torch.float64), mesa_layers=[0]).train()


def reference_state(build) -> dict[str, torch.Tensor]:
    """STEPS plain SGD steps on the mean loss of both blocks in one process."""
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        model(BLOCKS, labels=BLOCKS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def assert_state_close(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], initial) -> None:
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, atol=1e-10, rtol=0, msg=name)
    assert any(not torch.equal(expected[name], value) for name, value in initial.items())  # the steps moved weights


def same_on_every_rank(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(g, tensor) for g in gathered)


def launch(worker, *args, world_size: int = 2) -> None:
    """Run ``worker(*args)`` on ``world_size`` spawned CPU ranks; a failure on any rank fails the caller."""
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.start_processes(_rank_main, args=(f"{folder}/store", world_size, worker, args),
                                              nprocs=world_size, start_method="spawn")


def _rank_main(rank: int, store: str, world_size: int, worker, args: tuple) -> None:
    # what accelerate reads to recognise a multi-CPU run (the process group below is already initialised)
    os.environ.update(WORLD_SIZE=str(world_size), ACCELERATE_USE_CPU="yes", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29500", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, store=dist.FileStore(store, world_size))
    try:
        worker(*args)
    finally:
        dist.destroy_process_group()


def ddp_trainer_worker(output_dir: str) -> None:
    from accelerate.utils import DistributedType
    from torch.nn.parallel import DistributedDataParallel

    model = tint_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = Dataset.from_dict({"input_ids": BLOCKS.tolist(), "labels": BLOCKS.tolist()})
    args = finetune_tint.build_parser().parse_args([
        "--output-dir", output_dir, "--optim", "sgd", "--learning-rate", str(LR), "--max-steps", str(STEPS),
        "--batch-size", "1", "--max-grad-norm", "0"])
    trainer = finetune_tint.make_trainer(model, None, DatasetDict(train=blocks, eval=blocks), args, use_cpu=True)
    trainer.train()
    assert dist.get_world_size() == trainer.accelerator.num_processes == 2
    assert trainer.accelerator.distributed_type == DistributedType.MULTI_CPU
    assert isinstance(trainer.model_wrapped, DistributedDataParallel)
    assert same_on_every_rank(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert_state_close(model.state_dict(), reference_state(tint_model), initial)


def test_two_process_trainer_ddp_equals_a_full_batch_step_on_every_rank(tmp_path):
    launch(ddp_trainer_worker, str(tmp_path))


def fsdp2_worker() -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    assert dist.get_world_size() == 2
    rank = dist.get_rank()
    # TinT: one unit (its layers' prefixes are read outside the layers' forward); MesaOPT: one unit per layer.
    for build, units in ((tint_model, lambda m: []), (mesa_model, lambda m: list(m.model.decoder.layers))):
        model = build()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        for unit in units(model):
            fully_shard(unit)
        fully_shard(model)
        sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
        assert len(sharded) == len(list(model.parameters()))
        assert sum(p.to_local().numel() for p in sharded) < sum(p.numel() for p in sharded)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        own = BLOCKS[rank : rank + 1]
        for _ in range(STEPS):
            model(own, labels=own).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        assert same_on_every_rank(torch.cat([v.flatten() for v in full.values()]))
        assert_state_close(full, reference_state(build), initial)


def test_two_process_fsdp2_fully_shard_equals_a_full_batch_step():
    launch(fsdp2_worker)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("config", sorted((ROOT / "examples" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_parse_and_name_real_classes(config):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    cluster = load_config_from_file(str(config))  # rejects unknown top-level keys
    launch_options = {action.dest for action in launch_command_parser()._actions}
    assert set(cluster.fsdp_config) <= launch_options
    if cluster.fsdp_config:
        assert cluster.fsdp_config["fsdp_version"] == 2
        wrap = cluster.fsdp_config.get("fsdp_transformer_layer_cls_to_wrap")
        model = mesa_model() if "mesa" in config.stem else tint_model()
        if wrap is not None:
            assert wrap in model._no_split_modules
            assert any(type(module).__name__ == wrap for module in model.modules())
        else:
            assert cluster.fsdp_config["fsdp_auto_wrap_policy"] == "NO_WRAP"


def test_example_script_under_accelerate_launch_with_the_ddp_config(tmp_path):
    argv = ["--output-dir", str(tmp_path), "--max-steps", "2", "--block-size", "32", "--max-blocks", "6",
            "--eval-blocks", "2"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "examples" / "accelerate" / "ddp.yaml"), "--main_process_port", str(free_port()),
               str(ROOT / "examples" / "finetune_tint.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "world size 2;" in result.stdout
    trained = TinTForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    initial, _ = finetune_tint.load_tint(finetune_tint.build_parser().parse_args(argv))
    assert trained.keys() == initial.state_dict().keys()
    assert not torch.equal(trained["model.layers.1.prefixes.fc2"], initial.state_dict()["model.layers.1.prefixes.fc2"])
