"""TinTForCausalLM against independent references: HF's own OPT / GPT-2 (first pass) and tint_hf.simulate.tint_step
(the approximate SGD step TinT claims to compute), plus the HF plumbing (Auto classes, save/load, remote code)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_opt
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, OPTConfig, OPTForCausalLM

from tint_hf import TinTConfig, TinTForCausalLM
from tint_hf.models.tint.auxiliary import UnsupportedAuxiliaryModelError
from tint_hf.models.tint.simulated_modules import prefix_bias, prefix_weight
from tint_hf.simulate import Approximations, default_position_ids, exact_step, forward_with_params, tint_step

# HF's LlamaRMSNorm normalises in float32 even in a float64 model: the Llama first pass can only match HF's stock
# logits to float32 precision, and so would any step computed on HF's modules. TinT is compared with tint_step
# (which runs the HF model's own modules) in float64 for every family: the Llama auxiliaries of this file use
# conftest's FullPrecisionRMSNorm; test_first_pass_equals_hf_model also checks HF's stock Llama.
BUILDERS = {"opt": tiny_opt, "gpt2": tiny_gpt2, "llama": functools.partial(tiny_llama, full_precision_norms=True)}
FAMILIES = list(BUILDERS)
HF_TOL = {"opt": 1e-12, "gpt2": 1e-12, "llama": 1e-12, "stock-llama": 1e-6}
LR = 2e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def batch(seed: int = 0, B: int = 3, T: int = 14, train: int = 9):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (B, T), generator=gen)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, :3] = 0
    attn[2, -2:] = 0
    train_mask = (attn.bool() & (default_position_ids(attn) < train)).long()
    return ids, attn, train_mask


def build(family: str, **construction) -> tuple[torch.nn.Module, TinTForCausalLM]:
    aux = BUILDERS[family]()
    construction.setdefault("num_prefixes", 8)
    construction.setdefault("inner_lr", LR)
    return aux, TinTForCausalLM.from_auxiliary(aux, **construction)


def simulate(aux, tint: TinTForCausalLM, ids, attn, train, loss_mask=None):
    config = tint.config
    return tint_step(aux, ids, attn, train, loss_mask, lr=config.inner_lr, num_steps=config.num_steps,
                     num_layers=config.num_simulation_layers,
                     approximations=Approximations(**config.approximation_kwargs()))


@pytest.mark.parametrize("family", [*FAMILIES, "stock-llama"])
def test_first_pass_equals_hf_model(family):
    aux = tiny_llama() if family == "stock-llama" else BUILDERS[family]()
    tint = TinTForCausalLM.from_auxiliary(aux, num_prefixes=8, inner_lr=LR)
    ids, attn, train = batch()
    out = tint(ids, attn, train, return_logits_before=True)
    reference = aux(input_ids=ids, attention_mask=attn, position_ids=default_position_ids(attn)).logits
    real = attn.bool()
    assert rel(out.logits_before[real], reference[real]) < HF_TOL[family]
    assert rel(out.logits[real], out.logits_before[real]) > 1e-4  # the internal step changed the prediction


CASES = [
    dict(backward="exact"),
    dict(backward="fd"),
    dict(backward="exact", num_simulation_layers=1),
    dict(backward="exact", num_steps=2),
    dict(backward="fd", num_steps=2, num_simulation_layers=1),
    dict(backward="exact", loss_gradient="quad"),
    dict(backward="exact", loss_gradient="uniform"),
    dict(backward="exact", ln_bias_only=False),
    dict(backward="exact", authors_fc2_bias_bug=True),
    dict(backward="fd", fd_scale=30.0),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_internal_step_equals_reference_tint_step(family, case):
    aux, tint = build(family, **case)
    ids, attn, train = batch(seed=1)
    out = tint(ids, attn, train, return_logits_before=True)
    sim = simulate(aux, tint, ids, attn, train)
    real = attn.bool()
    delta = (out.logits - out.logits_before)[real]
    expected = (sim.logits_after - sim.logits_before)[real]
    assert expected.norm() > 1e-3
    assert rel(delta, expected) < 1e-9  # float64; the bound is 1e-4


def test_label_only_loss_mask_and_interleaved_training_part():
    aux, tint = build("opt", backward="exact")
    ids, attn, train = batch(seed=2)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 5::3] = 1
    train[:, 3] = 0  # a hole in the training part
    out = tint(ids, attn, train, loss_mask, return_logits_before=True)
    sim = simulate(aux, tint, ids, attn, train, loss_mask)
    real = attn.bool()
    assert rel((out.logits - out.logits_before)[real], (sim.logits_after - sim.logits_before)[real]) < 1e-9


def test_inner_lr_is_a_runtime_argument():
    aux, tint = build("gpt2", backward="exact")
    ids, attn, train = batch(seed=3)
    _, rebuilt = build("gpt2", backward="exact", inner_lr=5e-3)
    assert torch.allclose(tint(ids, attn, train, inner_lr=5e-3).logits, rebuilt(ids, attn, train).logits,
                          rtol=0, atol=1e-12)
    zero = tint(ids, attn, train, inner_lr=0.0, return_logits_before=True)
    assert torch.allclose(zero.logits, zero.logits_before, rtol=0, atol=1e-12)


def test_gap_to_exact_sgd_is_small_but_not_zero():
    """TinT approximates SGD: on the same parameter subset its logit change is close to, not equal to, exact SGD's."""
    aux, tint = build("opt", backward="exact")
    ids, attn, train = batch(seed=4)
    out = tint(ids, attn, train, return_logits_before=True)
    exact = exact_step(aux, ids, attn, train, lr=LR)
    real = attn.bool()
    gap = rel((out.logits - out.logits_before)[real], (exact.logits_after - exact.logits_before)[real])
    assert 1e-6 < gap < 0.5, gap


def test_padded_batch_equals_one_sequence_at_a_time():
    _, tint = build("opt")
    ids, attn, train = batch(seed=5)
    together = tint(ids, attn, train)
    for b in range(ids.shape[0]):
        real = attn[b].bool()
        alone = tint(ids[b][real][None], None, train[b][real][None])
        assert rel(together.logits[b][real], alone.logits[0]) < 1e-10


def test_rows_sharing_their_training_part_share_one_step():
    """A batch of prompts with the same demonstrations (training part) and different queries: TinT runs the step once
    for the group; each row must still equal its own, unbatched, simulation."""
    aux, tint = build("llama", backward="exact")
    gen = torch.Generator().manual_seed(12)
    demos = torch.randint(3, 64, (1, 9), generator=gen).expand(4, -1)
    ids = torch.cat([demos, torch.randint(3, 64, (4, 5), generator=gen)], dim=1)
    train = torch.zeros_like(ids)
    train[:, :9] = 1
    together = tint(ids, None, train)
    sim = simulate(aux, tint, ids, None, train)
    assert rel(together.logits, sim.logits_after) < 1e-9
    for b in range(4):
        assert rel(together.logits[b], tint(ids[b:b + 1], None, train[b:b + 1]).logits[0]) < 1e-10


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_segments_give_the_single_ft_step_in_one_pass(family):
    """Demonstrations packed as training segments and a query as the last segment: TinT's pass equals tint_step run
    on each demonstration as its own sequence, the parameter changes summed (one step on the summed loss), then the
    query alone with the updated weights. Padding on the left of the packed row changes nothing."""
    aux, tint = build(family, backward="exact")
    gen = torch.Generator().manual_seed(21)
    demos = [torch.randint(3, 64, (1, n), generator=gen) for n in (6, 4, 7)]
    query = torch.randint(3, 64, (1, 5), generator=gen)
    ids = torch.cat([*demos, query], dim=1)
    segments = torch.cat([torch.full_like(x, i) for i, x in enumerate([*demos, query])], dim=1)
    train = (segments < len(demos)).long()
    packed = tint(ids, None, train, segment_ids=segments)

    original = dict(aux.named_parameters())
    delta = {}
    for demo in demos:
        sim = tint_step(aux, demo, None, torch.ones_like(demo), lr=tint.config.inner_lr,
                        num_layers=tint.config.num_simulation_layers, return_params=True,
                        approximations=Approximations(**tint.config.approximation_kwargs()))
        assert rel(sim.logits_after, sim.logits_before) > 1e-4
        for name, value in sim.params.items():
            delta[name] = delta.get(name, 0) + (value[0] - original[name])
    updated = {name: original[name] + change for name, change in delta.items()}
    expected = forward_with_params(aux, updated, query)
    got = packed.logits[:, -query.shape[1]:]
    assert rel(got, forward_with_params(aux, {}, query)) > 1e-4  # the summed step changed the query's prediction
    # the reference's last forward is HF's model: Llama's RMSNorm runs in float32 there (HF_TOL)
    assert rel(got, expected) < max(HF_TOL[family], 1e-9)

    padded = torch.cat([torch.full((1, 3), 1), ids], dim=1)
    attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    again = tint(padded, attn, torch.cat([torch.zeros_like(attn[:, :3]), train], dim=1),
                 segment_ids=torch.cat([torch.zeros_like(attn[:, :3]), segments], dim=1))
    assert rel(again.logits[:, -query.shape[1]:], got) < 1e-10
    with pytest.raises(ValueError, match="numbered in order"):
        tint(ids, None, train, segment_ids=segments.flip(-1))

    # logits_to_keep: the query segment alone in the output pass, same logits and loss as the full call's
    calls = []  # positions each pass runs the top (simulated) layer on
    hook = tint.model.layers[-1].register_forward_pre_hook(lambda layer, args: calls.append(args[0].shape[1]))
    tail = tint(ids, None, train, segment_ids=segments, labels=ids, logits_to_keep=query.shape[1])
    hook.remove()
    assert calls[-1] == query.shape[1] and max(calls) < ids.shape[1]  # the step pass covers the demonstrations only
    assert rel(tail.logits, got) < 1e-12
    assert tail.loss.item() == pytest.approx(tint(ids, None, train, segment_ids=segments, labels=ids).loss.item(),
                                             rel=1e-12)
    unsegmented = tint(ids, None, train)  # no segments: every position is still needed, the tail is sliced
    assert rel(tint(ids, None, train, logits_to_keep=4).logits, unsegmented.logits[:, -4:]) < 1e-12


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_adapt_then_predict_equals_the_one_pass(family):
    """adapt(...) then forward(adaptation=...) is the one pass split in two, for (a) demonstrations packed as segments
    before a query (one adaptation reused by a batch of queries) and (b) each row's own training prefix (one
    adaptation per row); generate() with the adaptation decodes as the greedy loop over forward(adaptation=...)."""
    aux, tint = build(family)
    gen = torch.Generator().manual_seed(5)
    demos = [torch.randint(3, 64, (1, n), generator=gen) for n in (6, 4, 7)]
    queries = torch.randint(3, 64, (3, 5), generator=gen)
    packed = torch.cat(demos, dim=1)
    segments = torch.cat([torch.full_like(x, i) for i, x in enumerate(demos)], dim=1)
    adaptation = tint.adapt(packed, segment_ids=segments)
    assert adaptation.rows == 1
    one_pass = []
    for query in queries:
        ids = torch.cat([packed, query[None]], dim=1)
        seg = torch.cat([segments, torch.full((1, query.shape[0]), len(demos))], dim=1)
        one_pass.append(tint(ids, None, (seg < len(demos)).long(), segment_ids=seg).logits[0, -query.shape[0]:])
    split = tint(queries, adaptation=adaptation).logits
    assert rel(split, torch.stack(one_pass)) < 1e-12
    assert rel(split, tint(queries, None, torch.zeros_like(queries)).logits) > 1e-4  # the step changed them

    ids, attn, train = batch(seed=8)
    per_row = tint.adapt(ids, attn, train)
    assert per_row.rows == ids.shape[0]
    assert rel(tint(ids, attn, adaptation=per_row).logits, tint(ids, attn, train).logits) < 1e-12

    generated = tint.generate(queries[:1], adaptation=adaptation, max_new_tokens=3, do_sample=False)
    greedy = queries[:1]
    for _ in range(3):
        greedy = torch.cat([greedy, tint(greedy, adaptation=adaptation).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, greedy)


def test_adaptation_refuses_arguments_it_would_ignore():
    _, tint = build("opt")
    ids, attn, train = batch(seed=9)
    adaptation = tint.adapt(ids, attn, train)
    with pytest.raises(ValueError, match="train_mask marks training tokens"):
        tint(ids, attn, train, adaptation=adaptation)
    for name, value in (("inner_lr", 1e-3), ("loss_mask", train)):
        with pytest.raises(ValueError, match=f"{name} has no effect with adaptation"):
            tint(ids, attn, adaptation=adaptation, **{name: value})
    with pytest.raises(ValueError, match="adaptation holds 3 updates, but the batch has 2 rows"):
        tint(ids[:2], attn[:2], adaptation=adaptation)
    with pytest.raises(TypeError, match="adaptation must be a TinTAdaptation"):
        tint(ids, attn, adaptation={"prefixes": []})


def test_default_train_mask_is_the_first_fraction_of_real_tokens():
    _, tint = build("gpt2", default_train_fraction=0.5)
    ids, attn, _ = batch(seed=6)
    counts = attn.sum(-1, keepdim=True)
    explicit = attn.bool() & (default_position_ids(attn) < counts // 2)
    assert torch.equal(tint(ids, attn).logits, tint(ids, attn, explicit.long()).logits)
    labels = ids.masked_fill(attn == 0, -100)
    out = tint(ids, attn, labels=labels, return_logits_before=True)
    assert out.loss is not None and out.loss_before is not None and out.loss < out.loss_before + 1.0


def test_prefixes_hold_the_auxiliary_weights():
    aux, tint = build("opt")
    d = aux.config.hidden_size
    block = tint.model.layers[1]
    v_proj = aux.model.decoder.layers[1].self_attn.v_proj
    assert torch.equal(prefix_weight(block.prefixes["v"], d), v_proj.weight)
    assert torch.equal(prefix_bias(block.prefixes["v"], d), v_proj.bias)
    fc2 = aux.model.decoder.layers[1].fc2.weight
    assert torch.equal(prefix_weight(block.prefixes["fc2"][1], d), fc2[:, d:2 * d])


def test_llama_padding_of_grouped_kv_and_mlp_is_exact():
    """GQA K/V (d_kv < d) and d_ff not a multiple of d are zero-padded; the padding stays zero after the step."""
    aux, tint = build("llama", backward="exact")
    ids, attn, train = batch(seed=10)
    out = tint(ids, attn, train)
    sim = simulate(aux, tint, ids, attn, train)
    real = attn.bool()
    assert rel(out.logits[real], sim.logits_after[real]) < 1e-12
    d, kv = aux.config.hidden_size, aux.config.num_key_value_heads * aux.config.hidden_size // 4
    block = tint.model.layers[0]
    assert torch.equal(prefix_weight(block.prefixes["k"], d)[kv:], torch.zeros(d - kv, d, dtype=torch.float64))
    assert not hasattr(tint.model, "embed_positions")  # rotary positions: no position table
    with pytest.raises(ValueError, match="OPT and GPT-2 only"):
        tint.num_parameters(dense_equivalent=True)


def test_shape_rules_and_unsupported_models_fail_clearly():
    with pytest.raises(ValueError, match="num_prefixes=5 must be a positive divisor.*try num_prefixes=4"):
        TinTConfig(aux_config=tiny_opt().config, num_prefixes=5)
    with pytest.raises(ValueError, match="hidden_size=100 must equal"):
        TinTConfig(aux_config=tiny_opt().config, num_prefixes=8, hidden_size=100)
    with pytest.raises(ValueError, match="num_attention_heads=2"):
        TinTConfig(aux_config=tiny_opt().config, num_prefixes=8, num_attention_heads=2)
    post_ln = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=False))
    with pytest.raises(UnsupportedAuxiliaryModelError, match="post-LayerNorm"):
        TinTForCausalLM.from_auxiliary(post_ln, num_prefixes=8)
    projected = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         ffn_dim=64, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedAuxiliaryModelError, match="word_embed_proj_dim"):
        TinTForCausalLM.from_auxiliary(projected, num_prefixes=8)


@pytest.mark.parametrize(("aux_config", "expected"), [(OPTConfig(), 1_669_324_018), (GPT2Config(), 1_476_796_914)])
def test_dense_equivalent_parameter_count(aux_config, expected):
    with torch.device("meta"):
        model = TinTForCausalLM(TinTConfig(aux_config=aux_config, num_prefixes=256, hidden_size=3072,
                                           num_attention_heads=12))
    assert model.num_parameters(dense_equivalent=True) == expected
    # The structured construction stores the auxiliary weights in prefixes: about 173M numbers, not 1.67B.
    assert model.num_parameters() < 180_000_000


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_save_and_load_with_auto_classes(tmp_path, family):
    _, tint = build(family, backward="exact", num_steps=2)
    ids, attn, train = batch(seed=7)
    expected = tint(ids, attn, train).logits
    tint.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "modeling_tint.py").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "tint" and config["aux_config"]["model_type"] == family
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_tint.TinTForCausalLM"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TinTConfig)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, output_loading_info=True)
    assert isinstance(loaded, TinTForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.allclose(loaded(ids, attn, train).logits, expected, rtol=0, atol=1e-12)
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, device_map="auto")
    assert torch.allclose(mapped(ids, attn, train).logits, expected, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_remote_code_loads_without_tint_hf(tmp_path):
    """A saved folder loads with trust_remote_code=True in a process where tint_hf cannot be imported."""
    _, tint = build("gpt2", backward="exact")
    ids, attn, train = batch(seed=8)
    tint.save_pretrained(tmp_path / "ckpt")
    torch.save({"ids": ids, "attn": attn, "train": train, "logits": tint(ids, attn, train).logits},
               tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["tint_hf"] = None  # any import of tint_hf now fails
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / 'io.pt')!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True,
                                                     dtype=torch.float64)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        out = model(io["ids"], io["attn"], io["train"]).logits
        assert torch.allclose(out, io["logits"], rtol=0, atol=1e-12), (out - io["logits"]).abs().max()
        print("remote-ok")
    """)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "remote-ok" in result.stdout, result.stderr[-3000:]


def manual_greedy(tint, ids, steps, **masks):
    """Greedy decoding by full TinT calls; the given (B, T) masks grow with the new tokens (train/loss 0, segment:
    the last one)."""
    for _ in range(steps):
        next_token = tint(ids, **masks).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
        masks = {name: torch.cat([m, m[:, -1:] if name == "segment_ids" else torch.zeros_like(m[:, :1])], dim=1)
                 for name, m in masks.items()}
    return ids


def test_generate_runs_the_simulation_each_step_with_the_prompts_training_part():
    _, tint = build("opt", default_train_fraction=0.5)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(9))
    generated = tint.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=1)
    # without train_mask: the first half of the prompt trains, whatever is generated after it
    prompt_half = torch.zeros_like(ids)
    prompt_half[:, :4] = 1
    assert torch.equal(generated, manual_greedy(tint, ids, 3, train_mask=prompt_half))


def test_generate_passes_the_tint_arguments_through():
    aux, tint = build("opt", inner_lr=0.5)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    train = torch.zeros_like(ids)
    train[:, :6] = 1
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 3:6] = 1
    segments = torch.tensor([[0] * 3 + [1] * 6, [0] * 5 + [1] * 4])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=1)
    runs = {}
    for name, masks in {"train": dict(train_mask=train), "loss": dict(train_mask=train, loss_mask=loss_mask),
                        "segments": dict(train_mask=train, segment_ids=segments)}.items():
        runs[name] = tint.generate(ids, **masks, **kwargs)
        assert torch.equal(runs[name], manual_greedy(tint, ids, 4, **masks)), name
    assert len({tuple(run.flatten().tolist()) for run in runs.values()}) == 3  # each argument changed the output
    # inner_lr reaches every step: 0 is the auxiliary model itself
    frozen = tint.generate(ids, train_mask=train, inner_lr=0.0, **kwargs)
    assert torch.equal(frozen, aux.generate(ids, **kwargs))
    assert not torch.equal(frozen, runs["train"])


def test_return_dict_and_unsupported_outputs_are_honoured_or_refused():
    _, tint = build("opt")
    ids, attn, train = batch()
    out = tint(ids, attn, train, labels=ids)
    as_tuple = tint(ids, attn, train, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    for flag in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=flag):
            tint(ids, attn, train, **{flag: True})
    with pytest.raises(TypeError):
        tint(ids, attn, train, keep_last=2)  # one name per option: logits_to_keep
    assert not hasattr(out, "past_key_values") and "past_key_values" not in out


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("backward", ["fd", "exact"])
def test_bfloat16_weights_keep_the_step(family, backward):
    """With bfloat16 weights the finite differences are evaluated in float32: the logit change stays within a few
    percent of float64 (without that, N * (f(x + g/N) - f(x)) is mostly bfloat16 rounding)."""
    aux, reference = build(family, backward="exact")
    ids, attn, train = batch(seed=11)
    with torch.no_grad():
        out = reference(ids, attn, train, return_logits_before=True)
        half = TinTForCausalLM.from_auxiliary(aux, num_prefixes=8, inner_lr=LR, backward=backward).to(torch.bfloat16)
        low = half(ids, attn, train, return_logits_before=True)
    real = attn.bool()
    delta = (low.logits - low.logits_before).double()[real]
    assert rel(delta, (out.logits - out.logits_before)[real]) < 0.05


def test_per_row_inner_lr_equals_each_row_alone():
    _, tint = build("opt")
    ids, attn, train = batch(seed=5)
    ids[1] = ids[0]
    attn[1], train[1] = attn[0], train[0]  # rows 0 and 1 share their training part but not their step size
    lrs = torch.tensor([0.01, 0.05, 0.03], dtype=torch.float64)
    together = tint(ids, attn, train, inner_lr=lrs).logits
    for row in range(3):
        alone = tint(ids[row:row + 1], attn[row:row + 1], train[row:row + 1], inner_lr=float(lrs[row])).logits
        assert (together[row] - alone[0])[attn[row].bool()].abs().max() < 1e-12
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1e-3", True, torch.tensor([0.1, 0.2])])
def test_bad_inner_lr_raises(bad):
    _, tint = build("opt")
    ids, attn, train = batch()
    with pytest.raises((ValueError, TypeError), match="inner_lr"):
        tint(ids, attn, train, inner_lr=bad)


@pytest.mark.parametrize("field", ["inner_lr", "fd_scale"])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), "x"])
def test_bad_config_numbers_raise(field, bad):
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    with pytest.raises((ValueError, StrictDataclassFieldValidationError), match=field):
        TinTConfig(aux_config=tiny_opt().config, num_prefixes=8, **{field: bad})


def test_a_call_without_evaluation_targets_refuses_to_report_a_loss():
    _, tint = build("opt")
    ids, attn, _ = batch()
    with pytest.raises(ValueError, match="No evaluation target"):
        tint(ids, attn, torch.ones_like(ids), labels=ids)
    assert tint(ids, attn, torch.ones_like(ids)).logits.isfinite().all()  # logits are still meaningful


@pytest.mark.parametrize("name", ["attention_mask", "train_mask", "loss_mask"])
@pytest.mark.parametrize("value", [0.5, 2, -1])
def test_mask_values_other_than_0_and_1_raise(name, value):
    _, tint = build("opt")
    ids, attn, train = batch()
    masks = dict(attention_mask=attn, train_mask=train, loss_mask=torch.ones_like(ids))
    masks[name] = masks[name].to(torch.float64 if value == 0.5 else torch.long).clone()
    masks[name][0, 5] = value
    with pytest.raises(ValueError, match=f"`{name}` must hold only 0 and 1"):
        tint(ids, **masks)
    masks[name] = masks[name].clamp(0, 1).round().float()  # 0.0 / 1.0 floats are fine
    tint(ids, **masks)


def test_bad_ids_positions_and_shapes_name_the_argument():
    _, tint = build("opt")
    ids, attn, train = batch()
    with pytest.raises(ValueError, match="input_ids must be \\(batch, seq_len\\).*input_ids\\[None\\]"):
        tint(ids[0])
    with pytest.raises(ValueError, match="input_ids must lie in \\[0, 64\\)"):
        tint(ids.masked_fill(ids == ids[0, 0], 64), attn, train)
    with pytest.raises(ValueError, match="input_ids must lie"):
        tint(ids.masked_fill(ids == ids[0, 0], -1), attn, train)
    with pytest.raises(ValueError, match="position_ids must lie in \\[0, 64\\)"):
        tint(ids, attn, train, position_ids=torch.arange(14).expand(3, -1) + 60)
    with pytest.raises(ValueError, match="labels must have the shape"):
        tint(ids, attn, train, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="logits_to_keep"):
        tint(ids, attn, train, logits_to_keep=-1)


@pytest.mark.parametrize(("width", "heads", "expected"), [(64, 4, 16), (576, 9, 192), (768, 12, 256), (32, 4, 8)])
def test_num_prefixes_defaults_from_the_auxiliary_width(width, heads, expected):
    """d / 3 rows per prefix where 3 divides d, else the divisor of d nearest to d / 3 (d=64: 16, not 21)."""
    aux_config = OPTConfig(hidden_size=width, num_attention_heads=heads, ffn_dim=4 * width, word_embed_proj_dim=width,
                           num_hidden_layers=1, vocab_size=64, max_position_embeddings=32)
    assert TinTConfig(aux_config=aux_config).num_prefixes == expected
    if width == 64:  # from_auxiliary with no construction argument at all
        tint = TinTForCausalLM.from_auxiliary(OPTForCausalLM(aux_config).eval())
        assert tint.config.num_prefixes == 16 and tint.config.hidden_size == 64 * 5


def test_an_lm_head_untied_in_memory_is_refused():
    aux = tiny_opt()
    assert aux.config.tie_word_embeddings
    aux.lm_head.weight = torch.nn.Parameter(aux.lm_head.weight.detach().clone() + 0.1)  # config still says tied
    with pytest.raises(UnsupportedAuxiliaryModelError, match="tie_weights"):
        TinTForCausalLM.from_auxiliary(aux, num_prefixes=8)
    with pytest.raises(ValueError, match="tie_weights"):  # the reference refuses too
        tint_step(aux, *batch(), lr=LR)
    aux.tie_weights()
    TinTForCausalLM.from_auxiliary(aux, num_prefixes=8)


def test_partial_checkpoints_are_refused(tmp_path):
    """An auxiliary checkpoint with a missing tensor, and a saved TinT whose config was edited to another depth,
    raise instead of building / loading a simulator with uninitialised weights."""
    from safetensors.torch import load_file, save_file

    aux = tiny_opt()
    aux.save_pretrained(tmp_path / "aux")
    weights = load_file(tmp_path / "aux" / "model.safetensors")
    del weights["model.decoder.layers.1.fc1.weight"]
    save_file(weights, tmp_path / "aux" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="auxiliary checkpoint.*missing_keys.*layers.1.fc1.weight"):
        TinTForCausalLM.from_auxiliary(str(tmp_path / "aux"), num_prefixes=8)

    _, tint = build("opt")
    tint.save_pretrained(tmp_path / "tint")
    config_file = tmp_path / "tint" / "config.json"
    config = json.loads(config_file.read_text())
    assert TinTForCausalLM.from_pretrained(tmp_path / "tint").config.num_hidden_layers == 2
    config["num_simulation_layers"] = None  # re-derived from the (edited) depth
    for layers, kind in ((3, "missing_keys"), (1, "unexpected_keys")):
        config["aux_config"]["num_hidden_layers"] = layers
        config_file.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"TinT checkpoint.*{kind}"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "tint")


@pytest.mark.parametrize("n_inner", [None, 80])
def test_gpt2_left_padding_and_n_inner_match_hf_given_its_positions(n_inner):
    """The reported 0.6-0.85 gap on left-padded GPT-2 rows is the comparison's: HF's GPT-2 numbers positions
    0..T-1 whatever the padding unless given ``position_ids``, while TinT (like OPT) counts real tokens only. With
    HF given those positions TinT matches it, also for d_ff = n_inner = 80, not a multiple of d = 32."""
    aux = tiny_gpt2(n_inner=n_inner)
    tint = TinTForCausalLM.from_auxiliary(aux, num_prefixes=8, inner_lr=LR)
    ids, attn, train = batch(seed=2)  # row 1 left-padded, row 2 right-padded
    before = tint(ids, attn, train, return_logits_before=True).logits_before
    positioned = aux(ids, attention_mask=attn, position_ids=default_position_ids(attn)).logits
    unpositioned = aux(ids, attention_mask=attn).logits
    real = attn.bool()
    assert rel(before[real], positioned[real]) < 1e-12
    for row in (0, 2):  # no left padding: HF's own positions are the same
        assert rel(before[row][real[row]], unpositioned[row][real[row]]) < 1e-12
    assert rel(before[1][real[1]], unpositioned[1][real[1]]) > 0.1


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_gradients_flow_through_adapt_as_through_the_one_pass(family):
    """Meta-training written as ``model(q, adaptation=model.adapt(d))`` gets the one pass's gradient (adapt used to
    be no_grad, so the simulated step was a constant); under no_grad adapt keeps no graph."""
    _, tint = build(family)
    gen = torch.Generator().manual_seed(11)
    demos, query = torch.randint(3, 64, (1, 7), generator=gen), torch.randint(3, 64, (1, 5), generator=gen)
    weights = torch.randn(1, 5, 64, generator=gen, dtype=torch.float64)
    ids = torch.cat([demos, query], dim=1)
    segments = torch.cat([torch.zeros_like(demos), torch.ones_like(query)], dim=1)
    grads = []
    for split in (False, True):
        tint.zero_grad()
        if split:
            logits = tint(query, adaptation=tint.adapt(demos)).logits
        else:
            logits = tint(ids, None, (segments == 0).long(), segment_ids=segments).logits[:, -5:]
        (logits * weights).sum().backward()
        grads.append({name: p.grad.clone() for name, p in tint.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 2
    for name in grads[0]:  # float64; the split applies the demonstrations' update as factors (another rounding order)
        scale = grads[0][name].abs().max().item()
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-10 * scale, msg=name)
    step = [k for k in grads[0] if k.startswith("model.layers.1.")]  # a simulated layer's prefixes
    assert step and any(grads[0][k].abs().sum() > 0 for k in step)
    with torch.no_grad():
        assert all(t.grad_fn is None for t in tint.adapt(demos).tensors())


def test_an_adaptation_from_another_model_or_an_older_state_is_refused():
    _, tint = build("opt")
    _, other = build("opt", num_simulation_layers=1)
    ids = torch.randint(3, 64, (1, 6))
    adaptation = tint.adapt(ids)
    with pytest.raises(ValueError, match="made by another TinT model"):
        other(ids, adaptation=adaptation)
    _, same_shape = build("opt")  # equal weights, another object: its adaptations are its own
    with pytest.raises(ValueError, match="made by another TinT model"):
        same_shape(ids, adaptation=adaptation)
    with torch.no_grad():
        tint.model.final_norm_prefix.add_(0.0)  # an in-place change to a weight (as an optimizer step makes)
    with pytest.raises(ValueError, match="before its weights"):
        tint(ids, adaptation=adaptation)
    assert torch.isfinite(tint(ids, adaptation=tint.adapt(ids)).logits).all()
    with pytest.raises(ValueError, match="dtype"):
        tint.float()(ids, adaptation=adaptation)


def test_adapt_without_a_training_target_warns():
    _, tint = build("opt")
    ids = torch.randint(3, 64, (2, 6))
    with pytest.warns(UserWarning, match="no training target"):
        tint.adapt(ids, train_mask=torch.zeros_like(ids))


def test_a_nan_in_one_row_leaves_the_other_rows_alone():
    """Rows are independent through the step and the prediction: a NaN in one row's hidden states (here injected
    at the embedding output) stays in that row, with the step, with a per-row adaptation and before the step."""
    _, tint = build("llama")
    ids, attn, train = batch(seed=3)
    clean = tint(ids, attn, train, return_logits_before=True)

    def poison(module, args, output):
        output = output.clone()
        output[0, 5] = float("nan")
        return output

    handle = tint.model.embed_tokens.register_forward_hook(poison)
    try:
        out = tint(ids, attn, train, return_logits_before=True)
        split = tint(ids, attn, adaptation=tint.adapt(ids, attn, train)).logits
    finally:
        handle.remove()
    for logits, reference in ((out.logits, clean.logits), (out.logits_before, clean.logits_before),
                              (split, clean.logits)):
        assert torch.isnan(logits[0]).any()
        torch.testing.assert_close(logits[1:], reference[1:], rtol=1e-12, atol=1e-12)


def test_packed_positions_need_segment_ids():
    """position_ids restarting inside a row mark packed documents; TinT only separates documents by segment_ids, so
    without them the documents would attend to each other: refused (with or without an attention_mask)."""
    _, tint = build("opt")
    ids = torch.randint(3, 64, (1, 8))
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    for attention_mask in (None, torch.ones_like(ids)):
        with pytest.raises(ValueError, match="position_ids restart inside a row.*segment_ids"):
            tint(ids, attention_mask, position_ids=packed)
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    torch.testing.assert_close(tint(ids, position_ids=packed, segment_ids=segments).logits,
                               tint(ids, segment_ids=segments).logits)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_adding_each_querys_step_to_the_demonstrations_step_is_the_joint_step(family):
    """Single-FT with the query in the training part (the TinT authors' context loss): the step on the
    demonstrations and a query packed as segments equals the demonstrations' step taken once plus the query's own
    step (``adapt(..., add_to=)``), because one simulated step sums per-token terms at the original weights."""
    _, tint = build(family)
    gen = torch.Generator().manual_seed(12)
    demos = [torch.randint(3, 64, (1, n), generator=gen) for n in (6, 4, 7)]
    queries = torch.randint(3, 64, (3, 8), generator=gen)
    query_train = torch.zeros_like(queries)
    query_train[:, :5] = 1  # the query text trains; its last 3 tokens (the "option") are scored
    packed = torch.cat(demos, dim=1)
    segments = torch.cat([torch.full_like(x, i) for i, x in enumerate(demos)], dim=1)
    demos_step = tint.adapt(packed, segment_ids=segments)
    split = tint(queries, adaptation=tint.adapt(queries, train_mask=query_train, add_to=demos_step)).logits
    joint = []
    for query, train in zip(queries, query_train, strict=True):
        ids = torch.cat([packed, query[None]], dim=1)
        seg = torch.cat([segments, torch.full((1, query.shape[0]), len(demos))], dim=1)
        mask = torch.cat([torch.ones_like(packed), train[None]], dim=1)
        joint.append(tint(ids, None, mask, segment_ids=seg).logits[0, -query.shape[0]:])
    assert rel(split, torch.stack(joint)) < 1e-12
    without_query = tint(queries, adaptation=demos_step).logits
    assert rel(split, without_query) > 1e-6  # the query's own step matters


def test_add_to_refuses_what_it_cannot_sum():
    _, tint = build("opt", num_steps=2)
    ids = torch.randint(3, 64, (2, 6))
    with pytest.raises(ValueError, match="num_steps == 1"):
        tint.adapt(ids, add_to=tint.adapt(ids[:1]))
    _, one_step = build("opt")
    with pytest.raises(ValueError, match="add_to holds 2 updates for 3 rows"):
        one_step.adapt(torch.randint(3, 64, (3, 6)), add_to=one_step.adapt(ids))
