"""Checkpoints load whole or not at all: a mesa model folder missing a tensor, a plain base-model folder, or a
config.json edited after saving (in a way that changes the weights' names, shapes or meaning) is refused with a
message naming the problem and the fix, never loaded with random or silently dropped weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_without_tint_hf, tiny_llama, tiny_opt
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tint_hf import MesaLlamaForCausalLM, MesaOPTForCausalLM, TinTForCausalLM

SAVED_BEFORE = Path(__file__).parent / "fixtures" / "checkpoints"

FAMILIES = {
    "opt": (lambda: MesaOPTForCausalLM.from_opt(tiny_opt(dtype=torch.float32), mesa_layers=[1],
                                                 short_conv_size=4, use_output_gate=True),
            lambda: tiny_opt(dtype=torch.float32), "from_opt", "activation_function", "gelu"),
    "llama": (lambda: MesaLlamaForCausalLM.from_llama(tiny_llama(dtype=torch.float32), mesa_layers=[1],
                                                      short_conv_size=4, use_output_gate=True),
              lambda: tiny_llama(dtype=torch.float32), "from_llama", "hidden_act", "gelu"),
}


def saved(tmp_path, family):
    model = FAMILIES[family][0]()
    model.save_pretrained(tmp_path / "mesa")
    return model, tmp_path / "mesa"


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_saved_mesa_model_loads_exactly(family, tmp_path):
    model, folder = saved(tmp_path, family)
    loaded = type(model).from_pretrained(folder)
    ids = torch.randint(3, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert json.loads((folder / "config.json").read_text())["weights_built_for"]["mesa_layers"] == [1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_missing_mesa_tensor_is_refused(family, tmp_path):
    model, folder = saved(tmp_path, family)
    state = load_file(folder / "model.safetensors")
    name = next(k for k in state if k.endswith("lambda_params"))
    del state[name]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"random or unused.*missing_keys.*{name}"):
        type(model).from_pretrained(folder)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_plain_base_folder_points_at_the_conversion(family, tmp_path):
    mesa_class = type(FAMILIES[family][0]())
    FAMILIES[family][1]().save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=rf"plain base-model checkpoint.*{FAMILIES[family][2]}"):
        mesa_class.from_pretrained(tmp_path / "base", mesa_layers=[1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("edit", ["mesa_layers", "short_conv_size", "use_output_gate", "activation"])
def test_an_edited_config_is_refused(family, edit, tmp_path):
    model, folder = saved(tmp_path, family)
    activation_field, other_activation = FAMILIES[family][3:]
    change, expected = {
        "mesa_layers": ({"mesa_layers": [0, 1]}, r"missing_keys.*layers\.0\.self_attn"),
        "short_conv_size": ({"short_conv_size": 0}, r"unexpected_keys.*conv1d"),
        "use_output_gate": ({"use_output_gate": False}, r"unexpected_keys.*g_proj"),
        "activation": ({activation_field: other_activation},
                       rf"built for {activation_field}=.* but the config now says {activation_field}='gelu'"),
    }[edit]
    edit_config(folder, **change)
    with pytest.raises(ValueError, match=expected):
        type(model).from_pretrained(folder)


def test_mesa_rope_edit_is_refused_and_load_time_overrides_are_checked_too(tmp_path):
    """mesa_rope changes no weight name or shape, only what the weights mean: caught by weights_built_for, whether
    config.json was edited or the value is passed to from_pretrained."""
    model, folder = saved(tmp_path, "llama")
    with pytest.raises(ValueError, match=r"built for mesa_rope=True but the config now says mesa_rope=False"):
        MesaLlamaForCausalLM.from_pretrained(folder, mesa_rope=False)
    edit_config(folder, mesa_rope=False)
    with pytest.raises(ValueError, match=r"mesa_rope=True .* mesa_rope=False"):
        MesaLlamaForCausalLM.from_pretrained(folder)
    # a setting that does not change the weights' meaning stays free
    edit_config(folder, mesa_rope=True, mesa_solver="exact")
    assert MesaLlamaForCausalLM.from_pretrained(folder).config.mesa_solver == "exact"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unknown_conversion_arguments_are_refused(family):
    base = FAMILIES[family][1]()
    convert = getattr(type(FAMILIES[family][0]()), FAMILIES[family][2])
    with pytest.raises(TypeError, match=r"Unknown config fields \['mesa_layer'\].*mesa_layers"):
        convert(base, mesa_layer=[1])


@pytest.mark.parametrize("edit", ["num_simulation_layers", "aux activation"])
def test_an_edited_tint_config_is_refused(edit, tmp_path):
    """TinT's weights are its construction: a config edited to simulate other layers or another auxiliary
    activation keeps every weight name and shape, and is refused all the same."""
    from tint_hf import TinTForCausalLM

    tint = TinTForCausalLM.from_auxiliary(tiny_opt(), num_prefixes=8)
    tint.save_pretrained(tmp_path / "tint")
    assert type(TinTForCausalLM.from_pretrained(tmp_path / "tint")) is TinTForCausalLM
    config = json.loads((tmp_path / "tint" / "config.json").read_text())
    if edit == "num_simulation_layers":
        config["num_simulation_layers"] = 1
    else:
        config["aux_config"]["activation_function"] = "gelu"
    (tmp_path / "tint" / "config.json").write_text(json.dumps(config))
    name = "num_simulation_layers" if edit == "num_simulation_layers" else "aux_config"
    with pytest.raises(ValueError, match=rf"constructed for other values of \['{name}'\].*from_auxiliary"):
        TinTForCausalLM.from_pretrained(tmp_path / "tint")


def test_unknown_construction_arguments_are_refused():
    from tint_hf import TinTForCausalLM

    with pytest.raises(TypeError, match=r"unknown TinTConfig fields \['nump_prefixes'\].*num_prefixes"):
        TinTForCausalLM.from_auxiliary(tiny_opt(), nump_prefixes=8)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mesa_opt_v0", "mesa_llama_v0", "tint_opt_v0"])
def test_a_checkpoint_saved_by_an_earlier_version_still_loads(name, tmp_path):
    """tests/fixtures/checkpoints/mesa_*_v0 were saved at 7fa31e3, before the mesa files moved into one folder
    (from_opt / from_llama of conftest's tiny models, float32, mesa parameters moved off their initialisation);
    tint_opt_v0 at 7e1915b, before TinT's config fields took HF's ``num_*`` names (``from_auxiliary`` of conftest's
    tiny OPT, float32, num_prefixes 8, 1 simulated layer, 2 steps, inner_lr 1e-2; its forward trains on the first
    half of each row). Today's classes load them whole and give the logits that the code saved inside each
    checkpoint gives, run with ``trust_remote_code`` in a process without tint_hf."""
    folder = SAVED_BEFORE / name
    ids = torch.arange(3, 27).view(2, 12) % 64
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) in (MesaOPTForCausalLM, MesaLlamaForCausalLM, TinTForCausalLM)
    if name == "tint_opt_v0":  # its config.json has the earlier names n_simulation_layers, n_steps
        assert "n_steps" in json.loads((folder / "config.json").read_text())
        assert (model.config.num_simulation_layers, model.config.num_steps) == (1, 2)
    with torch.no_grad():
        logits = model(ids).logits
    their = run_without_tint_hf(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            print(json.dumps(model(torch.tensor({ids.tolist()!r})).logits.tolist()))
    """, tmp_path)
    torch.testing.assert_close(logits, torch.tensor(json.loads(their.splitlines()[-1])), rtol=0, atol=1e-6)
