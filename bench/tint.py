"""TinT cost against explicit dynamic evaluation, measured in the same run.

    python bench/tint.py                                   # OPT-125M shapes, random weights, T=256 and 1024, CPU
    python bench/tint.py --device cuda --seq-lens 1024

For each T: one TinT forward (and one with ``return_logits_before=True``, the extra output pass of the un-updated
model) (1 simulated SGD step on the top 12 layers, train fraction 0.5, B=1, fp32) and
``tint_hf.simulate.exact_step`` (forward + backward + SGD update + forward with autograd), each in a fresh worker
process so that its peak memory (CPU: max RSS; GPU: max allocated) is its own. Also: construction time from the
auxiliary model and the safetensors checkpoint size.

Reference (authors' implementation, H100, fp32, B=1, T=1024): 1.53 s per forward, 5.8 GiB activation peak on top of
6.7 GB of weights, about 24x an explicit forward+backward+update+forward. Target here: TinT <= 3x exact_step,
checkpoint <= 1 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import median_time, opt_125m_config
from transformers import OPTForCausalLM

from tint_hf import TinTForCausalLM
from tint_hf.simulate import exact_step


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def worker(args: argparse.Namespace) -> None:
    """Time one method at one length; print a JSON line with seconds and peak memory."""
    torch.manual_seed(0)
    aux = OPTForCausalLM(opt_125m_config()).to(args.device).eval()
    ids = torch.randint(0, aux.config.vocab_size, (1, args.seq_len), device=args.device)
    train = torch.zeros_like(ids)
    train[:, : args.seq_len // 2] = 1
    result = {}
    if args.worker in ("tint", "tint_before"):
        start = time.perf_counter()
        tint = TinTForCausalLM.from_auxiliary(aux, num_prefixes=256, inner_lr=args.lr)
        result["construction_s"] = time.perf_counter() - start
        del aux
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

        @torch.no_grad()
        def run() -> None:
            tint(ids, None, train, return_logits_before=args.worker == "tint_before")
    else:
        def run() -> None:
            exact_step(aux, ids, None, train, lr=args.lr)
    result["seconds"] = median_time(run, args.device, args.repeats)
    result["peak_gib"] = peak_memory_gib(args.device)
    print(json.dumps(result))


def spawn(method: str, seq_len: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--seq-len", str(seq_len), "--device", args.device,
           "--repeats", str(args.repeats), "--lr", str(args.lr)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def checkpoint_size_gb() -> float:
    with torch.device("cpu"):
        tint = TinTForCausalLM.from_auxiliary(OPTForCausalLM(opt_125m_config()), num_prefixes=256)
    with tempfile.TemporaryDirectory() as tmp:
        tint.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--worker", choices=["tint", "tint_before", "exact"], help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"OPT-125M shapes, random weights, fp32, B=1, device={args.device}, threads={torch.get_num_threads()}")
    print(f"checkpoint (safetensors): {checkpoint_size_gb():.3f} GB")
    print(f"{'T':>6} {'TinT s':>8} {'exact s':>8} {'TinT/exact':>11} {'+before/exact':>14} {'TinT peak GiB':>14} "
          f"{'exact peak GiB':>15} {'build s':>8}")
    for T in args.seq_lens:
        tint, before, exact = spawn("tint", T, args), spawn("tint_before", T, args), spawn("exact", T, args)
        print(f"{T:>6} {tint['seconds']:>8.2f} {exact['seconds']:>8.2f} {tint['seconds'] / exact['seconds']:>11.2f} "
              f"{before['seconds'] / exact['seconds']:>14.2f} {tint['peak_gib']:>14.2f} {exact['peak_gib']:>15.2f} "
              f"{tint['construction_s']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
