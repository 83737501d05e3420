"""The run store (tint_hf/runstore.py) through its public API: records survive a kill and are read back, free
settings extend a run, any other change of settings or inputs is refused with the change named, fingerprints follow
the content (not the object), and manifests written before a setting was renamed still resume."""

from __future__ import annotations

import json

import pytest
import torch

from tint_hf.runstore import (
    MANIFEST,
    RunStore,
    RunStoreError,
    fingerprint_json,
    fingerprint_model,
    fingerprint_tensors,
)


def started(folder, settings=None, records=(("a", 1), ("b", 2))) -> RunStore:
    store = RunStore(folder)
    store.check_settings(settings or {"lr": 0.1, "seeds": [1]}, free=("seeds",))
    store.check_provenance("data", fingerprint_json([1, 2, 3]))
    for key, value in records:
        store.put(key, {"value": value})
    return store


def test_records_are_read_back_and_free_settings_extend_the_run(tmp_path):
    started(tmp_path)
    again = RunStore(tmp_path)
    assert "a" in again and again.get("b") == {"key": "b", "value": 2} and len(again.records) == 2
    again.check_settings({"lr": 0.1, "seeds": [1, 2]}, free=("seeds",))  # another choice of records: allowed
    again.check_provenance("data", fingerprint_json([1, 2, 3]))
    assert json.loads((tmp_path / MANIFEST).read_text())["settings"]["seeds"] == [1, 2]
    with pytest.raises(RunStoreError, match="already holds 'a'"):
        again.put("a", {"value": 3})


def test_other_settings_or_inputs_are_refused_with_the_change_named(tmp_path):
    started(tmp_path)
    with pytest.raises(RunStoreError, match=r"other settings \(lr: 0.1 -> 0.2\)"):
        RunStore(tmp_path).check_settings({"lr": 0.2, "seeds": [1]}, free=("seeds",))
    with pytest.raises(RunStoreError, match=r"another data .*the input changed"):
        RunStore(tmp_path).check_provenance("data", fingerprint_json([1, 2, 4]))
    fresh = RunStore(tmp_path, overwrite=True)  # overwrite starts over: nothing to conflict with
    assert not fresh.records
    fresh.check_settings({"lr": 0.2})


def test_a_record_cut_short_by_a_kill_is_dropped_and_damage_is_named(tmp_path):
    started(tmp_path)
    path = tmp_path / "records.jsonl"
    path.write_text(path.read_text() + '{"key": "c", "val')
    with pytest.warns(UserWarning, match=r"records.jsonl:3: dropping a record cut short"):
        store = RunStore(tmp_path)
    assert sorted(store.records) == ["a", "b"] and path.read_text().count("\n") == 2
    path.write_text('{"key": "a", "value": 1}\nnot json\n{"key": "b", "value": 2}\n')
    with pytest.raises(RunStoreError, match=r"records.jsonl:2 is not valid JSON"):
        RunStore(tmp_path)
    path.write_text('{"key": "a", "value": 1}\n{"key": "a", "value": 5}\n')
    with pytest.raises(RunStoreError, match=r"lines 1 and 2 hold different results for 'a'"):
        RunStore(tmp_path)
    path.unlink()
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(RunStoreError, match=r"run.json is damaged"):
        RunStore(tmp_path)


def test_records_without_a_manifest_are_refused(tmp_path):
    started(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(RunStoreError, match="no run.json saying what they were computed from"):
        RunStore(tmp_path)


def test_a_manifest_with_a_renamed_setting_resumes(tmp_path):
    """``n_steps`` (the name before ``num_steps``) in a manifest reads as ``num_steps``: the same settings resume,
    another value is still refused."""
    started(tmp_path, {"lr": 0.1, "n_steps": 2})
    assert RunStore(tmp_path).settings == {"lr": 0.1, "num_steps": 2}
    RunStore(tmp_path).check_settings({"lr": 0.1, "num_steps": 2})
    with pytest.raises(RunStoreError, match=r"num_steps: 2 -> 3"):
        RunStore(tmp_path).check_settings({"lr": 0.1, "num_steps": 3})


def test_fingerprints_follow_the_content():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert fingerprint_model(a) == fingerprint_model(b)  # another object, the same weights
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert fingerprint_model(a) != fingerprint_model(b)
    assert fingerprint_tensors([("w", torch.ones(2))]) != fingerprint_tensors([("w", torch.ones(2, 1))])  # shape
    assert fingerprint_tensors([("w", torch.ones(2))]) != fingerprint_tensors([("v", torch.ones(2))])  # name
    assert fingerprint_json({"x": [1, 2]}) == fingerprint_json({"x": [1, 2]}) != fingerprint_json({"x": [2, 1]})
