"""What a wheel install ships: the package data the library reads at run time (the HELM core suite, the bundled
tiny model and books) is inside the wheel, found from a directory outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

from llmft.eval.helm import DEFAULT_SUITE, load_helm_suite

pytestmark = pytest.mark.slow  # builds a wheel


def test_a_wheel_ships_the_helm_suite_and_the_assets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "llmft", src / "llmft", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("llmft-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "llmft/eval/helm/core.yaml" in names
    assert "llmft/assets/tiny-llama/tokenizer.json" in names and "llmft/assets/frankenstein.txt.gz" in names

    # installed apart from the repository and run from elsewhere: the default suite resolves inside the install
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, cwd=tmp_path)
    run = tmp_path / "elsewhere"
    run.mkdir()
    probe = ("import json, llmft.eval.helm as h; s = h.load_helm_suite(); "
             "print(json.dumps({'file': str(h.DEFAULT_SUITE), 'scenarios': [x.name for x in s.scenarios]}))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=run, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(tmp_path / "site"))
    assert got["scenarios"] == [s.name for s in load_helm_suite(DEFAULT_SUITE).scenarios] and len(got["scenarios"]) == 16
