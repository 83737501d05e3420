"""Shared test fixtures: tiny random auxiliary models built in the test (no downloads) and the shipped GPT-2 BPE."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tint_hf.assets import load_gpt2_tokenizer


def _build(model_class, config_class, defaults: dict, seed: int, dtype: torch.dtype, overrides: dict):
    """A randomly initialised model in eval mode with randomised norm parameters."""
    torch.manual_seed(seed)
    model = model_class(config_class(**{**defaults, **overrides})).to(dtype).eval()
    _randomize_norms(model, seed)
    return model


def tiny_opt(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> OPTForCausalLM:
    """A 2-layer pre-LN OPT with d=32, 4 heads, ReLU, vocab 64."""
    defaults = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
    )
    return _build(OPTForCausalLM, OPTConfig, defaults, seed, dtype, overrides)


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with d=32, 4 heads, gelu_new, vocab 64."""
    defaults = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _build(GPT2LMHeadModel, GPT2Config, defaults, seed, dtype, overrides)


class FullPrecisionRMSNorm(LlamaRMSNorm):
    """HF's LlamaRMSNorm normalises in float32 whatever the model dtype; this one in the input dtype. A float64 Llama
    built with it can be compared with TinT at float64 precision (HF's own norm limits any comparison to ~1e-7)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, full_precision_norms: bool = False,
               **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama (RMSNorm, SwiGLU with d_ff=80 not a multiple of d, RoPE, 4 heads / 2 KV heads), vocab 64;
    ``full_precision_norms`` swaps HF's float32 RMSNorm for :class:`FullPrecisionRMSNorm`."""
    defaults = dict(
        vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=1000.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = _build(LlamaForCausalLM, LlamaConfig, defaults, seed, dtype, overrides)
    if full_precision_norms:
        for module in model.modules():
            if type(module) is LlamaRMSNorm:
                module.__class__ = FullPrecisionRMSNorm
    return model


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Give norm gains (and biases) non-trivial values, so that tests see their effect (default init is 1/0)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if "norm" not in type(module).__name__.lower():
                continue
            module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))


@pytest.fixture
def opt_model() -> OPTForCausalLM:
    return tiny_opt()


@pytest.fixture
def gpt2_model() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture
def llama_model() -> LlamaForCausalLM:
    return tiny_llama()


def save_tiny_gpt2(path, tokenizer, **overrides):
    """A tiny float32 GPT-2 over the full GPT-2 vocabulary, saved with ``tokenizer`` to ``path`` (returned)."""
    tiny_gpt2(vocab_size=50257, dtype=torch.float32, **overrides).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return load_gpt2_tokenizer()


def run_without_tint_hf(body: str, tmp_path) -> str:
    """Run the Python ``body`` in a fresh process in which importing tint_hf fails (so only code saved with a
    checkpoint can run), offline; returns its stdout."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        class _BlockTintHF:
            def find_spec(self, name, path=None, target=None):
                if name == "tint_hf" or name.startswith("tint_hf."):
                    raise ImportError("tint_hf is blocked in this process")
        sys.meta_path.insert(0, _BlockTintHF())
    """) + textwrap.dedent(body)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def generate_in_a_process_without_tint_hf(checkpoint, ids: torch.Tensor, mask: torch.Tensor | None, tmp_path,
                                          max_new_tokens: int = 4) -> list:
    """Greedy ``generate`` of ``checkpoint`` loaded with ``trust_remote_code=True`` in a process without tint_hf
    (:func:`run_without_tint_hf`); returns the ids as lists."""
    import json

    mask_arg = "" if mask is None else f", attention_mask=torch.tensor({mask.tolist()})"
    stdout = run_without_tint_hf(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True, dtype=torch.float64)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        out = model.generate(torch.tensor({ids.tolist()}){mask_arg}, max_new_tokens={max_new_tokens}, do_sample=False)
        print(out.tolist())
    """, tmp_path)
    return json.loads(stdout.strip().splitlines()[-1])
