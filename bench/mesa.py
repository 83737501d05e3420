"""Cost of one mesa layer against SDPA softmax attention measured in the same run, and the decoding state size.

    python bench/mesa.py                                   # CPU quick default: B=1, T=512, 12 heads, d=64
    python bench/mesa.py --device cuda --batch 8 --seq-len 2048     # the OPT-125m training shape
    python bench/mesa.py --device cuda --compile --tf32             # + torch.compile'd rows, TF32 matmuls
    python bench/mesa.py --baseline-rev HEAD~3                      # + the op as it was at a git revision

For each solver (exact, cg, cg1, gd) of the pure-PyTorch chunked form (and fla's kernel when installed, on CUDA),
the median time of a forward (no grad) and of forward + backward of the op alone, on normalised q/k, random v,
gates and lambda = 1, divided by causal SDPA on the same q/k/v. Mesa ops keep float32 states; inputs are bf16 on
CUDA, fp32 on CPU. ``--compile`` adds a row per solver for ``torch.compile(chunk_mesa, fullgraph=True)`` (the op,
implicit backward included, traces as one graph); ``--tf32`` lets CUDA float32 matmuls use TF32 tensor cores
(off by default, as in the reference run). ``--baseline-rev REV`` adds a row per solver for ``chunk_mesa`` as
committed at git revision REV (its mesa op file loaded on its own), to compare implementations in one run.

Reference (H100, B=8, T=2048, 12 heads, d=64, bf16): fla mesa 0.69 ms fwd / 2.34 ms fwd+bwd, SDPA 0.15 / 0.73 ms,
a naive PyTorch chunked CG (unrolled autograd) 39 / 178 ms. Target for the pure-PyTorch path: within 10x of fla.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import median_time

from tint_hf.ops import SOLVERS, chunk_mesa, fla_available, fla_chunk_mesa


def make_inputs(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    gen = torch.Generator(device=args.device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen, device=args.device)

    return dict(
        q=F.normalize(randn(*shape), dim=-1).to(dtype), k=F.normalize(randn(*shape), dim=-1).to(dtype),
        v=randn(*shape).to(dtype), lam=torch.ones(args.heads, args.head_dim, device=args.device),
        g=F.logsigmoid(4 + randn(*shape[:3])), beta=torch.sigmoid(randn(*shape[:3])),
    )


def chunk_mesa_at(revision: str) -> Callable:
    """``chunk_mesa`` of the mesa op file as committed at a git revision (tint_hf/models/mesa/mesa_op.py; before
    that tint_hf/ops/mesa.py, and before that tint_hf/models/mesa_opt/mesa_layer.py)."""
    repo = Path(__file__).resolve().parents[1]
    for op_file in ("tint_hf/models/mesa/mesa_op.py", "tint_hf/ops/mesa.py", "tint_hf/models/mesa_opt/mesa_layer.py"):
        shown = subprocess.run(["git", "show", f"{revision}:{op_file}"], cwd=repo, capture_output=True, text=True)
        if shown.returncode == 0 and "def chunk_mesa(" in shown.stdout:
            source = shown.stdout
            break
    else:
        raise SystemExit(f"No mesa op (chunk_mesa) at revision {revision}.")
    path = Path(tempfile.mkdtemp()) / "mesa_layer_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mesa_layer_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.chunk_mesa


def time_op(fn, inputs: dict[str, torch.Tensor], device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of fn(**inputs) without grad, and of fn(**inputs).sum().backward() w.r.t. q, k, v, g, beta."""
    with torch.no_grad():
        forward = median_time(lambda: fn(**inputs), device, repeats=repeats)
    leaves = {name: t.detach().requires_grad_(name != "lam") for name, t in inputs.items()}
    backward = median_time(lambda: fn(**leaves).float().sum().backward(), device, repeats=repeats)
    return forward, backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CUDA, 1 on CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 on CUDA, 512 on CPU")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--cg-steps", type=int, default=30)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd chunk_mesa per solver")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for CUDA float32 matmuls")
    parser.add_argument("--baseline-rev", default=None, help="also time chunk_mesa as of this git revision")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (8 if cuda else 1)
    args.seq_len = args.seq_len or (2048 if cuda else 512)
    repeats = args.repeats or (10 if cuda else 3)
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    inputs = make_inputs(args, dtype)
    print(f"device={args.device} B={args.batch} T={args.seq_len} heads={args.heads} d={args.head_dim} "
          f"cg_steps={args.cg_steps} chunk={args.chunk_size} inputs={dtype} threads={torch.get_num_threads()} "
          f"tf32={args.tf32 and cuda}")

    def sdpa(q, k, v, **_):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    rows = [("SDPA causal softmax", *time_op(sdpa, inputs, args.device, repeats))]
    baseline = chunk_mesa_at(args.baseline_rev) if args.baseline_rev else None
    for solver in args.solvers:
        def mesa(q, k, v, lam, g, beta, solver=solver, op=chunk_mesa):
            return op(q, k, v, lam, g, beta, solver=solver, cg_steps=args.cg_steps, chunk_size=args.chunk_size)[0]

        if baseline is not None:
            def old(q, k, v, lam, g, beta, solver=solver):
                return mesa(q, k, v, lam, g, beta, solver=solver, op=baseline)

            rows.append((f"mesa torch {solver} @ {args.baseline_rev}", *time_op(old, inputs, args.device, repeats)))
        rows.append((f"mesa torch {solver}", *time_op(mesa, inputs, args.device, repeats)))
        if args.compile:
            compiled = torch.compile(mesa, fullgraph=True)
            rows.append((f"mesa torch {solver} (compiled)", *time_op(compiled, inputs, args.device, repeats)))
    if cuda and fla_available():
        def fla(q, k, v, lam, g, beta):
            return fla_chunk_mesa(q, k, v, lam, g, beta, cg_steps=args.cg_steps)[0]

        rows.append(("mesa fla cg", *time_op(fla, inputs, args.device, repeats)))

    sdpa_fwd, sdpa_bwd = rows[0][1:]
    print("\n| op | fwd (ms) | fwd+bwd (ms) | fwd / SDPA | fwd+bwd / SDPA |\n|---|---|---|---|---|")
    for name, fwd, bwd in rows:
        print(f"| {name} | {fwd * 1e3:.2f} | {bwd * 1e3:.2f} | {fwd / sdpa_fwd:.1f} | {bwd / sdpa_bwd:.1f} |")

    # Decoding memory per sequence and layer: a fixed (H, S) state in float32 vs a KV cache growing per token.
    d, heads = args.head_dim, args.heads
    mesa_state = heads * 2 * d * d * 4
    linear_state = heads * d * d * 4
    kv_per_token = heads * 2 * d * torch.finfo(dtype).bits // 8
    print(f"\ndecoding state per sequence and layer: mesa (H, S) fp32 = {mesa_state / 1024:.0f} KiB for any length "
          f"({linear_state / 1024:.0f} KiB for gd: S only); softmax KV cache ({dtype}) = {kv_per_token} B per token, "
          f"so mesa's state equals the KV cache of {mesa_state // kv_per_token} tokens; "
          f"at T={args.seq_len}: mesa {mesa_state / args.seq_len:.0f} B per token vs KV {kv_per_token} B per token")


if __name__ == "__main__":
    main()
