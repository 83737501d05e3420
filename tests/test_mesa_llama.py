"""MesaLlamaForCausalLM against HF's LlamaForCausalLM, against an independent float64 mesa layer written here (RoPE,
grouped key/value heads), against its own full forward, and through packing, save/load, remote code and generate."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import generate_in_a_process_without_tint_hf, run_without_tint_hf, tiny_llama, tiny_opt
from transformers import AutoModelForCausalLM, DynamicCache

from tint_hf import MesaLlamaConfig, MesaLlamaForCausalLM

MESA_PARAMETERS = {"lambda_params", "f_proj", "b_proj", "o_norm", "g_proj", "q_conv1d", "k_conv1d", "v_conv1d"}


def left_padded(seed=0, length=12, vocab=64):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0  # the tiny Llama's pad token
    return ids, mask


def positions(mask):
    """HF generate's position_ids for left-padded rows."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def test_no_mesa_layers_reproduces_llama():
    llama = tiny_llama()
    model = MesaLlamaForCausalLM.from_llama(llama, mesa_layers=[])
    ids, mask = left_padded()
    for kwargs in ({}, dict(attention_mask=mask, position_ids=positions(mask))):
        torch.testing.assert_close(model(ids, **kwargs).logits, llama(ids, **kwargs).logits, rtol=0, atol=0)


def test_from_llama_reuses_every_weight_and_groups_the_state_per_key_value_head():
    llama = tiny_llama()
    model = MesaLlamaForCausalLM.from_llama(llama, mesa_layers=[1])
    base = llama.state_dict()
    for name, tensor in model.state_dict().items():
        if name in base:
            assert torch.equal(tensor, base[name]), name
        else:
            assert MESA_PARAMETERS.intersection(name.split(".")) and ".layers.1." in name, name
    mixer = model.model.layers[1].self_attn
    assert (mixer.num_heads, mixer.num_kv_heads, mixer.head_dim) == (4, 2, 8)
    assert mixer.lambda_params.shape == (2, 8) and mixer.f_proj.out_features == 2
    with pytest.raises(TypeError, match="from_opt"):
        MesaLlamaForCausalLM.from_llama(tiny_opt())


def reference_mesa_mixer(mixer, x, cos, sin, lambda_min):
    """The mesa layer written out independently in float64: HF-convention RoPE, L2 norm, per key/value head the
    recurrences H_t = g H + b k k^T, S_t = g S + b k v^T, and for every query head of the group
    o_t = S_t^T linalg.solve(H_t + diag(lam), q_t); per-head RMSNorm * weight, o_proj."""
    bsz, length, _ = x.shape
    heads, kv_heads, d = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim

    def rope(t):  # t (B, n, T, d); rotate_half convention
        half = torch.cat([-t[..., d // 2 :], t[..., : d // 2]], dim=-1)
        return t * cos[:, None] + half * sin[:, None]

    q = F.normalize(rope(mixer.q_proj(x).view(bsz, length, heads, d).transpose(1, 2)), dim=-1)
    k = F.normalize(rope(mixer.k_proj(x).view(bsz, length, kv_heads, d).transpose(1, 2)), dim=-1)
    v = mixer.v_proj(x).view(bsz, length, kv_heads, d).transpose(1, 2)
    gamma, beta = torch.sigmoid(mixer.f_proj(x)).mT, torch.sigmoid(mixer.b_proj(x)).mT  # (B, kv, T)
    lam = F.softplus(mixer.lambda_params) + lambda_min
    out = torch.zeros(bsz, heads, length, d, dtype=x.dtype)
    for b in range(bsz):
        for g in range(kv_heads):
            h, s = torch.zeros(d, d, dtype=x.dtype), torch.zeros(d, d, dtype=x.dtype)
            for t in range(length):
                h = gamma[b, g, t] * h + beta[b, g, t] * torch.outer(k[b, g, t], k[b, g, t])
                s = gamma[b, g, t] * s + beta[b, g, t] * torch.outer(k[b, g, t], v[b, g, t])
                for head in range(g * heads // kv_heads, (g + 1) * heads // kv_heads):
                    out[b, head, t] = s.T @ torch.linalg.solve(h + torch.diag(lam[g]), q[b, head, t])
    normed = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * mixer.o_norm.weight[:, None, :]
    return mixer.o_proj(normed.transpose(1, 2).reshape(bsz, length, heads * d))


def assert_first_mixer_matches(model, reference, perturb: tuple[str, ...] = (), scale: float = 0.3) -> torch.Tensor:
    """Move layer 0's gates, lambda, output norm (and ``perturb``) away from their initial values, run the model on
    left_padded() ids and compare the mixer's output with ``reference(mixer, x, cos, sin)`` (float64). Returns ids."""
    mixer = model.model.layers[0].self_attn
    with torch.no_grad():
        for name in ("f_proj.weight", "b_proj.weight", "lambda_params", "o_norm.weight", *perturb):
            p = mixer.get_parameter(name)
            p.add_(scale * torch.randn_like(p))
    captured = {}
    mixer.register_forward_hook(lambda m, args, kwargs, out: captured.update(x=args[0], out=out[0]), with_kwargs=True)
    ids = left_padded()[0]
    with torch.no_grad():
        model(ids)
        cos, sin = model.model.rotary_emb(captured["x"], torch.arange(ids.shape[1])[None].expand(3, -1))
        expected = reference(mixer, captured["x"], cos, sin)
    torch.testing.assert_close(captured["out"], expected, rtol=1e-10, atol=1e-12)
    return ids


def test_the_mesa_mixer_equals_an_independent_rope_and_grouped_head_reference():
    model = MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[0], mesa_solver="exact")
    ids = assert_first_mixer_matches(model, lambda m, x, cos, sin: reference_mesa_mixer(m, x, cos, sin,
                                                                                        model.config.lambda_min))
    no_rope = MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[0], mesa_solver="exact", mesa_rope=False)
    assert (no_rope(ids).logits - model(ids).logits).abs().max() > 0  # the switch acts


@pytest.mark.parametrize("mesa_kwargs", [
    dict(mesa_layers=[1], mesa_solver="cg", cg_steps=8, chunk_size=4),
    dict(mesa_layers="all", mesa_solver="cg", cg_steps=8, chunk_size=4, short_conv_size=4, use_output_gate=True),
])
def test_prefill_decode_and_generate_equal_the_full_forward(mesa_kwargs):
    model = MesaLlamaForCausalLM.from_llama(tiny_llama(), **mesa_kwargs)
    ids, mask = left_padded()
    pos = positions(mask)
    full = model(ids, attention_mask=mask, position_ids=pos).logits
    out = model(ids[:, :5], attention_mask=mask[:, :5], position_ids=pos[:, :5], use_cache=True)
    pieces = [out.logits]
    for lo, hi in [(5, 6), (6, 7), (7, 12)]:
        out = model(ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=pos[:, lo:hi], cache=out.cache)
        pieces.append(out.logits)
    assert isinstance(out.cache, DynamicCache) and out.cache.get_seq_length() == 12
    assert (torch.cat(pieces, dim=1) - full)[mask.bool()].abs().max() < 1e-10
    model.generation_config.pad_token_id = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_packed_documents_equal_running_them_separately():
    model = MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[0], short_conv_size=4, cg_steps=8)
    assert_packing_equals_separate_runs(model, [5, 3, 8])


def assert_packing_equals_separate_runs(model, lengths):
    """Documents of ``lengths`` packed in one row (positions restarting at 0) score as each run alone."""
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 64, (n,), generator=gen) for n in lengths]
    packed = model(torch.cat(docs)[None], position_ids=torch.cat([torch.arange(n) for n in lengths])[None]).logits
    start = 0
    for doc in docs:
        assert (packed[0, start : start + len(doc)] - model(doc[None]).logits[0]).abs().max() < 1e-10
        start += len(doc)


def test_save_load_round_trip_and_training_gradients(tmp_path):
    model = MesaLlamaForCausalLM.from_llama(tiny_llama(dtype=torch.float32), mesa_layers=[1], cg_steps=7)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(reloaded, MesaLlamaForCausalLM) and isinstance(reloaded.config, MesaLlamaConfig)
    assert not info["missing_keys"] and not info["unexpected_keys"] and reloaded.config.cg_steps == 7
    ids, mask = left_padded()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert math.isfinite(loss.item())
    for name, param in model.named_parameters():
        if MESA_PARAMETERS.intersection(name.split(".")):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_remote_code_loads_without_tint_hf(tmp_path, gpt2_tokenizer):
    model = MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[0], short_conv_size=4)
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_mesa_llama.MesaLlamaForCausalLM"
    # exactly the files its model imports from tint_hf/models/mesa/ (not the other family's)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.py")) == [
        "configuration_mesa.py", "configuration_mesa_llama.py", "mesa_layer.py", "mesa_op.py", "mesa_window.py",
        "modeling_mesa.py", "modeling_mesa_llama.py"]
    ids = left_padded()[0]
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generate_in_a_process_without_tint_hf(tmp_path / "ckpt", ids, None, tmp_path) == expected.tolist()
    # the tokenizer of the folder loads without trust_remote_code (transformers falls back to a plain config,
    # which refused the "mesa" layer types that config.json used to list)
    gpt2_tokenizer.save_pretrained(tmp_path / "ckpt")
    out = run_without_tint_hf(f"""
        from transformers import AutoTokenizer
        print(type(AutoTokenizer.from_pretrained({str(tmp_path / "ckpt")!r})).__name__)
    """, tmp_path)
    assert out.strip().endswith("GPT2Tokenizer")  # after transformers' remote-code prompt, answered "no"


def test_bad_inputs_name_the_argument():
    model = MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers="all")
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the 2 decoder layers"):
        MesaLlamaConfig(num_hidden_layers=2, mesa_layers=[2])
