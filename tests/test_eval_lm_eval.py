"""lm-evaluation-harness: an exported task scored by lm_eval's own HFLM gives our icl-mode numbers, and the
``tint-hf`` lm-eval model (tint_hf.evaluation.lm_eval_models) gives, per example, what ``tint-hf eval``'s modes give on
the same prompts: icl as HFLM, dynamic and tint as the concatenated train-on-query cells (the context is the training
part), with one step per distinct context. lm_eval is part of the test environment (the ``dev`` extra)."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import torch
import yaml
from conftest import tiny_gpt2

from tint_hf import TinTForCausalLM
from tint_hf.evaluation import (
    DynamicSGD,
    PlainLM,
    PromptBuilder,
    TinTForward,
    candidate_log_probs,
    get_task,
    load_examples,
)
from tint_hf.evaluation.lm_eval_compat import export_lm_eval_task, jinja_prompt
from tint_hf.evaluation.sampling import sample_demonstrations

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
K = 4


@pytest.fixture(scope="module")
def data():
    task = get_task("MR")
    train = load_examples(task, "train", data_dir=FIXTURES)
    demos = [train[i] for i in sample_demonstrations([e.label for e in train], K, seed=1, num_classes=2)]
    return task, demos, load_examples(task, "eval", data_dir=FIXTURES)[:8]


def test_exported_yaml_builds_our_prompt_strings(tmp_path, data, gpt2_tokenizer):
    task, demos, examples = data
    config = yaml.safe_load(export_lm_eval_task(tmp_path, "tint_mr", task, 0, demos, examples).read_text())
    assert jinja_prompt("Article: {text}\nAnswer:") == "Article: {{text}}\nAnswer:"
    render = jinja2.Template(config["doc_to_text"]).render
    shots = [render(text=d.text) + config["target_delimiter"] + config["doc_to_choice"][d.label] for d in demos]
    lm_eval_prompt = config["fewshot_delimiter"].join(shots) + config["fewshot_delimiter"] + render(text="so good")
    builder = PromptBuilder(gpt2_tokenizer, task.template(0))
    assert gpt2_tokenizer.decode(builder.example_context(demos, "so good").input_ids) == lm_eval_prompt
    assert config["fewshot_config"] == {"sampler": "first_n"} and config["output_type"] == "multiple_choice"


def test_lm_eval_hflm_scores_equal_our_icl_scores(tmp_path, data, gpt2_tokenizer):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task, demos, examples = data
    export_lm_eval_task(tmp_path, "tint_mr", task, 0, demos, examples)
    model = tiny_gpt2(vocab_size=50257, n_positions=256, dtype=torch.float32)
    lm = HFLM(pretrained=model, tokenizer=gpt2_tokenizer, batch_size=4, device="cpu")
    out = simple_evaluate(model=lm, tasks=["tint_mr"], num_fewshot=K, log_samples=True,
                          task_manager=TaskManager(include_path=str(tmp_path)))
    builder = PromptBuilder(gpt2_tokenizer, task.template(0))
    ours = candidate_log_probs(PlainLM(model), [builder.example_context(demos, e.text) for e in examples],
                               builder.candidates, batch_size=3, pad_id=50256, progress=False)
    samples = sorted(out["samples"]["tint_mr"], key=lambda s: s["doc_id"])
    theirs = torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples], dtype=torch.float64)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    accuracy = (ours.argmax(-1) == torch.tensor([e.label for e in examples])).double().mean().item()
    assert out["results"]["tint_mr"]["acc,none"] == pytest.approx(accuracy)


LR = 0.05


def lm_eval_scores(lm, folder, num_fewshot):
    """Per-example (N, C) log-likelihoods of the exported task ``tint_mr`` under lm-eval model ``lm``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=lm, tasks=["tint_mr"], num_fewshot=num_fewshot, log_samples=True,
                          task_manager=TaskManager(include_path=str(folder)))
    samples = sorted(out["samples"]["tint_mr"], key=lambda s: s["doc_id"])
    return torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples], dtype=torch.float64), out


@pytest.mark.parametrize("shots", [0, K])
def test_the_tint_hf_lm_eval_model_equals_our_modes_per_example(tmp_path, data, gpt2_tokenizer, shots):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from tint_hf.evaluation.lm_eval_models import AdaptiveLM

    task, demos, examples = data
    demos = demos[:shots]
    export_lm_eval_task(tmp_path, "tint_mr", task, 0, demos, examples)  # 0 shots: no few-shot split at all
    model = tiny_gpt2(vocab_size=50257, n_positions=256, dtype=torch.float32)
    hf, _ = lm_eval_scores(HFLM(pretrained=model, tokenizer=gpt2_tokenizer, batch_size=4, device="cpu"), tmp_path,
                           shots)
    rows = []  # the choices of a question (one-token label words) share one scored row
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(args[0] if args else kwargs["input_ids"])), with_kwargs=True)
    icl, _ = lm_eval_scores(AdaptiveLM(model, tokenizer=gpt2_tokenizer, batch_size=3), tmp_path, shots)
    hook.remove()
    torch.testing.assert_close(icl, hf, rtol=0, atol=1e-4)
    assert all(len(gpt2_tokenizer(" " + word)["input_ids"]) == 1 for word in task.template(0).verbalizer)
    if shots == 0:  # (with demonstrations the shared prefix runs once more, as one row)
        assert rows == [3, 3, 2]  # 8 questions, 3 rows (= batch_size) per call

    builder = PromptBuilder(gpt2_tokenizer, task.template(0), train_on_query=True)
    contexts = [builder.example_context(demos, e.text) for e in examples]
    tint = TinTForCausalLM.from_auxiliary(model, num_prefixes=8)
    for mode, ours in (("dynamic", DynamicSGD(model, LR)), ("tint", TinTForward(tint, LR))):
        expected = candidate_log_probs(ours, contexts, builder.candidates, batch_size=2, pad_id=50256,
                                       progress=False)
        lm = AdaptiveLM(tint if mode == "tint" else model, mode=mode, inner_lr=LR, tokenizer=gpt2_tokenizer,
                        batch_size=4)
        calls = []
        if mode == "tint":  # count TinT's step calls: the questions of one batch are adapted on together
            def counted(*args, _adapt=tint.model.adapt, _calls=calls, **kwargs):
                _calls.append(args[0].shape[0])
                return _adapt(*args, **kwargs)

            tint.model.adapt = counted
        theirs, _ = lm_eval_scores(lm, tmp_path, shots)
        torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-4)
        assert not torch.allclose(theirs, hf, atol=1e-3)  # the step did change the scores
        assert lm.steps_taken == len(examples)  # one step per question, shared by its two choices
        if mode == "tint":  # batch_size 4 = two questions of two choices per call
            assert calls == [2] * (len(examples) // 2) + [1] * (len(examples) % 2)
            # a memory budget that fits one row's step (a stated per-row need of 1 GiB, 1.5 GiB given): one per call
            calls.clear()
            tint.step_bytes_per_row = lambda tokens: 2**30
            bounded = AdaptiveLM(tint, mode=mode, inner_lr=LR, tokenizer=gpt2_tokenizer, batch_size=4,
                                 tint_memory_gib=1.5)
            torch.testing.assert_close(lm_eval_scores(bounded, tmp_path, shots)[0], theirs, rtol=0, atol=1e-4)
            assert calls == [1] * len(examples)
            del tint.step_bytes_per_row


def test_train_on_demonstrations_trains_on_the_few_shot_examples_only(tmp_path, data, gpt2_tokenizer):
    """train_on=demonstrations equals our dynamic cell without the query in the training part."""
    pytest.importorskip("lm_eval")
    from tint_hf.evaluation.lm_eval_models import AdaptiveLM

    task, demos, examples = data
    export_lm_eval_task(tmp_path, "tint_mr", task, 0, demos, examples)
    model = tiny_gpt2(vocab_size=50257, n_positions=256, dtype=torch.float32)
    builder = PromptBuilder(gpt2_tokenizer, task.template(0), train_on_query=False)
    contexts = [builder.example_context(demos, e.text) for e in examples]
    expected = candidate_log_probs(DynamicSGD(model, LR), contexts, builder.candidates, batch_size=2, pad_id=50256,
                                   progress=False)
    lm = AdaptiveLM(model, mode="dynamic", inner_lr=LR, train_on="demonstrations", tokenizer=gpt2_tokenizer)
    theirs, _ = lm_eval_scores(lm, tmp_path, K)
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-4)
    assert lm.steps_taken == 1  # every question shares the same demonstrations: one step in all


def test_rolling_and_generation_use_the_adapted_weights(gpt2_tokenizer):
    """loglikelihood_rolling is the paper's protocol (train on the first half of the window, score the rest) and
    equals block perplexity's sums; generate_until decodes greedily with the adapted weights."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from tint_hf.evaluation.lm_eval_models import AdaptiveLM
    from tint_hf.simulate import forward_with_params, sgd_update

    model = tiny_gpt2(vocab_size=50257, n_positions=64, dtype=torch.float32)
    lm = AdaptiveLM(model, mode="dynamic", inner_lr=LR, tokenizer=gpt2_tokenizer, window=16)
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [gpt2_tokenizer.eos_token_id] + gpt2_tokenizer(text)["input_ids"]
    expected = 0.0
    for first in range(0, len(ids) - 1, 16):
        window = torch.tensor([ids[first:first + 16]])
        n = max(1, int(0.5 * window.shape[1]))
        if window.shape[1] - n < 1:
            continue
        params = sgd_update(model, window[:, :n], None, torch.ones(1, n, dtype=torch.long), None, lr=LR,
                            per_sequence=False) if n >= 2 \
            else {}
        logp = torch.log_softmax(forward_with_params(model, params, window, None)[0, n - 1:-1].double(), -1)
        expected += float(logp.gather(-1, window[0, n:, None]).sum())
    assert total == pytest.approx(expected, abs=1e-4)

    (generated,) = lm.generate_until([Instance("generate_until", {}, ("Once upon a time", {"until": ["\n"],
                                                                       "max_gen_toks": 5}), 0)])
    context = torch.tensor([gpt2_tokenizer("Once upon a time")["input_ids"]])
    params = sgd_update(model, context, None, torch.ones_like(context), None, lr=LR, per_sequence=False)
    tokens = context
    for _ in range(5):
        nxt = forward_with_params(model, params, tokens, None)[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    assert generated == gpt2_tokenizer.decode(tokens[0, context.shape[1]:]).split("\n")[0]


def test_bad_model_arguments_name_the_argument(gpt2_tokenizer):
    pytest.importorskip("lm_eval")
    from tint_hf.evaluation.lm_eval_models import AdaptiveLM

    model = tiny_gpt2(vocab_size=50257, dtype=torch.float32)
    for kwargs, says in (({"mode": "sgd"}, "mode='sgd'"), ({"mode": "icl", "inner_lr": 0.1}, "inner_lr=0.1"),
                         ({"mode": "dynamic", "inner_lr": float("nan")}, "inner_lr=nan"),
                         ({"mode": "dynamic", "layers": 5}, "layers=5"),
                         ({"mode": "dynamic", "train_on": "query"}, "train_on='query'"),
                         ({"batch_size": "auto"}, "batch_size='auto'"), ({"max_batch_size": 64}, "max_batch_size=64"),
                         ({"mode": "dynamic", "tint_memory_gib": 1}, "tint_memory_gib=1"),
                         ({"mode": "tint", "tint_memory_gib": 0}, "tint_memory_gib=0"),
                         *([({"device": "cuda"}, "device='cuda'")] if not torch.cuda.is_available() else [])):
        with pytest.raises(ValueError, match=says.replace("(", r"\(")):
            AdaptiveLM(model, tokenizer=gpt2_tokenizer, **kwargs)


@pytest.mark.slow
def test_tint_hf_lm_eval_runs_lm_evals_command_line_with_the_model_registered(tmp_path, data, gpt2_tokenizer,
                                                                             monkeypatch):
    pytest.importorskip("lm_eval")
    import json

    from conftest import save_tiny_gpt2

    from tint_hf.cli import main

    task, demos, examples = data
    export_lm_eval_task(tmp_path / "tasks", "tint_mr", task, 0, demos, examples)
    save_tiny_gpt2(tmp_path / "tiny", gpt2_tokenizer, n_positions=256)
    monkeypatch.chdir(tmp_path)
    assert main(["lm-eval", "run", "--model", "tint-hf", "--model_args", "pretrained=tiny,mode=dynamic,inner_lr=0.01",
                 "--include_path", "tasks", "--tasks", "tint_mr", "--num_fewshot", str(K), "--batch_size", "4",
                 "--device", "cpu", "--output_path", "out"]) == 0
    (result,) = (tmp_path / "out").rglob("results_*.json")
    assert 0 <= json.loads(result.read_text())["results"]["tint_mr"]["acc,none"] <= 1
