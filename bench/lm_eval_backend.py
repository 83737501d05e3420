"""Per-request time and peak memory of the ``tint-hf`` lm-eval model against lm-eval's ``--model hf``, same run.

    python bench/lm_eval_backend.py                          # SmolLM2-135M, SST2 stand-in, 0 and 4 shots, 16 docs
    python bench/lm_eval_backend.py --shots 0 32 --docs 8 --tasks SST2 MR CR Subj AGNews AmazonPolarity

Each (mode, shots) runs in its own process (peak RSS is per process): lm-eval's ``simple_evaluate`` on the tasks
exported from the stand-in data (``export_lm_eval_task``; ``--docs`` random test documents each, the demonstrations of
seed 1, lm-eval's ``first_n`` sampler), batch 8; the time excludes loading (and, for tint, building TinT from the
model, printed separately). Printed: seconds per request (over all tasks) and peak RSS for hf, icl, dynamic and tint,
their ratios to hf measured in the same run, and each task's accuracy. Needs ``bash scripts/fetch_eval_assets.sh`` and the lm-eval
extra.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, time, torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained({model!r})
start = time.perf_counter()
if {mode!r} == "hf":
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
else:
    from tint_hf.evaluation.lm_eval_models import AdaptiveLM
    extra = {{}} if {mode!r} == "icl" else dict(inner_lr=1e-4, layers=12)
    if {mode!r} == "tint" and {budget!r} is not None:
        extra["tint_memory_gib"] = {budget!r}
    lm = AdaptiveLM(model, mode={mode!r}, tokenizer=tokenizer, batch_size=8, **extra)
built = time.perf_counter() - start
start = time.perf_counter()
out = simple_evaluate(model=lm, tasks={names!r}, num_fewshot={shots}, limit={docs}, log_samples=True,
                      task_manager=TaskManager(include_path={tasks!r}))
seconds = time.perf_counter() - start
requests = sum(len(s["filtered_resps"]) for name in {names!r} for s in out["samples"][name])
print(json.dumps(dict(seconds=seconds, requests=requests, built=built,
                      acc={{name: out["results"][name]["acc,none"] for name in {names!r}}},
                      peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""


def export(folder: Path, data: Path, docs: int, shots: int, name: str) -> str:
    """Export the stand-in task ``name`` as the lm-eval task ``bench_<name>`` into ``folder``; returns that name."""
    from tint_hf.evaluation import get_task, load_examples
    from tint_hf.evaluation.lm_eval_compat import export_lm_eval_task
    from tint_hf.evaluation.sampling import sample_demonstrations

    task = get_task(name)
    train, test = load_examples(task, "train", data_dir=data), load_examples(task, "eval", data_dir=data)
    test = random.Random(0).sample(test, docs)
    demos = [train[i] for i in sample_demonstrations([e.label for e in train], shots, seed=1,
                                                     num_classes=task.num_classes)] if shots else []
    export_lm_eval_task(folder, f"bench_{name.lower()}", task, 0, demos, test)
    return f"bench_{name.lower()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "assets" / "smollm2-135m")
    parser.add_argument("--data", type=Path, default=ROOT / "assets" / "eval_data")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["hf", "icl", "dynamic", "tint"])
    parser.add_argument("--tasks", nargs="+", default=["SST2"], help="stand-in tasks (names as tint-hf eval's)")
    parser.add_argument("--tint-memory-gib", type=float, default=None,
                        help="the tint mode's budget for steps taken together (default: half the free memory)")
    args = parser.parse_args()
    from tint_hf.evaluation import get_task

    for name in args.tasks:
        try:
            get_task(name)
        except KeyError as error:
            parser.error(f"--tasks: {error.args[0]}")
    missing = [name for name in args.tasks if not (args.data / name).is_dir()]
    if not (args.model / "config.json").exists() or missing:
        raise SystemExit(f"No model at {args.model} or stand-ins {missing} in {args.data}: run "
                         "bash scripts/fetch_eval_assets.sh")
    print(f"| shots | mode | s / request | x hf | peak RSS GiB | x hf | {' | '.join(args.tasks)} | mean | "
          "load (+ TinT build) s |")
    print("|---" * (8 + len(args.tasks)) + "|")
    for shots in args.shots:
        tasks = Path(tempfile.mkdtemp())
        names = [export(tasks, args.data, args.docs, shots, name) for name in args.tasks]
        rows = {}
        for mode in args.modes:
            code = CHILD.format(model=str(args.model), mode=mode, shots=shots, docs=args.docs, tasks=str(tasks),
                                names=names, budget=args.tint_memory_gib)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        base = rows.get("hf")
        for mode, r in rows.items():
            per = r["seconds"] / r["requests"]
            ratio = f"{per / (base['seconds'] / base['requests']):.2f}" if base else "-"
            mem = f"{r['peak_gib'] / base['peak_gib']:.2f}" if base else "-"
            accuracies = [r["acc"][name] for name in names]
            print(f"| {shots} | {mode} | {per:.3f} | {ratio} | {r['peak_gib']:.2f} | {mem} | "
                  f"{' | '.join(f'{a:.3f}' for a in accuracies)} | {sum(accuracies) / len(accuracies):.3f} | "
                  f"{r['built']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
