"""Cost of the single-FT variant in one TinT pass against explicit single-FT dynamic evaluation, in the same run.

    python bench/tint_single.py                     # OPT-125M shapes, random weights, CPU
    python bench/tint_single.py --device cuda

A batch of B zero-shot prompts (Lq tokens each) after k demonstrations (Ld tokens each), as the evaluation's tint
mode runs it: the demonstrations packed as segments in front of every prompt (``segment_ids``). Timed: the TinT
pass returning every position's logits (``logits_to_keep=0``), the same pass returning the prompts' logits only (the
output pass then skips the demonstrations), and explicit dynamic evaluation (``sgd_update`` on the k demonstration
rows, one step on their summed loss, then a forward of the prompts with the updated weights). Ratios are to the last.
Then the train-once split that the evaluation uses since one demonstration set serves every batch: ``tint.adapt``
on the packed demonstrations (once per set) and ``tint(prompts, adaptation=...)`` (per batch), against the per-batch
part of dynamic evaluation (the prompts' forward with the updated weights). Last, single-FT with the query in the
training part (the TinT authors' context loss), per batch as the evaluation's modes run it: TinT adds each prompt's
own step to the demonstrations' (``adapt(..., add_to=)``), dynamic evaluation adds each prompt's true SGD step.
"""

from __future__ import annotations

import argparse

import torch
from common import median_time, opt_125m_config
from transformers import OPTForCausalLM

from tint_hf import TinTForCausalLM
from tint_hf.evaluation.modes import Batch, DynamicSGD, TinTForward
from tint_hf.simulate import forward_with_params, sgd_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--demos", type=int, default=4, help="k demonstrations")
    parser.add_argument("--demo-len", type=int, default=24, help="tokens per demonstration")
    parser.add_argument("--batch", type=int, default=16, help="prompts per batch")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    torch.manual_seed(0)
    aux = OPTForCausalLM(opt_125m_config()).to(args.device).eval()
    tint = TinTForCausalLM.from_auxiliary(aux, num_prefixes=256, inner_lr=args.lr).to(args.device)

    def randint(*shape):
        return torch.randint(3, aux.config.vocab_size, shape, device=args.device)

    demos, prompts = randint(args.demos, args.demo_len), randint(args.batch, args.prompt_len)
    packed = torch.cat([demos.flatten()[None].expand(args.batch, -1), prompts], dim=1)
    segments = torch.arange(args.demos + 1, device=args.device).repeat_interleave(
        torch.tensor([args.demo_len] * args.demos + [args.prompt_len], device=args.device))[None].expand_as(packed)
    train = (segments < args.demos).long()

    @torch.no_grad()
    def tint_pass(keep: int) -> torch.Tensor:
        return tint(packed, None, train, segment_ids=segments, logits_to_keep=keep).logits

    def dynamic() -> torch.Tensor:
        params = sgd_update(aux, demos, None, torch.ones_like(demos), lr=args.lr, per_sequence=False)
        with torch.no_grad():
            return forward_with_params(aux, params, prompts)

    @torch.no_grad()
    def adapt():
        return tint.adapt(packed[:1, : -args.prompt_len], segment_ids=segments[:1, : -args.prompt_len])

    adaptation = adapt()
    params = sgd_update(aux, demos, None, torch.ones_like(demos), lr=args.lr, per_sequence=False)

    @torch.no_grad()
    def predict() -> torch.Tensor:
        return tint(prompts, adaptation=adaptation).logits

    @torch.no_grad()
    def dynamic_predict() -> torch.Tensor:
        return forward_with_params(aux, params, prompts)

    full = tint_pass(0)[:, -args.prompt_len:]
    assert torch.allclose(tint_pass(args.prompt_len), full, atol=1e-4, rtol=1e-4)
    assert torch.allclose(predict(), full, atol=1e-4, rtol=1e-4)
    timings = {
        "TinT pass, every position's logits": median_time(lambda: tint_pass(0), args.device, args.repeats),
        "TinT pass, prompts' logits only": median_time(lambda: tint_pass(args.prompt_len), args.device, args.repeats),
        "dynamic evaluation (sgd_update + forward)": median_time(dynamic, args.device, args.repeats),
    }
    per_batch = {
        "TinT adapt (once per demonstration set)": median_time(adapt, args.device, args.repeats),
        "TinT forward(adaptation=...) (per batch)": median_time(predict, args.device, args.repeats),
        "dynamic: forward with updated weights": median_time(dynamic_predict, args.device, args.repeats),
    }
    # The TinT authors' single-FT context loss also trains on the query: per batch, each prompt's own step is added
    # to the demonstrations' (TinT: adapt(..., add_to=); dynamic: the same sum of true SGD steps), as the
    # evaluation's modes run it. The prompts' first prompt_len - 1 tokens train, the last one is scored.
    demo_rows = Batch(demos, torch.ones_like(demos), torch.ones_like(demos), torch.zeros_like(demos))
    query_train = torch.ones_like(prompts)
    query_train[:, -1] = 0
    queries = Batch(prompts, torch.ones_like(prompts), query_train, torch.zeros_like(prompts))
    tint_mode = TinTForward(tint, args.lr, demonstrations=demo_rows)
    dynamic_mode = DynamicSGD(aux, args.lr, demonstrations=demo_rows)
    tint_mode.adaptation(), dynamic_mode.demonstrations_step()  # the once-per-set part, as in the evaluation
    with torch.no_grad():
        one_pass = tint(packed, None, (train.bool() | torch.cat([torch.zeros_like(packed[:, :-args.prompt_len]),
                                                                  query_train], 1).bool()).long(),
                        segment_ids=segments, logits_to_keep=args.prompt_len).logits
    assert torch.allclose(tint_mode.logits(queries), one_pass, atol=1e-4, rtol=1e-4)
    with_query = {
        "TinT: query step added + forward (per batch)": median_time(lambda: tint_mode.logits(queries), args.device,
                                                                    args.repeats),
        "dynamic: query step added + forward (per batch)": median_time(lambda: dynamic_mode.logits(queries),
                                                                       args.device, args.repeats),
    }
    baseline = timings["dynamic evaluation (sgd_update + forward)"]
    print(f"OPT-125M shapes, fp32, device={args.device}, threads={torch.get_num_threads()}: k={args.demos} x "
          f"{args.demo_len} demonstration tokens, B={args.batch} prompts x {args.prompt_len} tokens, lr={args.lr}")
    for name, seconds in timings.items():
        print(f"  {name:<44} {seconds:7.2f} s   {seconds / baseline:5.2f}x dynamic")
    print("train once, predict many:")
    for name, seconds in per_batch.items():
        print(f"  {name:<44} {seconds:7.2f} s   {seconds / baseline:5.2f}x dynamic, "
              f"{seconds / per_batch['dynamic: forward with updated weights']:5.2f}x its per-batch forward")
    print("single-FT with the query in the training part (the authors' TinT context loss), per batch:")
    reference = with_query["dynamic: query step added + forward (per batch)"]
    for name, seconds in with_query.items():
        print(f"  {name:<50} {seconds:7.2f} s   {seconds / reference:5.2f}x dynamic with the query, "
              f"{seconds / args.batch * 1000:7.1f} ms per prompt")


if __name__ == "__main__":
    main()
