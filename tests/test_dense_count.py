"""The closed-form dense parameter count against counts measured on the authors' TinT constructor.

How the reference numbers were measured: the authors' code (github.com/abhishekpanigrahi1996/
transformer_in_transformer at commit 1722081, ``tint_main/``) was extracted into a scratch directory
outside this repository and run in a scratch venv (torch 2.13.0 CPU, transformers 4.49.0).  A small
driver built a *randomly initialised* HF auxiliary model from a config (``OPTForCausalLM(OPTConfig(
hidden_size=d, num_hidden_layers=L, num_attention_heads=h, ffn_dim=d_ff, vocab_size=V,
max_position_embeddings=T, word_embed_proj_dim=d))`` or ``GPT2LMHeadModel(GPT2Config(n_embd=d,
n_layer=L, n_head=h, n_inner=d_ff, vocab_size=V, n_positions=T))``), filled the authors'
``ConstructionArguments(device="cpu", num_prefixes=P, num_attention_heads=H, hidden_size=D,
num_simulation_layers=n, n_forward_backward=steps, reuse_forward_blocks=..., reuse_backward_blocks=...,
restrict_prefixes=True)`` the way their ``TinT_Creator`` does (``seq_length = T``), called
``TinT_opt`` / ``TinT_gpt`` on ``nested_children(model)`` and printed
``sum(p.numel() for p in tint.parameters())`` plus the same sum for each named child module.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

_MODULE_PATH = Path(__file__).resolve().parents[1] / "tint_hf" / "models" / "tint" / "dense_count.py"


def _load() -> ModuleType:
    """Load ``tint_hf/models/tint/dense_count.py`` by path, without importing the rest of tint_hf."""
    spec = importlib.util.spec_from_file_location("tint_dense_count_under_test", _MODULE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dense_count = _load()
count = dense_count.authors_dense_parameter_count

OPT_125M = dict(aux_family="opt", d=768, num_aux_layers=12, num_aux_heads=12, d_ff=3072, vocab_size=50272,
                max_positions=2048, D=3072, P=256, H=12)
GPT2_124M = dict(aux_family="gpt2", d=768, num_aux_layers=12, num_aux_heads=12, d_ff=3072, vocab_size=50257,
                 max_positions=1024, D=3072, P=256, H=12)


def test_opt125m_breakdown_matches_authors_constructor() -> None:
    """Per-module counts of the OPT-125M TinT (reuse, n=12, one step) from the research notes (total re-measured)."""
    out = count(**OPT_125M, num_simulation_layers=12, num_steps=1)
    assert out["total"] == 1_669_324_018 == dense_count.OPT_125M_DENSE_TOTAL_REUSE
    assert out["embeddings"] == 38_608_896  # wte, tied with lm_head
    assert out["positions"] == 1_574_400  # (2048 + 2) x 768
    assert out["forward_block"] == 59_387_492
    assert out["forward_block_prefixes"] == 14_155_776  # 18 prefix tensors of 256 x 3072
    assert out["n_prefix_tensors_per_block"] == 18
    assert out["forward_block_construction"] == 45_231_716
    assert out["backward_block"] == 74_769_294
    assert out["gradient_module"] == 19_259_290
    assert out["n_backward_blocks"] == 12
    assert out["n_forward_blocks_with_prefixes"] == 12
    assert out["n_forward_blocks_without_prefixes"] == 0
    assert out["linear_forward"] == 6_680_882  # "each LinearForward ~6.68M"


def test_opt125m_totals_without_reuse_and_with_three_layers() -> None:
    """The two other OPT-125M totals measured with the authors' constructor."""
    no_reuse = count(**OPT_125M, num_simulation_layers=12, reuse_forward_blocks=False, reuse_backward_blocks=False)
    assert no_reuse["total"] == 2_212_104_610
    assert no_reuse["n_forward_blocks_without_prefixes"] == 12
    assert count(**OPT_125M, num_simulation_layers=3)["total"] == 996_400_372


def test_gpt2_124m_matches_authors_constructor() -> None:
    """GPT-2 (124M) shapes, measured by us: TinT_gpt, 23 s build on 2 CPU cores; children sums as below."""
    out = count(**GPT2_124M, num_simulation_layers=12)
    assert out["total"] == 1_476_796_914 == dense_count.GPT2_DENSE_TOTAL_REUSE
    assert out["embeddings"] == 38_597_376  # 50257 x 768, tied
    assert out["positions"] == 786_432  # 1024 x 768, no offset
    assert out["forward_block"] == 53_861_988
    assert out["backward_block"] == 64_514_958
    assert out["gradient_module"] == 16_889_754
    # Measured: no forward/backward reuse (n=12, one step), and n=3 with reuse.
    assert count(**GPT2_124M, num_simulation_layers=12, reuse_forward_blocks=False,
                 reuse_backward_blocks=False)["total"] == 1_953_271_458
    assert count(**GPT2_124M, num_simulation_layers=3)["total"] == 896_162_292


# Small configurations, each built with the authors' constructor as described in the module docstring.
# Columns: family, d, L, h, V, T, d_ff, D, P, H, n, steps, reuse_forward, reuse_backward, measured total.
SMALL_MEASURED = [
    ("opt", 48, 2, 6, 100, 64, 192, 192, 16, 12, 2, 1, True, True, 1_451_214),
    ("opt", 48, 2, 6, 100, 64, 192, 192, 16, 12, 2, 1, False, False, 1_922_358),
    ("opt", 48, 3, 3, 120, 40, 192, 192, 16, 4, 2, 2, False, False, 3_507_134),  # D/H=48 != P
    ("opt", 48, 3, 3, 120, 40, 192, 192, 16, 4, 1, 3, True, False, 2_135_904),
    ("opt", 64, 2, 4, 90, 32, 128, 320, 16, 5, 2, 2, False, True, 4_934_526),  # r=4, two MLP chunks
    ("gpt2", 64, 2, 4, 128, 32, 256, 320, 16, 5, 1, 3, False, True, 3_718_148),
    ("gpt2", 48, 3, 6, 77, 50, 96, 192, 16, 12, 3, 2, True, True, 2_021_296),
]


@pytest.mark.parametrize("row", SMALL_MEASURED, ids=lambda r: "-".join(map(str, r[:-1])))
def test_small_configs_match_authors_constructor(row: tuple) -> None:
    """Totals of small TinTs (both families, reuse on/off, several steps, other MLP widths)."""
    family, d, num_layers, heads, vocab, positions, d_ff, D, P, H, n, steps, reuse_f, reuse_b, measured = row
    out = count(aux_family=family, d=d, num_aux_layers=num_layers, num_aux_heads=heads, d_ff=d_ff, vocab_size=vocab,
                max_positions=positions, D=D, P=P, H=H, num_simulation_layers=n, num_steps=steps,
                reuse_forward_blocks=reuse_f, reuse_backward_blocks=reuse_b)
    assert out["total"] == measured


def test_small_config_block_breakdown() -> None:
    """Per-child sums measured for the first small OPT configuration (wte 4800, wpe 66 x 48)."""
    out = count(aux_family="opt", d=48, num_aux_layers=2, num_aux_heads=6, d_ff=192, vocab_size=100, max_positions=64,
                D=192, P=16, H=12, num_simulation_layers=2)
    assert (out["embeddings"], out["positions"]) == (4_800, 3_168)
    assert out["forward_block"] == 290_868
    assert out["forward_block_prefixes"] == 18 * 16 * 192
    assert out["backward_block"] == 380_958
    assert out["gradient_module"] == 99_594


def test_parts_add_up_and_untied_head() -> None:
    """The total is the sum of its parts; an untied lm_head adds V*d."""
    kwargs = dict(OPT_125M, num_simulation_layers=6, num_steps=2, reuse_forward_blocks=False, reuse_backward_blocks=False)
    out = count(**kwargs)
    assert out["total"] == (out["embeddings"] + out["positions"] + out["gradient_module"]
                            + out["n_forward_blocks_with_prefixes"] * out["forward_block"]
                            + out["n_forward_blocks_without_prefixes"] * out["forward_block_construction"]
                            + out["n_backward_blocks"] * out["backward_block"])
    assert out["n_backward_blocks"] == 12 and out["n_forward_blocks_without_prefixes"] == 12
    assert count(**kwargs, tie_word_embeddings=False)["total"] == out["total"] + 50272 * 768


@pytest.mark.parametrize(
    "override",
    [
        dict(D=2304),  # D = 3d: no room for the attention memory
        dict(P=512),  # d not a multiple of P
        dict(H=7),  # D not a multiple of H
        dict(num_aux_heads=13),  # more auxiliary heads than TinT heads
        dict(d_ff=1000),  # MLP width not a multiple of d
        dict(num_simulation_layers=13),
        dict(aux_family="llama"),
    ],
)
def test_rejects_shapes_the_constructor_rejects(override: dict) -> None:
    """Configurations the authors' constructor cannot build raise ValueError."""
    kwargs = dict(OPT_125M, num_simulation_layers=12)
    kwargs.update(override)
    with pytest.raises(ValueError):
        count(**kwargs)
