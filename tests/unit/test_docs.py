"""docs/hyperparameters.md: its recipe table is generated, current, lists every shipped recipe, and holds the real
numbers: totals from the model built from its config, trainable counts equal to the ``requires_grad`` parameters of
the PEFT model llmft builds, LLaMA-2-7B counted offline from the shipped published config."""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest
import torch
from conftest import REPO
from transformers import AutoConfig, AutoModelForCausalLM

from llmft.config import ModelConfig, load_recipe
from llmft.model import load as model_load
from llmft.model.adapters import apply_lora
from llmft.model.load import ModelLoadError, architecture_config, load_config, parameter_count_from_config

DOC = REPO / "docs" / "hyperparameters.md"
_spec = importlib.util.spec_from_file_location("gen_hyperparameters", REPO / "docs" / "gen_hyperparameters.py")
gen = sys.modules.setdefault("gen_hyperparameters", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(gen)

LLAMA2_7B = 6_738_415_616


def table() -> dict[str, dict[str, str]]:
    """The generated table of docs/hyperparameters.md: recipe path -> {column header: cell}."""
    text = DOC.read_text(encoding="utf-8")
    block = text[text.index(gen.BEGIN) + len(gen.BEGIN): text.index(gen.END)].strip().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
    header, rows = cells[0], cells[2:]
    out = {}
    for row in rows:
        path = row[0][row[0].index("](../") + 5: -1]  # [`cpu/x.yaml`](../recipes/cpu/x.yaml)
        out[path] = dict(zip(header, row))
    return out


def number(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_docs_table_is_current(capsys):
    # fails when a recipe or the counting code changed without `python docs/gen_hyperparameters.py`
    assert gen.main(["--check"]) == 0, capsys.readouterr().err


def test_check_reports_a_stale_table_and_the_generator_fixes_it(tmp_path, capsys):
    stale = tmp_path / "hyperparameters.md"
    stale.write_text(DOC.read_text(encoding="utf-8").replace("| 139,726,848 |", "| 139,726,847 |"), encoding="utf-8")
    assert gen.main(["--check", "--doc", str(stale)]) == 1
    assert "the recipe table is stale" in capsys.readouterr().err
    assert gen.main(["--doc", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == DOC.read_text(encoding="utf-8")


def test_table_lists_every_shipped_recipe():
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "recipes").rglob("*.yaml")}
    assert set(table()) == shipped and len(shipped) >= 7


def test_tiny_lora_trainable_count_equals_a_real_peft_model(monkeypatch):
    monkeypatch.chdir(REPO)
    row = table()["recipes/cpu/tiny_pi8x_lora.yaml"]
    recipe = load_recipe("recipes/cpu/tiny_pi8x_lora.yaml")
    # runs/tiny-base/final is written by model.produced_by (tiny_base.yaml: a random init of this config)
    config = AutoConfig.from_pretrained(REPO / "llmft" / "assets" / "tiny-llama")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, recipe.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert number(row["trainable params"]) == trainable
    assert number(row["total params"]) == total == 1_303_680
    # by hand: 4 layers x 4 projections x r (128 + 128), embedding 2048 x 128, 2 x 4 + 1 norms of 128
    assert trainable == 4 * 4 * 8 * (128 + 128) + 2048 * 128 + 9 * 128
    assert row["trainable %"] == f"{100 * trainable / total:.2f}%"
    assert (row["r"], row["alpha"], row["scale"], row["targets"], row["trainable extras"]) == (
        "8", "16", "α/r = 2", "q k v o", "embed, norm")


def test_llama2_7b_counts_from_the_shipped_config(monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(model_load, "_FALLBACK_LOGGED", set())
    rows = table()
    m = load_recipe("recipes/llama2_32k_qlora.yaml").model
    with caplog.at_level(logging.INFO, logger="llmft.model.load"):
        config = architecture_config(m)
    assert "llmft/assets/configs/meta-llama--Llama-2-7b-hf/config.json" in caplog.text
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size) == (
        4096, 32, 11008, 32000)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 8.0
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.max_position_embeddings == 32768
    assert parameter_count_from_config(m) == LLAMA2_7B
    for name in ("llama2_32k.yaml", "llama2_32k_lora.yaml", "llama2_32k_qlora.yaml"):
        assert number(rows[f"recipes/{name}"]["total params"]) == LLAMA2_7B
    # LongLoRA: r=8 on q/k/v/o (4096 -> 4096) + embedding 32000 x 4096 + 65 RMSNorms of 4096
    assert number(rows["recipes/llama2_32k_lora.yaml"]["trainable params"]) == \
        32 * 4 * 8 * (4096 + 4096) + 32000 * 4096 + 65 * 4096
    # QLoRA: r=64 on q/k/v/o and gate/up (4096 -> 11008) and down (11008 -> 4096)
    assert number(rows["recipes/llama2_32k_qlora.yaml"]["trainable params"]) == \
        32 * 64 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    # PI's global batch: 1 micro x 8 accumulation x 8 GPUs x 32768 tokens
    assert rows["recipes/llama2_32k.yaml"]["effective batch (tokens)"] == "2,097,152 (64 × 32,768)"


def test_shipped_config_is_only_a_fallback_for_known_hub_ids(tiny_model):
    # a hub id with no shipped config still fails, naming it
    with pytest.raises(ModelLoadError, match="cannot load model config 'example-org/not-shipped'"):
        load_config(ModelConfig(name="example-org/not-shipped", max_seq_len=128))
    assert architecture_config(ModelConfig(name="example-org/not-shipped", max_seq_len=128)) is None
    # a local directory is read as it is
    assert load_config(ModelConfig(name=str(tiny_model), max_seq_len=128))[0].hidden_size == 64
