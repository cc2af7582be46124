"""Stopping on purpose: SIGTERM finishes the step, checkpoints and exits 75, and the rerun ends bitwise equal to
an uninterrupted run; a second signal exits at once; non-finite steps are skipped, and after
``train.max_bad_steps`` in a row the run stops (exit 3) with a checkpoint of the last good weights; a loss spike is
warned about and flagged in the metrics."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, tiny_recipe, write_recipe
from safetensors.torch import load_file

from llmft.cli import main
from llmft.config import load_recipe
from llmft.train import checkpoint as ckpt
from llmft.train.loop import train
from llmft.train.spikes import SpikeDetector
from llmft.train.stop import EXIT_DIVERGED, EXIT_PREEMPTED, Diverged


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 300) -> str:
    """Read the process output until ``text`` appears; returns what was read."""
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} not seen:\n{seen[-2000:]}")


@pytest.mark.usefixtures("one_thread")  # bitwise across processes
def test_sigterm_checkpoints_exits_75_and_resumes_bitwise(tmp_path, tiny_model, text_file):
    steps = 30
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "pre", train={"max_steps": steps})
    path = write_recipe(tmp_path / "pre.yaml", recipe)  # no periodic checkpoints: only the one the signal asks for
    cmd = [sys.executable, "launch/train.py", str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_PREEMPTED, out[-2000:]
    assert "received SIGTERM: finishing this step" in out and "llmft: preempted: stopped by a signal after step" in out
    assert "Traceback" not in out
    stopped = ckpt.latest_complete(tmp_path / "pre")
    assert stopped is not None and not (tmp_path / "pre" / "final").exists()
    step = int(stopped.name.split("-")[1])
    assert 3 <= step < steps

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resume             from {stopped}" in again.stdout
    rows = [json.loads(line) for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))

    straight = tiny_recipe(tiny_model, text_file, tmp_path / "straight", train={"max_steps": steps})
    reference = train(load_recipe(write_recipe(tmp_path / "straight.yaml", straight)))
    resumed = load_file(tmp_path / "pre" / "final" / "model.safetensors")
    expected = load_file(reference.final_dir / "model.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)  # bitwise


def test_second_signal_exits_at_once(tmp_path, tiny_model, text_file):
    # long steps (16 micro-batches each), so the second signal lands inside the step the first one let finish
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "twice", train={"max_steps": 200,
                                                                           "gradient_accumulation_steps": 16})
    cmd = [sys.executable, "launch/train.py", str(write_recipe(tmp_path / "twice.yaml", recipe))]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(proc, "step 2/")
    proc.send_signal(signal.SIGINT)
    wait_for(proc, "received SIGINT")  # the first one is handled (signals of one kind coalesce until then)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT


class NaNFrom:
    """Global forward hook: the LM head's output becomes NaN on the calls numbered in ``calls`` (1-based), as a
    fault from outside the training code."""

    def __init__(self, calls):
        self.calls, self.n = set(calls), 0

    def __call__(self, module, args, output):
        if isinstance(module, torch.nn.Linear) and module.out_features == 512:  # the tiny model's vocabulary
            self.n += 1
            if self.n in self.calls:
                return output * float("nan")
        return None


def run_with_nan(tmp_path, tiny_model, text_file, name, calls, **train_fields):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / name, train={"max_steps": 6, **train_fields})
    handle = torch.nn.modules.module.register_module_forward_hook(NaNFrom(calls))
    try:
        return train(load_recipe(write_recipe(tmp_path / f"{name}.yaml", recipe)))
    finally:
        handle.remove()


def test_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path, tiny_model, text_file):
    result = run_with_nan(tmp_path, tiny_model, text_file, "one", calls={5})  # step 3's first micro-batch
    rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, False, True, False, False, False]
    weights = load_file(result.final_dir / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_too_many_non_finite_steps_stop_with_the_last_good_weights(tmp_path, tiny_model, text_file, capsys):
    with pytest.raises(Diverged, match="2 steps in a row"):
        run_with_nan(tmp_path, tiny_model, text_file, "bad", calls=range(3, 100), max_bad_steps=2)
    saved = ckpt.latest_complete(tmp_path / "bad")
    assert saved is not None and saved.name == ckpt.step_dir_name(3)
    good = tiny_recipe(tiny_model, text_file, tmp_path / "good", train={"max_steps": 1})
    one_step = train(load_recipe(write_recipe(tmp_path / "good.yaml", good)))  # the same first step, no faults
    last_good = load_file(saved / "model" / "model.safetensors")
    expected = load_file(one_step.final_dir / "model.safetensors")
    assert all(torch.equal(last_good[k], expected[k]) for k in expected)  # steps 2 and 3 changed nothing

    # through the CLI: exit code 3 and one message
    path = write_recipe(tmp_path / "cli.yaml", tiny_recipe(tiny_model, text_file, tmp_path / "cli",
                                                           train={"max_steps": 4, "max_bad_steps": 1}))
    handle = torch.nn.modules.module.register_module_forward_hook(NaNFrom(range(1, 100)))
    try:
        capsys.readouterr()
        assert main(["train", str(path)]) == EXIT_DIVERGED
    finally:
        handle.remove()
    assert "llmft: diverged: 1 steps in a row (to step 1)" in capsys.readouterr().err


class ScaleLogits:
    """Global forward hook: the LM head's output is multiplied by ``factor`` on the calls in ``calls`` (1-based):
    confident wrong logits, a loss spike from outside the training code."""

    def __init__(self, calls, factor: float):
        self.calls, self.factor, self.n = set(calls), factor, 0

    def __call__(self, module, args, output):
        if isinstance(module, torch.nn.Linear) and module.out_features == 512:
            self.n += 1
            if self.n in self.calls:
                return output * self.factor
        return None


def test_spike_detector_rule():
    d = SpikeDetector(factor=2.0, window=3)
    assert [d.update(x) for x in (5.0, 4.0, 3.0)] == [None, None, None]  # no full window yet: the fast early fall
    assert d.update(7.9) is None  # 7.9 <= 2 x median(5, 4, 3) = 8
    assert d.update(float("nan")) is None and d.update(float("inf")) is None  # the NaN guard's business
    assert d.update(8.5) == 4.0  # > 2 x median(4, 3, 7.9)
    assert d.state_dict() == [3.0, 7.9, 8.5]
    assert SpikeDetector(factor=None, window=3).update(1e9) is None  # disabled
    resumed = SpikeDetector(2.0, 3)
    resumed.load_state_dict(d.state_dict())
    assert resumed.update(20.0) == 7.9 and d.update(20.0) == 7.9


def test_a_loss_spike_is_warned_and_flagged_and_training_goes_on(tmp_path, tiny_model, text_file, caplog):
    recipe = tiny_recipe(tiny_model, text_file, tmp_path / "spike",
                         train={"max_steps": 8, "spike_factor": 1.5, "spike_window": 4})
    handle = torch.nn.modules.module.register_module_forward_hook(ScaleLogits({13, 14}, 40.0))  # step 7
    try:
        with caplog.at_level("WARNING", logger="llmft.train.loop"):
            train(load_recipe(write_recipe(tmp_path / "spike.yaml", recipe)))
    finally:
        handle.remove()
    rows = [json.loads(line) for line in (tmp_path / "spike" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("spike")] == [7]
    assert rows[6]["loss"] > 1.5 * sorted(r["loss"] for r in rows[2:6])[2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    warned = [r.getMessage() for r in caplog.records if "loss spike" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("step 7: loss spike")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for one checkpoint of the tiny model, not two (skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path, tiny_model, text_file,
                                                                             small_disk, capsys):
    recipe = tiny_recipe(tiny_model, text_file, small_disk / "run", train={"max_steps": 6},
                         checkpoint={"every_steps": 2, "keep_last": 2})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint step-00000004" in err and "No space left on device" in err
    assert "step-00000002) is intact" in err and "Traceback" not in err
    first = small_disk / "run" / "checkpoints" / ckpt.step_dir_name(2)
    assert ckpt.latest_complete(small_disk / "run") == first and ckpt.verify(first) is None
    assert not list((small_disk / "run" / "checkpoints").glob(".tmp-*"))  # the failed staging dir is gone

    # "free space": move the run to a roomy disk and re-run the same recipe there: it resumes from step 2
    import shutil

    shutil.copytree(small_disk / "run", tmp_path / "run")
    recipe["checkpoint"]["dir"] = str(tmp_path / "run")
    resumed = train(load_recipe(write_recipe(tmp_path / "r2.yaml", recipe)))
    assert resumed.resumed_from == 2 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
