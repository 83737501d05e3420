"""Block perplexity in the three modes against independent references: the plain HF forward, exact_step's
evaluation loss, and TinTForCausalLM's own evaluation loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_gpt2

from tint_hf import TinTForCausalLM
from tint_hf.assets import sample_text
from tint_hf.evaluation import DynamicSGD, PlainLM, TinTForward, block_perplexity, text_blocks
from tint_hf.evaluation.perplexity import summarize_perplexity
from tint_hf.simulate import exact_step

LR, FRACTION = 2e-2, 0.5


@pytest.fixture(scope="module")
def setup(gpt2_tokenizer):
    model = tiny_gpt2(vocab_size=50257, n_positions=64)
    blocks = text_blocks(gpt2_tokenizer, sample_text(), 24, max_blocks=5)
    train = torch.zeros_like(blocks)
    train[:, :12] = 1
    return model, blocks, train


def test_blocks_are_consecutive_tokens_of_the_text(gpt2_tokenizer):
    text = sample_text()[:2000]
    blocks = text_blocks(gpt2_tokenizer, text, 16)
    ids = gpt2_tokenizer(text)["input_ids"]
    assert blocks.shape == (len(ids) // 16, 16) and blocks.flatten().tolist() == ids[: blocks.numel()]
    with pytest.raises(ValueError, match="fewer than one block"):
        text_blocks(gpt2_tokenizer, "too short", 64)


def test_a_block_seed_cuts_at_its_own_offset_and_draws_blocks_without_replacement(gpt2_tokenizer):
    text = sample_text()[:4000]
    ids = gpt2_tokenizer(text)["input_ids"]
    joined = " ".join(map(str, ids))
    drawn = {seed: text_blocks(gpt2_tokenizer, text, 16, max_blocks=5, seed=seed) for seed in (1, 2)}
    for seed, blocks in drawn.items():
        assert blocks.shape == (5, 16)
        assert torch.equal(blocks, text_blocks(gpt2_tokenizer, text, 16, max_blocks=5, seed=seed))  # reproducible
        starts = {joined.count(" ".join(map(str, b.tolist()))) for b in blocks}
        assert starts == {1}  # each block is a run of consecutive tokens of the text, and they are distinct
    assert not torch.equal(drawn[1], drawn[2])
    every = text_blocks(gpt2_tokenizer, text, 16, seed=1)  # all blocks of seed 1's cut, in a random order
    assert len(every) in (len(ids) // 16, len(ids) // 16 - 1)
    assert {tuple(b.tolist()) for b in drawn[1]} <= {tuple(b.tolist()) for b in every}


def test_perplexity_summary_picks_each_modes_best_lr_and_flags_grid_edges():
    records = [dict(mode="icl", lr=None, train_fraction=0.5, seed=s, perplexity=p) for s, p in ((1, 10.0), (2, 12.0))]
    grid = {1e-5: (10.0, 12.0), 1e-4: (9.0, 11.5), 1e-3: (9.5, 11.2)}  # means 11.0, 10.25, 10.35
    records += [dict(mode="dynamic", lr=lr, train_fraction=0.5, seed=s, perplexity=p)
                for lr, values in grid.items() for s, p in zip((1, 2), values, strict=True)]
    records += [dict(mode="tint", lr=lr, train_fraction=0.5, seed=s, perplexity=11.0 - 1000 * lr)
                for lr in (1e-5, 1e-4, 1e-3) for s in (1, 2)]
    rows = {(r["mode"], r["lr"]): r for r in summarize_perplexity(records)}
    assert rows["icl", None]["mean"] == 11.0 and rows["icl", None]["std"] == pytest.approx(math.sqrt(2))
    assert rows["dynamic", 1e-4]["change"] == pytest.approx(10.25 - 11.0)
    assert [lr for (mode, lr), r in rows.items() if r.get("best")] == [1e-4, 1e-3]
    assert rows["dynamic", 1e-4]["at_edge"] is False and rows["tint", 1e-3]["at_edge"] is True


def test_model_as_is_matches_the_hf_forward(setup):
    model, blocks, _ = setup
    out = block_perplexity(PlainLM(model), blocks, FRACTION, batch_size=2, progress=False)
    log_probs = torch.log_softmax(model(blocks).logits, -1)
    nll = -log_probs[:, 11:-1].gather(-1, blocks[:, 12:, None]).sum().item()  # targets 12..23 of every block
    assert out["tokens"] == 12 * len(blocks)
    assert out["perplexity"] == pytest.approx(math.exp(nll / out["tokens"]), rel=1e-10)


def test_dynamic_matches_exact_step_and_tint_matches_its_own_loss(setup):
    model, blocks, train = setup
    dynamic = block_perplexity(DynamicSGD(model, LR), blocks, FRACTION, batch_size=2, progress=False)
    reference = exact_step(model, blocks, None, train, lr=LR)
    assert dynamic["perplexity"] == pytest.approx(math.exp(reference.loss_after.item()), rel=1e-10)
    assert dynamic["perplexity"] != pytest.approx(math.exp(reference.loss_before.item()), rel=1e-6)
    tint = TinTForCausalLM.from_auxiliary(model, num_prefixes=8, inner_lr=LR)
    via_tint = block_perplexity(TinTForward(tint), blocks, FRACTION, batch_size=3, progress=False)
    with torch.no_grad():
        own = tint(blocks, train_mask=train, labels=blocks).loss.item()
    assert via_tint["perplexity"] == pytest.approx(math.exp(own), rel=1e-10)
    assert via_tint["perplexity"] == pytest.approx(dynamic["perplexity"], rel=0.05)  # TinT approximates SGD
