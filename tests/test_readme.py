"""The README's Python snippets run as written, with the Hub id replaced by a local folder of the same kind (a
random OPT of OPT-125M's vocabulary and enough layers and width for the snippets' arguments, plus the GPT-2 BPE)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_snippets_run(tmp_path, monkeypatch, gpt2_tokenizer):
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=50272, hidden_size=256, num_hidden_layers=12, num_attention_heads=4, ffn_dim=512,
                       max_position_embeddings=2048, word_embed_proj_dim=256)
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    gpt2_tokenizer.save_pretrained(tmp_path / "opt")
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 2 and all("facebook/opt-125m" in block for block in blocks)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block.replace("facebook/opt-125m", str(tmp_path / "opt")), str(README), "exec"), namespace)
    assert (tmp_path / "tint-opt-125m" / "model.safetensors").exists()
