"""Kills at any moment lose nothing: a run SIGKILLed at 6 seeded random points, and at every stage of a
checkpoint write, is resumed by re-running the same command each time, every resume starts from a checkpoint
that verifies, and the final weights are bitwise equal to an uninterrupted run's."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_recipe, write_recipe
from safetensors.torch import load_file

from llmft.config import load_recipe
from llmft.train import checkpoint as ckpt
from llmft.train.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # bitwise across processes
KILLS = 6  # random kills of one run (each costs a start-up); every stage of a write is killed in the test below


def step_of(path: Path | None) -> int:
    return 0 if path is None else int(path.name.split("-")[1])


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def wait_for_text(proc: subprocess.Popen, log: Path, text: str, timeout: float = 300) -> bool:
    """True once ``text`` is in the process's output; False when the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in log.read_text():
            return True
        if proc.poll() is not None:
            return text in log.read_text()
        time.sleep(0.005)
    raise TimeoutError(f"{text!r} did not appear in {log} within {timeout} s")


def resumed_from(log: Path) -> str:
    return next(line for line in log.read_text().splitlines() if "resume  " in line).split("resume", 1)[1].strip()


def assert_equals_uninterrupted(tmp_path, tiny_model, text_file, run_dir: Path, steps: int) -> None:
    """Every step logged once, the same losses, and bitwise equal final weights."""
    reference = train(load_recipe(write_recipe(tmp_path / "straight.yaml", tiny_recipe(
        tiny_model, text_file, tmp_path / "straight", train={"max_steps": steps}))))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    resumed = load_file(run_dir / "final" / "model.safetensors")
    straight = load_file(reference.final_dir / "model.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)  # bitwise


def test_killed_at_six_random_points_resumes_to_bitwise_equal_weights(tmp_path, tiny_model, text_file):
    steps, every = 24, 3
    run_dir = tmp_path / "killed"
    path = write_recipe(tmp_path / "killed.yaml", tiny_recipe(
        tiny_model, text_file, run_dir, train={"max_steps": steps}, checkpoint={"every_steps": every, "keep_last": 2}))
    cmd = [sys.executable, "launch/train.py", str(path)]
    rng = random.Random(20261122)
    during_write = 0
    for i in range(KILLS):
        start = ckpt.latest_complete(run_dir)
        assert start is None or ckpt.verify(start) is None
        # a step a little past the resume point, then a random moment within about a step and a checkpoint
        target = min(step_of(start) + rng.randint(1, 2 * every), steps - 1)
        delay = rng.uniform(0.0, 0.25)
        log = tmp_path / f"kill-{i}.log"
        proc = launch(cmd, log)
        reached = wait_for_text(proc, log, f"step {target}/{steps} ")
        assert reached, log.read_text()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, log.read_text()
        assert resumed_from(log) == (f"from {start}" if start else "fresh start")
        during_write += any((run_dir / "checkpoints").glob(".tmp-*"))
    print(f"{KILLS} kills, {during_write} of them during a checkpoint write")

    start = ckpt.latest_complete(run_dir)
    assert start is not None and ckpt.verify(start) is None
    log = tmp_path / "final.log"
    proc = launch(cmd, log)
    assert proc.wait(timeout=600) == 0, log.read_text()
    assert resumed_from(log) == f"from {start}"
    assert len(list((run_dir / "checkpoints").glob("step-*"))) <= 2  # keep_last, through every restart
    assert_equals_uninterrupted(tmp_path, tiny_model, text_file, run_dir, steps)


# Runs launch/train.py in-process, with the checkpoint code patched to SIGKILL the process at one stage of the
# ``nth`` checkpoint write of this process: a fault injected from outside the code under test.
KILLER = r'''
import os, runpy, signal, sys
from pathlib import Path

import torch
import llmft.train.checkpoint as ck

stage, nth = sys.argv.pop(1), int(sys.argv.pop(1))
seen = {"publish": 0, "save": 0}
in_rotation = [False]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


real_save = torch.save
def save(obj, f, *args, **kwargs):  # "state": optimizer.pt torn half-way
    if Path(str(f)).name == "optimizer.pt":
        seen["save"] += 1
        if stage == "state" and seen["save"] == nth:
            real_save(obj, f, *args, **kwargs)
            data = Path(f).read_bytes()
            Path(f).write_bytes(data[: len(data) // 2])
            die()
    return real_save(obj, f, *args, **kwargs)
torch.save = save


real_fsync_tree = ck._fsync_tree
def fsync_tree(root):  # "fsync": the biggest file lost its tail before it reached the disk
    if stage == "fsync" and seen["publish"] == nth:
        biggest = max((p for p in Path(root).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[:100])
        die()
    return real_fsync_tree(root)
ck._fsync_tree = fsync_tree


real_write_manifest = ck.write_manifest
def write_manifest(root, step):
    if stage == "manifest" and seen["publish"] == nth:  # half a manifest, never renamed into place
        (Path(root) / "manifest.json.tmp").write_text('{"step": %d, "files": {"mod' % step)
        die()
    real_write_manifest(root, step)
    if stage == "before-rename" and seen["publish"] == nth:
        die()
ck.write_manifest = write_manifest


real_rmtree = ck.shutil.rmtree
def rmtree(path, *args, **kwargs):  # "rotation": an old checkpoint half deleted
    if stage == "rotation" and in_rotation[0] and ck._STEP_DIR.match(Path(path).name):
        (Path(path) / "state" / "optimizer.pt").unlink()
        die()
    return real_rmtree(path, *args, **kwargs)
ck.shutil.rmtree = rmtree


real_publish = ck.publish
real_list = ck.list_checkpoints
def list_checkpoints(run_dir):
    if in_rotation[0] and stage == "after-rename" and seen["publish"] == nth:
        die()  # renamed into place, older ones not rotated yet
    return real_list(run_dir)
ck.list_checkpoints = list_checkpoints


def publish(tmp, step, keep_last):
    seen["publish"] += 1
    real_rename = Path.rename
    def rename(self, target):
        out = real_rename(self, target)
        if seen["publish"] == nth and Path(target).parent == Path(tmp).parent:
            in_rotation[0] = True
        return out
    Path.rename = rename
    try:
        return real_publish(tmp, step, keep_last)
    finally:
        Path.rename = real_rename
        in_rotation[0] = False
ck.publish = publish

sys.argv = ["launch/train.py", *sys.argv[1:]]
runpy.run_path("launch/train.py", run_name="__main__")
'''

# stage -> checkpoints this process completes before it is killed (it is killed during the 2nd)
STAGES = {"state": 1, "fsync": 1, "manifest": 1, "before-rename": 1, "after-rename": 2, "rotation": 2}


def test_killed_during_checkpoint_writes_every_resume_starts_from_a_verified_checkpoint(tmp_path, tiny_model,
                                                                                      text_file):
    steps, every = 30, 2
    run_dir = tmp_path / "killed"
    path = write_recipe(tmp_path / "killed.yaml", tiny_recipe(
        tiny_model, text_file, run_dir, train={"max_steps": steps}, checkpoint={"every_steps": every, "keep_last": 2}))
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    for stage, completed in STAGES.items():
        start = ckpt.latest_complete(run_dir)
        log = tmp_path / f"{stage}.log"
        proc = launch([sys.executable, str(killer), stage, "2", str(path)], log)
        assert proc.wait(timeout=600) == -signal.SIGKILL, log.read_text()
        assert resumed_from(log) == (f"from {start}" if start else "fresh start")
        newest = ckpt.latest_complete(run_dir)
        assert newest is not None and ckpt.verify(newest) is None, stage
        assert step_of(newest) == step_of(start) + completed * every, (stage, newest)
        if completed == 1:  # killed before the 2nd checkpoint was published: its staging dir is what is left
            assert (run_dir / "checkpoints" / f".tmp-{ckpt.step_dir_name(step_of(newest) + every)}").is_dir()

    start = ckpt.latest_complete(run_dir)
    log = tmp_path / "final.log"
    proc = launch([sys.executable, "launch/train.py", str(path)], log)
    assert proc.wait(timeout=600) == 0, log.read_text()
    assert resumed_from(log) == f"from {start}"
    assert_equals_uninterrupted(tmp_path, tiny_model, text_file, run_dir, steps)
