"""How fast this machine multiplies matrices: the yardstick that makes run times from different machines comparable
(a repro's minutes, a benchmark's MFU)."""

from __future__ import annotations

import time

import torch


def gemm_peak(sizes=(2048, 3072, 4096), repeats: int = 5, device: str = "cpu", dtype=None) -> float:
    """FLOP/s of the best ``torch.matmul`` of square matrices (best of ``repeats`` per size; fp32 unless ``dtype``),
    with this process's torch thread count (the same as the children's: torch's default); on CUDA each product is
    timed between synchronizations."""
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(2))
        a @ b  # warm-up
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best
