"""``tint-hf push``: stage a checkpoint with its remote code, tokenizer and model card, then upload it to the Hub."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig

from ..cards import CARDS, CardSpec, render_card

HELP = "Stage a TinT / MesaOPT checkpoint with remote code, tokenizer and its model card, and upload it to the Hub."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="A folder written by `tint-hf build` or `save_pretrained`.")
    parser.add_argument("--card", required=True, help=f"The model card to attach: one of {', '.join(CARDS)}.")
    parser.add_argument("--repo-id", required=True, help="Target Hub repository, e.g. my-org/tint-opt-125m.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder or Hub id (default: the checkpoint).")
    parser.add_argument("--staging", type=Path, default=None,
                        help="Empty folder to stage the upload in (default: a temporary folder).")
    parser.add_argument("--dry-run", action="store_true", help="Stage only (needs --staging); upload nothing.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--revision", default=None, help="Branch to upload to (created if missing).")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one).")


def check_card_matches(config: PreTrainedConfig, spec: CardSpec) -> None:
    """Refuse to publish a checkpoint under a card that describes a different model (type, base shapes, settings)."""
    problems = []
    if config.model_type != spec.model_type:
        problems.append(f"model_type {config.model_type!r} != {spec.model_type!r}")
    else:
        base = config.aux_config if spec.model_type == "tint" else config
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if getattr(base, key) != getattr(spec.base_shapes, key):
                problems.append(f"base {key} {getattr(base, key)} != {getattr(spec.base_shapes, key)}")
        for key, expected in spec.construction.items():
            if key == "mesa_layers" and expected == "all":
                expected = list(range(config.num_hidden_layers))
            if getattr(config, key) != expected:
                problems.append(f"{key} {getattr(config, key)!r} != {expected!r}")
    if problems:
        raise SystemExit(f"The checkpoint does not match the card {spec.name!r}: {'; '.join(problems)}.")


def stage(checkpoint: str, card: str, repo_id: str, folder: Path, tokenizer: str | None = None) -> Path:
    """Write the folder to upload: weights (safetensors) with remote code and ``auto_map``, tokenizer, README.md."""
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"--staging {folder} is not empty; choose a new folder.")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)  # keeps the stored dtype
    check_card_matches(model.config, CARDS[card])
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer or checkpoint).save_pretrained(folder)
    render_card(card, repo_id).save(folder / "README.md")
    return folder


def upload(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
           commit_message: str | None = None, token: str | None = None) -> str:
    """Create the repository (if needed) and upload ``folder`` in one commit; returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                               commit_message=commit_message or f"Upload {folder.name} with tint_hf")
    return str(commit)


def run(args: argparse.Namespace) -> int:
    if args.card not in CARDS:
        raise SystemExit(f"Unknown card {args.card!r}; choose one of {', '.join(CARDS)}.")
    if args.dry_run and args.staging is None:
        raise SystemExit("--dry-run keeps only the staged folder: pass --staging.")
    with tempfile.TemporaryDirectory() as temporary:
        folder = stage(args.checkpoint, args.card, args.repo_id, args.staging or Path(temporary) / "stage",
                       args.tokenizer)
        files = sorted(p.name for p in folder.iterdir())
        print(f"staged {len(files)} files in {folder}: {', '.join(files)}")
        if args.dry_run:
            return 0
        print(f"uploaded: {upload(folder, args.repo_id, args.private, args.revision, args.commit_message, args.token)}")
    return 0
