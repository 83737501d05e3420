"""lm-evaluation-harness compatibility: an exported task scored by lm_eval's own HFLM gives our icl-mode numbers.

The lm_eval test is skipped when ``lm_eval`` is not importable (it is not a dependency). To run it without touching
the project venv: ``pip install --target /tmp/lmeval_site --no-deps lm_eval==0.4.13 <its dependencies>`` and
``PYTHONPATH=/tmp/lmeval_site pytest tests/test_eval_lm_eval.py``."""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest
import torch
import yaml
from conftest import tiny_gpt2

from tint_hf.evaluation import PlainLM, PromptBuilder, candidate_log_probs, get_task, load_examples
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
