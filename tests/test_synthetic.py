"""The synthetic ICL lab: generators against hand-computed sequences, probes against independent references
(``numpy.linalg.lstsq``, gradient descent by autograd, a hand-built linear attention layer), models, training, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tint_hf.cli import console_main
from tint_hf.synthetic import (
    LinearDynamicsTask,
    LinearRegressionTask,
    LinearSelfAttentionModel,
    PlateauTask,
    build_model,
    compare_with_gd,
    fit_gd_lr,
    plateau_length,
    prefix_gd,
    prefix_ridge,
    ridge_probe_accuracy,
    self_only_mixing,
    sensitivity_cosine,
    train_on_task,
    weights_component_score,
)
from tint_hf.synthetic.experiments import (
    dynamics_experiment,
    plateau_experiment,
    plateau_task_for,
    plot,
    regression_experiment,
    summary,
)


def tensors(task, n, seed=0):
    return {k: torch.from_numpy(v) for k, v in task.batch(n, seed).items()}


# ---------------------------------------------------------------- generators


def test_regression_sequences_are_the_stated_linear_functions():
    task = LinearRegressionTask(dim=3, n_context=5)
    b = task.batch(4, seed=1)
    assert b["inputs"].shape == (4, 6, 4) and b["targets"].shape == (4, 6, 1)
    for n in range(4):
        x, w = b["inputs"][n, :, :3].astype(np.float64), b["weights"][n].astype(np.float64)
        np.testing.assert_allclose(b["targets"][n, :, 0], x @ w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b["inputs"][n, :-1, 3], x[:-1] @ w, rtol=1e-5, atol=1e-6)  # context labels
        assert b["inputs"][n, -1, 3] == 0.0  # the query's label is hidden
    assert (np.abs(b["inputs"][..., :3]) <= 1).all()
    np.testing.assert_array_equal(b["target_mask"], np.tile([0, 0, 0, 0, 0, 1], (4, 1)))


def test_regression_noise_is_on_context_labels_only():
    task = LinearRegressionTask(dim=4, n_context=50, noise_std=0.5)
    b = task.batch(64, seed=0)
    residual = b["targets"][..., 0] - np.einsum("ntd,nd->nt", b["inputs"][..., :4], b["weights"])
    assert np.abs(residual[:, -1]).max() < 1e-5  # the query's target is noiseless
    assert abs(residual[:, :-1].std() - 0.5) < 0.02


def test_dynamics_sequences_follow_their_system():
    task = LinearDynamicsTask(dim=4, length=7, noise_std=0.0, spectral_radius=0.9)
    b = task.batch(3, seed=2)
    for n in range(3):
        w, s, nxt = (b[k][n].astype(np.float64) for k in ("weights", "inputs", "targets"))
        np.testing.assert_allclose(w @ w.T, 0.81 * np.eye(4), atol=1e-6)  # 0.9 x orthogonal
        np.testing.assert_allclose(nxt, s @ w.T, atol=1e-6)
        np.testing.assert_allclose(s[1:], nxt[:-1])
    noisy = LinearDynamicsTask(dim=4, length=30, noise_std=0.1).batch(32, seed=0)
    residual = noisy["targets"] - np.einsum("nij,ntj->nti", noisy["weights"], noisy["inputs"])
    assert abs(residual.std() - 0.1) < 0.005


def test_plateau_sequences_are_encoded_values_and_permuted_labels():
    task = PlateauTask(num_values=4, n_context=6, latent_noise=0.0, input_dim=5, latent_dim=3, encoder_width=7)
    b = task.batch(16, seed=3)
    length = 2 * 6 + 1
    assert b["inputs"].shape == (16, length, 5 + 4)
    for n in range(16):
        values, labels = b["values"][n, 0::2], b["targets"][n, 0::2]
        assert (b["values"][n, 1::2] == -100).all() and (b["targets"][n, 1::2] == -100).all()
        # x tokens: the encoder written out by hand, sin(f (mu_v A + a)) B, no label part
        z = task.prototypes[values]
        by_hand = np.sin(task.encoder_frequency * (z @ task.encoder_in + task.encoder_bias)) @ task.encoder_out
        np.testing.assert_allclose(b["inputs"][n, 0::2, :5], by_hand, rtol=1e-5, atol=1e-6)
        assert (b["inputs"][n, 0::2, 5:] == 0).all() and (b["inputs"][n, 1::2, :5] == 0).all()
        # label tokens: one-hot of the label of the x token before them
        np.testing.assert_array_equal(b["inputs"][n, 1::2, 5:].argmax(-1), labels[:-1])
        np.testing.assert_array_equal(b["inputs"][n, 1::2, 5:].sum(-1), 1)
        # one permutation per sequence: equal values get equal labels
        mapping = {}
        for v, y in zip(values, labels, strict=True):
            assert mapping.setdefault(v, y) == y
        assert len(set(mapping.values())) == len(mapping)
    np.testing.assert_array_equal(b["target_mask"][0], np.arange(length) % 2 == 0)


def test_plateau_schedules_fixed_task_warmup_and_mixing():
    task = PlateauTask(num_values=5, n_context=4, fixed_warmup_examples=300)
    b = task.batch(600, seed=0)
    fixed = b["is_fixed"]
    assert fixed[:300].all() and not fixed[300:].any()
    on_x = b["values"] >= 0
    np.testing.assert_array_equal(b["targets"][:300][on_x[:300]], b["values"][:300][on_x[:300]])  # D_fix: y = v
    mixed = PlateauTask(num_values=5, n_context=4, fixed_fraction=0.3).batch(2000, seed=0)["is_fixed"]
    assert abs(mixed.mean() - 0.3) < 0.04
    assert plateau_task_for("warmup", task, 10, 0.2).fixed_warmup_examples == 10
    assert plateau_task_for("mix", task, 10, 0.2).fixed_fraction == 0.2
    assert plateau_task_for("baseline", task, 10, 0.2).fixed_warmup_examples == 0
    with pytest.raises(ValueError, match="strategy"):
        plateau_task_for("curriculum", task, 10, 0.2)


def test_streams_are_seeded_and_the_datasets_agree():
    task = LinearDynamicsTask(dim=3, length=5)
    a, b, c = task.batch(300, seed=4), task.batch(300, seed=4), task.batch(300, seed=5)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.allclose(a["inputs"], c["inputs"])
    stream = iter(task.as_iterable_dataset(seed=4))
    for i in range(300):  # across a block boundary (block = 256)
        row = next(stream)
        assert isinstance(row["inputs"], torch.Tensor)
        np.testing.assert_array_equal(row["inputs"].numpy(), a["inputs"][i])
    table = task.as_dataset(300, seed=4)
    np.testing.assert_array_equal(table[299]["weights"].numpy(), a["weights"][299])


@pytest.mark.parametrize("make, match", [
    (lambda: LinearRegressionTask(dim=0), "dim"),
    (lambda: LinearRegressionTask(noise_std=-1.0), "noise_std"),
    (lambda: LinearDynamicsTask(spectral_radius=0.0), "spectral_radius"),
    (lambda: PlateauTask(fixed_fraction=1.5), "fixed_fraction"),
    (lambda: PlateauTask(num_values=1), "num_values"),
])
def test_bad_task_parameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- probes vs independent references


def test_prefix_ridge_is_least_squares_on_each_prefix():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 9, 3)), rng.standard_normal((2, 9, 2))
    q = rng.standard_normal((2, 9, 3))
    exact = prefix_ridge(torch.tensor(x), torch.tensor(y), torch.tensor(q)).numpy()
    ridge = prefix_ridge(torch.tensor(x), torch.tensor(y), torch.tensor(q), lam=0.7).numpy()
    for n in range(2):
        for t in range(9):
            w_t = np.linalg.lstsq(x[n, :t], y[n, :t], rcond=None)[0] if t else np.zeros((3, 2))  # min-norm
            np.testing.assert_allclose(exact[n, t], q[n, t] @ w_t, atol=1e-10)
            w_r = np.linalg.solve(x[n, :t].T @ x[n, :t] + 0.7 * np.eye(3), x[n, :t].T @ y[n, :t])
            np.testing.assert_allclose(ridge[n, t], q[n, t] @ w_r, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
def test_prefix_gd_matches_gradient_descent_by_autograd(steps):
    rng = np.random.default_rng(1)
    x, y, q = (torch.tensor(rng.standard_normal((2, 6, d))) for d in (4, 2, 4))
    lr = 0.3
    ours = prefix_gd(x, y, q, lr, steps)
    for n in range(2):
        for t in range(6):
            w = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
            for _ in range(steps):
                loss = 0.5 * ((x[n, :t] @ w.T - y[n, :t]) ** 2).sum() / max(t, 1)
                (grad,) = torch.autograd.grad(loss, w)
                w = (w - lr * grad).detach().requires_grad_(True)
            torch.testing.assert_close(ours[n, t], w.detach() @ q[n, t], rtol=1e-12, atol=1e-12)


def hand_built_gd_layer(dim: int, eta: float) -> LinearSelfAttentionModel:
    """W_Q = W_K = [[I, 0], [0, 0]], W_V = [[0, 0], [0, 1]], P = eta I: one GD step from W = 0."""
    layer = LinearSelfAttentionModel(dim + 1).double()
    select_x = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)
    select_x[:dim, :dim] = torch.eye(dim)
    select_y = torch.zeros(dim + 1, dim + 1, dtype=torch.float64)
    select_y[dim, dim] = 1.0
    with torch.no_grad():
        layer.q_proj.weight.copy_(select_x)
        layer.k_proj.weight.copy_(select_x)
        layer.v_proj.weight.copy_(select_y)
        layer.out_proj.weight.copy_(eta * torch.eye(dim + 1, dtype=torch.float64))
    return layer


def test_the_gd_probe_recovers_a_hand_built_gradient_step_exactly():
    task = LinearRegressionTask(dim=5, n_context=8)
    data = {k: v.double() for k, v in tensors(task, 64).items()}
    eta = 0.37
    layer = hand_built_gd_layer(5, eta)
    x, y, mask = data["inputs"][..., :5], data["targets"], data["target_mask"]
    with torch.no_grad():
        predictions = layer(data["inputs"]).predictions
    # independent of the probe: the prediction is eta/N sum_i y_i x_i^T x_q
    by_hand = eta / 8 * torch.einsum("ni,nid,nd->n", y[:, :8, 0], x[:, :8], x[:, 8])
    torch.testing.assert_close(predictions[:, 8, 0], by_hand, rtol=1e-12, atol=1e-12)
    assert abs(fit_gd_lr(predictions, x, y, x, mask, 1) - eta) < 1e-12
    report = compare_with_gd(predictions, x, y, y, mask, steps=(1, 2))
    assert report["gd"][0]["relative_distance"] < 1e-24
    assert report["gd"][1]["relative_distance"] > 1e-4  # two steps are a different algorithm
    assert abs(sensitivity_cosine(layer, data["inputs"], x, y, 8, eta) - 1) < 1e-12
    assert report["ridge_mse"] < 1e-12  # noiseless, N = 8 > d = 5: least squares is exact (float32 data)


def test_multi_step_lr_fit_recovers_the_generating_lr():
    rng = np.random.default_rng(2)
    x, y = (torch.tensor(rng.standard_normal((4, 7, d))) for d in (3, 1))
    mask = torch.zeros(4, 7)
    mask[:, 3:] = 1
    target = prefix_gd(x, y, x, 0.21, steps=3)
    assert abs(fit_gd_lr(target, x, y, x, mask, steps=3) / 0.21 - 1) < 1e-6


def test_lsa_layer_matches_a_loop_over_tokens():
    torch.manual_seed(0)
    layer = LinearSelfAttentionModel(4, num_heads=2).double()
    e = torch.randn(2, 5, 4, dtype=torch.float64)
    out = layer(e).hidden_states
    wq, wk, wv = (m.weight.view(2, 4, 4) for m in (layer.q_proj, layer.k_proj, layer.v_proj))
    for n in range(2):
        for j in range(5):
            heads = [sum(((wv[h] @ e[n, i]) * ((wk[h] @ e[n, i]) @ (wq[h] @ e[n, j])) for i in range(j)),
                         torch.zeros(4, dtype=torch.float64)) / max(j, 1) for h in range(2)]
            torch.testing.assert_close(out[n, j], e[n, j] + layer.out_proj.weight @ torch.cat(heads))


def test_probe_accuracy_and_plateau_length_on_known_inputs():
    values = torch.randint(0, 4, (40, 6))
    assert ridge_probe_accuracy(torch.nn.functional.one_hot(values, 4).double(), values) == 1.0
    assert ridge_probe_accuracy(torch.randn(40, 6, 3), values) < 0.5
    chance = math.log(8)
    steps = list(range(0, 1000, 100))
    losses = [2.2, chance, chance, chance, 1.9, 1.0, 0.5, 0.4, 0.4, 0.4]
    assert plateau_length(steps, losses, chance) == 500  # first below (chance + 0.4) / 2 = 1.24
    assert plateau_length(steps, [chance] * 10, chance) is None
    with pytest.raises(ValueError, match="as many"):
        plateau_length(steps, losses[:-1], chance)


@pytest.mark.parametrize("backbone", ["softmax", "mesa"])
def test_self_only_mixing_cuts_the_context(backbone):
    task = PlateauTask(num_values=4, n_context=3, input_dim=6)
    torch.manual_seed(0)
    model = build_model(task, backbone, hidden_size=16, num_layers=2, num_heads=2).eval()
    data = tensors(task, 2)
    changed = data["inputs"].clone()
    changed[:, :-1] = torch.randn_like(changed[:, :-1])  # every token but the last
    with torch.no_grad():
        normal = model(data["inputs"]).hidden_states[:, -1]
        with self_only_mixing(model):
            alone = model(data["inputs"]).hidden_states[:, -1]
            alone_changed = model(changed).hidden_states[:, -1]
        after = model(changed).hidden_states[:, -1]
    torch.testing.assert_close(alone, alone_changed)  # the last token sees only itself
    assert not torch.allclose(normal, alone) and not torch.allclose(normal, after)  # hooks removed afterwards


def test_weights_component_score_probes_the_self_only_representation():
    task = PlateauTask(num_values=4, n_context=3, input_dim=6)
    torch.manual_seed(0)
    model = build_model(task, "softmax", hidden_size=16, num_layers=1, num_heads=2).eval()
    data = tensors(task, 64)
    with torch.no_grad(), self_only_mixing(model):
        hidden = model(data["inputs"]).hidden_states
    assert weights_component_score(model, data["inputs"], data["values"]) == ridge_probe_accuracy(hidden, data["values"])


# ---------------------------------------------------------------- models and training


def test_sequence_model_losses_are_the_stated_ones():
    task = PlateauTask(num_values=4, n_context=3, input_dim=6)
    torch.manual_seed(0)
    model = build_model(task, "softmax", hidden_size=16, num_layers=1, num_heads=2, weights_loss=0.1).eval()
    data = tensors(task, 3)
    out = model(data["inputs"], data["targets"], data["target_mask"], data["values"])
    logits, on_x = out.predictions, data["target_mask"].bool()
    ce = torch.nn.functional.cross_entropy(logits[on_x], data["targets"][on_x])
    aux = torch.nn.functional.cross_entropy(model.weights_head(out.hidden_states)[on_x], data["values"][on_x])
    torch.testing.assert_close(out.loss, ce + 0.1 * aux)
    with pytest.raises(ValueError, match="pass values"):
        model(data["inputs"], data["targets"], data["target_mask"])
    plain = build_model(task, "softmax", hidden_size=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="only used by a model built with weights_loss"):
        plain(data["inputs"], data["targets"], data["target_mask"], data["values"])
    with pytest.raises(ValueError, match=r"inputs must be \(batch, length, 10\)"):
        plain(data["inputs"][..., :5])
    with pytest.raises(ValueError, match="regression tasks only"):
        build_model(task, "lsa")
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_model(task, "rnn")

    dyn = LinearDynamicsTask(dim=3, length=6)
    regression = build_model(dyn, "mesa", hidden_size=16, num_layers=1, num_heads=2)
    d = tensors(dyn, 2)
    mask = torch.zeros(2, 6)
    mask[:, 2:] = 1
    out = regression(d["inputs"], d["targets"], mask)
    by_hand = ((out.predictions - d["targets"]) ** 2)[:, 2:].mean()
    torch.testing.assert_close(out.loss, by_hand)
    with pytest.raises(ValueError, match="selects no position"):
        regression(d["inputs"], d["targets"], torch.zeros(2, 6))


def test_trainer_lowers_the_loss_and_probes_on_schedule():
    task = LinearRegressionTask(dim=4, n_context=8)
    torch.manual_seed(0)
    model = build_model(task, "lsa")
    data = tensors(task, 256, seed=99)
    with torch.no_grad():
        before = float(model(data["inputs"], data["targets"], data["target_mask"]).loss)
    history = train_on_task(model, task, steps=60, batch_size=64, lr=1e-2, probe_every=20, progress=False,
                            probe=lambda m: {"loss": float(m(data["inputs"], data["targets"], data["target_mask"]).loss)})
    assert [p["step"] for p in history["probes"]] == [0, 20, 40, 60]
    assert history["probes"][0]["loss"] == pytest.approx(before)
    assert history["probes"][-1]["loss"] < 0.7 * before
    assert not model.training


def test_experiments_run_small_and_summarise(tmp_path):
    reg = regression_experiment(seeds=(0,), steps=3, batch_size=8, eval_examples=16, progress=False,
                                task=LinearRegressionTask(dim=3, n_context=4))
    assert {g["steps"] for g in reg["runs"][0]["gd"]} == {1, 2, 3}
    dyn = dynamics_experiment(models=(("softmax", 1), ("mesa", 1)), seeds=(0,), steps=2, batch_size=4,
                              hidden_size=16, eval_examples=8, progress=False,
                              task=LinearDynamicsTask(dim=3, length=25))
    assert len(dyn["runs"]) == 2 and len(dyn["runs"][1]["mse_by_position"]) == 25
    plat = plateau_experiment(seeds=(0,), steps=4, batch_size=4, hidden_size=16, warmup_steps_fixed=2,
                              probe_every=2, eval_examples=16, progress=False,
                              task=PlateauTask(num_values=4, n_context=3, input_dim=6))
    assert [r["strategy"] for r in plat["runs"]] == ["baseline", "warmup", "mix", "weights_loss"]
    assert [p["step"] for p in plat["runs"][0]["probes"]] == [0, 2, 4]
    for result in (reg, dyn, plat):
        assert summary(result).startswith("|")
        json.dumps(result)
        plot(result, tmp_path / f"{result['experiment']}.png")
        assert (tmp_path / f"{result['experiment']}.png").stat().st_size > 0


def test_cli_writes_json_and_table_and_refuses_misplaced_options(tmp_path, capsys):
    out = tmp_path / "syn"
    assert console_main(["synthetic", "regression", "--seeds", "0", "--steps", "3", "--batch-size", "8",
                         "--out", str(out), "--no-plot", "--quiet"]) == 0
    result = json.loads((out / "regression.json").read_text())
    assert result["arguments"]["steps"] == 3 and result["runs"][0]["seed"] == 0
    assert (out / "regression.md").read_text() == summary(result)
    assert console_main(["synthetic", "regression", "--models", "mesa:1", "--out", str(out), "--no-plot"]) == 2
    assert "--models applies to the dynamics experiment only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        console_main(["synthetic", "dynamics", "--models", "lstm:2"])
