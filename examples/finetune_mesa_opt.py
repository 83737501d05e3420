"""Fine-tune MesaOPT (OPT with mesa-layers) with the HF ``Trainer``: full fine-tuning, LoRA or IA3 through ``peft``.

A MesaOPT made from an OPT keeps every OPT weight; the mesa parameters (ridge lambda, forget / input gates, output
norm) start from their initialisation, so the usual recipe is to fine-tune the converted model on text.

Tiny default (CPU, no network): a random 2-layer OPT (d=64) with the GPT-2 BPE vocabulary, converted with both layers
as mesa-layers, trained on the shipped CC0 text::

    python examples/finetune_mesa_opt.py --max-steps 20
    python examples/finetune_mesa_opt.py --max-steps 20 --peft ia3 --activation-checkpointing

Real runs (any number of GPUs; DDP and FSDP configs in ``examples/accelerate/``)::

    accelerate launch --config_file examples/accelerate/fsdp_mesa_opt.yaml examples/finetune_mesa_opt.py \\
        --model facebook/opt-125m --mesa-layers 4 5 6 7 --dataset wikitext --dataset-config wikitext-103-raw-v1 \\
        --block-size 512 --batch-size 8 --learning-rate 1e-4 --max-steps 2000 --bf16 --activation-checkpointing

``--bf16`` is autocast: the mesa states and solves run in float32 whatever the activation dtype.
Data, training and PEFT options are shared with ``finetune_tint.py``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from finetune_tint import add_training_arguments, apply_peft, read_text, run_training, text_blocks
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Trainer

import tint_hf
from tint_hf.assets import load_gpt2_tokenizer

MESA_LORA_TARGETS = {"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "f_proj", "b_proj", "fc1", "fc2"]}
MESA_IA3_TARGETS = (["k_proj", "v_proj", "fc2"], ["fc2"])


SOLVER_DEFAULTS = dict(mesa_solver="cg", cg_steps=16, chunk_size=32)  # when converting here


def load_mesa_opt(args: argparse.Namespace) -> tuple[PreTrainedModel, object]:
    """MesaOPT and a tokenizer: a saved MesaOPT checkpoint, an OPT converted with ``from_opt`` (``--model``), or the
    tiny default."""
    # solver settings apply to a saved checkpoint too; which layers are mesa layers its weights fix
    solver = {name: value for name, value in (("mesa_solver", args.mesa_solver), ("cg_steps", args.cg_steps),
                                              ("chunk_size", args.chunk_size)) if value is not None}
    mesa = dict(mesa_layers=args.mesa_layers or "all", **{**SOLVER_DEFAULTS, **solver})
    if args.model is None:
        from tint_hf.assets import tiny_demo_model

        tokenizer = load_gpt2_tokenizer()
        opt = tiny_demo_model(len(tokenizer), args.seed)
        return tint_hf.MesaOPTForCausalLM.from_opt(opt, **mesa).train(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if AutoConfig.from_pretrained(args.model).model_type == tint_hf.MesaOPTConfig.model_type:
        if args.mesa_layers is not None:
            raise SystemExit(f"--mesa-layers: {args.model} is a MesaOPT checkpoint, whose weights fix its mesa layers; "
                             "drop it, or pass the OPT model as --model to convert those layers.")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **solver)
    else:
        model = tint_hf.MesaOPTForCausalLM.from_opt(args.model, **mesa)
    return model.train(), tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="A MesaOPT checkpoint, or an OPT to convert (default: tiny random OPT).")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer (default: the --model folder / Hub id).")
    mesa = parser.add_argument_group("mesa-layers (the solver options also apply to a saved MesaOPT)")
    mesa.add_argument("--mesa-layers", type=int, nargs="+", default=None,
                      help="Layer indices to convert (default: all; not with a MesaOPT checkpoint).")
    mesa.add_argument("--mesa-solver", choices=["exact", "cg", "cg1", "gd"], default=None, help="Default: cg.")
    mesa.add_argument("--cg-steps", type=int, default=None, help="Default: 16.")
    mesa.add_argument("--chunk-size", type=int, default=None, help="Default: 32.")
    add_training_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> Trainer:
    args = build_parser().parse_args(argv)
    model, tokenizer = load_mesa_opt(args)
    model = apply_peft(model, args, MESA_LORA_TARGETS, MESA_IA3_TARGETS)
    data = text_blocks(tokenizer, read_text(args), args.block_size, args.max_blocks, args.eval_blocks)
    return run_training(model, tokenizer, data, args)


if __name__ == "__main__":
    main(sys.argv[1:]).accelerator.end_training()  # destroys the process group under accelerate launch / torchrun
