"""Few-shot downstream and perplexity evaluation of standard ICL, dynamic evaluation and TinT with one scorer.

* :mod:`.tasks`: task registry, templates and verbalizers (the TinT paper's template 0 by default).
* :mod:`.data`: examples from local JSONL/CSV/TSV/parquet files, ``save_to_disk`` folders or the HF Hub.
* :mod:`.sampling`: seeded, class-balanced demonstrations and disjoint evaluation subsets.
* :mod:`.prompts`: tokenised prompts with training-part and label-word masks.
* :mod:`.modes`: ``icl`` (:class:`PlainLM`), ``dynamic`` (:class:`DynamicSGD`), ``tint`` (:class:`TinTForward`).
* :mod:`.scoring`: label-word log-likelihoods, calibration (none / ``icl_sfc`` / contextual), metrics.
* :mod:`.fewshot`: the evaluation loop; :mod:`.perplexity`: block perplexity; :mod:`.report`: result files.
"""

from .data import DataError, Example, load_examples, write_jsonl
from .fewshot import FewShotConfig, FewShotEvaluator, ModeConfig, summarize_runs
from .modes import Batch, DynamicSGD, PlainLM, TinTForward
from .perplexity import address_split, block_perplexity, text_blocks
from .prompts import Context, PromptBuilder
from .sampling import disjoint_subsets, sample_demonstrations
from .scoring import calibrate, candidate_log_probs, classification_metrics
from .tasks import TASKS, HubSource, Task, Template, get_task, register_task, register_template

__all__ = [
    "TASKS", "Batch", "Context", "DataError", "DynamicSGD", "Example", "FewShotConfig", "FewShotEvaluator",
    "HubSource", "ModeConfig", "PlainLM", "PromptBuilder", "Task", "Template", "TinTForward", "address_split",
    "block_perplexity", "calibrate", "candidate_log_probs", "classification_metrics", "disjoint_subsets", "get_task",
    "load_examples", "register_task", "register_template", "sample_demonstrations", "summarize_runs", "text_blocks",
    "write_jsonl",
]
