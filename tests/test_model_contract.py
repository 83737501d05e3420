"""The HF model contract, one harness over every model class (the fla / transformers pattern): save and reload,
dtype, meta-device construction, token-embedding resizing, weight tying, activation checkpointing, padding
invariance, generation (greedy, sampling, beam search; with and without a cache), ``torch.compile``, peft (LoRA and
prefix tuning), ``past_key_values=`` and ``output_hidden_states`` from the config, signatures. What a model does not
support is declared in its case (``refuses``) and tested as a refusal with a message.

The references are independent of the code under test: HF's own OPT / Llama (a mesa model without mesa layers is
that model; prefix tuning is compared with peft on HF's model), the same model called another way (one row vs a
padded batch, cached vs uncached decoding, eager vs compiled, checkpointed vs not), and torch's autograd.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from conftest import tiny_llama, tiny_opt
from transformers import AutoModelForCausalLM

from tint_hf import MesaLlamaForCausalLM, MesaOPTForCausalLM, TinTForCausalLM

VOCAB = 64


@dataclass
class Case:
    build: Callable[[], torch.nn.Module]  # float64, eval mode, dropout 0
    base: Callable[[], torch.nn.Module] | None = None  # HF model the case equals with its mesa layers removed
    pad_id: int = 1
    refuses: set[str] = field(default_factory=set)
    lora: dict = field(default_factory=dict)


def _tint() -> TinTForCausalLM:
    return TinTForCausalLM.from_auxiliary(tiny_opt(), num_prefixes=8, inner_lr=1e-3)


CASES = {
    # the exact solver: the contract compares decoding paths token for token, which a CG solve that is not run to
    # convergence would blur (the solvers are compared with each other in test_mesa_ops)
    "mesa_opt": Case(lambda: MesaOPTForCausalLM.from_opt(tiny_opt(), mesa_layers=[1], mesa_solver="exact"),
                     base=lambda: MesaOPTForCausalLM.from_opt(tiny_opt(), mesa_layers=[]), pad_id=1,
                     lora=dict(target_modules=["q_proj", "v_proj"])),
    "mesa_llama": Case(lambda: MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[1], mesa_solver="exact"),
                       base=lambda: MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[]), pad_id=0,
                       lora=dict(target_modules=["q_proj", "v_proj"])),
    "mesa_llama_window": Case(  # the within-layer hybrid: a softmax window of 3 tokens and mesa over older ones
        lambda: MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[1], mesa_solver="exact", mesa_window=3),
        base=lambda: MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[]), pad_id=0,
        lora=dict(target_modules=["q_proj", "v_proj"])),
    "tint": Case(_tint, pad_id=1, refuses={"resize", "prefix_tuning", "hidden_states"},
                 lora=dict(target_parameters=["prefixes.v", "prefixes.fc1"])),
}
REFERENCE_BASES = {"mesa_opt": lambda: tiny_opt(), "mesa_llama": lambda: tiny_llama()}


def ids(batch=2, length=9, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def cases(*, without: str = "") -> list:
    return [pytest.param(name, id=name) for name, case in CASES.items() if without not in case.refuses]


@pytest.mark.parametrize("name", cases())
def test_save_and_reload_give_the_same_model(name, tmp_path):
    model = CASES[name].build()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.dtype == torch.float64  # dtype="auto": the checkpoint's
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-12, atol=1e-12)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()  # tied again


@pytest.mark.parametrize("name", cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_in_another_dtype(name, dtype, tmp_path):
    model = CASES[name].build()
    model.save_pretrained(tmp_path / "m")
    loaded = type(model).from_pretrained(tmp_path / "m", dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    with torch.no_grad():
        reference, logits = model(ids()).logits, loaded(ids()).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    assert (logits.double() - reference).abs().max() < tolerance * reference.abs().max()


@pytest.mark.parametrize("name", cases())
def test_construction_on_the_meta_device_allocates_nothing(name):
    model = CASES[name].build()
    with torch.device("meta"):
        empty = type(model)(model.config)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert sum(p.numel() for p in empty.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", cases())
def test_the_head_is_tied_to_the_embedding(name):
    model = CASES[name].build()
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("name", cases(without="resize"))
def test_resizing_the_vocabulary_keeps_the_old_logits_and_the_tie(name):
    model = CASES[name].build()
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    model.resize_token_embeddings(VOCAB + 8)
    assert model.config.vocab_size == VOCAB + 8
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        after = model(x).logits
    assert after.shape[-1] == VOCAB + 8
    torch.testing.assert_close(after[..., :VOCAB], before, rtol=1e-10, atol=1e-10)
    model(torch.full((1, 3), VOCAB + 5))  # a new id is accepted


def test_tint_refuses_resizing_with_the_way_to_do_it():
    with pytest.raises(NotImplementedError, match="resize the auxiliary model.*from_auxiliary"):
        CASES["tint"].build().resize_token_embeddings(VOCAB + 8)


@pytest.mark.parametrize("name", cases())
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name):
    model = CASES[name].build().train()
    x = ids(seed=2)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert model.is_activation_checkpointing
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=0)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for key in results[0][1]:
        torch.testing.assert_close(results[1][1][key], results[0][1][key], rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", cases())
def test_left_padding_does_not_change_a_row(name):
    case = CASES[name]
    model = case.build()
    x = ids(batch=2, length=8, seed=3)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    x[mask == 0] = case.pad_id
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate passes them
    with torch.no_grad():
        batch = model(x, attention_mask=mask, position_ids=positions).logits
        alone = model(x[1:, 3:]).logits
    torch.testing.assert_close(batch[1, 3:], alone[0], rtol=1e-9, atol=1e-9)


GENERATION = {"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=10),
              "beam": dict(do_sample=False, num_beams=3)}


@pytest.mark.parametrize("name", cases())
@pytest.mark.parametrize("how", sorted(GENERATION))
def test_generation_with_and_without_the_cache_agree(name, how):
    case = CASES[name]
    model = case.build()
    model.generation_config.pad_token_id = case.pad_id
    model.generation_config.eos_token_id = None  # always 5 new tokens, as in the plain loop below
    x = ids(batch=2, length=6, seed=4)
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        outputs.append(model.generate(x, max_new_tokens=5, use_cache=use_cache, **GENERATION[how]))
    assert outputs[0].shape == (2, 11)
    assert torch.equal(outputs[0], outputs[1])
    if how == "greedy":  # against the plain loop over forward calls
        loop = x
        with torch.no_grad():
            for _ in range(5):
                loop = torch.cat([loop, model(loop).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(outputs[0], loop)


@pytest.mark.parametrize("name", cases())
def test_torch_compile_traces_the_forward(name):
    model = CASES[name].build()
    compiled = torch.compile(model, backend="aot_eager")
    x = ids(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", cases())
def test_lora_starts_at_the_model_trains_only_adapters_and_merges(name):
    peft = pytest.importorskip("peft")
    case = CASES[name]
    model = case.build()
    x = ids(seed=6)
    with torch.no_grad():
        reference = model(x).logits
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **case.lora))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped(x, labels=x).loss.backward()
    assert all(p.grad is not None for p in wrapped.parameters() if p.requires_grad)
    with torch.no_grad():
        adapted = wrapped(x).logits
    assert not torch.allclose(adapted, reference)  # random (non-zero) adapters change the output
    merged = wrapped.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-8, atol=1e-8)


# peft < 0.22 hands the prefix over as `past_key_values=` (transformers' deprecated name), peft >= 0.22 as `cache=`
PEFT_PREFIX_NAME = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


@PEFT_PREFIX_NAME
@pytest.mark.parametrize("name", ["mesa_opt", "mesa_llama"])
def test_prefix_tuning_without_mesa_layers_equals_hfs_model(name):
    """peft prefix tuning hands the model ``past_key_values=`` (a key/value cache of the virtual tokens); a mesa model
    without mesa layers must give exactly what peft on HF's own model gives."""
    peft = pytest.importorskip("peft")
    x = ids(seed=7)
    logits = []
    for build in (CASES[name].base, REFERENCE_BASES[name]):
        model = build()
        torch.manual_seed(0)  # the same virtual tokens for both
        wrapped = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        with torch.no_grad():
            logits.append(wrapped(input_ids=x).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-12, atol=1e-12)


@PEFT_PREFIX_NAME
@pytest.mark.parametrize("name", ["mesa_opt", "mesa_llama"])
def test_prefix_tuning_of_mesa_layers_is_refused_with_the_reason(name):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(CASES[name].build(),
                                  peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="mesa layers keep a state, not keys and values"):
        wrapped(input_ids=ids())


@PEFT_PREFIX_NAME
def test_prefix_tuning_of_tint_is_refused():
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(CASES["tint"].build(),
                                  peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="TinT takes no past_key_values / cache.*prefix tuning"):
        wrapped(input_ids=ids())
    with pytest.raises(ValueError, match="TinT takes input_ids, not inputs_embeds"):
        CASES["tint"].build()(inputs_embeds=torch.zeros(1, 3, 32, dtype=torch.float64))


@pytest.mark.parametrize("name", ["mesa_opt", "mesa_llama"])
def test_past_key_values_is_the_deprecated_name_of_cache(name):
    model = CASES[name].build()
    x = ids(batch=1, length=6, seed=8)
    with torch.no_grad():
        first = model(x[:, :4], use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            step = model(x[:, 4:], past_key_values=first.cache, use_cache=True)
        full = model(x).logits
    torch.testing.assert_close(step.logits, full[:, 4:], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", cases(without="hidden_states"))
def test_output_hidden_states_follows_the_config(name):
    model = CASES[name].build()
    x = ids()
    model.config.output_hidden_states = True
    with torch.no_grad():
        out = model(x)
    assert out.hidden_states is not None and len(out.hidden_states) == model.config.num_hidden_layers + 1
    model.config.output_hidden_states = False
    with torch.no_grad():
        assert model(x).hidden_states is None and model(x, output_hidden_states=True).hidden_states is not None


def test_tint_refuses_hidden_states_from_the_config_and_its_base_model_follows_return_dict():
    model = CASES["tint"].build()
    model.config.output_hidden_states = True
    with pytest.raises(ValueError, match="does not return hidden_states"):
        model(ids())
    with pytest.raises(ValueError, match="does not return hidden_states"):
        model.model(ids())
    model.config.output_hidden_states = False
    as_tuple = model.model(ids(), return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], model.model(ids()).last_hidden_state)


@pytest.mark.parametrize("name", cases())
def test_forward_signatures_name_their_inputs(name):
    """Trainer, peft and generate inspect forward's parameters: no ``*args`` hiding them."""
    model = CASES[name].build()
    for module in (model, model.model):
        parameters = inspect.signature(module.forward).parameters
        assert "input_ids" in parameters and "attention_mask" in parameters
        assert not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters.values())


def test_mesa_llama_declares_no_tensor_parallel_plan():
    """Llama's plan would shard q/k/v but not the per-head mesa parameters: the mesa models declare none (so
    transformers refuses tp_plan) instead of a plan that splits them half-way."""
    config = CASES["mesa_llama"].build().config
    assert not config.base_model_tp_plan and not config.base_model_pp_plan
    assert not getattr(MesaLlamaForCausalLM, "_tp_plan", None)
