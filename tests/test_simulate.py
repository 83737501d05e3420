"""The reference simulator against independent references: torch.optim.SGD on a deep copy, HF forward, autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama, tiny_opt
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, OPTConfig, OPTForCausalLM

from tint_hf.simulate import (
    Approximations,
    exact_step,
    forward_with_params,
    select_parameters,
    sgd_update,
    tint_step,
)
from tint_hf.simulate.families import UnsupportedModelError

LR = 2e-2
# HF's LlamaRMSNorm normalises in float32 even in a float64 model, so comparisons with HF Llama logits are only
# float32-exact; everything else is compared in float64.
HF_TOL = {"opt": 1e-10, "gpt2": 1e-10, "llama": 1e-6}
BUILDERS = {"opt": tiny_opt, "gpt2": tiny_gpt2, "llama": tiny_llama}
FAMILIES = list(BUILDERS)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def batch(seed: int = 0, B: int = 3, T: int = 14, train: int = 9, vocab: int = 64):
    """Random ids with left padding on row 1 and right padding on row 2; the first `train` real tokens train."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=gen)
    attn = torch.ones(B, T, dtype=torch.long)
    if B > 1:
        attn[1, :3] = 0
    if B > 2:
        attn[2, -2:] = 0
    real_index = attn.cumsum(-1) - 1
    train_mask = (attn.bool() & (real_index < train)).long()
    return ids, attn, train_mask


def hand_sgd_logits(model, ids, attn, train_mask, names, lr, num_steps=1):
    """Per sequence: deep copy, SGD on the summed next-token loss of training targets, then logits."""
    out = []
    for b in range(ids.shape[0]):
        m = copy.deepcopy(model)
        params = dict(m.named_parameters())
        for p in m.parameters():
            p.requires_grad_(False)
        for n in names:
            params[n].requires_grad_(True)
        opt = torch.optim.SGD([params[n] for n in names], lr=lr)
        real = attn[b].bool()
        row = ids[b][real][None]  # the sequence without its padding
        targets = train_mask[b][real][1:].bool()
        for _ in range(num_steps):
            opt.zero_grad()
            logits = m(input_ids=row).logits[0, :-1]
            F.cross_entropy(logits[targets], row[0, 1:][targets], reduction="sum").backward()
            opt.step()
        with torch.no_grad():
            out.append((m(input_ids=row).logits[0], real))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_layers", [None, 1])
def test_exact_step_equals_torch_sgd_on_deep_copy(family, num_layers):
    model = BUILDERS[family]()
    ids, attn, train = batch()
    names = select_parameters(model, num_layers=num_layers)
    result = exact_step(model, ids, attn, train, lr=LR, num_layers=num_layers)
    for b, (expected, real) in enumerate(hand_sgd_logits(model, ids, attn, train, names, LR)):
        assert rel(result.logits_after[b][real], expected) < 1e-6
    change = (result.logits_after - result.logits_before).abs().max()
    assert change > 1e-3, "the step must change the logits"


@pytest.mark.parametrize("family", FAMILIES)
def test_two_steps_equal_two_sgd_steps(family):
    model = BUILDERS[family]()
    ids, attn, train = batch(seed=1, B=2)
    names = select_parameters(model)
    result = exact_step(model, ids, attn, train, lr=LR, num_steps=2)
    for b, (expected, real) in enumerate(hand_sgd_logits(model, ids, attn, train, names, LR, num_steps=2)):
        assert rel(result.logits_after[b][real], expected) < 1e-6


def test_select_parameters_default_subset():
    model = tiny_opt(num_hidden_layers=3)
    names = select_parameters(model, num_layers=2)
    assert not any(".layers.0." in n for n in names)
    assert any(".layers.1." in n for n in names) and any(".layers.2." in n for n in names)
    assert "model.decoder.final_layer_norm.bias" in names
    assert not any("embed" in n for n in names)
    with_emb = select_parameters(model, num_layers=2, include_embeddings=True)
    assert {"model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"} <= set(with_emb)
    with pytest.raises(ValueError, match="num_layers=4"):
        select_parameters(model, num_layers=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_lr_zero_returns_original_logits(family):
    model = BUILDERS[family]()
    ids, attn, train = batch()
    for step in (exact_step, tint_step):
        result = step(model, ids, attn, train, lr=0.0)
        for b in range(ids.shape[0]):
            real = attn[b].bool()
            reference = model(input_ids=ids[b][real][None]).logits[0]
            assert torch.allclose(result.logits_after[b][real], result.logits_before[b][real], rtol=0, atol=1e-12)
            assert rel(result.logits_before[b][real], reference) < HF_TOL[family]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("step", ["exact", "tint"])
def test_padded_batch_equals_one_sequence_at_a_time(family, step):
    model = BUILDERS[family]()
    fn = exact_step if step == "exact" else tint_step
    ids, attn, train = batch(seed=2)
    together = fn(model, ids, attn, train, lr=LR)
    for b in range(ids.shape[0]):
        real = attn[b].bool()
        alone = fn(model, ids[b][real][None], None, train[b][real][None], lr=LR)
        assert rel(together.logits_after[b][real], alone.logits_after[0]) < 1e-10
        assert torch.allclose(together.eval_nll_after[b], alone.eval_nll_after[0], rtol=1e-10)
    # The batch loss is the token-weighted mean of the per-sequence sums.
    assert torch.allclose(together.loss_after, together.eval_nll_after.sum() / together.eval_tokens.sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_tint_step_without_approximations_equals_exact_step(family):
    model = BUILDERS[family]()
    ids, attn, train = batch(seed=3)
    everything = select_parameters(model, include_embeddings=True)
    exact_all = exact_step(model, ids, attn, train, lr=LR, params=everything)
    simulated = tint_step(model, ids, attn, train, lr=LR, approximations=Approximations.none())
    exact_top = exact_step(model, ids, attn, train, lr=LR, num_layers=1)
    simulated_top = tint_step(model, ids, attn, train, lr=LR, num_layers=1,
                              approximations=Approximations.none().with_(freeze_embeddings=True))
    for b in range(ids.shape[0]):
        real = attn[b].bool()
        assert rel(simulated.logits_after[b][real], exact_all.logits_after[b][real]) < HF_TOL[family]
        assert rel(simulated_top.logits_after[b][real], exact_top.logits_after[b][real]) < HF_TOL[family]


def _params_after(model, approx, **kw):
    ids, attn, train = batch(seed=4)
    return tint_step(model, ids, attn, train, lr=LR, approximations=approx, return_params=True, **kw).params


def _changed(new: dict, model, name: str) -> bool:
    """Whether the step moved parameter `name` (parameters it does not train are not returned at all)."""
    if name not in new:
        return False
    original = dict(model.named_parameters())[name]
    return not torch.equal(new[name], original.expand_as(new[name]))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_approximation_changes_only_what_it_should(family):
    model = BUILDERS[family]()
    exact = Approximations.none().with_(freeze_embeddings=True)
    reference = _params_after(model, exact)
    names = list(reference)
    qk = [n for n in names if any(s in n for s in ("q_proj", "k_proj"))]
    ln_weights = [n for n in names if ("norm" in n or "ln_" in n) and n.endswith("weight")]

    # Q/K frozen: exactly the Q/K parameters stay at their original values; nothing else moves.
    frozen_qk = _params_after(model, exact.with_(freeze_qk=True))
    if family != "gpt2":
        assert qk and all(not _changed(frozen_qk, model, n) and _changed(reference, model, n) for n in qk)
    else:  # GPT-2 keeps Q, K, V in one c_attn matrix: its Q and K columns stay, the V columns move.
        d = model.config.n_embd
        for n in (n for n in names if "c_attn.weight" in n):
            original = dict(model.named_parameters())[n]
            assert torch.equal(frozen_qk[n][..., :2 * d], original[..., :2 * d].expand_as(frozen_qk[n][..., :2 * d]))
            assert torch.equal(frozen_qk[n][..., 2 * d:], reference[n][..., 2 * d:])
    others = [n for n in names if n not in qk and "c_attn" not in n]
    assert all(torch.equal(frozen_qk[n], reference[n]) for n in others)

    # LN gamma frozen: exactly the LN weights stay; all other parameters are updated as by exact SGD.
    bias_only = _params_after(model, exact.with_(ln_bias_only=True))
    assert ln_weights and all(not _changed(bias_only, model, n) for n in ln_weights)
    assert all(torch.equal(bias_only[n], reference[n]) for n in names if n not in ln_weights)

    # The authors' fc2-bias bug: only the fc2 bias moves, by d_ff/d times the exact step.
    buggy = _params_after(model, exact.with_(authors_fc2_bias_bug=True))
    fc2_bias = [n for n in names if n.endswith(("fc2.bias", "mlp.c_proj.bias"))]
    scale = 4.0
    for n in names:
        if n in fc2_bias:
            original = dict(model.named_parameters())[n]
            assert torch.allclose(buggy[n] - original, scale * (reference[n] - original), rtol=1e-10, atol=1e-14)
        else:
            assert torch.equal(buggy[n], reference[n])


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_attention_grad_keeps_top_value_path_and_freezes_qk(family):
    model = BUILDERS[family]()
    exact = Approximations.none().with_(freeze_embeddings=True)
    reference = _params_after(model, exact)
    stopped = _params_after(model, exact.with_(stop_attention_grad=True))
    top = "h.1." if family == "gpt2" else "layers.1."
    top_mlp = [n for n in reference if top in n and any(s in n for s in ("fc1", "fc2", "final_layer_norm", "mlp", "ln_2"))]
    assert top_mlp and all(torch.allclose(stopped[n], reference[n], rtol=1e-12, atol=1e-15) for n in top_mlp)
    if family != "gpt2":
        prefix = "model.decoder.layers.0" if family == "opt" else "model.layers.0"
        for kind in ("q_proj", "k_proj"):
            assert not _changed(stopped, model, f"{prefix}.self_attn.{kind}.weight")
        v0 = f"{prefix}.self_attn.v_proj.weight"
        assert rel(stopped[v0], reference[v0]) > 1e-8  # lower layers see an incomplete gradient


@pytest.mark.parametrize("family", FAMILIES)
def test_finite_difference_backward_converges_to_exact(family):
    model = BUILDERS[family]()
    ids, attn, train = batch(seed=5)
    exact = tint_step(model, ids, attn, train, lr=LR, approximations=Approximations(backward="exact"))
    delta = exact.logits_after - exact.logits_before
    errors = []
    for scale in (30.0, 300.0, 3000.0):
        fd = tint_step(model, ids, attn, train, lr=LR, approximations=Approximations(fd_scale=scale))
        errors.append(rel(fd.logits_after - fd.logits_before, delta))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors
    # The final-LN beta gradient is the injected loss gradient itself: the finite difference cannot touch it.
    if family == "llama":
        return  # RMSNorm has no beta
    fd_params = _params_after(model, Approximations(fd_scale=30.0))
    exact_params = _params_after(model, Approximations(backward="exact"))
    beta = "model.decoder.final_layer_norm.bias" if family == "opt" else "transformer.ln_f.bias"
    assert torch.allclose(fd_params[beta], exact_params[beta], rtol=1e-12)


def test_train_token_mask_is_exact_for_a_prefix_training_part():
    model = tiny_opt()
    ids, attn, train = batch(seed=6)
    on = tint_step(model, ids, attn, train, lr=LR, approximations=Approximations(backward="exact"))
    off = tint_step(model, ids, attn, train, lr=LR,
                    approximations=Approximations(backward="exact", train_token_mask=False))
    assert rel(on.logits_after, off.logits_after) < 1e-12
    interleaved = train.clone()
    interleaved[:, 4] = 0  # a hole in the training part: TinT's descent skips token 4's gradient
    on = tint_step(model, ids, attn, interleaved, lr=LR, approximations=Approximations(backward="exact"))
    off = tint_step(model, ids, attn, interleaved, lr=LR,
                    approximations=Approximations(backward="exact", train_token_mask=False))
    assert rel(on.logits_after - on.logits_before, off.logits_after - off.logits_before) > 1e-6


@pytest.mark.parametrize("mode", ["quad", "uniform"])
def test_surrogate_loss_gradients_match_hand_formula(mode):
    """With only the final-LN beta trainable... checked through its update, -lr * sum_t dL/dy_t."""
    model = tiny_opt()
    ids, attn, train = batch(seed=7, B=1)
    params = _params_after_single(model, ids, attn, train, mode)
    with torch.no_grad():
        y = model.model.decoder(input_ids=ids).last_hidden_state[0]  # final-LN output (1 x T x d)
    U = model.lm_head.weight
    targets = train[0, 1:].bool()
    y_t = y[:-1][targets]
    target_rows = U[ids[0, 1:][targets]]
    if mode == "quad":
        grad = (y_t @ U.T) @ U - target_rows
    else:
        grad = U.mean(0) - target_rows
    beta = model.model.decoder.final_layer_norm.bias
    expected = beta - LR * grad.sum(0)
    assert rel(params["model.decoder.final_layer_norm.bias"][0], expected) < 1e-10


def _params_after_single(model, ids, attn, train, mode):
    approx = Approximations(backward="exact", loss_gradient=mode)
    return tint_step(model, ids, attn, train, lr=LR, approximations=approx, return_params=True).params


def test_sgd_update_shared_and_forward_with_params():
    model = tiny_gpt2()
    ids, _, train = batch(seed=8, B=2)
    train[:] = 1  # every token trains: a shared step on both rows (single-FT style)
    names = select_parameters(model, num_layers=1)
    shared = sgd_update(model, ids, None, train, lr=LR, num_layers=1, per_sequence=False)
    copy_model = copy.deepcopy(model)
    params = dict(copy_model.named_parameters())
    optimizer = torch.optim.SGD([params[n] for n in names], lr=LR)
    loss = F.cross_entropy(copy_model(input_ids=ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum")
    loss.backward()
    optimizer.step()
    test_ids = ids[:1, :6]
    with torch.no_grad():
        expected = copy_model(input_ids=test_ids).logits
    assert rel(forward_with_params(model, shared, test_ids), expected) < 1e-8


def test_model_is_never_modified():
    model = tiny_opt()
    model.train()
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids, attn, train = batch()
    exact_step(model, ids, attn, train, lr=LR)
    tint_step(model, ids, attn, train, lr=LR, approximations=Approximations.none())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert model.training and all(m.training for m in model.modules())


def test_unsupported_auxiliary_models_are_refused_clearly():
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4)).double()
    ids, attn, train = batch(B=1)
    with pytest.raises(UnsupportedModelError, match="not 'gpt_neox'.*exact_step"):
        tint_step(neox, ids, attn, train, lr=LR)
    exact_step(neox, ids, attn, train, lr=LR)  # true dynamic evaluation works for any HF causal LM
    post_ln = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=False))
    with pytest.raises(UnsupportedModelError, match="post-LayerNorm"):
        tint_step(post_ln, ids, attn, train, lr=LR)


def test_bad_inputs_give_clear_errors():
    model = tiny_opt()
    ids, attn, train = batch()
    with pytest.raises(ValueError, match="train_mask` is required"):
        exact_step(model, ids, attn, None, lr=LR)
    with pytest.raises(ValueError, match="shape"):
        exact_step(model, ids, attn, train[:, :-1], lr=LR)
    with pytest.raises(KeyError, match="no parameters named"):
        exact_step(model, ids, attn, train, lr=LR, params=["not.a.parameter"])
    with pytest.raises(ValueError, match="num_steps"):
        tint_step(model, ids, attn, train, lr=LR, num_steps=0)
    with pytest.raises(ValueError, match="backward"):
        Approximations(backward="taylor")


@pytest.mark.parametrize("step", [exact_step, tint_step, sgd_update])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1e-3", True])
def test_non_finite_or_non_numeric_lr_raises(step, bad):
    ids, attn, train = batch()
    with pytest.raises((ValueError, TypeError), match="lr"):
        step(tiny_opt(), ids, attn, train, lr=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "1000"])
def test_bad_fd_scale_raises(bad):
    with pytest.raises(ValueError, match="fd_scale"):
        Approximations(fd_scale=bad)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_finite_difference_step_on_half_precision_models_stays_close_to_float64(family):
    """In bfloat16, N (f(x + g/N) - f(x)) is rounding noise; the reference evaluates it in float32, so the logit
    change of a bf16 model stays within a few percent of the same step in float64."""
    model = BUILDERS[family]()
    ids, attn, train = batch(seed=3)
    reference = tint_step(model, ids, attn, train, lr=LR)
    low = tint_step(copy.deepcopy(model).to(torch.bfloat16), ids, attn, train, lr=LR)
    real = attn.bool()
    change = (reference.logits_after - reference.logits_before)[real]
    low_change = (low.logits_after - low.logits_before).double()[real]
    assert rel(low_change, change) < 0.05
