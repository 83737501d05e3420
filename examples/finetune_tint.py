"""Fine-tune (meta-train) TinT with the HF ``Trainer``: full fine-tuning or LoRA through ``peft``.

TinT's forward pass runs its auxiliary model, one simulated SGD step on the first part of each block and the
prediction of the rest; its loss is the evaluation-part NLL *after* that step, and the whole pass is differentiable.
Training TinT therefore meta-learns its prefix embeddings so that the simulated step helps more.

Tiny default (CPU, no network): a random 2-layer OPT (d=64) with the GPT-2 BPE vocabulary, turned into TinT, trained
on the shipped CC0 text::

    python examples/finetune_tint.py --max-steps 20

Real runs (any number of GPUs; the configs are in ``examples/accelerate/``)::

    tint-hf build --aux facebook/opt-125m --out tint-opt-125m          # construct once, in one process
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/finetune_tint.py \\
        --model tint-opt-125m --dataset wikitext --dataset-config wikitext-103-raw-v1 --block-size 512 --bf16

Numerics: ``--bf16`` is autocast (float32 master weights and residual stream) and keeps the simulated step within
about 1.5e-2 (relative) of float64 with either backward. TinT evaluates its finite-difference backward
(``N (f(x + g / N) - f(x))``, N = 1000) in float32 even for bfloat16 activations, which would otherwise round
``x + g / N`` back to ``x``; this script loads float32 weights.

PEFT: ``--peft lora`` puts LoRA on TinT's prefix embeddings with ``LoraConfig(target_parameters=...)`` (the (P, D)
and (C, P, D) prefixes are weight matrices and stacks of them; peft applies the adapter while TinT calls the module
that holds them). The token embedding is not adapted: the inner step reads it as a raw matrix and the output head is tied to it, so a
merged adapter would change both. IA3 needs ``nn.Linear`` layers, of which TinT has only that tied head, so
``--peft ia3`` is refused for TinT (it works for MesaOPT).

The helpers above ``load_tint`` are shared with ``finetune_mesa_opt.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer, TrainingArguments

import tint_hf
from tint_hf._optional import require
from tint_hf.assets import load_gpt2_tokenizer, sample_text
from tint_hf.training import DecayAwareTrainer


# --------------------------------------------------------------------------------------------------------------
# Shared with finetune_mesa_opt.py
# --------------------------------------------------------------------------------------------------------------
def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Data, optimisation, precision and PEFT options common to the fine-tuning examples."""
    data = parser.add_argument_group("data (default: the shipped CC0 text)")
    data.add_argument("--text-file", type=Path, default=None, help="A plain-text file to train on.")
    data.add_argument("--dataset", default=None, help="A `datasets` name or local folder (e.g. wikitext).")
    data.add_argument("--dataset-config", default=None)
    data.add_argument("--dataset-split", default="train")
    data.add_argument("--text-column", default="text")
    data.add_argument("--block-size", type=int, default=64, help="Tokens per training sequence (default 64).")
    data.add_argument("--max-blocks", type=int, default=None, help="Use at most this many blocks.")
    data.add_argument("--eval-blocks", type=int, default=8, help="Blocks held out for evaluation (default 8).")
    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", type=Path, default=Path("finetuned"))
    train.add_argument("--max-steps", type=int, default=20)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--optim", default="adamw_torch", help="Trainer optimizer name (e.g. adamw_torch, sgd).")
    train.add_argument("--batch-size", type=int, default=2, help="Per-device batch size.")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping.")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights stay float32).")
    train.add_argument("--activation-checkpointing", action="store_true")
    train.add_argument("--logging-steps", type=int, default=5)
    train.add_argument("--seed", type=int, default=0)
    peft = parser.add_argument_group("parameter-efficient fine-tuning")
    peft.add_argument("--peft", choices=["none", "lora", "ia3"], default="none")
    peft.add_argument("--lora-r", type=int, default=8)
    peft.add_argument("--lora-alpha", type=int, default=16)
    peft.add_argument("--targets", nargs="+", default=None, help="Module names to adapt (default: per model).")


def read_text(args: argparse.Namespace) -> str:
    """The training text: ``--text-file``, a ``datasets`` split (``--dataset``) or the shipped sample text."""
    if args.text_file is not None:
        return args.text_file.read_text(encoding="utf-8")
    if args.dataset is not None:
        from datasets import load_dataset

        split = load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
        return "\n".join(line for line in split[args.text_column] if line.strip())
    return sample_text()


def text_blocks(tokenizer, text: str, block_size: int, max_blocks: int | None, eval_blocks: int) -> DatasetDict:
    """Tokenise ``text`` and cut it into ``block_size`` sequences (labels = input_ids), the last ``eval_blocks``
    held out."""
    ids = torch.tensor(tokenizer(text).input_ids)
    n_blocks = ids.numel() // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks <= eval_blocks:
        raise SystemExit(f"Only {n_blocks} blocks of {block_size} tokens: lower --block-size or --eval-blocks.")
    blocks = ids[: n_blocks * block_size].view(n_blocks, block_size).tolist()
    split = n_blocks - eval_blocks
    return DatasetDict(train=Dataset.from_dict({"input_ids": blocks[:split], "labels": blocks[:split]}),
                       eval=Dataset.from_dict({"input_ids": blocks[split:], "labels": blocks[split:]}))


def apply_peft(model: PreTrainedModel, args: argparse.Namespace, lora_targets: dict[str, list[str]],
               ia3_targets: tuple[list[str], list[str]] | None) -> PreTrainedModel:
    """Wrap ``model`` in a LoRA / IA3 ``PeftModel`` (``--peft``).

    ``lora_targets``: ``LoraConfig`` keyword(s), ``target_modules`` and / or ``target_parameters`` (``--targets``
    replaces them by module names); ``ia3_targets``: (targets, feed-forward subset), ``None`` when the model has no
    layers IA3 can scale."""
    if args.peft == "none":
        return model
    peft = require("peft", "peft", f"--peft {args.peft}")
    IA3Config, LoraConfig, get_peft_model = peft.IA3Config, peft.LoraConfig, peft.get_peft_model  # noqa: N806

    if args.peft == "lora":
        targets = {"target_modules": args.targets} if args.targets else lora_targets
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, **targets)
    elif ia3_targets is None:
        raise SystemExit(f"--peft ia3 needs nn.Linear layers to scale; {type(model).__name__} has none (use lora).")
    else:
        targets, feedforward = ia3_targets
        targets = args.targets or targets
        config = IA3Config(target_modules=targets, feedforward_modules=[m for m in feedforward if m in targets])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def training_arguments(args: argparse.Namespace, **overrides) -> TrainingArguments:
    """``TrainingArguments`` from the command line; every trainable parameter is used in every forward, so DDP
    runs without the unused-parameter search."""
    kwargs = dict(
        output_dir=str(args.output_dir), max_steps=args.max_steps, learning_rate=args.learning_rate, optim=args.optim,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, warmup_steps=args.warmup_steps, lr_scheduler_type="constant",
        max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay, bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing, logging_steps=args.logging_steps, seed=args.seed,
        save_strategy="no", eval_strategy="no", report_to="none", ddp_find_unused_parameters=False,
        disable_tqdm=True, use_cpu=not torch.accelerator.is_available(),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(model: PreTrainedModel, tokenizer, data: DatasetDict, args: argparse.Namespace,
                 **training_overrides) -> Trainer:
    """A ``Trainer`` for ``model`` on ``data`` with the command-line settings (``training_overrides`` win)."""
    return DecayAwareTrainer(model=model, args=training_arguments(args, **training_overrides),
                             train_dataset=data["train"], eval_dataset=data["eval"], processing_class=tokenizer)


def run_training(model: PreTrainedModel, tokenizer, data: DatasetDict, args: argparse.Namespace) -> Trainer:
    """Train, evaluate on the held-out blocks before and after, save the model (or adapter) and tokenizer."""
    trainer = make_trainer(model, tokenizer, data, args)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model()
    if trainer.is_world_process_zero():
        world = trainer.accelerator.num_processes
        print(f"world size {world}; eval loss {before:.4f} -> {after:.4f}; saved to {args.output_dir}")
    return trainer


# --------------------------------------------------------------------------------------------------------------
# TinT
# --------------------------------------------------------------------------------------------------------------
def load_tint(args: argparse.Namespace) -> tuple[PreTrainedModel, object]:
    """TinT and a tokenizer: a saved TinT checkpoint, TinT built from an OPT / GPT-2 (``--model``), or the tiny
    default."""
    # settings a saved checkpoint may take at load time; the construction's own (P, simulated layers) it fixes
    overrides = {name: value for name, value in (("backward", args.backward), ("inner_lr", args.inner_lr))
                 if value is not None}
    construction = dict(num_prefixes=16 if args.num_prefixes is None else args.num_prefixes,
                        num_simulation_layers=args.num_simulation_layers,
                        **{"inner_lr": 1e-2, **overrides})
    if args.model is None:
        from tint_hf.assets import tiny_demo_model

        tokenizer = load_gpt2_tokenizer()
        aux = tiny_demo_model(len(tokenizer), args.seed)
        return tint_hf.TinTForCausalLM.from_auxiliary(aux, **construction).train(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if AutoConfig.from_pretrained(args.model).model_type == tint_hf.TinTConfig.model_type:
        fixed = [f"--{name}" for name, value in (("num-prefixes", args.num_prefixes),
                                                ("num-simulation-layers", args.num_simulation_layers)) if value is not None]
        if fixed:
            raise SystemExit(f"{' and '.join(fixed)}: {args.model} is a built TinT, whose construction fixes them; "
                             "drop them, or pass the auxiliary model as --model to build TinT with them.")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **overrides)
    else:
        model = tint_hf.TinTForCausalLM.from_auxiliary(args.model, dtype=torch.float32, **construction)
    return model.train(), tokenizer


def tint_lora_targets(model: PreTrainedModel) -> dict[str, list[str]]:
    """LoRA on every prefix embedding (the slots of the first layer name those of all layers)."""
    return {"target_parameters": [f"prefixes.{slot}" for slot, _ in model.model.layers[0].prefixes.named_parameters()]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="A TinT checkpoint, or an OPT / GPT-2 to build TinT from (default: tiny random OPT).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer (default: the --model folder / Hub id).")
    tint = parser.add_argument_group("TinT construction (ignored for a saved TinT checkpoint except --backward)")
    tint.add_argument("--num-prefixes", type=int, default=None, help="P when building TinT here (default 16).")
    tint.add_argument("--inner-lr", type=float, default=None,
                      help="Simulated SGD learning rate (summed loss; default 1e-2 when building, the checkpoint's "
                           "otherwise).")
    tint.add_argument("--num-simulation-layers", type=int, default=None)
    tint.add_argument("--backward", choices=["fd", "exact"], default=None,
                      help="LayerNorm/activation backward (default: fd for a construction, the checkpoint's setting otherwise).")
    add_training_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> Trainer:
    args = build_parser().parse_args(argv)
    model, tokenizer = load_tint(args)
    model = apply_peft(model, args, tint_lora_targets(model), ia3_targets=None)
    data = text_blocks(tokenizer, read_text(args), args.block_size, args.max_blocks, args.eval_blocks)
    return run_training(model, tokenizer, data, args)


if __name__ == "__main__":
    main(sys.argv[1:]).accelerator.end_training()  # destroys the process group under accelerate launch / torchrun
