"""Peak memory of one evaluation batch in the icl and tint modes, each in its own process (peak RSS is per process).

    python bench/tint_memory.py                      # OPT-125M shapes, random weights, B=16 prompts of 40 tokens
    python bench/tint_memory.py --budget-gib 2       # the tint mode split to fit a 2 GiB budget for per-row updates

The zero-shot TinT cell of the authors' protocol trains every prompt on its own tokens (the query), so each row holds
its own update (factors over the shared prefixes) and its step's activations (``TinTForCausalLM.step_bytes_per_row``);
the tint mode splits a batch into calls that fit its memory budget (default: half the free memory). Printed: peak RSS
of the icl batch (the plain auxiliary model), of the tint batch, and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, torch
sys.path.insert(0, {bench!r})
from common import opt_125m_config
from transformers import OPTForCausalLM
from tint_hf import TinTForCausalLM
from tint_hf.evaluation.modes import Batch, PlainLM, TinTForward
torch.manual_seed(0)
aux = OPTForCausalLM(opt_125m_config()).eval()
ids = torch.randint(3, aux.config.vocab_size, ({batch}, {length}))
train = torch.ones_like(ids)
train[:, -1] = 0
batch = Batch(ids, torch.ones_like(ids), train, torch.zeros_like(ids))
if {mode!r} == "tint":
    tint = TinTForCausalLM.from_auxiliary(aux, inner_lr=1e-5)
    mode = TinTForward(tint, 1e-5, memory_budget={budget})
    rows = mode.rows_per_call({batch}, {length})
else:
    mode, rows = PlainLM(aux), {batch}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    mode.logits(batch, logits_from={length} - 1)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(before_gib=before / 2**20, peak_gib=peak / 2**20, rows_per_call=rows)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--budget-gib", type=float, default=None, help="tint mode's budget (default: half the free)")
    args = parser.parse_args()
    budget = None if args.budget_gib is None else int(args.budget_gib * 2**30)
    bench = str(Path(__file__).resolve().parent)
    results = {}
    for mode in ("icl", "tint"):
        code = CHILD.format(bench=bench, batch=args.batch, length=args.length, mode=mode, budget=budget)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"OPT-125M shapes, fp32, B={args.batch} prompts x {args.length} tokens, each training on its own tokens "
          f"but the last (zero-shot TinT with the query); tint budget: "
          f"{'half the free memory' if budget is None else f'{args.budget_gib} GiB'}")
    for mode, r in results.items():
        print(f"  {mode:5s} peak RSS {r['peak_gib']:6.2f} GiB (model and inputs built: {r['before_gib']:5.2f} GiB), "
              f"rows per call {r['rows_per_call']}")
    print(f"  tint / icl peak: {results['tint']['peak_gib'] / results['icl']['peak_gib']:.2f}x")


if __name__ == "__main__":
    main()
