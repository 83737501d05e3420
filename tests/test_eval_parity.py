"""Protocol parity with the TinT authors' ``icl_eval`` (github.com/abhishekpanigrahi1996/transformer_in_transformer).

Their behaviour, restated here from reading their code (nothing of it is imported or copied):

* ``sample_subset(seed, num, unbiased=True)``: ``np.random.seed(seed)`` (global state, restored after), one
  ``np.random.permutation(n)``, walked in order while each class still needs ``num / C`` examples. Demonstrations use
  the train pool and seeds 1-3; the evaluation examples use the validation pool and ``eval_set_seed`` 0.
* ``encode_prompt`` (SST-2 template 0, ``SST2v2Template``): demonstrations ``f"Review: {s.strip()}\\nSentiment:
  {word}"`` joined by ``"\\n\\n"``, then ``"\\n\\n"`` and the query with each candidate word; the whole string is
  tokenised with the tokenizer's BOS (OPT's tokenizer adds one); a candidate's tokens are the last
  ``len(enc(query + word)) - len(enc(query))`` tokens. ``icl_sfc`` replaces the query by ``"\\nSentiment: {word}"``
  (its ``.strip(' ')`` keeps the newline, also at k = 0) and the score is the candidate's summed log-probability
  minus the calibration prompt's.

A tiny random OPT and a small SST-2-format folder (GLUE's columns) go through ``tint-hf eval --legacy-sampler``; the
sampled indices, the prompt strings and every score must equal what that procedure gives, computed here with HF's
OPT directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_opt
from transformers import AutoTokenizer, GPT2TokenizerFast

from tint_hf.assets import GPT2_TOKENIZER_DIR
from tint_hf.cli import main
from tint_hf.evaluation import PromptBuilder, get_task, load_examples

TRAIN = [("a gorgeous , witty , seductive movie . ", 1), ("the plot is nothing but boilerplate clichés . ", 0),
         ("it 's a cookie-cutter movie , a cut-and-paste job . ", 0), ("a masterpiece four years in the making . ", 1),
         ("one of the greatest family-oriented fantasy-adventure movies ever . ", 1),
         ("the performances are an absolute joy . ", 1), ("unfortunately the story and the actors are served with a "
                                                           "hack script . ", 0),
         ("it is as uncompromising as it is nonjudgmental . ", 0), ("a sensitive , moving , brilliantly constructed "
                                                                    "work . ", 1),
         ("it 's slow -- very , very slow . ", 0), ("an utterly charming and hilarious film . ", 1),
         ("a warm , funny , engaging film . ", 1), ("the story is also as unoriginal as they come . ", 0),
         ("there is nothing here to engage the viewer . ", 0), ("a dull , simple-minded and stereotypical tale . ", 0),
         ("it 's a wonderful , sobering , heart-felt drama . ", 1), ("the acting is superb throughout . ", 1),
         ("a film that lacks both a purpose and a strong pulse . ", 0), ("smart , sassy and exceptionally charming . ",
                                                                         1),
         ("it never rises above mediocrity . ", 0), ("too long and too tedious . ", 0),
         ("a beautifully shot and tender film . ", 1), ("a mess of a movie . ", 0), ("funny and touching . ", 1)]
VALID = [("a thoroughly boring film . ", 0), ("delightful and witty . ", 1), ("an exhilarating experience . ", 1),
         ("the jokes fall flat . ", 0), ("moving and memorable . ", 1), ("a tired retread . ", 0),
         ("strictly routine . ", 0), ("a joyous romp . ", 1), ("wonderfully acted . ", 1), ("a real charmer . ", 1),
         ("painfully unfunny . ", 0), ("a waste of talent . ", 0), ("smart and sweet . ", 1), ("tedious . ", 0),
         ("a small gem . ", 1), ("lifeless and dull . ", 0)]
# The authors' draws for these label sequences (numpy's legacy global RNG), checked against the restatement below.
DEMOS = {1: [13, 18, 3, 14], 2: [21, 0, 22, 6], 3: [22, 12, 15, 16]}
EVAL = [1, 6, 8, 9, 13, 4, 10, 15]
WORDS = ("Negative", "Positive")


def authors_sample_subset(labels: list[int], seed: int, num: int) -> list[int]:
    state = np.random.get_state()
    np.random.seed(seed)
    order = np.random.permutation(len(labels)).tolist()
    np.random.set_state(state)
    quota, picked = {c: num // len(set(labels)) for c in set(labels)}, []
    for i in order:
        if quota[labels[i]] > 0:
            quota[labels[i]] -= 1
            picked.append(i)
            if len(picked) == num:
                break
    return picked


def demonstration(text: str, label: int) -> str:
    return f"Review: {text.strip()}\nSentiment: {WORDS[label]}"


def authors_prompts(demos: list[tuple[str, int]], query: str, calibration: bool) -> list[tuple[str, str, str]]:
    """(whole prompt, query with the word, query without it) per candidate, as the authors' encode_prompt builds
    them."""
    head = "\n\n".join(demonstration(t, y) for t, y in demos)
    if calibration:
        pieces = [(f"\nSentiment: {w}", "\nSentiment:") for w in WORDS]
    else:
        pieces = [(f"Review: {query.strip()}\nSentiment: {w}", f"Review: {query.strip()}\nSentiment:") for w in WORDS]
    return [((head + "\n\n" + full).lstrip() if head else full, full, bare) for full, bare in pieces]


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(GPT2_TOKENIZER_DIR), add_bos_token=True)  # BOS like OPT's
    tokenizer.pad_token = tokenizer.eos_token
    model = tiny_opt(vocab_size=50257, max_position_embeddings=512, pad_token_id=50256, bos_token_id=50256,
                     eos_token_id=50256)
    model.save_pretrained(root / "opt")
    tokenizer.save_pretrained(root / "opt")
    for name, rows in (("train", TRAIN), ("validation", VALID)):
        (root / "data" / "SST2").mkdir(parents=True, exist_ok=True)
        with (root / "data" / "SST2" / f"{name}.jsonl").open("w") as f:
            for idx, (sentence, label) in enumerate(rows):
                f.write(json.dumps({"sentence": sentence, "label": label, "idx": idx}) + "\n")
    return root


def test_the_restatement_gives_the_held_indices():
    for seed, expected in DEMOS.items():
        assert authors_sample_subset([y for _, y in TRAIN], seed, 4) == expected
    assert authors_sample_subset([y for _, y in VALID], 0, 8) == EVAL


def test_prompt_strings_equal_the_authors(opt_folder):
    tokenizer = AutoTokenizer.from_pretrained(opt_folder / "opt")
    builder = PromptBuilder(tokenizer, get_task("SST2").template(0))
    pool = load_examples(get_task("SST2"), "train", data_dir=opt_folder / "data")
    demos = [pool[i] for i in DEMOS[1]]
    query = load_examples(get_task("SST2"), "eval", data_dir=opt_folder / "data")[1].text  # "delightful and witty ."
    text = tokenizer.decode(builder.example_context(demos, query).input_ids)
    assert text == ("<|endoftext|>Review: there is nothing here to engage the viewer .\nSentiment: Negative\n\n"
                    "Review: smart , sassy and exceptionally charming .\nSentiment: Positive\n\n"
                    "Review: a masterpiece four years in the making .\nSentiment: Positive\n\n"
                    "Review: a dull , simple-minded and stereotypical tale .\nSentiment: Negative\n\n"
                    "Review: delightful and witty .\nSentiment:")
    assert tokenizer.decode(builder.premise_context(demos).input_ids).endswith(
        "stereotypical tale .\nSentiment: Negative\n\n\nSentiment:")
    assert tokenizer.decode(builder.premise_context([]).input_ids) == "<|endoftext|>\nSentiment:"
    for context, (full, _, _) in [(builder.example_context(demos, query), authors_prompts(
            [TRAIN[i] for i in DEMOS[1]], VALID[1][0], False)[1]),
            (builder.premise_context([]), authors_prompts([], "", True)[1])]:
        assert list(context.input_ids) + list(builder.candidates[1]) == tokenizer.encode(full)


def authors_score(model, tokenizer, full: str, verbalized: str, bare: str) -> float:
    """Summed log-probability of the candidate's last tokens in the whole prompt, their count taken from the query
    with and without the word."""
    ids = tokenizer.encode(full)
    option = len(tokenizer.encode(verbalized)) - len(tokenizer.encode(bare))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(ids) - option, len(ids))))


def test_indices_and_scores_equal_the_authors_procedure(opt_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["eval", "--model", str(opt_folder / "opt"), "--tasks", "SST2", "--data-dir",
                 str(opt_folder / "data"), "--modes", "icl", "--shots", "0,4", "--seeds", "1,2,3", "--n-eval", "8",
                 "--legacy-sampler", "--calibration", "icl_sfc", "--dtype", "float64", "--quiet", "--no-plot",
                 "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["seed"]: r["demo_indices"] for r in runs if r["shots"] == 4} == DEMOS
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    from transformers import OPTForCausalLM

    model = OPTForCausalLM.from_pretrained(opt_folder / "opt", dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(opt_folder / "opt")
    for run in runs:
        rows = [p for p in predictions if (p["shots"], p["seed"]) == (run["shots"], run["seed"])]
        assert [p["index"] for p in rows] == EVAL
        demos = [TRAIN[i] for i in run["demo_indices"]]
        calibration = [authors_score(model, tokenizer, *p) for p in authors_prompts(demos, "", True)]
        for p in rows[:3]:
            raw = [authors_score(model, tokenizer, *q) for q in authors_prompts(demos, VALID[p["index"]][0], False)]
            assert p["scores"] == pytest.approx(raw, abs=1e-9)
            assert p["calibrated_scores"] == pytest.approx([r - c for r, c in zip(raw, calibration)], abs=1e-9)


def authors_training_part(tokenizer, demos: list[tuple[str, int]], full: str, verbalized: str, bare: str):
    """What the authors' constructed model trains on for one candidate prompt, restated from icl_eval/run.py
    (``constructed_model_forward``) and tint_main/tint_opt.py: ``bidirection_mask[:, :-option_len] = 1`` and the
    loss gradient at t is kept where ``bidirection_mask[t + 1]`` is 1, i.e. every token before the option is a
    training target (demonstrations, separators, the query); with ``loss_label_only`` the gradient is also multiplied
    by ``gradient_mask`` = the demonstrations' label tokens, located as ``encode_prompt_with_construction`` does
    (cumulative prompt + the demonstration without its word, then the word's length). Also the demonstrations' and the
    query's token spans (``train_example_start/end``, ``test_example_start``) that their single-FT masks use.
    Returns (ids, option length, training flags, label flags, demo spans, query start)."""
    ids = tokenizer.encode(full)
    option = len(tokenizer.encode(verbalized)) - len(tokenizer.encode(bare))
    train = [1] * (len(ids) - option) + [0] * option
    label = [0] * len(ids)
    spans, prompt, shift = [], "", 1  # shift: the BOS (OPT's tokenizer adds one)
    for text, y in demos:
        example_prompt = (prompt + demonstration(text, y)).lstrip()
        example_sent = (prompt + f"Review: {text.strip()}\nSentiment:").lstrip()
        whole, sentence = tokenizer.encode(example_prompt), tokenizer.encode(example_sent)
        label[len(sentence): len(whole)] = [1] * (len(whole) - len(sentence))
        spans.append((len(whole) - len(tokenizer.encode(demonstration(text, y).strip())) + shift, len(whole)))
        prompt = example_prompt + "\n\n"
    query_start = len(tokenizer.encode(prompt + "end")) - len(tokenizer.encode("end")) + shift
    return ids, option, train, label, spans, query_start


@pytest.mark.parametrize("shots", [0, 4])
def test_tints_training_part_equals_the_authors(opt_folder, shots):
    """--preset tint-paper's TinT rows (train_on_query, context loss; label loss) hand TinT the authors' training
    part: in the concatenated variant token for token; in the single-FT variant the demonstrations and the query as
    separate rows (each after a BOS), whose targets are the authors' except the separators between the pieces, which
    their single-FT prompt keeps (unrestricted attention) and ours drops; the first token of a piece is predicted from
    BOS in ours and from the separator before it in theirs."""
    from tint_hf.evaluation.data import Example

    tokenizer = AutoTokenizer.from_pretrained(opt_folder / "opt")
    demos = [TRAIN[i] for i in DEMOS[1]][:shots]
    examples = [Example(text.strip(), y) for text, y in demos]
    builder = PromptBuilder(tokenizer, get_task("SST2").template(0), train_on_query=True)
    for query, _ in VALID[:3]:
        context = builder.example_context(examples, query.strip())
        for full, verbalized, bare in authors_prompts(demos, query, calibration=False):
            ids, option, train, label, spans, query_start = authors_training_part(tokenizer, demos, full,
                                                                                 verbalized, bare)
            # concatenated: the scored row is the context (one-token options), every flag as theirs
            assert list(context.input_ids) == ids[:-option]
            assert list(context.train_mask) == train[:-option]
            assert list(context.label_mask) == label[:-option]
            # single-FT: each demonstration its own row (BOS + its tokens), then the query alone
            rows = builder.demonstration_rows(examples) + [builder.example_context([], query.strip())]
            pieces = spans + [(query_start, len(ids) - option)]
            assert [list(r.input_ids[1:]) for r in rows] == [ids[a:b] for a, b in pieces]
            assert all(all(r.train_mask) for r in rows)
            ours = {t for a, b in pieces for t in range(a, b)}  # each row's tokens, the first predicted from BOS
            theirs = {t for t in range(1, len(ids)) if train[t]}
            gaps = {t for t in range(1, len(ids) - option) if not any(a <= t < b for a, b in pieces)}
            assert ours <= theirs and theirs - ours == gaps
            assert all(tokenizer.decode([ids[t]]).strip() == "" for t in gaps)  # only separators
