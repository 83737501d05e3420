"""MesaOPTForCausalLM against HF's OPTForCausalLM, against its own full forward, and through save/load/generate."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import generate_in_a_process_without_tint_hf, tiny_opt
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from tint_hf import MesaOPTConfig, MesaOPTForCausalLM
from tint_hf.models.mesa import MesaStateLayer

MESA_PARAMETERS = {"lambda_params", "f_proj", "b_proj", "o_norm", "g_proj", "q_conv1d", "k_conv1d", "v_conv1d"}


def batch_with_left_padding(seed=0, length=12, vocab=64):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 1  # OPT's pad token
    return ids, mask


def mesa_model(opt=None, **mesa_kwargs):
    return MesaOPTForCausalLM.from_opt(tiny_opt() if opt is None else opt, **mesa_kwargs)


def test_no_mesa_layers_reproduces_opt():
    opt = tiny_opt()
    model = mesa_model(opt, mesa_layers=[])
    ids, mask = batch_with_left_padding()
    labels = ids.masked_fill(mask == 0, -100)
    for attention_mask in (None, mask):
        ref = opt(ids, attention_mask=attention_mask, labels=labels)
        out = model(ids, attention_mask=attention_mask, labels=labels)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)


def test_from_opt_reuses_every_weight():
    opt = tiny_opt()
    model = mesa_model(opt, mesa_layers=[0])
    opt_state = opt.state_dict()
    for name, tensor in model.state_dict().items():
        if name in opt_state:
            assert torch.equal(tensor, opt_state[name]), name
        else:
            assert MESA_PARAMETERS.intersection(name.split(".")), name
            assert name.startswith("model.decoder.layers.0."), name
    assert set(opt_state) <= set(model.state_dict())
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()


def test_mesa_parameter_initialisation():
    model = mesa_model(mesa_layers="all", lambda_init=1.5, lambda_min=0.25, forget_gate_windows=(8, 512))
    attn = model.model.decoder.layers[1].self_attn
    lam = torch.nn.functional.softplus(attn.lambda_params) + 0.25
    torch.testing.assert_close(lam, torch.full_like(lam, 1.5))
    u = torch.randn(5, 32, dtype=torch.float64)
    gamma = torch.sigmoid(attn.f_proj(u))
    windows = 1 / (1 - gamma)  # the forget gate's memory length, the same for every input at init
    expected = torch.tensor([8.0 * 64 ** (i / 3) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(windows, expected.expand(5, 4), rtol=1e-6, atol=0)  # initialised in float32
    torch.testing.assert_close(torch.sigmoid(attn.b_proj(u)), torch.full((5, 4), 0.5, dtype=torch.float64))


@pytest.mark.parametrize(
    "mesa_kwargs",
    [
        dict(mesa_layers=[1], mesa_solver="exact"),
        dict(mesa_layers="all", mesa_solver="cg", cg_steps=8, chunk_size=4),
        dict(mesa_layers=[0], mesa_solver="gd", use_forget_gate=False),
        dict(mesa_layers="all", mesa_solver="cg1", use_input_gate=False),
    ],
)
def test_prefill_then_decode_equals_full_forward(mesa_kwargs):
    model = mesa_model(**mesa_kwargs)
    ids, mask = batch_with_left_padding()
    full = model(ids, attention_mask=mask).logits
    prefill = 5
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
    cache = out.cache
    pieces = [out.logits]
    # one token at a time (recurrent step), then a 3-token block from the cached state (chunked form)
    for lo, hi in [(t, t + 1) for t in range(prefill, 9)] + [(9, 12)]:
        out = model(ids[:, lo:hi], attention_mask=mask[:, :hi], cache=cache, use_cache=True)
        pieces.append(out.logits)
    real = mask.bool()
    assert (torch.cat(pieces, dim=1) - full)[real].abs().max() < 1e-10
    layer_kinds = [layer._layer_type for layer in cache.layers]  # the class may be another folder's copy
    assert layer_kinds.count("mesa") == len(model.config.mesa_layers)
    assert cache.get_seq_length() == 12


def test_float32_decode_matches_full_forward():
    model = mesa_model(tiny_opt(dtype=torch.float32), mesa_layers="all", cg_steps=30)
    ids, mask = batch_with_left_padding()
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
    pieces = [out.logits]
    for t in range(3, 12):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=out.cache)
        pieces.append(out.logits)
    assert out.cache.layers[0].s_state.dtype == torch.float32
    assert (torch.cat(pieces, dim=1) - full)[mask.bool()].abs().max() < 1e-4


def test_left_padded_rows_equal_unpadded_rows():
    model = mesa_model(mesa_layers=[0], mesa_solver="exact")
    ids, mask = batch_with_left_padding()
    padded = model(ids, attention_mask=mask).logits
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = model(ids[row : row + 1, real]).logits[0]
        assert (padded[row, real] - alone).abs().max() < 1e-10


def manual_greedy(model, ids, mask, steps):
    """Greedy decoding by full forwards without a cache."""
    for _ in range(steps):
        logits = model(ids, attention_mask=mask).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("mesa_layers", [[1], "all"])
def test_generate_with_cache_equals_without(mesa_layers):
    model = mesa_model(mesa_layers=mesa_layers, mesa_solver="cg", cg_steps=8)
    model.generation_config.pad_token_id = 1
    ids, mask = batch_with_left_padding()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6)
    greedy = model.generate(ids, do_sample=False, **kwargs)
    assert torch.equal(greedy, model.generate(ids, do_sample=False, use_cache=False, **kwargs))
    assert torch.equal(greedy, manual_greedy(model, ids, mask, 6))
    beams = model.generate(ids, do_sample=False, num_beams=3, num_return_sequences=2, **kwargs)
    assert torch.equal(beams, model.generate(ids, do_sample=False, num_beams=3, num_return_sequences=2,
                                             use_cache=False, **kwargs))
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        sampled.append(model.generate(ids, do_sample=True, num_return_sequences=2, use_cache=use_cache, **kwargs))
    assert torch.equal(*sampled)


def test_assisted_decoding_is_refused():
    model = mesa_model(mesa_layers="all")
    ids, mask = batch_with_left_padding()
    # transformers refuses it (5.24: the model is stateful; 5.25: its cache cannot be cropped)
    with pytest.raises(ValueError, match="stateful|cache that can be cropped"):
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, assistant_model=mesa_model())
    cache = model(ids, attention_mask=mask, use_cache=True).cache
    with pytest.raises(NotImplementedError):
        cache.crop(-1)


def test_user_cache_without_mesa_layers_is_replaced_when_empty():
    model = mesa_model(mesa_layers=[0])
    ids, _ = batch_with_left_padding()
    out = model(ids, cache=DynamicCache(), use_cache=True)
    assert out.cache.layers[0]._layer_type == "mesa" and type(out.cache.layers[0]).__name__ == MesaStateLayer.__name__


def test_bfloat16_model_keeps_float32_state():
    model = mesa_model(mesa_layers="all").to(torch.bfloat16)
    ids, mask = batch_with_left_padding()
    out = model(ids, attention_mask=mask, use_cache=True)
    assert out.logits.dtype == torch.bfloat16 and out.logits.isfinite().all()
    layer = out.cache.layers[0]
    assert layer.h_state.dtype == layer.s_state.dtype == torch.float32


def test_config_validation_and_layer_types():
    config = MesaOPTConfig(num_hidden_layers=4, mesa_layers=[-1, 1])
    assert config.mesa_layers == [1, 3]
    assert config.layer_types == ["full_attention", "mesa", "full_attention", "mesa"]
    for bad in (dict(mesa_solver="lu"), dict(lambda_min=0.0), dict(mesa_backend="triton"), dict(cg_steps=0)):
        with pytest.raises(ValueError):
            MesaOPTConfig(**bad)
    assert isinstance(AutoConfig.for_model("mesa_opt"), MesaOPTConfig)
    config.mesa_layers = [0]  # derived fields follow a later change
    assert config.layer_types == ["mesa", "full_attention", "full_attention", "full_attention"]


def test_a_plain_opt_folder_is_refused_by_from_pretrained_and_taken_by_from_opt(tmp_path):
    """from_pretrained on a plain OPT folder would leave the mesa parameters random: refused, naming from_opt;
    from_opt(folder) gives a mesa_opt config whose cache layer types follow mesa_layers, OPT's weights bit for bit,
    the generations of from_opt(instance), and it saves and reloads as a MesaOPT."""
    opt = tiny_opt(dtype=torch.float32)
    opt.save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match=r"random or unused.*plain base-model checkpoint.*from_opt"):
        MesaOPTForCausalLM.from_pretrained(tmp_path / "opt", mesa_layers=[1])
    torch.manual_seed(0)
    model = MesaOPTForCausalLM.from_opt(tmp_path / "opt", mesa_layers=[1])
    torch.manual_seed(0)
    reference = mesa_model(opt, mesa_layers=[1])
    assert model.config.model_type == "mesa_opt"
    assert model.config.layer_types == ["full_attention", "mesa"]
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    ids, mask = batch_with_left_padding()
    model.generation_config.pad_token_id = reference.generation_config.pad_token_id = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    model.save_pretrained(tmp_path / "mesa")
    assert json.loads((tmp_path / "mesa" / "config.json").read_text())["model_type"] == "mesa_opt"
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "mesa"), MesaOPTForCausalLM)


def test_save_pretrained_round_trip(tmp_path):
    model = mesa_model(mesa_layers=[1], mesa_solver="cg", cg_steps=7, chunk_size=5, use_input_gate=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if MESA_PARAMETERS.intersection(name.split(".")):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, output_loading_info=True)
    assert isinstance(reloaded, MesaOPTForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (reloaded.config.mesa_layers, reloaded.config.cg_steps, reloaded.config.chunk_size) == ([1], 7, 5)
    ids, mask = batch_with_left_padding()
    torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                               rtol=0, atol=0)


@pytest.mark.slow
def test_remote_code_loads_without_tint_hf(tmp_path):
    """The saved folder carries its code: a process that cannot import tint_hf loads it with trust_remote_code."""
    model = mesa_model(mesa_layers=[0])
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_mesa_opt.MesaOPTForCausalLM"
    # exactly the files its model imports from tint_hf/models/mesa/ (not the other family's)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.py")) == [
        "configuration_mesa.py", "configuration_mesa_opt.py", "mesa_layer.py", "mesa_op.py", "mesa_window.py",
        "modeling_mesa.py", "modeling_mesa_opt.py"]
    ids, mask = batch_with_left_padding()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert generate_in_a_process_without_tint_hf(tmp_path / "ckpt", ids, mask, tmp_path) == expected.tolist()


def test_training_step_reaches_every_mesa_parameter():
    model = mesa_model(tiny_opt(dtype=torch.float32), mesa_layers="all").train()
    ids, mask = batch_with_left_padding()
    loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    assert math.isfinite(loss.item())
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all(), name
        if MESA_PARAMETERS.intersection(name.split(".")):
            assert param.grad.abs().sum() > 0, name


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = mesa_model(tiny_opt(dtype=torch.float32), mesa_layers=[0]).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        ids, _ = batch_with_left_padding()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_hidden_states_match_opt_and_return_dict_false_gives_a_tuple():
    opt = tiny_opt()
    model = mesa_model(opt, mesa_layers=[])
    ids, mask = batch_with_left_padding()
    ref = opt(ids, attention_mask=mask, output_hidden_states=True)
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == opt.config.num_hidden_layers + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    as_tuple = model(ids, attention_mask=mask, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)


def test_training_builds_no_cache_and_unknown_arguments_raise():
    model = mesa_model(mesa_layers=[0])
    ids, mask = batch_with_left_padding()
    assert model.eval()(ids, attention_mask=mask).cache is not None  # config.use_cache at inference
    assert model.train()(ids, attention_mask=mask).cache is None
    model.eval()
    with pytest.raises(TypeError, match="seq_idx"):
        model(ids, seq_idx=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)


def test_a_cache_reused_with_another_batch_size_raises():
    model = mesa_model(mesa_layers=[0])
    ids, mask = batch_with_left_padding()
    cache = model(ids, attention_mask=mask, use_cache=True).cache
    with pytest.raises(ValueError, match="fresh cache"):
        model(ids[:2, :1], attention_mask=torch.ones(2, 13, dtype=torch.long), cache=cache)


def test_bad_inputs_name_the_argument():
    model = mesa_model(mesa_layers=[0])
    ids, mask = batch_with_left_padding()
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[0])
    with pytest.raises(ValueError, match="vocab_size"):
        model(ids.clamp(max=model.config.vocab_size - 1) + 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(3, 60, (1, model.config.max_position_embeddings + 1)))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=mask[:, 1:])


@pytest.mark.parametrize("layers", [[5], [-3], "some"])
def test_mesa_layers_outside_the_model_raise(layers):
    with pytest.raises(ValueError, match="mesa_layers"):
        MesaOPTConfig(num_hidden_layers=2, mesa_layers=layers)


@pytest.mark.parametrize("solver", ["gd", "cg1", "exact"])
def test_fla_backend_refuses_solvers_it_does_not_implement(solver):
    with pytest.raises(ValueError, match="only mesa_solver='cg'"):
        MesaOPTConfig(mesa_backend="fla", mesa_solver=solver)
    assert MesaOPTConfig(mesa_backend="auto", mesa_solver=solver).mesa_solver == solver  # auto falls back to torch


# ---------------------------------------------------------------- MesaNet options: short convolution, output gate,
# decode CG steps, packed sequences


def with_random_extras(model, seed=0):
    """Random short-convolution and output-gate weights (their initialisation is the identity tap / OPT's init),
    so that the tests see them act."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "conv1d" in name or "g_proj" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return model


def test_short_convolution_is_a_causal_depthwise_conv1d_with_state_and_document_resets():
    from tint_hf.models.mesa.mesa_layer import MesaShortConvolution

    torch.manual_seed(0)
    conv = MesaShortConvolution(6, 4).double()
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    reference = torch.nn.functional.silu(
        torch.nn.functional.conv1d(torch.nn.functional.pad(x.mT, (3, 0)), conv.weight, groups=6)).mT
    full, state = conv(x)
    torch.testing.assert_close(full, reference, rtol=1e-12, atol=1e-12)
    first, carried = conv(x[:, :5])
    second, state_after = conv(x[:, 5:], carried)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state_after, state)
    resets = torch.zeros(2, 11, dtype=torch.bool)
    resets[:, [4, 6]] = True  # documents [0, 4), [4, 6), [6, 11)
    packed, _ = conv(x, resets=resets)
    for start, end in ((0, 4), (4, 6), (6, 11)):
        torch.testing.assert_close(packed[:, start:end], conv(x[:, start:end])[0], rtol=1e-12, atol=1e-12)
    short = torch.zeros(2, 3, dtype=torch.bool)
    short[:, 2] = True  # a document starting at the last token: the state keeps only that token
    _, kept = conv(x[:, :3], resets=short)
    assert (kept[:, :2] == 0).all() and torch.equal(kept[:, 2], x[:, 2])


MESANET_OPTIONS = dict(short_conv_size=4, use_output_gate=True, mesa_solver="cg", cg_steps=8, chunk_size=4)


@pytest.mark.parametrize("mesa_layers", [[0], "all"])
def test_mesanet_options_prefill_decode_and_generate_equal_the_full_forward(mesa_layers):
    model = with_random_extras(mesa_model(mesa_layers=mesa_layers, **MESANET_OPTIONS))
    assert model.model.decoder.layers[0].self_attn.q_conv1d.weight.shape == (32, 1, 4)
    ids, mask = batch_with_left_padding()
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    pieces = [out.logits]
    for lo, hi in [(5, 6), (6, 7), (7, 12)]:
        out = model(ids[:, lo:hi], attention_mask=mask[:, :hi], cache=out.cache, use_cache=True)
        pieces.append(out.logits)
    assert (torch.cat(pieces, dim=1) - full)[mask.bool()].abs().max() < 1e-10
    without = mesa_model(mesa_layers=mesa_layers, mesa_solver="cg", cg_steps=8, chunk_size=4)
    assert (without(ids, attention_mask=mask).logits - full)[mask.bool()].abs().max() > 1e-3  # the options act
    model.generation_config.pad_token_id = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def test_cg_steps_decode_sets_the_decoding_solve():
    """One mesa layer: its state does not depend on the solver, so decoding with cg_steps_decode=1 must give the
    last token of a full forward with one CG step (solver cg1), while the prefill keeps cg_steps=30."""
    opt = tiny_opt(num_hidden_layers=1)
    model = mesa_model(opt, mesa_layers="all", mesa_solver="cg", cg_steps=30, cg_steps_decode=1)
    one_step = mesa_model(opt, mesa_layers="all", mesa_solver="cg1")
    ids, mask = batch_with_left_padding()
    prefill = model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
    decoded = model(ids[:, -1:], attention_mask=mask, cache=prefill.cache).logits[:, -1]
    torch.testing.assert_close(decoded, one_step(ids, attention_mask=mask).logits[:, -1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prefill.logits, model(ids[:, :-1], attention_mask=mask[:, :-1]).logits)
    assert (model(ids, attention_mask=mask).logits[:, -1] - decoded).abs().max() > 1e-4


@pytest.mark.parametrize("mesa_layers", [[0], "all"])
def test_packed_documents_equal_running_them_separately(mesa_layers):
    """position_ids restarting at 0 (DataCollatorWithFlattening's packing, no attention_mask): mesa states and
    convolutions restart, softmax layers see only their document; each document's logits equal its own run."""
    model = with_random_extras(mesa_model(mesa_layers=mesa_layers, **MESANET_OPTIONS))
    gen = torch.Generator().manual_seed(3)
    lengths = [[5, 4, 7], [9, 7]]
    docs = [[torch.randint(3, 64, (n,), generator=gen) for n in row] for row in lengths]
    ids = torch.stack([torch.cat(row) for row in docs])
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    packed = model(ids, position_ids=position_ids).logits
    for r, row in enumerate(docs):
        start = 0
        for doc in row:
            alone = model(doc[None]).logits[0]
            assert (packed[r, start : start + len(doc)] - alone).abs().max() < 1e-10
            start += len(doc)
    unpacked = model(ids).logits  # without the restarts the documents see each other
    assert (unpacked[0, 5:] - packed[0, 5:]).abs().max() > 1e-3


def test_mesanet_option_values_are_checked():
    with pytest.raises(ValueError, match="cg_steps_decode"):
        MesaOPTConfig(cg_steps_decode=0)
    with pytest.raises(ValueError, match="short_conv_size"):
        MesaOPTConfig(short_conv_size=1)
    model = mesa_model(mesa_layers="all", mesa_backend="fla")
    packed = dict(input_ids=torch.tensor([[5, 6, 7, 8]]), position_ids=torch.tensor([[0, 1, 0, 1]]))
    with pytest.raises(ValueError, match="packed sequences"):
        model(**packed)
    with pytest.raises(ValueError, match="take no cache"):
        mesa_model(mesa_layers="all")(**packed, use_cache=True)


def test_data_collator_with_flattening_gives_the_loss_of_the_separate_documents():
    from transformers import DataCollatorWithFlattening

    model = with_random_extras(mesa_model(mesa_layers=[0], **MESANET_OPTIONS))
    gen = torch.Generator().manual_seed(5)
    docs = [torch.randint(3, 64, (n,), generator=gen).tolist() for n in (6, 3, 8)]
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": doc} for doc in docs])
    assert "attention_mask" not in batch
    packed_loss = model(**batch).loss
    nll = [torch.nn.functional.cross_entropy(model(torch.tensor([doc])).logits[0, :-1], torch.tensor(doc[1:]),
                                             reduction="sum") for doc in docs]
    expected = sum(nll) / sum(len(doc) - 1 for doc in docs)
    torch.testing.assert_close(packed_loss.double(), expected, rtol=1e-6, atol=0)  # HF's loss runs in float32
