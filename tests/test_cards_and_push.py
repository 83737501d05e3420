"""Model cards (tint_hf/cards.py, model_cards/) and `tint-hf push`, offline: the committed cards are what the
generator renders, their metadata parses, quoted numbers match bench/RESULTS.md; a pushed folder loads with
``trust_remote_code=True`` in a fresh process without tint_hf, and the upload goes to the Hub API as one folder."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_opt
from huggingface_hub import ModelCard, metadata_load

from tint_hf import MesaLlamaForCausalLM, MesaOPTForCausalLM, TinTForCausalLM, cards
from tint_hf.cli import main

ROOT = Path(__file__).resolve().parents[1]
CARD_DIR = ROOT / "model_cards"
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def test_committed_cards_are_what_the_generator_renders():
    assert sorted(p.stem for p in CARD_DIR.glob("*.md")) == sorted(cards.CARDS)
    for name in cards.CARDS:
        assert (CARD_DIR / f"{name}.md").read_text(encoding="utf-8") == str(cards.render_card(name)) + "\n", (
            f"model_cards/{name}.md is stale: run `python -m tint_hf.cards model_cards`")


@pytest.mark.parametrize("name", sorted(cards.CARDS))
def test_card_metadata_parses_with_the_hub_fields(name):
    spec, path = cards.CARDS[name], CARD_DIR / f"{name}.md"
    meta = metadata_load(path)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == spec.base_model and meta["model_name"] == name
    assert "custom_code" in meta["tags"]
    assert meta["license"] == spec.license["license"]
    if meta["license"] == "other":
        assert meta["license_name"] and meta["license_link"].startswith("https://")
    card = ModelCard.load(path)
    assert card.data.to_dict() == meta
    assert f'from_pretrained("{spec.repo_id}", trust_remote_code=True' in card.text
    assert f"--card {name}" in card.text


def results_table() -> dict[tuple[str, str, str], list[str]]:
    """The "TinT fidelity" table of bench/RESULTS.md: (aux, dtype, backward) -> the remaining cells."""
    text = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8").split("## TinT fidelity")[1].split("\n## ")[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[1].startswith("float"):
            rows[tuple(cells[:3])] = cells[3:]
    return rows


def test_quoted_fidelity_numbers_are_those_of_bench_results():
    table = results_table()
    quoted = [(spec.fidelity_family, row) for spec in cards.CARDS.values() for row in spec.fidelity]
    assert len(quoted) == 12
    for family, row in quoted:
        cells = table[(family, row.dtype, row.backward)]
        assert [row.first_pass_vs_hf, row.delta_vs_tint_step, row.delta_vs_exact_sgd] == cells[:3]


def test_quoted_smollm2_perplexities_are_those_of_bench_results():
    text = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8").split("## TinT from a real pretrained")[1]
    table = text.split("| method | inner lr (chosen on dev) |")[1].split("\n\n")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()[2:]]
    quoted = cards.CARDS["tint-smollm2-135m"].real_eval
    assert len(rows) == len(quoted) == 3
    for (_, lr, before, after), row in zip(quoted, rows):
        assert [float(lr), before, after] == [float(row[1]), row[2], row[3]]


def test_quoted_conversion_perplexities_are_those_of_bench_results():
    text = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8").split("## Mesa conversion of a real")[1]
    table = text.split("\n## ")[0].split("Layers 26-29:")[1].strip().split("\n\n")[0]
    header, _, *rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    cells = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    quoted = cards.CARDS["mesa-smollm2-135m"].conversion_result
    assert len(quoted) >= 5
    for model, column, value in quoted:
        assert cells[model][column] == value, (model, column)


def test_the_recorded_conversion_study_is_the_benchs_output():
    """The card reads tint_hf/data/results/mesa_conversion.json (shipped with the package); it is the study folder's
    results.json byte for byte (bench/mesa_conversion.py --record writes both)."""
    record = ROOT / "tint_hf" / "data" / "results" / "mesa_conversion.json"
    assert record.read_bytes() == (ROOT / "bench" / "mesa_conversion" / "results.json").read_bytes()


def test_cited_tests_exist():
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    for spec in cards.CARDS.values():
        for name in spec.verified_by:
            assert re.search(rf"^def {name}\(", sources, re.MULTILINE), name


def test_card_sizes_are_those_of_the_constructed_model():
    """The generator counts on a meta-device model; a TinT really built by from_auxiliary stores as many numbers."""
    aux = tiny_gpt2(dtype=torch.float32)
    spec = dataclasses.replace(cards.CARDS["tint-gpt2"], base_shapes=aux.config, construction=dict(num_prefixes=8, num_attention_heads=10))
    with mock.patch.dict(cards.CARDS, {"tint-gpt2": spec}):
        rows = dict(cards.details(spec))
    built = TinTForCausalLM.from_auxiliary(aux, num_prefixes=8, num_attention_heads=10)
    assert rows["parameters stored"].startswith(f"{built.num_parameters():,} ")
    assert rows["the authors' dense construction would store"] == f"{built.num_parameters(dense_equivalent=True):,}"


# ------------------------------------------------------------------------------------------------------------
# tint-hf push
# ------------------------------------------------------------------------------------------------------------
def tiny_checkpoint(kind: str, folder: Path, gpt2_tokenizer) -> tuple[torch.nn.Module, cards.CardSpec]:
    """A tiny TinT / MesaOPT saved with the GPT-2 tokenizer, and a card spec describing it."""
    if kind == "tint":
        aux = tiny_gpt2(dtype=torch.float32)
        model = TinTForCausalLM.from_auxiliary(aux, num_prefixes=8, inner_lr=0.05)
        spec = dataclasses.replace(cards.CARDS["tint-gpt2"], name="tint-tiny", base_shapes=aux.config,
                                   construction=dict(num_prefixes=8, inner_lr=0.05, backward="fd"))
    elif kind == "mesa_llama":
        llama = tiny_llama(dtype=torch.float32)
        model = MesaLlamaForCausalLM.from_llama(llama, mesa_layers=[1], mesa_solver="cg", cg_steps=16)
        spec = dataclasses.replace(cards.CARDS["mesa-smollm2-135m"], name="mesa-llama-tiny", base_shapes=llama.config,
                                   construction=dict(mesa_layers=[1], mesa_solver="cg", cg_steps=16))
    else:
        opt = tiny_opt(dtype=torch.float32)
        model = MesaOPTForCausalLM.from_opt(opt, mesa_layers=[0], mesa_solver="cg", cg_steps=30)
        spec = dataclasses.replace(cards.CARDS["mesa-opt-125m"], name="mesa-tiny", base_shapes=opt.config,
                                   construction=dict(mesa_layers=[0], mesa_solver="cg", cg_steps=30))
    model.save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return model.eval(), spec


FRESH_PROCESS = """
import json, sys, torch
sys.modules["tint_hf"] = None  # the plugin must not be importable: everything comes from the pushed folder
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
torch.save(logits, sys.argv[3])
print(json.dumps({"module": type(model).__module__, "vocab": len(tokenizer)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tint", "mesa", "mesa_llama"])
def test_push_stages_code_tokenizer_and_card_loads_in_a_fresh_process_and_uploads(tmp_path, kind, gpt2_tokenizer):
    model, spec = tiny_checkpoint(kind, tmp_path / "ckpt", gpt2_tokenizer)
    staged = tmp_path / "staged"
    with mock.patch.dict(cards.CARDS, {spec.name: spec}), mock.patch("tint_hf.commands.push.HfApi") as api_class:
        assert main(["push", str(tmp_path / "ckpt"), "--card", spec.name, "--repo-id", "me/tiny", "--staging",
                     str(staged), "--private", "--token", "hf_test"]) == 0
        expected_card = str(cards.render_card(spec.name, "me/tiny"))
    api_class.assert_called_once_with(token="hf_test")
    api = api_class.return_value
    api.create_repo.assert_called_once_with("me/tiny", private=True, exist_ok=True)
    api.upload_folder.assert_called_once()
    assert api.upload_folder.call_args.kwargs["repo_id"] == "me/tiny"
    assert Path(api.upload_folder.call_args.kwargs["folder_path"]) == staged

    files = {p.name for p in staged.iterdir()}
    code = {"tint": {"configuration_tint.py", "modeling_tint.py"},
            "mesa": {"configuration_mesa_opt.py", "modeling_mesa_opt.py", "mesa_op.py"},
            "mesa_llama": {"configuration_mesa_llama.py", "modeling_mesa_llama.py", "mesa_op.py"}}[kind]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} | code <= files
    assert set(json.loads((staged / "config.json").read_text())["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert (staged / "README.md").read_text(encoding="utf-8").strip() == expected_card.strip()
    assert metadata_load(staged / "README.md")["model_name"] == spec.name

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(staged), json.dumps(IDS.tolist()),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["module"].startswith("transformers_modules.") and loaded["vocab"] == len(gpt2_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(IDS).logits, rtol=0, atol=0)


def test_push_refuses_a_card_describing_another_model_and_dry_run_uploads_nothing(tmp_path, gpt2_tokenizer):
    tiny_checkpoint("tint", tmp_path / "ckpt", gpt2_tokenizer)
    with mock.patch("tint_hf.commands.push.HfApi") as api_class:
        with pytest.raises(SystemExit, match="does not match the card 'tint-gpt2'.*hidden_size 32 != 768"):
            main(["push", str(tmp_path / "ckpt"), "--card", "tint-gpt2", "--repo-id", "me/x", "--dry-run",
                  "--staging", str(tmp_path / "a")])
        with pytest.raises(SystemExit, match="model_type 'tint' != 'mesa_opt'"):
            main(["push", str(tmp_path / "ckpt"), "--card", "mesa-opt-125m", "--repo-id", "me/x", "--dry-run",
                  "--staging", str(tmp_path / "b")])
        _, spec = tiny_checkpoint("tint", tmp_path / "ckpt2", gpt2_tokenizer)
        with mock.patch.dict(cards.CARDS, {spec.name: spec}):
            assert main(["push", str(tmp_path / "ckpt2"), "--card", spec.name, "--repo-id", "me/x", "--dry-run",
                         "--staging", str(tmp_path / "c")]) == 0
    api_class.assert_not_called()
    assert (tmp_path / "c" / "README.md").exists() and (tmp_path / "c" / "model.safetensors").exists()
