"""llmft.config: imports no other llmft module, and each number derived from a recipe has one definition that the
CLI's printout, ``llmft plan``, the DeepSpeed config and the training loop all read."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, tiny_recipe, write_recipe

from llmft.config import load_recipe
from llmft.config.recipe import attention_kernel
from llmft.summary import derived_numbers

CONFIG = REPO / "llmft" / "config"


def test_config_imports_no_other_llmft_module():
    # statically: every llmft import in the package stays inside it
    for path in sorted(CONFIG.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name.split(".")[0] == "llmft":
                    assert name.startswith("llmft.config"), f"{path.name} imports {name}"
    # and at run time: importing it loads no other llmft module (nor torch)
    code = ("import sys, llmft.config; print(sorted(m for m in sys.modules if m.startswith('llmft') "
            "and m != 'llmft' and not m.startswith('llmft.config'))); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "False"


@pytest.fixture
def recipe_at(tiny_model, text_file, tmp_path):
    def make(**sections):
        return load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, text_file, tmp_path / "run",
                                                                         **sections)))
    return make


def test_tokens_per_step_and_total_steps(recipe_at):
    r = recipe_at(train={"micro_batch_size": 3, "gradient_accumulation_steps": 5, "max_steps": None,
                         "max_tokens": 100_000}, model={"max_seq_len": 64})
    assert r.sequences_per_step(4) == 3 * 5 * 4
    assert r.tokens_per_step(4) == 3 * 5 * 4 * 64
    assert r.total_steps(4) == math.ceil(100_000 / (3 * 5 * 4 * 64)) == 27
    assert r.total_steps(1) == math.ceil(100_000 / (3 * 5 * 64))
    r = recipe_at(train={"max_steps": 7})
    assert r.total_steps(8) == 7


def test_adapters_and_zero_stage(recipe_at, tmp_path):
    full = recipe_at()
    assert not full.uses_adapters and full.adapter is None
    lora = recipe_at(method="lora")
    assert lora.uses_adapters and lora.adapter is lora.lora and lora.adapter.rank == 8
    assert recipe_at(deepspeed={"stage": 1}).zero_stage == 1
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert recipe_at(deepspeed={"stage": 1, "config": str(ds)}).zero_stage == 3  # the JSON wins
    ds.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}}))
    r = recipe_at(deepspeed={"stage": 2, "config": str(ds)})
    assert r.zero_stage == 2
    from llmft.train.engine import deepspeed_config

    cfg = deepspeed_config(r, 2)  # the launch uses the stage the recipe reports, not DeepSpeed's default 0
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["train_batch_size"] == r.sequences_per_step(2)


@pytest.mark.parametrize("requested,flash,precision,expected", [
    ("auto", True, "bf16", "flash_attention_2"), ("auto", True, "fp16", "flash_attention_2"),
    ("auto", True, "fp32", "sdpa"), ("auto", False, "bf16", "sdpa"), ("sdpa", True, "bf16", "sdpa"),
    ("eager", False, "fp32", "eager"), ("flash_attention_2", False, "bf16", "flash_attention_2"),
])
def test_attention_kernel(requested, flash, precision, expected):
    assert attention_kernel(requested, flash, precision) == expected


def test_cli_plan_and_loop_read_the_same_numbers(recipe_at):
    from llmft.model.load import resolve_attention
    from llmft.plan import setup_from_recipe

    r = recipe_at(train={"micro_batch_size": 2, "gradient_accumulation_steps": 3, "max_steps": None,
                         "max_tokens": 5000}, method="lora")
    lines = derived_numbers(r, 2)
    assert f"tokens per step         {r.tokens_per_step(2):,}" in lines
    assert f"steps                   {r.total_steps(2)} ({r.total_steps(2) * r.tokens_per_step(2):,} tokens)" in lines
    st = setup_from_recipe(r, world_size=2, device="cpu")
    assert (st.micro_batch * st.accumulation * st.world_size, st.lora) == (r.sequences_per_step(2), r.adapter)
    assert st.stage == r.zero_stage and st.attention == r.model.attention_kernel(False, r.train.precision)
    assert resolve_attention(r.model.attention, r.train.precision)[0] == st.attention  # no flash-attn on CPU
    auto = recipe_at(model={"attention": "auto"}, train={"precision": "bf16"})
    assert setup_from_recipe(auto, device="cuda").attention == "flash_attention_2"
    assert setup_from_recipe(auto, device="cpu").attention == "sdpa"
    fp32 = recipe_at(model={"attention": "auto"}, train={"precision": "fp32"})
    assert setup_from_recipe(fp32, device="cuda").attention == "sdpa"  # flash-attn would refuse fp32 at launch


def test_no_recomputed_derived_numbers():
    # the expressions the config now owns appear nowhere else in the package
    banned = ['method in ("lora", "qlora")', "micro_batch_size * t.gradient_accumulation_steps",
              'attention == "auto"']
    for path in sorted(
        [*(REPO / "llmft").rglob("*.py"), *(REPO / "docs").glob("*.py"), *(REPO / "bench").glob("*.py")]
    ):
        if path.parent == CONFIG:
            continue
        text = path.read_text(encoding="utf-8")
        for expr in banned:
            assert expr not in text, f"{path.relative_to(REPO)} recomputes {expr!r}; use llmft.config.Recipe"


def test_library_does_not_import_the_test_fixtures():
    for path in sorted((REPO / "llmft").rglob("*.py")):
        if "testing" in path.relative_to(REPO / "llmft").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("llmft.testing") for n in names), f"{path.relative_to(REPO)} imports {names}"


def test_shipped_paths_resolve_from_any_directory_and_local_files_win(tmp_path, monkeypatch):
    from llmft.config.loading import PACKAGE_DIR, shipped_path

    monkeypatch.chdir(REPO)  # a clone reads its own files, relative paths kept
    r = load_recipe("recipes/cpu/tiny_pi8x.yaml")
    assert str(r.data.sources[0].path) == "llmft/assets/frankenstein.txt.gz"
    assert str(r.model.produced_by) == "recipes/cpu/tiny_base.yaml"
    monkeypatch.chdir(tmp_path)  # elsewhere: the installed copies
    r = load_recipe("recipes/cpu/tiny_pi8x.yaml")
    assert r.data.sources[0].path == PACKAGE_DIR / "assets" / "frankenstein.txt.gz"
    assert r.model.produced_by == PACKAGE_DIR / "recipes" / "cpu" / "tiny_base.yaml"
    assert shipped_path("recipes/no_such.yaml") is None and shipped_path("meta-llama/Llama-2-7b-hf") is None
    # a file of the user's at the same relative path is theirs, not the shipped one
    (tmp_path / "llmft" / "assets").mkdir(parents=True)
    (tmp_path / "llmft" / "assets" / "frankenstein.txt.gz").write_bytes(
        (PACKAGE_DIR / "assets" / "frankenstein.txt.gz").read_bytes())
    r = load_recipe("recipes/cpu/tiny_pi8x.yaml")
    assert str(r.data.sources[0].path) == "llmft/assets/frankenstein.txt.gz"
    assert r.data.sources[1].path == PACKAGE_DIR / "assets" / "mobydick.txt.gz"
