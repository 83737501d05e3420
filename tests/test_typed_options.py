"""Options are typed: configuration fields, task fields and keyword arguments of the wrong type, out of range or
not finite raise with the field's name instead of being kept, rounded or turned into NaN logits."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, tiny_opt
from huggingface_hub.errors import StrictDataclassFieldValidationError

from tint_hf import MesaLlamaConfig, MesaLlamaForCausalLM, MesaOPTConfig, TinTConfig, TinTForCausalLM
from tint_hf.synthetic.tasks import LinearDynamicsTask, LinearRegressionTask, PlateauTask

TYPE_ERRORS = (ValueError, StrictDataclassFieldValidationError)
SMALL_LLAMA = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


@pytest.mark.parametrize("config_class", [MesaLlamaConfig, MesaOPTConfig])
@pytest.mark.parametrize("field, bad", [
    ("mesa_layers", [0.7]), ("mesa_layers", "some"), ("cg_steps", 2.5), ("use_output_gate", 1),
    ("use_forget_gate", "no"), ("lambda_init", float("inf")), ("lambda_min", float("nan")),
    ("forget_gate_windows", (2.0, float("inf"))), ("short_conv_size", 4.0), ("mesa_solver", 3),
])
def test_mesa_config_fields_are_typed(config_class, field, bad):
    fields = SMALL_LLAMA if config_class is MesaLlamaConfig else dict(vocab_size=50, hidden_size=16,
                                                                        num_hidden_layers=2, num_attention_heads=2,
                                                                        ffn_dim=32)
    with pytest.raises(TYPE_ERRORS, match=field):
        config_class(**fields, **{field: bad})


def test_mesa_rope_must_be_a_bool():
    with pytest.raises(TYPE_ERRORS, match="mesa_rope"):
        MesaLlamaConfig(**SMALL_LLAMA, mesa_rope="yes")


def test_an_infinite_gate_window_cannot_reach_the_model():
    """Before: forget_gate_windows=(16, inf) built a model whose logits were NaN."""
    with pytest.raises(TYPE_ERRORS, match="forget_gate_windows"):
        MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[1], forget_gate_windows=(16.0, float("inf")))


@pytest.mark.parametrize("field, bad", [("num_steps", 1.5), ("ln_bias_only", "yes"), ("num_prefixes", 8.0),
                                        ("num_simulation_layers", True), ("inner_lr", float("nan")),
                                        ("backward", 1)])
def test_tint_config_fields_are_typed(field, bad):
    kwargs = {"num_prefixes": 8, field: bad}
    with pytest.raises(TYPE_ERRORS, match=field):
        TinTConfig(aux_config=tiny_opt().config.to_dict(), **kwargs)


@pytest.mark.parametrize("task, field, bad", [
    (LinearRegressionTask, "dim", 2.5), (LinearRegressionTask, "noise_std", float("nan")),
    (LinearRegressionTask, "n_context", True), (LinearDynamicsTask, "spectral_radius", float("inf")),
    (LinearDynamicsTask, "length", 0), (PlateauTask, "encoder_frequency", float("nan")),
])
def test_synthetic_task_fields_are_typed(task, field, bad):
    with pytest.raises(ValueError, match=rf"{task.__name__}\.{field} must be"):
        task(**{field: bad})


def test_valid_values_still_pass():
    MesaLlamaConfig(**SMALL_LLAMA, forget_gate_windows=[4, 8], lambda_init=2, mesa_layers="all")
    LinearRegressionTask(dim=3, noise_std=0)
    TinTConfig(aux_config=tiny_opt().config.to_dict(), num_prefixes=8, inner_lr=1)
    assert torch.isfinite(MesaLlamaForCausalLM.from_llama(tiny_llama(), mesa_layers=[1])(
        torch.tensor([[3, 4, 5]])).logits).all()


def test_tint_config_accepts_the_fields_earlier_names():
    """n_simulation_layers / n_steps (the names before HF's num_* convention) set num_simulation_layers / num_steps,
    in the config and in from_auxiliary, and are not saved twice."""
    config = TinTConfig(aux_config=tiny_opt().config.to_dict(), num_prefixes=8, n_simulation_layers=1, n_steps=3)
    assert (config.num_simulation_layers, config.num_steps) == (1, 3)
    assert "n_steps" not in config.to_dict() and config.to_dict()["num_steps"] == 3
    tint = TinTForCausalLM.from_auxiliary(tiny_opt(), num_prefixes=8, n_simulation_layers=1)
    assert tint.config.num_simulation_layers == 1
