"""The llmft-vs-transformers benches and the GPU MFU bench run (their --quick modes, all at once) and write their
tables: every number in them positive and finite; and the max-context search doubles, bisects and respects its time
budget."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import max_context  # noqa: E402

BENCHES = ("train_throughput", "max_context", "eval_throughput", "gpu_mfu")


def table_numbers(text: str) -> list[float]:
    """Every number in the markdown table rows of ``text`` (thousands separators, %, ranges in brackets)."""
    lines = text.splitlines()
    body = [line for line, after in zip(lines, lines[1:] + [""])
            if line.startswith("| ") and not after.startswith("|---")]  # not a header row
    return [float(x.replace(",", "")) for r in body for x in re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?", r)]


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Each bench's --quick mode, the processes at once; bench -> (stdout, results file text)."""
    tmp = tmp_path_factory.mktemp("bench")
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--results",
                                     str(tmp / f"{name}.md")], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name in BENCHES}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}:\n{stderr[-3000:]}"
        out[name] = (stdout, (tmp / f"{name}.md").read_text())
    return out


def bench_json(stdout: str):
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("[bench] json "))[13:])


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("name", BENCHES)
def test_quick_mode_writes_its_table(quick_runs, name):
    stdout, text = quick_runs[name]
    assert text.startswith("# Benchmark results") and f"\n## {name} — " in text
    assert "Command: `python bench/" in text and "--quick" in text
    numbers = table_numbers(text)
    assert numbers and all(math.isfinite(x) and x > 0 for x in numbers), numbers


def test_train_throughput_ratios(quick_runs):
    data = bench_json(quick_runs["train_throughput"][0])
    assert positive_finite(data["gemm_peak"]) and data["rows"]
    for row in data["rows"]:
        assert positive_finite(row["tps_ratio"]) and positive_finite(row["rss_ratio"])
        for side in ("llmft", "hf"):
            assert all(positive_finite(row[side][k]) for k in ("tps", "rss", "mfu")), row
            assert row[side]["mfu"] < 1.5  # a fraction of the measured GEMM peak


def test_max_context_found_lengths(quick_runs):
    data = bench_json(quick_runs["max_context"][0])
    assert set(data) == {"hf", "llmft"}
    assert all(positive_finite(found["max_ok"]) for found in data.values()), data


def test_eval_throughput_ratios(quick_runs):
    rows = bench_json(quick_runs["eval_throughput"][0])
    assert [r["length"] for r in rows] == [256, 512]
    assert all(positive_finite(r[k]) for r in rows for k in ("ratio", "llmft_tps", "raw_tps", "ppl_per_byte"))


class FakeArgs:
    start, resolution, max_len = 8192, 8192, 524288


def fake_attempts(monkeypatch, fits_up_to: int, seconds_at_8k: float = 1.0) -> list[int]:
    tried = []

    def attempt(side, s, model_dir, books, cap, timeout_s):
        tried.append(s)
        ok = s <= fits_up_to
        return {"status": "ok" if ok else "memory", "seconds": seconds_at_8k * (s / 8192) ** 2,
                "peak_rss": 1e9 + 2e5 * s, "watched_peak_rss": 0, "why": "over the cap"}

    monkeypatch.setattr(max_context, "attempt", attempt)
    return tried


def test_search_doubles_then_bisects_to_the_resolution(monkeypatch):
    tried = fake_attempts(monkeypatch, fits_up_to=40_000)
    found = max_context.search("x", FakeArgs, Path("."), [], cap=int(1e9 + 2e5 * 100_000),
                               deadline=time.monotonic() + 3600)
    assert tried == [8192, 16384, 32768, 65536, 49152, 40960]
    assert (found["max_ok"], found["first_fail"], found["stop"]) == (32768, 40960, "")
    assert found["fit"] == pytest.approx((1e9, 2e5)) and found["extrapolated"] == pytest.approx(100_000, abs=1)


def test_search_does_not_start_a_step_it_cannot_finish(monkeypatch):
    tried = fake_attempts(monkeypatch, fits_up_to=10**9, seconds_at_8k=10.0)
    found = max_context.search("x", FakeArgs, Path("."), [], cap=10**12, deadline=time.monotonic() + 100)
    assert tried == [8192, 16384]  # 32768 would take 160 s > the 100 s left
    assert found["max_ok"] == 16384 and found["first_fail"] is None
    assert found["stop"].startswith("32,768 not tried: one step predicted 3 min")


def test_gpu_mfu_quick_run(quick_runs):
    rows = bench_json(quick_runs["gpu_mfu"][0])
    assert [r["seq_len"] for r in rows] == [256] and rows[0]["gpu"] == "CPU"
    assert all(positive_finite(rows[0][k]) for k in ("tps", "tflops", "mfu", "peak_tflops", "mem_gib"))
    assert rows[0]["mfu"] < 1.5 and all(math.isfinite(x) for x in rows[0]["losses"])


def test_gpu_mfu_counts_the_matmul_weights_of_the_real_model():
    """The MFU numerator's N equals the Linear weights of the transformers model the bench builds (GQA included)."""
    import gpu_mfu
    import torch
    from transformers import AutoModelForCausalLM

    from llmft.testing.tiny import tiny_llama_config

    for cfg in (gpu_mfu.ONE_B, {**gpu_mfu.ONE_B, "num_kv_heads": 32}):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(tiny_llama_config(**cfg))
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert gpu_mfu.matmul_params(cfg) == linear
    assert 1.0e9 < gpu_mfu.matmul_params(gpu_mfu.ONE_B) < 1.1e9


@pytest.mark.slow
def test_row_store_bench_measures_both_sides(tmp_path):
    """bench/row_store.py at 1 M and 4 M tokens: two ranks' data memory from the store stays at a batch while the
    in-memory rows grow with the corpus, and every rank read about half the store."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "row_store.py"), "--sizes", "1,4", "--baseline-max", "4",
                          "--seq-len", "1024", "--results", str(tmp_path / "r.md")], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = bench_json(out.stdout)
    assert [r["tokens"] for r in runs] == [999_424, 3_999_744]
    for r in runs:
        assert r["disk"] == r["tokens"] * 2.25  # uint16 ids + 2 bits per token
        for rank in range(2):
            assert r["store"][rank]["data_rss"] < 16 * 2**20 < r["in_memory"][rank]["data_rss"]
            assert abs(r["store"][rank]["read_bytes"] - r["disk"] / 2) < 0.05 * r["disk"]
    assert runs[1]["in_memory"][0]["data_rss"] > 3 * runs[0]["in_memory"][0]["data_rss"]  # grows with the corpus
    assert "## row_store — " in (tmp_path / "r.md").read_text()


def test_prefill_bench_chunked_prompt_memory_stays_below_one_forward(tmp_path):
    """bench/prefill_memory.py at 1K and 2K prompt tokens: the same greedy tokens both ways (the bench checks), and
    prefilling 256 tokens at a time grows memory less than one forward over the prompt, by more the longer it is."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "prefill_memory.py"), "--lengths", "1024,2048",
                          "--chunk", "256", "--new-tokens", "4", "--results", str(tmp_path / "r.md")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = bench_json(out.stdout)
    assert [r["length"] for r in runs] == [1024, 2048]
    for r in runs:
        assert r["whole"]["tokens"] == r["chunked"]["tokens"] and len(r["whole"]["tokens"]) == 4
        assert r["chunked"]["growth_mb"] < r["whole"]["growth_mb"]
    # the saving shows at the longer prompt (2K: chunked ~0.45-0.5x of one forward; at 1K, ~0.6x but with RSS noise of
    # 20 MB on a growth of 50-75 MB)
    assert runs[1]["chunked"]["growth_mb"] < 0.7 * runs[1]["whole"]["growth_mb"]
    assert runs[1]["whole"]["growth_mb"] > 1.5 * runs[0]["whole"]["growth_mb"]  # one forward grows with the prompt
    assert "## prefill_memory — " in (tmp_path / "r.md").read_text()


def test_data_scale_bench_reports_build_and_rank_memory(tmp_path):
    """bench/data_scale.py at 0.3 M and 0.6 M training tokens: the build meets its shares, reads each source about
    as far as its share needs (the oversized one holds 10x that; at these sizes a document is ~1/10 of a share,
    hence the margin), and the table has a row per size; with --dedup, each size also built without dedup."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "data_scale.py"), "--sizes", "0.3,0.6", "--seq-len",
                          "1024", "--dedup", "--results", str(tmp_path / "r.md")], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "r.md").read_text()
    assert "## data_scale --dedup — " in text and "Build peak RSS at 0.6 M is" in text
    rows = [line for line in text.splitlines() if line.startswith("| 0.")]
    assert len(rows) == 4  # the main table, and the dedup table (without / with)
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert int(cells[1]) > 0 and cells[3].endswith("GB") and cells[4].endswith("GB")
    for line in rows[:2]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        shares = [float(x) for x in cells[7].split(",")]
        assert all(abs(s - 0.25) < 0.01 for s in shares), shares
        read = [float(x) for x in cells[6].split(",")]  # big, mid, small, tight: bytes read / needed
        assert all(0.9 < x < 1.5 for x in read), read
        assert float(cells[2].split()[0]) > 0 and "MiB" in cells[8]


def test_gpu_check_smoke_version_runs_every_check(tmp_path):
    """bench/gpu_check.py --quick: the GPU check's own code on CPU (tiny sizes, SDPA vs the eager block mask, CPU
    bitsandbytes, DeepSpeed ZeRO-2 on one gloo rank): every check passes and the table lands in the results file."""
    results = tmp_path / "check.md"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--quick", "--results", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("[gpu_check] json "))[17:])
    assert [r["check"] for r in rows] == ["fa2_packing", "mfu_8k", "qlora", "eval_fa2", "zero2"]
    assert all(r["ok"] for r in rows)
    by = {r["check"]: r for r in rows}
    assert by["fa2_packing"]["mean_abs_diff"] < 1e-4  # sdpa and eager block masks agree in fp32
    assert len(by["zero2"]["losses"]) == 4 and min(by["qlora"]["losses"][-2:]) < by["qlora"]["losses"][0]
    assert {"eval/ppl@256", "eval/passkey@256"} <= set(by["eval_fa2"]["evals"])
    text = results.read_text()
    assert "\n## gpu_check — " in text and "5/5 checks passed" in text and "CPU (smoke version" in text
    assert text.count("| pass |") == 5


def test_sequence_parallel_bench_measures_both_sides(tmp_path):
    """``max_context.py --sp --quick``: 1 rank and SP=2 over 2 ranks at two lengths under the deepspeed launcher;
    per-rank peaks, tokens/s and losses, all positive (at these lengths the framework dominates the peaks: the
    comparison itself is in bench/RESULTS.md)."""
    results = tmp_path / "sp.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "max_context.py"), "--sp", "--quick", "--results",
                           str(results)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = results.read_text()
    assert "\n## max_context, sequence parallelism — " in text and "--sp --quick" in text
    numbers = table_numbers(text)
    assert len(numbers) == 2 * 7 and all(math.isfinite(x) and x > 0 for x in numbers), numbers
    data = bench_json(proc.stdout)
    runs = data["runs"]
    assert set(runs) == {"1", "2"} and all(r["ranks"] == int(sp) for sp, rs in runs.items() for r in rs.values())
    assert all(positive_finite(r[k]) for rs in runs.values() for r in rs.values()
               for k in ("peak_rss", "tokens_per_second", "loss"))


def test_sequence_parallel_attempt_over_the_per_rank_cap_is_killed(tmp_path):
    """``max_context.py --sp --search``'s attempt: a rank that passes the cap gets every rank of the launch killed,
    and the attempt reports "memory" with the rank's sampled peak (here the cap is below what importing torch
    takes, so the attempt ends within seconds)."""
    import psutil

    model_dir = max_context.write_model_dir(tmp_path / "model", 1024)
    books = [str(b) for b in max_context.book_paths(tmp_path)][-1:]
    cap = 200 * 2**20
    r = max_context.sp_launch(1024, 2, model_dir, books, tmp_path, 1, cap_bytes=cap, timeout_s=300)
    assert r["status"] == "memory" and "cap" in r["why"] and r["peak_rss"] > cap, r
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left, left
