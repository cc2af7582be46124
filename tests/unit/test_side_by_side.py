"""llmft.side_by_side: jobs in their own processes with a share of the threads, their output in their logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmft.config import RecipeError
from llmft.side_by_side import run_side_by_side, split_cores


def meet(mine: str, other: str, folder: str) -> tuple[int, int, bool]:
    """Write ``mine`` in ``folder`` and wait up to 60 s for ``other``: both see each other only if they run at the
    same time. Returns (pid, torch threads, met)."""
    print(f"job {mine} starts\n[job] step 1 of {mine}", flush=True)
    (Path(folder) / mine).touch()
    deadline = time.time() + 60
    while not (Path(folder) / other).exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # long enough for a progress line
    return os.getpid(), torch.get_num_threads(), (Path(folder) / other).exists()


def linger(folder: str, name: str) -> None:
    """Write this process's pid to ``folder/name.pid`` and sleep for 2 minutes."""
    (Path(folder) / f"{name}.pid").write_text(str(os.getpid()))
    time.sleep(120)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"  # a zombie has ended


def fail(messages: list[str]) -> None:
    raise RecipeError(messages)


def test_cores_are_split_between_as_many_processes_as_jobs_and_threads_allow():
    assert split_cores(4, 2) == (2, 1)
    assert split_cores(4, 16) == (4, 4)
    assert split_cores(2, 5) == (2, 2)
    assert split_cores(1, 2) == (1, 2)
    assert split_cores(3, 1) == (1, 1)


def test_two_jobs_run_at_once_in_their_own_processes_with_one_thread_each(tmp_path):
    said = []
    logs = {"a": tmp_path / "a" / "train.log", "b": tmp_path / "b" / "train.log"}
    done = run_side_by_side({"a": (meet, ("a", "b", str(tmp_path))), "b": (meet, ("b", "a", str(tmp_path)))}, logs,
                            threads=2, progress_every=0.5, say=said.append)
    assert list(done) == ["a", "b"]
    (pid_a, threads_a, met_a), _ = done["a"]
    (pid_b, threads_b, met_b), seconds = done["b"]
    assert met_a and met_b  # one after the other, the first would wait for a file that never comes
    assert len({pid_a, pid_b, os.getpid()}) == 3 and threads_a == threads_b == 1
    assert 0 < seconds < 60
    assert logs["a"].read_text() == "job a starts\n[job] step 1 of a\n"
    assert logs["b"].read_text() == "job b starts\n[job] step 1 of b\n"
    assert said[0].startswith("2 jobs, 2 at a time with 1 thread(s) each") and any("b done in" in s for s in said)
    assert "a: [job] step 1 of a" in said  # progress: each running job's last step line


def test_one_thread_runs_the_jobs_here_one_after_the_other(tmp_path, capsys):
    (tmp_path / "b").touch()  # so that "a" does not wait for a job that runs after it
    done = run_side_by_side({"a": (meet, ("a", "b", str(tmp_path))), "b": (meet, ("b", "a", str(tmp_path)))},
                            {"a": tmp_path / "a.log", "b": tmp_path / "b.log"}, threads=1)
    assert [r[0][0] for r in done.values()] == [os.getpid()] * 2
    out = capsys.readouterr().out
    assert out == "job a starts\n[job] step 1 of a\njob b starts\n[job] step 1 of b\n"
    assert not (tmp_path / "a.log").exists()


def test_a_failing_job_raises_its_own_error_in_the_parent(tmp_path):
    (tmp_path / "b").touch()
    with pytest.raises(RecipeError) as e:
        run_side_by_side({"a": (meet, ("a", "b", str(tmp_path))), "bad": (fail, (["x: is wrong", "y: too"],))},
                         {"a": tmp_path / "a.log", "bad": tmp_path / "bad.log"}, threads=2)
    assert e.value.messages == ["x: is wrong", "y: too"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_jobs_end_when_their_parent_is_killed(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_side_by_side import linger; "
            "from llmft.side_by_side import run_side_by_side; "
            "run_side_by_side({n: (linger, (sys.argv[2], n)) for n in 'ab'}, "
            "{n: __import__('pathlib').Path(sys.argv[2]) / f'{n}.log' for n in 'ab'}, threads=2)")
    parent = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path)])
    deadline = time.time() + 120
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    pids = [int((tmp_path / f"{n}.pid").read_text()) for n in "ab"]
    assert all(alive(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)  # orphaned, they would sleep on for 2 minutes
