"""Run our tasks, templates and demonstration sets through EleutherAI's lm-evaluation-harness (``lm_eval``).

:func:`export_lm_eval_task` writes, into one folder:

* ``<name>.yaml``: a ``multiple_choice`` task with our template (``doc_to_text`` = the prompt, ``doc_to_choice`` = the
  verbalizer, ``target_delimiter`` = " ", ``fewshot_delimiter`` = "\\n\\n"), which builds the same prompt strings as
  :class:`~tint_hf.evaluation.PromptBuilder`;
* ``<name>.fewshot.jsonl``: our k sampled demonstrations, in order; the task reads them with lm-eval's ``first_n``
  sampler, so every document gets the same, class-balanced demonstration set (lm-eval's default sampler draws
  different, unbalanced demonstrations per document);
* ``<name>.test.jsonl``: the evaluation examples.

Then (``lm_eval`` installed; ``--include_path`` makes it find the YAML)::

    lm-eval run --model hf --model_args pretrained=PATH,dtype=float32 --include_path FOLDER --tasks NAME \\
        --num_fewshot K --batch_size 8 --log_samples --output_path out/

``acc`` there equals our ``icl`` mode with ``--calibration none`` (the sum of label-token log-probabilities; tested
in ``tests/test_eval_lm_eval.py``). lm-eval's ``acc_mutual_info`` is *not* the paper's ``icl_sfc``. HFLM pads with
token 0 and passes no attention mask, which is harmless for a plain causal LM; a TinT checkpoint loaded by HFLM gets
no ``train_mask`` and falls back to its ``default_train_fraction``: for TinT and dynamic evaluation use the
``tint-hf`` lm-eval model (:mod:`tint_hf.evaluation.lm_eval_models`, ``tint-hf lm-eval run --model tint-hf ...``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .._optional import require
from .data import Example, write_jsonl
from .tasks import Task


def jinja_prompt(prompt: str) -> str:
    """``"Review: {text}\\nSentiment:"`` -> ``"Review: {{text}}\\nSentiment:"`` (str.format fields -> Jinja)."""
    return re.sub(r"\{(\w+)\}", r"{{\1}}", prompt)


def export_lm_eval_task(folder: str | Path, name: str, task: Task, template_id: int, demos: Sequence[Example],
                        examples: Sequence[Example]) -> Path:
    """Write the YAML task and its two JSONL files into ``folder``; returns the YAML path."""
    yaml = require("yaml", "lm-eval", "Exporting an lm-evaluation-harness task")
    folder = Path(folder)
    template = task.template(template_id)
    if template.label_delimiter != " " or not name.isidentifier():
        raise ValueError("lm-eval tasks need an identifier name and the ' ' label delimiter.")
    write_jsonl(examples, folder / f"{name}.test.jsonl")
    files = {"test": str((folder / f"{name}.test.jsonl").resolve())}
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test"}
    if demos:  # a 0-shot task declares no few-shot split (lm-eval would look for documents in it and fail)
        write_jsonl(demos, folder / f"{name}.fewshot.jsonl")
        files["fewshot"] = str((folder / f"{name}.fewshot.jsonl").resolve())
        config.update(fewshot_split="fewshot", fewshot_config={"sampler": "first_n"})
    config.update({
        "output_type": "multiple_choice",
        "doc_to_text": jinja_prompt(template.prompt),
        "doc_to_target": "label",
        "doc_to_choice": list(template.verbalizer),
        "target_delimiter": template.label_delimiter,
        "fewshot_delimiter": template.demo_separator,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": f"tint_hf {task.name} template {template_id}"},
    })
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path
