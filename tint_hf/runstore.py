"""One store for resumable runs: what each result was computed from, and the results.

A run folder holds a manifest, ``run.json``::

    {"format": 1, "settings": {...}, "provenance": {"model": "sha256:...", "data/SST2": "sha256:...", ...}}

and the finished results, one JSON object per line with a ``"key"`` in a records file (``cells.jsonl`` for
``tint-hf eval``, ``stages.jsonl`` for a mesa conversion, ...). :meth:`RunStore.put` appends and flushes at once, so a
run killed at any point keeps every finished record and a rerun skips them.

Nothing is mixed silently: once a folder holds records, a run whose settings (other than those the caller declares
free, e.g. which cells to run) or whose provenance (content hashes of the model weights, tokenizer, data, package
versions: :func:`fingerprint_model`, :func:`fingerprint_json`, ...) differ from the manifest's is refused with a
:class:`RunStoreError` naming what changed and how to start fresh. Damaged files are named with their line and the
fix; the one damage a kill can cause (a last line cut short) is dropped and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Collection, Iterable
from pathlib import Path

import torch

MANIFEST = "run.json"
FORMAT = 1
RENAMED_SETTINGS = {"n_steps": "num_steps"}  # manifests written before a setting was renamed read as today's name


class RunStoreError(ValueError):
    """A run folder that cannot be resumed as asked: other settings or inputs, or a damaged file."""


def _digest(update) -> str:
    h = hashlib.sha256()
    update(h)
    return "sha256:" + h.hexdigest()[:32]


def fingerprint_json(value) -> str:
    """Content hash of a JSON-ready value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return _digest(lambda h: h.update(text.encode("utf-8")))


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Content hash of named tensors: each name, dtype, shape and the raw bytes."""
    def update(h) -> None:
        for name, tensor in named:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
            if flat.numel():
                h.update(flat.view(torch.uint8).numpy().data)
    return _digest(update)


def fingerprint_model(model: torch.nn.Module) -> str:
    """Content hash of a model: its configuration (without paths and versions) and every tensor of its state dict."""
    config = getattr(model, "config", None)
    described = {}
    if config is not None:
        described = {k: v for k, v in config.to_dict().items()
                     if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    state = model.state_dict()
    return fingerprint_json([type(model).__name__, described,
                             fingerprint_tensors((name, state[name]) for name in sorted(state))])


def fingerprint_tokenizer(tokenizer) -> str:
    """Content hash of a tokenizer: its vocabulary, merges, normaliser and post-processor (fast tokenizers), special
    tokens and padding side."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return fingerprint_json([type(tokenizer).__name__, body, tokenizer.special_tokens_map,
                             getattr(tokenizer, "padding_side", None)])


def fingerprint_file(path: str | Path) -> str:
    """Content hash of a file."""
    def update(h) -> None:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return _digest(update)


def versions() -> dict[str, str]:
    """The versions of the packages whose code computes a result."""
    import transformers

    from . import __version__
    return {"tint_hf": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def _differences(old: dict, new: dict, skip: Collection[str] = ()) -> list[str]:
    names = sorted(k for k in set(old) | set(new) if k not in skip and old.get(k) != new.get(k))
    return [f"{k}: {_short(old.get(k, '(absent)'))} -> {_short(new.get(k, '(absent)'))}" for k in names]


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


class RunStore:
    """A resumable run in ``folder``: a manifest (settings, provenance) and records keyed by strings.

    Args:
        folder: the run's folder (created on the first write).
        records: the records file's name inside ``folder``.
        fresh_start: how the user starts over, for the messages (e.g. "pass --overwrite or use another --out").
        overwrite: discard a previous run in ``folder`` (its manifest, records and ``also_remove``) instead of
            refusing one that differs.
        also_remove: other files of the run that ``overwrite`` removes (result tables, plots).
    """

    def __init__(self, folder: str | Path, records: str = "records.jsonl", *,
                 fresh_start: str = "use another output folder or delete this one", overwrite: bool = False,
                 also_remove: Iterable[str] = ()):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise RunStoreError(f"{self.folder} is a file, not a folder for a run's results; give a folder path.")
        self.records_path = self.folder / records
        self.manifest_path = self.folder / MANIFEST
        self.fresh_start = fresh_start
        if overwrite:
            for name in (MANIFEST, records, *also_remove):
                (self.folder / name).unlink(missing_ok=True)
        self.manifest = self._read_manifest()
        self.records: dict[str, dict] = self._read_records()
        if self.records and self.manifest is None:
            raise RunStoreError(f"{self.records_path} has results but {self.folder} has no {MANIFEST} saying what they "
                                f"were computed from (written by an older tint_hf, or the manifest was removed); "
                                f"{self.fresh_start}.")
        if self.manifest is None:
            self.manifest = {"format": FORMAT, "settings": {}, "provenance": {}}

    # -- reading -------------------------------------------------------------------------------------------------
    def _read_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunStoreError(f"{self.manifest_path} is damaged ({error}); {self.fresh_start}.") from None
        if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
                and isinstance(manifest.get("settings"), dict) and isinstance(manifest.get("provenance"), dict)):
            raise RunStoreError(f"{self.manifest_path} is not a tint_hf run manifest (format {FORMAT}); "
                                f"{self.fresh_start}.")
        manifest["settings"] = {RENAMED_SETTINGS.get(k, k): v for k, v in manifest["settings"].items()}
        return manifest

    def _read_records(self) -> dict[str, dict]:
        if not self.records_path.exists():
            return {}
        try:
            text = self.records_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise RunStoreError(f"{self.records_path} is not UTF-8 text ({error}); {self.fresh_start}.") from None
        lines = text.split("\n")
        records: dict[str, dict] = {}
        where: dict[str, int] = {}
        cut = False
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if number == len(lines):  # the last line has no newline: a write cut short by a kill
                    warnings.warn(f"{self.records_path}:{number}: dropping a record cut short (an interrupted "
                                  "write); it is computed again.", stacklevel=3)
                    cut = True
                    continue
                raise RunStoreError(f"{self.records_path}:{number} is not valid JSON ({error}); delete that line "
                                    f"to recompute it, or {self.fresh_start}.") from None
            if not isinstance(record, dict) or not isinstance(record.get("key"), str):
                raise RunStoreError(f"{self.records_path}:{number} is not a record of this run (a JSON object with a "
                                    f"string \"key\"); delete that line, or {self.fresh_start}.")
            key = record["key"]
            if key in records and records[key] != record:
                raise RunStoreError(f"{self.records_path}: lines {where[key]} and {number} hold different results "
                                    f"for {key!r}; delete the wrong one, or {self.fresh_start}.")
            records.setdefault(key, record)
            where.setdefault(key, number)
        if cut or len(records) != sum(1 for line in lines if line.strip()):
            self._rewrite(records)
        return records

    def _rewrite(self, records: dict[str, dict]) -> None:
        tmp = self.records_path.with_suffix(self.records_path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records.values()), encoding="utf-8")
        tmp.replace(self.records_path)

    # -- checking what the records were computed from ------------------------------------------------------------
    def check_settings(self, settings: dict, free: Collection[str] = ()) -> None:
        """Refuse ``settings`` (JSON-ready) if records exist that were computed with others; ``free`` names settings
        that only choose which records a call computes, so they may differ. Records the new settings."""
        settings = json.loads(json.dumps(settings, default=str))
        if self.records:
            changed = _differences(self.manifest["settings"], settings, skip=free)
            if changed:
                raise RunStoreError(f"{self.folder} holds {len(self.records)} results computed with other settings "
                                    f"({'; '.join(changed)}); {self.fresh_start}.")
        self.manifest["settings"] = settings
        self._write_manifest()

    def check_provenance(self, name: str, value) -> None:
        """Refuse if records exist and ``name`` (e.g. ``"model"``, ``"data/SST2"``) was recorded with another
        ``value``; record it otherwise. Values are fingerprints or small JSON-ready facts."""
        value = json.loads(json.dumps(value, default=str))
        known = self.manifest["provenance"]
        if self.records and name in known and known[name] != value:
            raise RunStoreError(f"{self.folder} holds {len(self.records)} results computed from another {name} "
                                f"({_short(known[name])} -> {_short(value)}: the input changed since); "
                                f"{self.fresh_start}.")
        if known.get(name) != value:
            known[name] = value
            self._write_manifest()

    def _write_manifest(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(self.manifest_path)

    # -- records -------------------------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def put(self, key: str, record: dict) -> dict:
        """Append ``record`` under ``key`` (flushed at once); a key holds one result."""
        if key in self.records:
            raise RunStoreError(f"{self.records_path} already holds {key!r}; a result is written once.")
        record = {"key": key, **{k: v for k, v in record.items() if k != "key"}}
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.manifest_path.exists():
            self._write_manifest()
        with self.records_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        self.records[key] = record
        return record


__all__ = ["MANIFEST", "RunStore", "RunStoreError", "fingerprint_file", "fingerprint_json", "fingerprint_model",
           "fingerprint_tensors", "fingerprint_tokenizer", "versions"]
