"""Safety: secrets never reach logs, recipe dumps, metrics, wandb files or checkpoints; no checkpoint file is
unpickled in a way that could run code; the source never loads pickles unsafely or turns on remote code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_recipe, write_recipe

from llmft.train.checkpoint import CheckpointError
from llmft.train.engine import check_deepspeed_pickles

SECRETS = {
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef5ec2e7aa",  # 40 hex characters, like a real key
    "HF_TOKEN": "hf_llmftSecretTokenDoNotLog4711",
    "HUGGING_FACE_HUB_TOKEN": "hf_llmftOtherSecretDoNotLog0815",
}


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {n.decode()}" for n in needles if n in data]
    return hits


def test_secrets_never_reach_outputs(tmp_path, tiny_model, text_file):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_model, text_file, run_dir, train={"max_steps": 4},
                         checkpoint={"every_steps": 2, "keep_last": 3},
                         eval={"every_steps": 2, "lengths": [64], "max_windows": 1})
    recipe["logging"]["wandb"] = {"mode": "offline", "project": "secrets-test"}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    env = {**os.environ, **SECRETS, "WANDB_DIR": str(tmp_path / "wandb-dir")}
    outputs = []
    for cmd in ([sys.executable, "launch/train.py", str(path)],
                [sys.executable, "-m", "llmft.cli", "validate", str(path)],
                [sys.executable, "-m", "llmft.cli", "eval", "--ppl", "pg19", "--model", str(run_dir / "final"),
                 "--data", str(text_file.parent), "--lengths", "64", "--max-docs", "1",
                 "--out", str(tmp_path / "eval"), "--wandb-project", "secrets-test"]):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
        outputs.append(proc.stdout + proc.stderr)
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    assert list((run_dir / "checkpoints").glob("step-*")) and (tmp_path / "eval").is_dir()

    needles = [s.encode() for s in SECRETS.values()]
    assert files_containing(tmp_path, needles) == []  # run dir, wandb files, checkpoints, eval outputs
    assert [n for n in needles for out in outputs if n in out] == []  # console output


class RunsCode:
    """Unpickling this runs code: it writes ``flag``."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return exec, (f"open({str(self.flag)!r}, 'w').write('ran')",)


def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path):
    ds = tmp_path / "state" / "deepspeed"
    ds.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}, "ds_version": "0.19.8"}, ds / "mp_rank_00_model_states.pt")
    check_deepspeed_pickles(ds)  # plain data passes

    flag = tmp_path / "ran.txt"
    torch.save({"optimizer_state_dict": {"x": RunsCode(flag)}}, ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt is not a plain-data"):
        check_deepspeed_pickles(ds)
    assert not flag.exists()


SOURCES = [p for d in ("llmft", "launch", "bench", "eval", "docs") for p in (REPO / d).rglob("*.py")]


@pytest.mark.parametrize("pattern, why", [
    (r"torch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True"),
    (r"\byaml\.(load|unsafe_load|full_load)\(", "yaml loading other than yaml.safe_load"),
    (r"\bpickle\.loads?\(|\bdill\b|\bcloudpickle\b", "unpickling"),
    (r"trust_remote_code\s*=\s*True", "remote code turned on in the source"),
    (r"(?<![\w.])(eval|exec)\(", "eval/exec of strings"),
])
def test_the_source_never_loads_unsafely(pattern, why):
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in SOURCES
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert hits == [], f"{why}:\n" + "\n".join(hits)
