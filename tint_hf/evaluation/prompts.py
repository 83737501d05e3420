"""Tokenised prompts with the masks the adaptive modes need.

A :class:`Context` is the token sequence of a prompt up to (not including) the query's label, with

* ``train_mask``: 1 on the *training part*: the demonstrations and the separators after them, plus the query itself
  when ``train_on_query`` (the TinT paper's transductive ``context`` setting, which also makes zero-shot TinT adapt);
* ``label_mask``: 1 on the demonstrations' label-word tokens (the ``label_only`` loss).

Masks come from the tokenizer's character offsets of the *whole* prompt (never from matching label token ids, which
would also hit label words inside reviews). The tokenizer must be a fast tokenizer (offsets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .data import Example
from .tasks import Template


@dataclass(frozen=True)
class Context:
    """A tokenised prompt: ``input_ids``, ``train_mask`` and ``label_mask``, all of length T."""

    input_ids: tuple[int, ...]
    train_mask: tuple[int, ...]
    label_mask: tuple[int, ...]


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer itself starts every encoding with its BOS token (OPT, Llama) or not (GPT-2)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


class PromptBuilder:
    """Builds :class:`Context` s and candidate label tokens for one template.

    Args:
        tokenizer: a fast HF tokenizer.
        template: the task template.
        train_on_query: whether the query tokens belong to the training part (see module docstring).
        add_bos: prepend the BOS token; ``None`` follows the tokenizer's own behaviour.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: Template, train_on_query: bool = False,
                 add_bos: bool | None = None):
        if not tokenizer.is_fast:
            raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; the prompt masks need character "
                            f"offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True).")
        self.tokenizer = tokenizer
        self.template = template
        self.train_on_query = train_on_query
        self.add_bos = tokenizer_adds_bos(tokenizer) if add_bos is None else add_bos
        if self.add_bos and tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token.")
        self.candidates: list[tuple[int, ...]] = [self._encode(template.label_text(y))
                                                  for y in range(len(template.verbalizer))]
        empty = [w for w, c in zip(template.verbalizer, self.candidates) if not c]
        if empty:
            raise ValueError(f"Label words {empty} tokenize to nothing.")

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def demonstration(self, example: Example) -> str:
        return self.template.query(example.text) + self.template.label_text(example.label)

    def context(self, demos: Sequence[Example], query: str) -> Context:
        """Demonstrations, then ``query`` (an already formatted query string, e.g. the premise) with leading and
        trailing spaces (not newlines) removed: the ``icl_sfc`` premise "\\nSentiment:" keeps its newline, even at
        k = 0, and " This is" follows the separator as "This is", exactly as in the authors' ``icl_eval``."""
        sep, pieces, label_spans, cursor = self.template.demo_separator, [], [], 0
        for demo in demos:
            text = self.demonstration(demo)
            word = self.template.verbalizer[demo.label]
            label_spans.append((cursor + len(text) - len(word), cursor + len(text)))
            pieces.append(text + sep)
            cursor += len(text) + len(sep)
        text = "".join(pieces) + query.strip(" ")  # spaces only, as the TinT authors' encode_prompt does
        return self._tokenize(text, len(text) if self.train_on_query else cursor, label_spans)

    def _tokenize(self, text: str, train_end: int, label_spans: list[tuple[int, int]]) -> Context:
        """Tokens of ``text``; a token is in the training part if it starts before ``train_end`` and is a label token
        if it overlaps a character span in ``label_spans``."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, train, label = [], [], []
        if self.add_bos:
            ids, train, label = [self.tokenizer.bos_token_id], [int(train_end > 0)], [0]
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            ids.append(token)
            train.append(int(start < train_end))
            label.append(int(any(start < hi and end > lo for lo, hi in label_spans)))
        return Context(tuple(ids), tuple(train), tuple(label))

    def example_context(self, demos: Sequence[Example], text: str) -> Context:
        return self.context(demos, self.template.query(text))

    def premise_context(self, demos: Sequence[Example]) -> Context:
        """The ``icl_sfc`` calibration prompt: demonstrations, then the template with the input removed."""
        return self.context(demos, self.template.premise)

    def demonstration_rows(self, demos: Sequence[Example]) -> list[Context]:
        """Each demonstration as its own fully-trained sequence (the single-FT variant of dynamic evaluation)."""
        rows = []
        for demo in demos:
            text, word = self.demonstration(demo), self.template.verbalizer[demo.label]
            rows.append(self._tokenize(text, len(text), [(len(text) - len(word), len(text))]))
        return rows
