"""Loading a task's labelled examples from local files, a ``save_to_disk`` folder or the HF Hub.

Local layout (what ``tint-hf prepare-data`` writes)::

    DATA_DIR/<Task>/train.jsonl        # demonstration pool
    DATA_DIR/<Task>/test.jsonl         # evaluation pool (``validation``/``dev`` are accepted too)

Each row has a text column (``text``, ``sentence`` or ``content``, or ``--text-field``) and a ``label`` column holding
a class index ``0..C-1`` or a class name / label word. ``.jsonl``, ``.json``, ``.csv``, ``.tsv`` and ``.parquet`` files
work, and so does a ``DatasetDict.save_to_disk`` folder at ``DATA_DIR/<Task>``. Texts are whitespace-normalised (so a
newline inside a review cannot look like the demonstration separator).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .tasks import Task

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
SPLIT_FILE_NAMES = {"train": ("train",), "eval": ("test", "validation", "dev")}


@dataclass(frozen=True)
class Example:
    """One labelled example: normalised text and class index."""

    text: str
    label: int


class DataError(ValueError):
    """A data file or source is missing or malformed; the message says how to fix it."""


def normalize_text(text: str) -> str:
    return " ".join(str(text).split())


def _read_file(path: Path) -> list[Mapping]:
    import datasets

    if not path.exists():
        raise DataError(f"Data file {path} does not exist. Check the path, or run `tint-hf prepare-data` to create it.")
    if path.is_dir():
        return list(_read_saved(path, None))
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(f"Unsupported data file {path}: use one of {', '.join(FILE_FORMATS)} or a save_to_disk folder.")
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    if path.stat().st_size == 0:
        raise DataError(f"Data file {path} is empty; write the examples into it (one per line or row).")
    try:
        return list(datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(path), split="train", **kwargs))
    except Exception as error:  # broken JSON, bad encoding, ragged CSV, ...: the reader's message names no file
        raise DataError(f"Data file {path} could not be read as {FILE_FORMATS[suffix]} ({type(error).__name__}: "
                        f"{str(error)[:300]}); check that it is UTF-8 {suffix[1:]} with a text and a label "
                        "column.") from None


def _read_saved(path: Path, split_names: Iterable[str] | None) -> Iterable[Mapping]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        return loaded
    for name in split_names or ():
        if name in loaded:
            return loaded[name]
    raise DataError(f"The saved DatasetDict at {path} has splits {list(loaded)}, none of {list(split_names or [])}.")


def _find_local(task: Task, split: str, data_dir: Path) -> tuple[list[Mapping], Path]:
    """The rows of ``task``'s ``split`` under ``data_dir`` and the file (or folder) they came from."""
    folder = data_dir / task.name
    names = SPLIT_FILE_NAMES[split]
    for name in names:
        for suffix in FILE_FORMATS:
            if (folder / f"{name}{suffix}").exists():
                return _read_file(folder / f"{name}{suffix}"), folder / f"{name}{suffix}"
    if (folder / "dataset_dict.json").exists():
        return list(_read_saved(folder, names)), folder
    raise DataError(f"No {split} data for {task.name} under {folder}: expected {folder}/{names[0]}.jsonl "
                    f"(or .csv/.tsv/.parquet, or a save_to_disk folder). Create it with "
                    f"`tint-hf prepare-data --tasks {task.name} --out {data_dir}` on a machine with internet.")


def _read_hub(task: Task, split: str) -> list[Mapping]:
    import datasets

    if task.hub is None:
        raise DataError(f"{task.name} has no Hub source; pass local files (--data-dir or --train-file/--eval-file).")
    hub_split = task.hub.train_split if split == "train" else task.hub.eval_split
    try:
        return list(datasets.load_dataset(task.hub.path, task.hub.name, split=hub_split))
    except Exception as err:  # offline, renamed repo, ...: say what was tried and the offline alternative
        raise DataError(f"Could not load {task.hub.path} ({task.hub.name or 'default'}, split {hub_split}) from the "
                        f"HF Hub: {err}. Offline, use `tint-hf prepare-data` elsewhere and pass --data-dir.") from err


def label_lookup(task: Task) -> dict[str, int]:
    """Accepted string labels (lower-cased): class names, template-0 label words and the indices as strings."""
    lookup = {str(i): i for i in range(task.num_classes)}
    lookup.update({name.lower(): i for i, name in enumerate(task.label_names)})
    lookup.update({word.lower(): i for i, word in enumerate(task.templates[0].verbalizer)})
    return lookup


def rows_to_examples(rows: list[Mapping], task: Task, source: str, text_field: str | None = None,
                     label_field: str = "label") -> list[Example]:
    """Convert raw rows to :class:`Example` s, checking columns and labels."""
    if not rows:
        raise DataError(f"{source} holds no rows.")
    columns = list(rows[0].keys())
    candidates = (text_field,) if text_field else task.text_fields
    text_col = next((c for c in candidates if c in columns), None)
    if text_col is None:
        raise DataError(f"{source} has no text column {' / '.join(candidates)} (columns: {columns}); "
                        f"pass --text-field NAME.")
    if label_field not in columns:
        raise DataError(f"{source} has no label column {label_field!r} (columns: {columns}); pass --label-field NAME.")
    lookup = label_lookup(task)
    examples, unknown = [], set()
    for number, row in enumerate(rows, 1):
        text = row[text_col]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}, row {number}: the text ({text_col!r}) is {text!r}; every example needs a "
                            "non-empty text (drop or fix that row).")
        value = row[label_field]
        key = str(int(value)) if isinstance(value, (bool, int, float)) and float(value).is_integer() else str(value)
        label = lookup.get(key.strip().lower())
        if label is None:
            unknown.add(value)
            continue
        examples.append(Example(normalize_text(text), label))
    if unknown:
        raise DataError(f"{source} has labels {sorted(map(str, unknown))[:10]} that are not classes of {task.name}: "
                        f"use 0..{task.num_classes - 1} or one of {list(task.label_names)}.")
    return examples


def load_examples(task: Task, split: str, *, data_dir: str | Path | None = None, file: str | Path | None = None,
                  hub: bool = False, text_field: str | None = None, label_field: str = "label") -> list[Example]:
    """The ``split`` (``"train"`` = demonstration pool, ``"eval"`` = evaluation pool) of ``task``.

    Sources, first match wins: ``file``; ``data_dir/<Task>/...``; the Hub (only with ``hub=True``).
    """
    if split not in SPLIT_FILE_NAMES:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
    if file is not None:
        rows, source = _read_file(Path(file)), str(file)
    elif data_dir is not None:
        rows, found = _find_local(task, split, Path(data_dir))
        source = f"{found} ({task.name} {split})"
    elif hub:
        rows, source = _read_hub(task, split), f"{task.hub.path} ({split})"
        text_field = text_field or task.hub.text_field
    else:
        raise DataError(f"No data source for {task.name}: pass --data-dir DIR (see `tint-hf prepare-data`), "
                        f"--train-file/--eval-file, or --hub to download from the HF Hub.")
    return rows_to_examples(rows, task, source, text_field, label_field)


def write_jsonl(examples: Iterable[Example], path: str | Path) -> int:
    """Write examples in the canonical layout (``{"text": ..., "label": int}`` per line); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps({"text": example.text, "label": example.label}, ensure_ascii=False) + "\n")
            n += 1
    return n
