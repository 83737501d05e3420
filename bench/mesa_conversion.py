"""Converting layers of a real pretrained model to mesa layers (tint_hf.conversion), with controls, over seeds.

    python bench/mesa_conversion.py --model assets/smollm2-135m --layers 26-29 22-29 --runs cg gd zero \
        --seeds 0 1 2 --out outputs/mesa_conversion
    python bench/mesa_conversion.py ... --runs exact --seeds 0 --out outputs/mesa_conversion   # adds to the same study

Text: the shipped State of the Union addresses, split by year: the model trains on the addresses whose heading does
not start with --held-out (default 1961 and 1962, Kennedy) and is scored on those that do (1964, Johnson), in
--block-size blocks. Runs, for every layer set and seed:

* ``cg`` / ``gd`` / ``exact``: the mesa conversion with that solver (``gd`` is gated linear attention), stages init,
  calibrate, transfer (--transfer-steps), finetune (--finetune-steps of LoRA + KL on the converted layers'
  attention projections);
* ``cg-mlp`` (any solver + ``-mlp``): the same conversion with LoRA on the converted layers' feed-forward projections;
* ``cg+window``: the within-layer hybrid (``mesa_window = --window``): softmax over the last W tokens, the mesa layer
  over the older ones; ``window``: the window-only control (softmax over the last W tokens, nothing older), both
  through the same stages;
* ``zero``: the removed-attention control: the original model with those layers' attention output set to zero,
  fine-tuned with the same token budget (--transfer-steps + --finetune-steps LoRA + KL steps, same rank and lr) on
  the same layers' feed-forward projections (the only trainable place left in them);
* ``original``: the original model fine-tuned the same way with its attention intact: what the fine-tuning gains
  from the training text alone (the held-out addresses share its domain).

Held-out perplexity after each stage and next-token NLL by position band of each final model, and whether it uses
context more than 64 tokens back: at 32 positions past 128 in every held-out block, the NLL with only the last 64
tokens visible minus the NLL with the whole block ("gain from > 64 back"; zero for a model that cannot look further).
With --tasks (e.g. ``SST2 MR CR Subj AGNews AmazonPolarity``, stand-ins from ``bash scripts/fetch_eval_assets.sh``),
also each final model's zero-shot accuracy on those tasks, as ``tint-hf eval --modes icl --shots 0 --n-eval N
--calibration C`` computes it (LoLCATs' zero-shot retention; C = --task-calibration, default icl_sfc: uncalibrated,
SmolLM2 is near chance on several stand-ins).
Every finished run is a record of the run store in --out (records.jsonl, run.json: :mod:`tint_hf.runstore`), so an
interrupted study continues and a rerun with other study settings, another model or other text is refused;
results.json (rewritten after every run) collects them,
results.md holds mean +- std over seeds, nll_by_position.png the NLL by position.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tint_hf.commands.arguments import at_least  # noqa: E402
from tint_hf.conversion import ConversionSettings, convert, decoder_layers, finetune, perplexity  # noqa: E402
from tint_hf.conversion_results import KINDS, LABELS, STAGES, mean_std, paired, stage_table  # noqa: E402
from tint_hf.evaluation import (  # noqa: E402
    FewShotConfig,
    FewShotEvaluator,
    ModeConfig,
    address_split,
    get_task,
    load_examples,
)
from tint_hf.evaluation.scoring import CALIBRATIONS  # noqa: E402
from tint_hf.runstore import RunStore, fingerprint_json, fingerprint_model, fingerprint_tensors, versions  # noqa: E402

RECORD = Path(__file__).resolve().parents[1] / "tint_hf" / "data" / "results" / "mesa_conversion.json"
STUDY_ARGUMENTS = ("model", "held_out", "transfer_steps", "finetune_steps", "cg_steps", "block_size", "batch_size",
                   "eval_blocks", "window")  # runs recorded under other values of these cannot share one results.json
TASK_ARGUMENTS = ("tasks", "task_examples", "task_calibration")  # study settings too, recorded only when --tasks is given


@torch.no_grad()
def nll_by_position(model, blocks: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(T - 1,) mean next-token NLL at each position over ``blocks`` (N, T)."""
    total = torch.zeros(blocks.shape[1] - 1, dtype=torch.float64)
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.mT, batch[:, 1:], reduction="none").double().sum(0)
    return total / len(blocks)


WINDOW = 64  # context_gain: how many tokens of context the windowed prediction sees
GAIN_TARGETS = range(128, 255, 4)  # ... at these positions t (predicting token t + 1): 32 per block, all past 128


@torch.no_grad()
def context_gain(model, blocks: torch.Tensor, nll: torch.Tensor) -> dict:
    """What context more than WINDOW tokens back is worth to ``model``: at positions ``GAIN_TARGETS`` of every block
    (N, T), the mean next-token NLL when only the last WINDOW tokens are visible (each target re-scored on its own
    window) minus the NLL with the whole block (``nll``, (T - 1,) from :func:`nll_by_position`, same targets)."""
    targets = torch.tensor(list(GAIN_TARGETS))
    # (P, WINDOW + 1) per block: tokens t - WINDOW + 1 .. t + 1, so the logits at -2 predict token t + 1
    index = targets[:, None] + torch.arange(-WINDOW + 1, 2)[None]
    total = 0.0
    for block in blocks:
        windows = block[index]
        logits = model(windows).logits[:, -2].float()
        total += F.cross_entropy(logits, windows[:, -1], reduction="sum").item()
    windowed = total / (len(blocks) * len(targets))
    full = float(nll[targets].mean())
    return {"window": WINDOW, "windowed": windowed, "full": full, "gain": windowed - full}


def zero_shot(model, tokenizer, tasks: list[str], data_dir: Path, n_eval: int, calibration: str) -> dict[str, float]:
    """Zero-shot accuracy per task, as ``tint-hf eval --modes icl --shots 0 --n-eval n_eval --calibration
    calibration`` computes it (template 0, the same test examples)."""
    config = FewShotConfig(shots=(0,), seeds=(1,), n_eval=n_eval, calibration=calibration, progress=False)
    evaluator = FewShotEvaluator(model, tokenizer, config)
    accuracy = {}
    for name in tasks:
        task = get_task(name)
        train, test = (load_examples(task, split, data_dir=data_dir) for split in ("train", "eval"))
        accuracy[name] = evaluator.evaluate_task(task, train, test, [ModeConfig("icl")]).runs[0]["accuracy"]
    return accuracy


def final_scores(model, blocks: torch.Tensor, batch_size: int, downstream=None) -> dict:
    """``nll`` by position (:func:`nll_by_position`) and ``context`` (:func:`context_gain`) of a model on ``blocks``,
    and ``zero_shot`` (``downstream(model)``: :func:`zero_shot` with the study's tasks) when there are tasks."""
    nll = nll_by_position(model, blocks, batch_size)
    scores = {"nll": nll, "context": context_gain(model, blocks, nll)}
    if downstream is not None:
        scores["zero_shot"] = downstream(model)
    return scores


def zeroed_attention(model, layers):
    """Forward hooks that set the chosen layers' attention output to zero (the removed-attention control)."""
    return [decoder_layers(model)[i].self_attn.register_forward_hook(
        lambda module, args, output: (torch.zeros_like(output[0]),) + tuple(output[1:])) for i in layers]


def bands(nll: torch.Tensor) -> dict:
    """Mean NLL over position bands 1-16, 17-64, 65-128, 129-end."""
    edges = [(0, 16), (16, 64), (64, 128), (128, len(nll))]
    return {f"{lo + 1}-{hi}": float(nll[lo:hi].mean()) for lo, hi in edges if hi > lo}


def layer_set(text: str) -> list[int]:
    """``26-29`` or ``26,27,28,29`` -> [26, 27, 28, 29]."""
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(x) for x in text.split(",")]


def layer_key(layers: list[int]) -> str:
    """[26, 27, 28, 29] -> ``26-29`` (a contiguous range), else ``1,5``: the layer set's name in results.json."""
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def run_control(teacher, layers: list[int], train: torch.Tensor, evaluation: torch.Tensor, args, seed: int,
                zero: bool, initial: float, downstream=None) -> dict:
    """The original model, its attention in ``layers`` zeroed or not, fine-tuned with the conversion's token budget
    on those layers' feed-forward projections (see the module docstring); ``initial``: its perplexity before, as
    already measured for the references."""
    control = copy.deepcopy(teacher)
    if zero:
        zeroed_attention(control, layers)
    record = {"init": initial}
    torch.manual_seed(seed)
    control, _ = finetune(control, teacher, train, args.transfer_steps + args.finetune_steps, 5e-4,
                          batch_size=args.batch_size, seed=seed, progress=False, layers=layers, target="mlp")
    record["finetune"] = perplexity(control, evaluation, args.batch_size)
    return {"perplexity": record, **final_scores(control, evaluation, args.batch_size, downstream)}


def run_mesa(teacher, layers: list[int], train, evaluation, args, kind: str, seed: int, folder: Path,
             downstream=None) -> dict:
    windowed = kind == "window" or kind.endswith("+window")
    solver, _, target = ("cg" if kind == "window" else kind.removesuffix("+window")).partition("-")
    mesa = dict(mesa_solver=solver, cg_steps=args.cg_steps)
    if windowed:
        mesa.update(mesa_window=args.window, mesa_window_only=kind == "window")
    settings = ConversionSettings(mesa_layers=layers, mesa=mesa,
                                  transfer_steps=args.transfer_steps, finetune_steps=args.finetune_steps,
                                  batch_size=args.batch_size, seed=seed, lora_target=target or "attention")
    student = convert(teacher, train, folder, settings, eval_blocks=evaluation, progress=False)
    record = json.loads((folder / "stages.json").read_text())
    return {"perplexity": {stage: facts["perplexity"] for stage, facts in record["stages"].items()},
            **final_scores(student, evaluation, args.batch_size, downstream)}


COMPARISONS = (("cg", "gd"), ("cg", "zero"), ("exact", "cg"), ("cg+window", "window"), ("cg+window", "zero"),
               ("cg+window", "cg"))  # (run, against): paired by seed in the report


def paired_differences(result: dict, layers: str) -> list[str]:
    """One line per pair of ``COMPARISONS``: the final perplexity and context gain of ``run`` minus ``against``,
    seed by seed (same batches), mean +- std over the seeds both have."""
    lines = []
    for kind, against in COMPARISONS:
        diff = paired(result, layers, kind, against)
        if not diff["perplexity"]:
            continue
        line = f"* {LABELS[kind]} minus {LABELS[against]}, paired by seed: final perplexity " \
               f"{mean_std(diff['perplexity'], 2)} ({len(diff['perplexity'])} seeds)"
        if diff["gain"]:
            line += f", gain from > {WINDOW} back {mean_std(diff['gain'], 3)} ({len(diff['gain'])} seeds)"
        lines.append(line)
    return lines


def zero_shot_table(result: dict, layers: str) -> list[str]:
    """Zero-shot accuracy (%) per task and their mean, mean +- std over seeds, for the references and every run that
    has it (none: no lines)."""
    rows = [(name, [facts]) for name, facts in result["references"][layers].items()]
    rows += [(LABELS[kind], [r for r in result["runs"] if r["layers"] == layers and r["run"] == kind]) for kind in KINDS]
    rows = [(name, [r["zero_shot"] for r in runs if "zero_shot" in r]) for name, runs in rows]
    rows = [(name, scores) for name, scores in rows if scores]
    if not rows:
        return []
    tasks = list(rows[0][1][0])
    lines = [f"Zero-shot accuracy (%), layers {layers}:", "", f"| model | seeds | {' | '.join(tasks)} | mean |",
             "|---" * (len(tasks) + 3) + "|"]
    for name, scores in rows:
        cells = [mean_std([100 * s[t] for s in scores], 1) for t in tasks]
        cells.append(mean_std([100 * statistics.mean(s.values()) for s in scores], 1))
        lines.append(f"| {name} | {len(scores)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def report(result: dict, out: Path) -> None:
    """results.md (mean +- std over seeds per layer set and run) and nll_by_position.png."""
    lines = []
    for layers, reference in result["references"].items():
        lines += [f"Layers {layers}:", "",
                  "| model | seeds | init | calibrate | transfer | finetune | NLL 1-16 | 17-64 | 65-128 | 129-end | "
                  f"gain from > {WINDOW} back | minutes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, facts in reference.items():
            gain = f"{facts['context']['gain']:.3f}" if "context" in facts else ""
            lines.append(f"| {name} | | {facts['perplexity']:.2f} | | | | "
                         + " | ".join(f"{v:.3f}" for v in facts["bands"].values()) + f" | {gain} | |")
        for kind in KINDS:
            runs = [r for r in result["runs"] if r["layers"] == layers and r["run"] == kind]
            if not runs:
                continue
            label = LABELS[kind]
            cells = [stage_table(result, layers)[label][stage] for stage in STAGES]
            cells += [mean_std([r["bands"][b] for r in runs], 3) for b in runs[0]["bands"]]
            gains = [r["context"]["gain"] for r in runs if "context" in r]
            cells.append(mean_std(gains, 3) + (f" ({len(gains)} seeds)" if 0 < len(gains) < len(runs) else ""))
            lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells)
                         + f" | {statistics.mean(r['seconds'] for r in runs) / 60:.1f} |")
        lines += ["", *paired_differences(result, layers), "", *zero_shot_table(result, layers)]
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sets = list(result["references"])
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    window = 16
    smooth = torch.ones(window) / window
    for ax, layers in zip(axes[0], sets):
        curves = {name: facts["nll"] for name, facts in result["references"][layers].items()}
        for kind in KINDS:
            runs = [r for r in result["runs"] if r["layers"] == layers and r["run"] == kind]
            if runs:
                curves[kind] = torch.tensor([r["nll"] for r in runs]).mean(0).tolist()
        for name, nll in curves.items():
            values = torch.nn.functional.conv1d(torch.tensor(nll)[None, None], smooth[None, None])[0, 0]
            ax.plot(range(window, window + len(values)), values, label=name)
        ax.axvline(64, color="grey", lw=0.5)
        ax.set(title=f"SmolLM2 layers {layers} converted", xlabel="position", ylabel=f"NLL ({window}-token mean)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "nll_by_position.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", nargs="+", required=True, help="layer sets, e.g. 26-29 22-29 or 26,27,28,29")
    parser.add_argument("--runs", nargs="+", default=["cg", "gd", "zero"], choices=KINDS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--held-out", default="1964", help="heading prefix of the held-out addresses")
    parser.add_argument("--transfer-steps", type=int, default=40)
    parser.add_argument("--finetune-steps", type=int, default=30)
    parser.add_argument("--cg-steps", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--eval-blocks", type=int, default=0, help="score this many held-out blocks (0: all)")
    parser.add_argument("--window", type=int, default=64, help="W of the cg+window and window runs (LoLCATs: 64)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="stand-in tasks for each final model's zero-shot accuracy (default: none)")
    parser.add_argument("--task-examples", type=at_least(1), default=200, help="test examples per task (--n-eval)")
    parser.add_argument("--task-calibration", default="icl_sfc", choices=CALIBRATIONS,
                        help="calibration of the zero-shot scores (tint-hf eval's --calibration)")
    parser.add_argument("--data-dir", type=Path, default=Path("assets/eval_data"), help="the stand-ins' folder")
    parser.add_argument("--out", type=Path, default=Path("outputs/mesa_conversion"))
    parser.add_argument("--record", action="store_true",
                        help="also write results.json to tint_hf/data/results/mesa_conversion.json, the study the "
                             "mesa-smollm2-135m model card quotes")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's stage checkpoints (0.5 GB each for SmolLM2; default: only stages.json)")
    args = parser.parse_args()
    for name in args.tasks or ():
        try:
            get_task(name)
        except KeyError as error:
            parser.error(f"--tasks: {error.args[0]}")
    if args.block_size <= GAIN_TARGETS[-1] + 1:
        parser.error(f"--block-size {args.block_size}: the context gain scores positions up to {GAIN_TARGETS[-1]}; "
                     f"use at least {GAIN_TARGETS[-1] + 2}.")

    teacher = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    try:
        train, evaluation, kept, held = address_split(tokenizer, args.held_out, args.block_size)
    except ValueError as error:
        raise SystemExit(f"--held-out: {error}") from error
    evaluation = evaluation[: args.eval_blocks or None]
    store = RunStore(args.out, "records.jsonl", fresh_start="use another --out")
    study = STUDY_ARGUMENTS + (TASK_ARGUMENTS if args.tasks else ())
    store.check_settings({name: getattr(args, name) for name in study})
    store.check_provenance("versions", versions())
    store.check_provenance("teacher", fingerprint_model(teacher))
    store.check_provenance("blocks", fingerprint_tensors([("train", train), ("eval", evaluation)]))
    downstream = None
    if args.tasks:
        for name in args.tasks:
            task = get_task(name)
            store.check_provenance(f"data/{name}", fingerprint_json(
                [[[e.text, e.label] for e in load_examples(task, split, data_dir=args.data_dir)]
                 for split in ("train", "eval")]))
        downstream = functools.partial(zero_shot, tokenizer=tokenizer, tasks=args.tasks, data_dir=args.data_dir,
                                       n_eval=args.task_examples, calibration=args.task_calibration)
    facts = {"study": {name: str(getattr(args, name)) for name in study}, "train": kept, "held_out": held,
             "train_tokens": train.numel(), "eval_tokens": evaluation.numel()}

    def results() -> dict:
        """results.json: the study's facts, the references per layer set and every finished run."""
        records = store.records.values()
        return {**facts, "references": {r["layers"]: r["references"] for r in records if r["key"].startswith("ref|")},
                "runs": [{k: v for k, v in r.items() if k != "key"} for r in records if r["key"].startswith("run|")]}

    def put(key: str, record: dict) -> None:
        store.put(key, record)
        (args.out / "results.json").write_text(json.dumps(results(), indent=1) + "\n")
        if args.record:
            shutil.copyfile(args.out / "results.json", RECORD)

    for layers in map(layer_set, args.layers):
        key = layer_key(layers)
        if f"ref|{key}" in store:
            continue
        references = {}
        for name, zero in (("teacher", False), ("attention zeroed, untrained", True)):
            handles = zeroed_attention(teacher, layers) if zero else []
            scores = final_scores(teacher, evaluation, args.batch_size, downstream)
            nll = scores.pop("nll")
            references[name] = {"perplexity": float(nll.mean().exp()), "bands": bands(nll), "nll": nll.tolist(),
                                **scores}
            for handle in handles:
                handle.remove()
        put(f"ref|{key}", {"layers": key, "references": references})
    for seed in args.seeds:
        for layers in map(layer_set, args.layers):
            key = layer_key(layers)
            for kind in args.runs:
                if f"run|{key}|{kind}|{seed}" in store:
                    continue
                start = time.perf_counter()
                if kind in ("zero", "original"):
                    reference = "attention zeroed, untrained" if kind == "zero" else "teacher"
                    run = run_control(teacher, layers, train, evaluation, args, seed, zero=kind == "zero",
                                      initial=store.get(f"ref|{key}")["references"][reference]["perplexity"],
                                      downstream=downstream)
                else:
                    folder = args.out / f"L{key}-{kind}-seed{seed}"
                    run = run_mesa(teacher, layers, train, evaluation, args, kind, seed, folder, downstream)
                    if not args.keep_checkpoints:
                        for stage in folder.iterdir():
                            if stage.is_dir():
                                shutil.rmtree(stage)
                nll = run.pop("nll")
                run.update(layers=key, run=kind, seed=seed, seconds=time.perf_counter() - start, bands=bands(nll),
                           nll=nll.tolist())
                put(f"run|{key}|{kind}|{seed}", run)
                print(key, kind, seed, {k: round(v, 2) for k, v in run["perplexity"].items()},
                      f"{run['seconds']:.0f} s", flush=True)
    result = results()
    report(result, args.out)


if __name__ == "__main__":
    main()
