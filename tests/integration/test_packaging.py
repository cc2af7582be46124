"""What a wheel install ships: the package data the library reads at run time (the HELM core suite, the bundled
tiny model and books, the shipped recipes) is inside the wheel, and the ``llmft`` command of a fresh virtualenv
validates a shipped recipe, resolves the HELM suite and runs the quickstart from a directory outside the
repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from llmft.eval.helm import DEFAULT_SUITE, load_helm_suite

pytestmark = pytest.mark.slow  # builds a wheel

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # symlinks followed: llmft/recipes and llmft/data_recipes link to the repository's recipes/ and data_recipes/
    shutil.copytree(REPO / "llmft", src / "llmft", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(src)], check=True, cwd=tmp)
    return next((tmp / "dist").glob("llmft-*.whl"))


def test_a_wheel_ships_the_helm_suite_the_assets_and_the_recipes(wheel, tmp_path):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "llmft/eval/helm/core.yaml" in names
    assert "llmft/assets/tiny-llama/tokenizer.json" in names and "llmft/assets/frankenstein.txt.gz" in names
    shipped = {p.relative_to(REPO).as_posix() for p in [*(REPO / "recipes").rglob("*.yaml"),
                                                        *(REPO / "data_recipes").glob("*.yaml")]}
    assert shipped and {f"llmft/{p}" for p in shipped} <= names

    # installed apart from the repository and run from elsewhere: the default suite resolves inside the install
    subprocess.run([*PIP, "install", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, cwd=tmp_path)
    run = tmp_path / "elsewhere"
    run.mkdir()
    probe = ("import json, llmft.eval.helm as h; s = h.load_helm_suite(); "
             "print(json.dumps({'file': str(h.DEFAULT_SUITE), 'scenarios': [x.name for x in s.scenarios]}))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=run, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(tmp_path / "site"))
    assert (
        got["scenarios"] == [s.name for s in load_helm_suite(DEFAULT_SUITE).scenarios] and len(got["scenarios"]) == 16
    )


def test_the_llmft_command_of_a_fresh_virtualenv_works_outside_the_repository(wheel, tmp_path):
    # a fresh virtualenv holding only the wheel; its dependencies come from this environment's site-packages (a
    # path in a .pth file: that directory's own .pth files, e.g. the repository's editable install, are not read)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*PIP, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], check=True)
    llmft = venv / "bin" / "llmft"
    run = tmp_path / "elsewhere"
    run.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(llmft), *args], cwd=run, capture_output=True, text=True, env=env, timeout=600)

    probe = subprocess.run([python, "-c", "import llmft; print(llmft.__file__)"], cwd=run, capture_output=True,
                           text=True, env=env, check=True)
    assert probe.stdout.strip().startswith(str(site))  # the installed copy, not the repository's

    # a shipped recipe by its repository path: it and the files it names are read from the install
    v = call("validate", "recipes/cpu/tiny_pi8x.yaml")
    assert v.returncode == 0, v.stderr
    assert "recipes/cpu/tiny_pi8x.yaml: valid" in v.stdout
    assert f"produced_by: {site / 'llmft/recipes/cpu/tiny_base.yaml'}" in v.stdout
    assert f"path: {site / 'llmft/assets/frankenstein.txt.gz'}" in v.stdout

    # the HELM suite resolves from package data: an unknown scenario is refused naming the suite's scenarios
    e = call("eval", "--helm", "no_such_scenario", "--model", "unused")
    assert e.returncode == 2 and "no_such_scenario" in e.stderr and "boolq" in e.stderr and "mmlu" in e.stderr

    # the quickstart, CI-sized
    q = call("quickstart", "--fast", "--out", "qs")
    assert q.returncode == 0, q.stdout[-2000:] + q.stderr[-2000:]
    assert (run / "qs" / "ppl.md").read_text().startswith("| context | base (128) |")
    assert (run / "qs" / "extended" / "final" / "config.json").is_file()
    assert not (REPO / "qs").exists()
