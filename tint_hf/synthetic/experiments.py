"""The three experiments of ``tint-hf synthetic``, each returning a JSON-ready dict (and :func:`plot` / :func:`summary`
turning it into figures and a markdown table).

* :func:`regression_experiment`: one linear self-attention layer trained on in-context linear regression, compared
  with K steps of gradient descent at the fitted learning rate and with least squares (von Oswald et al. 2023).
* :func:`dynamics_experiment`: softmax transformers of several depths vs mesa-layer models on linear dynamical
  systems, next-state MSE by position against least squares on the observed prefix.
* :func:`plateau_experiment`: the plateau task trained as is and with the three strategies of Fu et al. 2024
  (D_fix warm-up, D_fix mixed into D_rnd, the auxiliary weights loss): plateau length and the weights-component
  score over training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

from .._optional import require
from .models import build_model, task_loss
from .probes import (
    compare_with_gd,
    plateau_length,
    prefix_ridge,
    ridge_probe_accuracy,
    sensitivity_cosine,
    weights_component_score,
)
from .tasks import LinearDynamicsTask, LinearRegressionTask, PlateauTask, SyntheticTask
from .train import train_on_task

EVAL_SEED = 10_000  # evaluation streams: a seed no training run uses
PLATEAU_STRATEGIES = ("baseline", "warmup", "mix", "weights_loss")


def _tensors(task: SyntheticTask, n: int, seed: int = EVAL_SEED) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in task.batch(n, seed).items()}


def _mean_std(values: Sequence[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def regression_experiment(seeds: Sequence[int] = (0, 1, 2), steps: int = 8000, batch_size: int = 256,
                          lr: float = 1e-3, gd_steps: Sequence[int] = (1, 2, 3), eval_examples: int = 2000,
                          task: LinearRegressionTask | None = None, progress: bool = True) -> dict:
    """Per seed: train one LSA layer; on ``eval_examples`` fresh tasks, its query MSE, the fitted GD learning rate
    and ``relative_distance`` to K-step GD for K in ``gd_steps``, the cosine of the query sensitivities (vs one step)
    and least squares' MSE."""
    task = task or LinearRegressionTask()
    data = _tensors(task, eval_examples)
    x, y, mask = data["inputs"][..., : task.dim], data["targets"], data["target_mask"]
    runs = []
    for seed in seeds:
        set_seed(seed)
        model = build_model(task, "lsa")
        start = time.perf_counter()
        history = train_on_task(model, task, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
        with torch.no_grad():
            predictions = model(data["inputs"]).predictions
        report = compare_with_gd(predictions, x, y, y, mask, steps=gd_steps)
        report["sensitivity_cosine_1step"] = sensitivity_cosine(model, data["inputs"], x, y, task.n_context,
                                                                report["gd"][0]["lr"], 1)
        runs.append({"seed": seed, "seconds": time.perf_counter() - start, **report, **history})
    return {"experiment": "regression", "task": task.describe(), "steps": steps, "batch_size": batch_size, "lr": lr,
            "eval_examples": eval_examples, "runs": runs}


def _mse_by_position(predictions: torch.Tensor, targets: torch.Tensor) -> list[float]:
    return (predictions.double() - targets.double()).pow(2).mean(dim=(0, 2)).tolist()


def dynamics_experiment(models: Sequence[tuple[str, int]] = (("softmax", 1), ("softmax", 2), ("softmax", 4),
                                                              ("mesa", 1), ("mesa", 2)),
                        seeds: Sequence[int] = (0, 1, 2), steps: int = 1500, batch_size: int = 64, lr: float = 1e-3,
                        hidden_size: int = 64, cg_steps: int = 10, eval_examples: int = 1000,
                        task: LinearDynamicsTask | None = None, progress: bool = True) -> dict:
    """Per (backbone, layers) and seed: train; next-state MSE by position on fresh systems, the parameter count and
    the relative distance of the predictions to least squares on the prefix (``prefix_ridge`` with lam=0)."""
    task = task or LinearDynamicsTask()
    data = _tensors(task, eval_examples)
    least_squares = prefix_ridge(data["inputs"], data["targets"], data["inputs"])
    runs = []
    for backbone, layers in models:
        for seed in seeds:
            set_seed(seed)
            model = build_model(task, backbone, hidden_size=hidden_size, num_layers=layers, cg_steps=cg_steps)
            start = time.perf_counter()
            history = train_on_task(model, task, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                    progress=progress)
            with torch.no_grad():
                predictions = model(data["inputs"]).predictions.double()
            runs.append({"backbone": backbone, "layers": layers, "seed": seed,
                         "parameters": sum(p.numel() for p in model.parameters()),
                         "seconds": time.perf_counter() - start,
                         "mse": float(task_loss(predictions, data["targets"], data["target_mask"], True)),
                         "mse_by_position": _mse_by_position(predictions, data["targets"]),
                         "relative_distance_to_least_squares": float(
                             (predictions - least_squares).pow(2).sum() / least_squares.pow(2).sum()),
                         **history})
    return {"experiment": "dynamics", "task": task.describe(), "steps": steps, "batch_size": batch_size, "lr": lr,
            "hidden_size": hidden_size, "cg_steps": cg_steps, "eval_examples": eval_examples,
            "least_squares_mse_by_position": _mse_by_position(least_squares, data["targets"]),
            "zero_prediction_mse_by_position": _mse_by_position(torch.zeros_like(least_squares), data["targets"]),
            "runs": runs}


def plateau_task_for(strategy: str, task: PlateauTask, warmup_examples: int, mix_fraction: float) -> PlateauTask:
    """The training stream of ``strategy``: D_rnd; D_fix for the first ``warmup_examples``; or D_fix mixed in."""
    if strategy not in PLATEAU_STRATEGIES:
        raise ValueError(f"strategy must be one of {PLATEAU_STRATEGIES}, got {strategy!r}.")
    if strategy == "warmup":
        return replace(task, fixed_fraction=0.0, fixed_warmup_examples=warmup_examples)
    return replace(task, fixed_fraction=mix_fraction if strategy == "mix" else 0.0, fixed_warmup_examples=0)


def plateau_experiment(strategies: Sequence[str] = PLATEAU_STRATEGIES, seeds: Sequence[int] = (0, 1, 2),
                       steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, num_layers: int = 2,
                       hidden_size: int = 64, warmup_steps_fixed: int = 300, mix_fraction: float = 0.2,
                       weights_loss: float = 0.1, probe_every: int = 50, eval_examples: int = 512,
                       task: PlateauTask | None = None, progress: bool = True) -> dict:
    """Per strategy and seed: train a softmax transformer, probing every ``probe_every`` steps on fresh D_rnd
    sequences (in-context loss and query accuracy, weights-component score); the plateau length of the in-context
    loss curve with the plateau at chance, ``ln(num_values)``. The warm-up's D_fix steps count as training steps."""
    task = task or PlateauTask()
    evaluation = replace(task, fixed_fraction=0.0, fixed_warmup_examples=0)
    data = _tensors(evaluation, eval_examples)
    chance = math.log(task.num_values)
    input_probe = ridge_probe_accuracy(data["inputs"][..., : task.input_dim], data["values"])

    def probe(model) -> dict:
        with torch.no_grad():
            logits = model(data["inputs"]).predictions
        query_hit = logits[:, -1].argmax(-1) == data["targets"][:, -1]
        return {"icl_loss": float(task_loss(logits, data["targets"], data["target_mask"], False)),
                "query_accuracy": float(query_hit.double().mean()),
                "weights_component": weights_component_score(model, data["inputs"], data["values"])}

    runs = []
    for strategy in strategies:
        stream = plateau_task_for(strategy, task, warmup_steps_fixed * batch_size, mix_fraction)
        aux = weights_loss if strategy == "weights_loss" else 0.0
        columns = ("inputs", "targets", "target_mask") + (("values",) if aux else ())
        for seed in seeds:
            set_seed(seed)
            model = build_model(stream, "softmax", hidden_size=hidden_size, num_layers=num_layers, weights_loss=aux)
            start = time.perf_counter()
            history = train_on_task(model, stream, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                    probe=probe, probe_every=probe_every, progress=progress, columns=columns)
            curve = history["probes"]
            runs.append({"strategy": strategy, "seed": seed, "seconds": time.perf_counter() - start,
                         "plateau_length": plateau_length([p["step"] for p in curve], [p["icl_loss"] for p in curve],
                                                          chance),
                         "final": curve[-1], **history})
    summary = {s: _mean_std([r["plateau_length"] for r in runs if r["strategy"] == s]) for s in strategies}
    return {"experiment": "plateau", "task": task.describe(), "steps": steps, "batch_size": batch_size, "lr": lr,
            "num_layers": num_layers, "hidden_size": hidden_size, "warmup_steps_fixed": warmup_steps_fixed,
            "mix_fraction": mix_fraction, "weights_loss": weights_loss, "chance_loss": chance,
            "input_linear_probe": input_probe,
            "plateau_length": summary, "runs": runs}


def summary(result: dict) -> str:
    """A markdown table of an experiment's result (means +- std over seeds)."""
    runs, kind = result["runs"], result["experiment"]
    if kind == "regression":
        lines = ["| quantity | mean ± std over seeds |", "|---|---|"]
        rows = [("LSA query MSE", [r["model_mse"] for r in runs]), ("least squares MSE", [r["ridge_mse"] for r in runs])]
        for i, gd in enumerate(runs[0]["gd"]):
            k = gd["steps"]
            rows += [(f"GD {k} step(s): fitted lr", [r["gd"][i]["lr"] for r in runs]),
                     (f"GD {k} step(s): MSE", [r["gd"][i]["gd_mse"] for r in runs]),
                     (f"GD {k} step(s): relative distance to LSA", [r["gd"][i]["relative_distance"] for r in runs])]
        rows.append(("cosine of query sensitivities (1 step)", [r["sensitivity_cosine_1step"] for r in runs]))
        lines += [f"| {name} | {np.mean(v):.4g} ± {np.std(v):.2g} |" for name, v in rows]
    elif kind == "dynamics":
        lines = ["| model | parameters | MSE (all positions) | MSE at t=5 | t=20 | last | dist. to least squares |",
                 "|---|---|---|---|---|---|---|"]
        for key in dict.fromkeys((r["backbone"], r["layers"]) for r in runs):
            group = [r for r in runs if (r["backbone"], r["layers"]) == key]
            by_pos = np.array([r["mse_by_position"] for r in group])
            cell = [f"{m:.2e} ± {s:.1e}" for m, s in zip(by_pos.mean(0)[[4, 19, -1]], by_pos.std(0)[[4, 19, -1]],
                                                           strict=True)]
            lines.append(f"| {key[0]} x{key[1]} | {group[0]['parameters']} | "
                         f"{np.mean([r['mse'] for r in group]):.2e} ± {np.std([r['mse'] for r in group]):.1e} | "
                         f"{' | '.join(cell)} | {np.mean([r['relative_distance_to_least_squares'] for r in group]):.3f} |")
        ls = result["least_squares_mse_by_position"]
        lines.append(f"| least squares on the prefix | - | {np.mean(ls):.2e} | {ls[4]:.2e} | {ls[19]:.2e} | "
                     f"{ls[-1]:.2e} | 0 |")
    else:
        lines = ["| strategy | plateau length (steps) | runs that left the plateau | final in-context loss | "
                 "final query accuracy | final weights-component score |", "|---|---|---|---|---|---|"]
        for strategy, length in result["plateau_length"].items():
            group = [r for r in runs if r["strategy"] == strategy]
            final = {k: [r["final"][k] for r in group] for k in ("icl_loss", "query_accuracy", "weights_component")}
            shown = "-" if length["mean"] is None else f"{length['mean']:.0f} ± {length['std']:.0f}"
            lines.append(f"| {strategy} | {shown} | {length['n']}/{len(group)} | "
                         + " | ".join(f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in final.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Two panels per experiment. Regression: training loss per seed, and the relative distance of the LSA layer to
    K-step GD by K. Dynamics: training loss, and next-state MSE by position (log scale) against least squares.
    Plateau: the probed in-context loss (chance dashed) and the weights-component score over training, mean over
    seeds."""
    matplotlib = require("matplotlib", "plot", "tint-hf synthetic's plots (or pass --no-plot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, kind = result["runs"], result["experiment"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels: dict[str, int] = {}  # one colour per model (dynamics) or seed (regression), every seed drawn
    for run in runs:
        if kind == "plateau":
            break
        label = f"seed {run['seed']}" if kind == "regression" else f"{run['backbone']} x{run['layers']}"
        first = label not in labels
        colour = f"C{labels.setdefault(label, len(labels))}"
        axes[0].plot([p["step"] for p in run["train_loss"]], [p["loss"] for p in run["train_loss"]], color=colour,
                     label=label if first else None, alpha=0.7)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    if kind == "regression":
        ks = [g["steps"] for g in runs[0]["gd"]]
        for run in runs:
            axes[1].plot(ks, [g["relative_distance"] for g in run["gd"]], "o-", label=f"seed {run['seed']}")
        axes[1].set_xlabel("GD steps K (learning rate fitted)")
        axes[1].set_ylabel("|LSA - GD|^2 / |GD|^2")
        axes[1].set_yscale("log")
    elif kind == "dynamics":
        for key in dict.fromkeys((r["backbone"], r["layers"]) for r in runs):
            curves = np.array([r["mse_by_position"] for r in runs if (r["backbone"], r["layers"]) == key])
            axes[1].plot(range(1, curves.shape[1] + 1), curves.mean(0), label=f"{key[0]} x{key[1]}")
        ls = result["least_squares_mse_by_position"]
        axes[1].plot(range(1, len(ls) + 1), ls, "k--", label="least squares")
        axes[1].set_xlabel("position t")
        axes[1].set_ylabel("next-state MSE")
        axes[1].set_yscale("log")
    else:
        for strategy in dict.fromkeys(r["strategy"] for r in runs):
            group = [r["probes"] for r in runs if r["strategy"] == strategy]
            steps = [p["step"] for p in group[0]]
            for ax, key in zip(axes, ("icl_loss", "weights_component"), strict=True):
                ax.plot(steps, np.mean([[p[key] for p in g] for g in group], axis=0), label=strategy)
        axes[0].axhline(result["chance_loss"], color="grey", linestyle="dashed")
        axes[0].set_ylabel("in-context loss on D_rnd (probe)")
        axes[0].set_yscale("linear")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("weights-component score")
    for ax in axes:
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["PLATEAU_STRATEGIES", "dynamics_experiment", "plateau_experiment", "plateau_task_for", "plot",
           "regression_experiment", "summary"]
