"""The one scorer in every mode, against independent references: the plain HF forward, tint_hf.simulate.exact_step,
torch.optim.SGD on a copy of the model, TinTForCausalLM, and hand-computed calibration / metric values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_gpt2

from tint_hf import TinTForCausalLM
from tint_hf.evaluation import (
    DynamicSGD,
    Example,
    PlainLM,
    PromptBuilder,
    TinTForward,
    calibrate,
    candidate_log_probs,
    classification_metrics,
    get_task,
)
from tint_hf.evaluation.modes import MIN_SHARED_PREFIX, Batch, pad_rows, shared_prefix_length
from tint_hf.simulate import Approximations, exact_step

DEMOS = [Example("a fine film .", 1), Example("so dull and long", 0), Example("great fun", 1), Example("awful", 0)]
QUERIES = ["a warm story", "badly acted and far too long to sit through", "fun", "i loved every minute of it"]
LR = 3e-2


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(vocab_size=50257, n_positions=128)


def prompts(tokenizer, train_on_query=False, task="MR", template=0, demos=DEMOS):
    builder = PromptBuilder(tokenizer, get_task(task).template(template), train_on_query=train_on_query)
    return builder, [builder.example_context(demos, q) for q in QUERIES]


def score(mode, builder, contexts, batch_size=8):
    return candidate_log_probs(mode, contexts, builder.candidates, batch_size=batch_size, pad_id=50256,
                               progress=False)


def reference_log_prob(logits: torch.Tensor, start: int, candidate) -> float:
    """sum_j log p(w_j | ...) from full-sequence logits (1, T, V), candidate tokens starting at position start + 1."""
    log_probs = torch.log_softmax(logits[0], -1)
    return sum(log_probs[start + j, w].item() for j, w in enumerate(candidate))


def test_multi_token_candidates_match_the_plain_hf_model(model, gpt2_tokenizer):
    builder, contexts = prompts(gpt2_tokenizer, task="AGNews", template=2, demos=[])
    assert max(len(c) for c in builder.candidates) > 1  # "Science and technology" is several tokens
    scores = score(PlainLM(model), builder, contexts, batch_size=3)
    for n, ctx in enumerate(contexts):
        for c, cand in enumerate(builder.candidates):
            ids = torch.tensor([ctx.input_ids + cand])
            expected = reference_log_prob(model(ids).logits, len(ctx.input_ids) - 1, cand)
            assert scores[n, c].item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("make", [lambda m: PlainLM(m), lambda m: DynamicSGD(m, LR)], ids=["icl", "dynamic"])
def test_batching_with_padding_equals_batch_size_one(model, gpt2_tokenizer, make):
    builder, contexts = prompts(gpt2_tokenizer, train_on_query=True)  # every prompt gets its own update
    one = score(make(model), builder, contexts, batch_size=1)
    padded = score(make(model), builder, contexts, batch_size=4)
    assert len({len(c.input_ids) for c in contexts}) > 1
    rows = pad_rows([(c.input_ids, c.train_mask, c.label_mask) for c in contexts], 0)
    assert shared_prefix_length(rows.input_ids, rows.attention_mask) > MIN_SHARED_PREFIX  # the demos run once
    torch.testing.assert_close(padded, one, rtol=0, atol=1e-10)


def test_dynamic_with_zero_lr_equals_icl(model, gpt2_tokenizer):
    builder, contexts = prompts(gpt2_tokenizer, train_on_query=True)
    icl = score(PlainLM(model), builder, contexts)
    torch.testing.assert_close(score(DynamicSGD(model, 0.0), builder, contexts), icl, rtol=0, atol=1e-12)
    assert (score(DynamicSGD(model, LR), builder, contexts) - icl).abs().max() > 1e-3


@pytest.mark.parametrize("label_loss", [False, True], ids=["context-loss", "label-loss"])
@pytest.mark.parametrize("train_on_query", [False, True], ids=["demos", "demos+query"])
def test_dynamic_equals_exact_step_on_each_prompt(model, gpt2_tokenizer, label_loss, train_on_query):
    builder, contexts = prompts(gpt2_tokenizer, train_on_query=train_on_query)
    scores = score(DynamicSGD(model, LR, num_steps=2, num_layers=1, label_loss=label_loss), builder, contexts)
    for n, ctx in enumerate(contexts):
        ids = torch.tensor([ctx.input_ids])
        loss_mask = torch.tensor([ctx.label_mask]) if label_loss else None
        out = exact_step(model, ids, None, torch.tensor([ctx.train_mask]), loss_mask, lr=LR, num_steps=2, num_layers=1)
        for c, cand in enumerate(builder.candidates):
            expected = reference_log_prob(out.logits_after, len(ctx.input_ids) - 1, cand)
            assert scores[n, c].item() == pytest.approx(expected, abs=1e-10)


def test_single_ft_variant_equals_torch_sgd_then_zero_shot(model, gpt2_tokenizer):
    """Each demonstration its own row, one SGD step on the summed loss of all rows, then zero-shot prompts."""
    from tint_hf.evaluation import FewShotConfig, FewShotEvaluator, ModeConfig

    evaluator = FewShotEvaluator(model, gpt2_tokenizer, FewShotConfig(progress=False))
    builder = PromptBuilder(gpt2_tokenizer, get_task("MR").template(0))
    queries = [Example(q, 0) for q in QUERIES]
    raw, _ = evaluator.score(ModeConfig("dynamic", lrs=(LR,), variant="single"), LR, builder, DEMOS, queries, "t")

    tuned = copy.deepcopy(model)
    trained = [p for n, p in tuned.named_parameters() if n.startswith(("transformer.h.", "transformer.ln_f."))]
    optimizer = torch.optim.SGD(trained, lr=LR)
    loss = 0.0
    for demo in DEMOS:
        ids = torch.tensor([gpt2_tokenizer.encode(builder.demonstration(demo))])
        loss = loss + torch.nn.functional.cross_entropy(tuned(ids).logits[0, :-1], ids[0, 1:], reduction="sum")
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        for n, text in enumerate(QUERIES):
            ctx = builder.example_context([], text)
            logits = tuned(torch.tensor([ctx.input_ids])).logits
            for c, cand in enumerate(builder.candidates):
                expected = reference_log_prob(logits, len(ctx.input_ids) - 1, cand)
                assert raw[n, c].item() == pytest.approx(expected, abs=1e-10)


def test_tint_mode_agrees_with_dynamic_in_the_tint_approximation_setting(model, gpt2_tokenizer):
    tint = TinTForCausalLM.from_auxiliary(model, num_prefixes=8, inner_lr=LR)
    approx = Approximations(**tint.config.approximation_kwargs())
    for label_loss in (False, True):
        builder, contexts = prompts(gpt2_tokenizer, train_on_query=True)
        via_tint = score(TinTForward(tint, LR, label_loss), builder, contexts, batch_size=3)
        simulated = score(DynamicSGD(model, LR, label_loss=label_loss, approximations=approx), builder, contexts)
        exact = score(DynamicSGD(model, LR, label_loss=label_loss), builder, contexts)
        icl = score(PlainLM(model), builder, contexts)
        torch.testing.assert_close(via_tint, simulated, rtol=0, atol=1e-8)
        change = (simulated - icl).abs().max()
        assert change > 1e-4 and (exact - simulated).abs().max() < 0.5 * change  # TinT approximates SGD


def test_tint_single_variant_agrees_with_dynamic_single_in_the_tint_approximation_setting(model, gpt2_tokenizer):
    """Single-FT: TinT packs the demonstrations as separate segments in front of each zero-shot prompt; that must
    equal one approximate step on the summed loss of the separate demonstrations (the rows' tint_step changes
    summed), then the zero-shot prompt with the updated weights."""
    from tint_hf.evaluation import FewShotConfig, FewShotEvaluator, ModeConfig

    tint = TinTForCausalLM.from_auxiliary(model, num_prefixes=8, inner_lr=LR)
    approx = Approximations(**tint.config.approximation_kwargs())
    evaluator = FewShotEvaluator(model, gpt2_tokenizer, FewShotConfig(progress=False, batch_size=3), tint_model=tint)
    builder = PromptBuilder(gpt2_tokenizer, get_task("MR").template(0))
    queries = [Example(q, 0) for q in QUERIES]
    for loss in ("context", "label"):
        def run(mode, loss=loss, **kwargs):
            config = ModeConfig(mode, lrs=(LR,), loss=loss, **kwargs)
            return evaluator.score(config, LR, builder, DEMOS, queries, "t")[0]

        via_tint = run("tint", variant="single")
        simulated = run("dynamic", variant="single", approximations=approx)
        exact = run("dynamic", variant="single")
        zero_shot = score(PlainLM(model), builder, [builder.example_context([], q) for q in QUERIES])
        torch.testing.assert_close(via_tint, simulated, rtol=0, atol=1e-8)
        change = (simulated - zero_shot).abs().max()
        assert change > 1e-4 and (exact - simulated).abs().max() < 0.5 * change  # TinT approximates SGD


def test_shared_prefix_length_by_hand():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 9, 1], [5, 6, 7, 8, 2]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert shared_prefix_length(ids, attention) == 3
    assert shared_prefix_length(ids[[0, 2]], attention[[0, 2]]) == 3  # row 0 keeps one token of its own
    assert shared_prefix_length(ids[[1, 2]], attention[[1, 2]]) == 3


def test_tint_mode_rejects_a_plain_model(model):
    with pytest.raises(TypeError, match="takes no `train_mask`"):
        TinTForward(model)


def test_calibration_formulas_against_hand_computed_values():
    scores = torch.tensor([[-1.0, -2.0], [math.log(0.6), math.log(0.4)]], dtype=torch.float64)
    torch.testing.assert_close(calibrate(scores, "none"), scores)
    sfc = calibrate(scores, "icl_sfc", torch.tensor([-0.5, -2.5]))
    torch.testing.assert_close(sfc, torch.tensor([[-0.5, 0.5], [math.log(0.6) + 0.5, math.log(0.4) + 2.5]],
                                                 dtype=torch.float64))
    # Zhao et al.: p_cf = mean of the content-free label distributions (0.8, 0.2) and (0.6, 0.4) = (0.7, 0.3).
    reference = torch.tensor([[math.log(0.8), math.log(0.2)], [math.log(0.6) + 3.0, math.log(0.4) + 3.0]])
    contextual = calibrate(scores, "contextual", reference)
    p0 = [math.exp(-1) / (math.exp(-1) + math.exp(-2)), math.exp(-2) / (math.exp(-1) + math.exp(-2))]
    expected = torch.tensor([[math.log(p0[0] / 0.7), math.log(p0[1] / 0.3)],
                             [math.log(0.6 / 0.7), math.log(0.4 / 0.3)]], dtype=torch.float64)
    torch.testing.assert_close(contextual, expected)
    assert contextual.argmax(-1).tolist() == [0, 1] and scores.argmax(-1).tolist() == [0, 0]
    with pytest.raises(ValueError, match="Unknown calibration"):
        calibrate(scores, "median", reference)


def test_metrics_against_hand_computed_values():
    metrics = classification_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 2)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["macro_f1"] == pytest.approx((2 * 1 / 4 + 2 * 2 / 6) / 2)
    assert metrics["predicted_counts"] == [2, 3]


@pytest.mark.parametrize("num_steps", [1, 2])
def test_single_ft_with_the_query_is_one_step_on_the_demonstrations_and_the_query(model, gpt2_tokenizer, num_steps):
    """The TinT authors' single-FT context loss also trains on the query. Dynamic evaluation's single-FT rows must
    equal true SGD on the demonstrations and the row's query as separate sequences of one summed loss (sgd_update,
    autograd), then the row with those weights: the demonstrations' step is taken once and each query's part added
    (one step), or one joint update per query (more steps). TinT's single-FT rows must equal the same with TinT's
    approximate step (tint_step)."""
    from tint_hf.evaluation.modes import stack_rows
    from tint_hf.simulate import forward_with_params, sgd_update

    builder = PromptBuilder(gpt2_tokenizer, get_task("MR").template(0), train_on_query=True)
    demos = pad_rows([(c.input_ids, c.train_mask, c.label_mask) for c in builder.demonstration_rows(DEMOS)], 50256)
    queries = pad_rows([(c.input_ids, c.train_mask, c.label_mask)
                        for c in (builder.example_context([], q) for q in QUERIES)], 50256)
    got = DynamicSGD(model, LR, num_steps=num_steps, demonstrations=demos).logits(queries)
    for b in range(len(QUERIES)):
        n = int(queries.attention_mask[b].sum())
        row = Batch(*(t[b:b + 1, :n] for t in queries.tensors()))
        joint = stack_rows(demos, row)
        params = sgd_update(model, joint.input_ids, joint.attention_mask, joint.train_mask, lr=LR, num_steps=num_steps,
                            per_sequence=False)
        expected = forward_with_params(model, params, row.input_ids)
        torch.testing.assert_close(got[b:b + 1, :n], expected, rtol=1e-9, atol=1e-9)
    demos_only = DynamicSGD(model, LR, num_steps=num_steps, demonstrations=demos).demonstrations_step()
    assert (forward_with_params(model, demos_only, queries.input_ids[:1]) - got[:1]).abs().max() > 1e-6
    if num_steps == 1:
        tint = TinTForCausalLM.from_auxiliary(model, num_prefixes=8, inner_lr=LR)
        approx = Approximations(**tint.config.approximation_kwargs())
        via_tint = TinTForward(tint, LR, demonstrations=demos).logits(queries)
        simulated = DynamicSGD(model, LR, approximations=approx, demonstrations=demos).logits(queries)
        real = queries.attention_mask.bool()
        torch.testing.assert_close(via_tint[real], simulated[real], rtol=0, atol=1e-8)
    else:  # more steps: the demonstrations are packed in front of each row as segments, one TinT pass per row
        tint = TinTForCausalLM.from_auxiliary(model, num_prefixes=8, inner_lr=LR, num_steps=num_steps)
        via_tint = TinTForward(tint, LR, demonstrations=demos).logits(queries)
        real_demos = demos.attention_mask.bool()
        demo_ids = demos.input_ids[real_demos][None]
        demo_segments = torch.arange(len(DEMOS))[:, None].expand_as(real_demos)[real_demos][None]
        for b in range(len(QUERIES)):
            n = int(queries.attention_mask[b].sum())
            ids = torch.cat([demo_ids, queries.input_ids[b:b + 1, :n]], dim=1)
            train = torch.cat([torch.ones_like(demo_ids), queries.train_mask[b:b + 1, :n]], dim=1)
            segments = torch.cat([demo_segments, torch.full((1, n), len(DEMOS))], dim=1)
            expected = tint(ids, train_mask=train, segment_ids=segments, inner_lr=LR).logits[:, -n:]
            torch.testing.assert_close(via_tint[b:b + 1, :n], expected, rtol=1e-10, atol=1e-10)


def test_zero_shot_with_the_query_adapts_on_the_query_alone(model, gpt2_tokenizer):
    """k = 0 in the authors' TinT protocol: the only training data is the query; single and concatenated agree."""
    from tint_hf.evaluation import FewShotConfig, FewShotEvaluator, ModeConfig

    tint = TinTForCausalLM.from_auxiliary(model, num_prefixes=8, inner_lr=LR)
    evaluator = FewShotEvaluator(model, gpt2_tokenizer, FewShotConfig(progress=False, batch_size=3), tint_model=tint)
    builder = PromptBuilder(gpt2_tokenizer, get_task("MR").template(0), train_on_query=True)
    queries = [Example(q, 0) for q in QUERIES]
    scores = {variant: evaluator.score(ModeConfig("tint", lrs=(LR,), variant=variant, train_on_query=True), LR,
                                       builder, [], queries, "t")[0] for variant in ("single", "concatenated")}
    plain = evaluator.score(ModeConfig("icl"), None, PromptBuilder(gpt2_tokenizer, get_task("MR").template(0)), [],
                            queries, "t")[0]
    torch.testing.assert_close(scores["single"], scores["concatenated"], rtol=0, atol=1e-10)
    assert (scores["single"] - plain).abs().max() > 1e-4  # the query's own step moved the scores


def test_tint_rows_with_their_own_step_are_split_to_fit_memory(model, gpt2_tokenizer):
    """Each row that trains on its own tokens holds its own update; a budget that fits two such rows splits a batch
    of four into two calls with the same logits, and a budget below one row is refused with the numbers (before:
    the kernel's OOM killer, with no message)."""
    tint = TinTForCausalLM.from_auxiliary(model, num_prefixes=8, inner_lr=LR)
    builder, contexts = prompts(gpt2_tokenizer, train_on_query=True)
    batch = pad_rows([(c.input_ids, c.train_mask, c.label_mask) for c in contexts], 50256)
    per_row = tint.step_bytes_per_row(batch.input_ids.shape[1])
    assert per_row > 2 * tint.update_bytes_per_row(batch.input_ids.shape[1])  # activations counted too
    whole = TinTForward(tint, LR, memory_budget=10 * per_row)
    split = TinTForward(tint, LR, memory_budget=2 * per_row)
    length = batch.input_ids.shape[1]
    assert whole.rows_per_call(4, length) == 4 and split.rows_per_call(4, length) == 2
    torch.testing.assert_close(split.logits(batch), whole.logits(batch), rtol=1e-12, atol=1e-12)
    with pytest.raises(MemoryError, match=r"One row's own TinT step needs about .* MiB.*--layers"):
        TinTForward(tint, LR, memory_budget=per_row // 2).logits(batch)
    shared = TinTForward(tint, LR, memory_budget=per_row // 2, demonstrations=pad_rows(
        [(c.input_ids, c.train_mask, c.label_mask) for c in builder.demonstration_rows(DEMOS)], 50256))
    no_query = pad_rows([(c.input_ids, tuple(0 for _ in c.train_mask), c.label_mask)
                         for c in (builder.example_context([], q) for q in QUERIES)], 50256)
    assert shared.logits(no_query).shape[0] == 4  # a shared update needs no per-row copies: never split or refused


def test_the_summary_counts_learning_rates_chosen_at_the_edge_of_their_grid():
    from tint_hf.evaluation import summarize_runs
    from tint_hf.evaluation.report import markdown_table

    def run(seed, lr, grid, selection="dev", mode="dynamic"):
        return dict(task="MR", mode=mode, shots=4, seed=seed, lr=lr, selection=selection, accuracy=0.5,
                    macro_f1=0.5, n=8, mode_config=dict(lrs=grid))

    grid = [1e-5, 1e-4, 1e-3]
    runs = [run(1, 1e-4, grid), run(2, 1e-3, grid), run(3, 1e-5, grid),  # interior, top edge, bottom edge
            run(1, 1e-4, [1e-4], selection=None, mode="tint"),  # nothing chosen
            run(1, None, [1e-4], selection=None, mode="icl")]
    summary = {row["mode"]: row for row in summarize_runs(runs, {"MR": 2})}
    assert summary["dynamic"]["lr_at_edge"] == 2
    assert summary["tint"]["lr_at_edge"] == 0 and summary["icl"]["lr_at_edge"] == 0
    table = markdown_table(list(summary.values()))
    assert "(2/3 at the grid's edge)" in table and table.count("grid's edge") == 1
