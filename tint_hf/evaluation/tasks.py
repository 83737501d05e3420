"""Few-shot classification tasks: prompt templates, verbalizers and where the data comes from.

A prompt for one evaluation example with demonstrations ``(x_1, y_1) ... (x_k, y_k)`` is

    t(x_1) + " " + v(y_1) + "\\n\\n" + ... + t(x_k) + " " + v(y_k) + "\\n\\n" + t(x)

and the model scores every class y by log p(" " + v(y) | prompt). ``t`` is the template's ``prompt`` and ``v`` its
``verbalizer``. Template 0 of every task is the TinT paper's default (Panigrahi et al. 2023, ``icl_eval``); template 1
replaces the label words by symbols (a task-learning probe); template 2, where defined, is a cloze variant.
More templates are added with :func:`register_template`, more tasks with :func:`register_task`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Template:
    """How one example becomes text.

    Args:
        prompt: the query format, with a ``{text}`` field and no trailing space (e.g. ``"Review: {text}\\nSentiment:"``).
        verbalizer: one label word per class index (e.g. ``("Negative", "Positive")``).
        premise: the prompt with the input removed, the "domain premise" of the paper's ``icl_sfc`` calibration.
        label_delimiter: text between the prompt and the label word.
        demo_separator: text between consecutive demonstrations (and before the query).
        content_free_inputs: inputs for contextual calibration (Zhao et al. 2021).
    """

    prompt: str
    verbalizer: tuple[str, ...]
    premise: str
    label_delimiter: str = " "
    demo_separator: str = "\n\n"
    content_free_inputs: tuple[str, ...] = ("N/A", "", "[MASK]")

    def query(self, text: str) -> str:
        return self.prompt.format(text=text)

    def label_text(self, label: int) -> str:
        return self.label_delimiter + self.verbalizer[label]


@dataclass(frozen=True)
class HubSource:
    """A ``datasets.load_dataset`` source.

    ``datasets`` >= 4 dropped loading scripts, so only parquet/JSON-backed Hub repos load. The repos used below are
    believed to be such repos (``nyu-mll/glue``, ``cornell-movie-review-data/rotten_tomatoes``,
    ``SetFit/SentEval-CR``, ``jxm/mpqa``, ``SetFit/subj``, ``fancyzhx/{ag_news,amazon_polarity,yelp_polarity}``);
    use these canonical ids rather than the legacy short names (``glue``, ``ag_news``, ...), which may not load. None of
    this could be re-checked from the offline development machines.
    """

    path: str
    name: str | None
    train_split: str
    eval_split: str
    text_field: str
    label_field: str = "label"


@dataclass
class Task:
    """A classification task: class names, templates and data sources.

    ``label_names`` are the canonical class names; string labels in data files are matched against them and against
    the template-0 verbalizer (case-insensitively). ``hub`` is ``None`` when no Hub copy loads with ``datasets`` 5.
    """

    name: str
    label_names: tuple[str, ...]
    templates: dict[int, Template]
    hub: HubSource | None
    text_fields: tuple[str, ...] = ("text", "sentence", "content")
    paper_note: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def template(self, template_id: int) -> Template:
        if template_id not in self.templates:
            raise KeyError(f"Task {self.name!r} has no template {template_id}; available: {sorted(self.templates)}. "
                           f"Add one with tint_hf.evaluation.register_template({self.name!r}, id, Template(...)).")
        return self.templates[template_id]


def _review_templates() -> dict[int, Template]:
    review = "Review: {text}\nSentiment:"
    return {
        0: Template(review, ("Negative", "Positive"), "\nSentiment:"),
        1: Template(review, ("@", "#"), "\nSentiment:"),
        2: Template("{text} It was", ("terrible", "great"), " It was"),
    }


_AGNEWS_PROMPT = "Article: {text}\nWhat is the article about? Answer:"
_SUBJ_PROMPT = "{text} This is"

TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add a task to the registry (under its name and aliases, case-insensitively)."""
    for key in (task.name, *task.aliases):
        TASKS[key.lower()] = task
    return task


def register_template(task_name: str, template_id: int, template: Template) -> None:
    """Add (or replace) a template of a registered task."""
    task = get_task(task_name)
    if len(template.verbalizer) != task.num_classes:
        raise ValueError(f"Template for {task.name!r} needs {task.num_classes} label words, "
                         f"got {len(template.verbalizer)}: {template.verbalizer}.")
    task.templates[template_id] = template


def get_task(name: str) -> Task:
    """The registered task called ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in TASKS:
        known = sorted({t.name for t in TASKS.values()})
        raise KeyError(f"Unknown task {name!r}. Known tasks: {', '.join(known)}. "
                       f"Register your own with tint_hf.evaluation.register_task(Task(...)).")
    return TASKS[key]


def _binary(name: str, hub: HubSource | None, note: str, aliases: tuple[str, ...] = ()) -> Task:
    return register_task(Task(name, ("negative", "positive"), _review_templates(), hub, paper_note=note,
                              aliases=aliases))


_binary("SST2", HubSource("nyu-mll/glue", "sst2", "train", "validation", "sentence"),
        "GLUE SST-2; the eval pool is the validation split (test labels are hidden).", ("sst-2",))
_binary("MR", HubSource("cornell-movie-review-data/rotten_tomatoes", None, "train", "test", "text"),
        "Pang & Lee sentence polarity; the Hub copy has 8,530/1,066 train/test, not LM-BFF's split.")
_binary("CR", HubSource("SetFit/SentEval-CR", None, "train", "test", "text"), "Hu & Liu customer reviews.")
_binary("MPQA", HubSource("jxm/mpqa", None, "train", "test", "sentence"), "MPQA opinion polarity (phrases).")
_binary("AmazonPolarity", HubSource("fancyzhx/amazon_polarity", None, "train", "test", "content"),
        "The paper uses a length-filtered copy (not published); title is dropped.", ("amazon_polarity", "amazon"))
_binary("YelpPolarity", HubSource("fancyzhx/yelp_polarity", None, "train", "test", "text"),
        "The paper uses a length-filtered copy (not published).", ("yelp_polarity", "yelp"))
register_task(Task(
    "Subj", ("objective", "subjective"),
    {0: Template(_SUBJ_PROMPT, ("objective", "subjective"), " This is"),
     1: Template(_SUBJ_PROMPT, ("@", "#"), " This is")},
    HubSource("SetFit/subj", None, "train", "test", "text"), paper_note="Pang & Lee subjectivity."))
register_task(Task(
    "AGNews", ("world", "sports", "business", "technology"),
    {0: Template(_AGNEWS_PROMPT, ("World", "Sports", "Business", "Technology"), " Answer:"),
     1: Template(_AGNEWS_PROMPT, ("#", "@", "$", "%"), " Answer:"),
     2: Template("{text} What label best describes this news article?",
                 ("World politics", "Sports", "Business", "Science and technology"),
                 " What label best describes this news article?")},
    HubSource("fancyzhx/ag_news", None, "train", "test", "text"),
    paper_note="The paper uses a length-filtered copy (not published).", aliases=("ag_news",)))
