"""The within-layer hybrid (``mesa_window = w``): softmax over the last w tokens plus the mesa layer over the older
ones (tint_hf/models/mesa/mesa_window.py), against an independent float64 reference written here, against HF's own
models where no token is older than the window, against its own full forward (prefill + decode, generate) and
through packing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama, tiny_opt
from test_mesa_llama import assert_first_mixer_matches, assert_packing_equals_separate_runs, left_padded, positions

from tint_hf import MesaLlamaConfig, MesaLlamaForCausalLM, MesaOPTForCausalLM

WINDOW = 3


def reference_hybrid(mixer, x, cos, sin, lambda_min, w, window_only=False):
    """The hybrid mixer written out per head and position, float64, exact solves. Window: softmax of the plain
    (RoPE'd) projections over j in (i - w, i]; older: the mesa state over j <= i - w with its gates decayed up to
    i - w, solved against the normalised query; share a = sigmoid(L - mu - log n), 1 when n = 0."""
    bsz, length, _ = x.shape
    heads, kv_heads, d = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim

    def rope(t):  # (B, n, T, d), rotate_half convention
        return t * cos[:, None] + torch.cat([-t[..., d // 2:], t[..., : d // 2]], dim=-1) * sin[:, None]

    q = rope(mixer.q_proj(x).view(bsz, length, heads, d).transpose(1, 2))
    k = rope(mixer.k_proj(x).view(bsz, length, kv_heads, d).transpose(1, 2))
    v = mixer.v_proj(x).view(bsz, length, kv_heads, d).transpose(1, 2)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    gamma, beta = torch.sigmoid(mixer.f_proj(x)).mT, torch.sigmoid(mixer.b_proj(x)).mT  # (B, kv, T)
    lam = F.softplus(mixer.lambda_params) + lambda_min
    out = torch.zeros(bsz, heads, length, d, dtype=x.dtype)
    for b in range(bsz):
        for head in range(heads):
            g = head // (heads // kv_heads)
            for i in range(length):
                window = range(max(0, i - w + 1), i + 1)
                scores = torch.stack([q[b, head, i] @ k[b, g, j] for j in window]) / math.sqrt(d)
                softmax_part = scores.softmax(0) @ v[b, g, list(window)]
                older = range(0, i - w + 1)
                if window_only or not older:
                    out[b, head, i] = softmax_part
                    continue
                h, s = torch.diag(lam[g]), torch.zeros(d, d, dtype=x.dtype)
                for j in older:
                    decay = torch.prod(gamma[b, g, j + 1: i - w + 1])
                    h = h + decay * beta[b, g, j] * torch.outer(kn[b, g, j], kn[b, g, j])
                    s = s + decay * beta[b, g, j] * torch.outer(kn[b, g, j], v[b, g, j])
                mesa = s.T @ torch.linalg.solve(h, qn[b, head, i])
                mesa = mesa * torch.rsqrt(mesa.pow(2).mean() + 1e-6) * mixer.o_norm.weight[head]
                share = torch.sigmoid(torch.logsumexp(scores, 0) - mixer.older_log_weight[head] - math.log(len(older)))
                out[b, head, i] = share * softmax_part + (1 - share) * mesa
    return mixer.o_proj(out.transpose(1, 2).reshape(bsz, length, heads * d))


@pytest.mark.parametrize("window_only", [False, True])
def test_the_hybrid_mixer_equals_an_independent_reference(window_only):
    model = MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[0], mesa_solver="exact", mesa_window=WINDOW,
                                            mesa_window_only=window_only)
    assert_first_mixer_matches(model, lambda m, x, cos, sin: reference_hybrid(
        m, x, cos, sin, model.config.lambda_min, WINDOW, window_only), perturb=("older_log_weight",), scale=0.5)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_without_tokens_older_than_the_window_it_is_the_base_model(family):
    """While no token is older than the window, the layer is the base model's softmax attention: a model converted
    with a window as long as the input gives the base model's logits at every real position (left padding too)."""
    ids, mask = left_padded()
    if family == "opt":
        base = tiny_opt()
        model = MesaOPTForCausalLM.from_opt(base, mesa_layers="all", mesa_window=ids.shape[1])
        kwargs = dict(attention_mask=mask)
    else:
        base = tiny_llama()
        model = MesaLlamaForCausalLM.from_llama(base, mesa_layers="all", mesa_window=ids.shape[1])
        kwargs = dict(attention_mask=mask, position_ids=positions(mask))
    real = mask.bool()
    torch.testing.assert_close(model(ids, **kwargs).logits[real], base(ids, **kwargs).logits[real],
                               rtol=1e-10, atol=1e-10)
    convert = MesaOPTForCausalLM.from_opt if family == "opt" else MesaLlamaForCausalLM.from_llama
    short = convert(base, mesa_layers="all", mesa_window=WINDOW)  # older tokens reach the mesa part: not the base
    assert (short(ids, **kwargs).logits - base(ids, **kwargs).logits)[real].abs().max() > 1e-3


@pytest.mark.parametrize("family,mesa_kwargs", [
    ("llama", dict(mesa_layers=[1], cg_steps=8, chunk_size=4)),
    ("llama", dict(mesa_layers="all", cg_steps=8, chunk_size=4, short_conv_size=4, use_output_gate=True)),
    ("opt", dict(mesa_layers="all", cg_steps=8, chunk_size=4)),
    ("opt", dict(mesa_layers="all", mesa_window_only=True)),
])
def test_prefill_decode_and_generate_equal_the_full_forward(family, mesa_kwargs):
    """The decode cache (the last w tokens' window keys / values and pending mesa inputs, the mesa state, the count of
    older tokens) continues the sequence exactly: one token at a time and in blocks, with left padding."""
    ids, mask = left_padded()
    if family == "opt":
        model = MesaOPTForCausalLM.from_opt(tiny_opt(), mesa_window=WINDOW, **mesa_kwargs)
        position_kwargs = lambda lo, hi: {}  # noqa: E731
        model.generation_config.pad_token_id = 1
    else:
        model = MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_window=WINDOW, **mesa_kwargs)
        pos = positions(mask)
        position_kwargs = lambda lo, hi: dict(position_ids=pos[:, lo:hi])  # noqa: E731
        model.generation_config.pad_token_id = 0
    full = model(ids, attention_mask=mask, **position_kwargs(0, 12)).logits
    out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True, **position_kwargs(0, 5))
    pieces = [out.logits]
    for lo, hi in [(5, 6), (6, 7), (7, 8), (8, 12)]:
        out = model(ids[:, lo:hi], attention_mask=mask[:, :hi], cache=out.cache, use_cache=True,
                    **position_kwargs(lo, hi))
        pieces.append(out.logits)
    assert (torch.cat(pieces, dim=1) - full)[mask.bool()].abs().max() < 1e-10
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_packed_documents_equal_running_them_separately():
    """Windows, delayed mesa inputs and the count of older tokens all restart with each packed document."""
    model = MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers="all", short_conv_size=4, cg_steps=8,
                                            mesa_window=WINDOW)
    assert_packing_equals_separate_runs(model, [5, 2, 9])


def test_window_settings_are_checked():
    with pytest.raises(ValueError, match="mesa_window must be an int >= 0"):
        MesaLlamaConfig(mesa_window=-1)
    with pytest.raises(ValueError, match="mesa_window_only=True .* set mesa_window > 0"):
        MesaLlamaConfig(mesa_window_only=True)
    model = MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[0], mesa_window=WINDOW)
    assert model.model.layers[0].self_attn.older_log_weight.shape == (4,)
    assert torch.equal(model.model.layers[0].self_attn.older_log_weight, torch.zeros(4, dtype=torch.float64))


def test_a_checkpoint_keeps_its_window(tmp_path):
    """The window is part of what the weights mean: a saved hybrid reloads equal, and loading it with another window
    (or none) is refused, while an older checkpoint without the field still loads (test_layout's fixtures)."""
    model = MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[1], mesa_window=WINDOW, cg_steps=6)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = MesaLlamaForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = left_padded()[0]
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mesa_window=3"):
        MesaLlamaForCausalLM.from_pretrained(tmp_path / "ckpt", mesa_window=5)
