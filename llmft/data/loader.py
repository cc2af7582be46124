"""Serving packed rows to the training loop: seeded epochs, data-parallel sharding, exact resume.

Legend: n = rows, s = sequence length, b = micro batch.
"""

from __future__ import annotations

import torch

from llmft.data.examples import DataError
from llmft.data.packing import PackedRows


class PackedLoader:
    """Micro-batches of packed rows, in a seeded order that can be saved and resumed.

    Each epoch visits every row once in a fresh permutation (``seed + epoch``). With several data-parallel
    ranks, rank r takes positions r, r + world, r + 2*world, ... of that permutation, so ranks never share a
    row. The state is (epoch, batches served in the epoch); restoring it continues at the exact next batch.
    With ``weights`` (n, s) (per-token loss weights of a reweighted data build), each batch carries its rows'
    ``weight`` too.
    """

    def __init__(self, rows: PackedRows, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 weights: torch.Tensor | None = None):
        if weights is not None and weights.shape != rows.input_ids.shape:
            raise DataError(f"the per-token weights have shape {tuple(weights.shape)} but the rows "
                            f"{tuple(rows.input_ids.shape)}; rebuild the data")
        self.rows, self.micro_batch_size, self.seed, self.weights = rows, micro_batch_size, seed, weights
        self.rank, self.world_size = rank, world_size
        self.num_rows = len(rows)
        self.batches_per_epoch = self.num_rows // world_size // micro_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training data fills {self.num_rows} rows of {rows.input_ids.shape[1]} tokens: fewer than "
                f"micro_batch_size x ranks = {micro_batch_size * world_size}. Add data or lower model.max_seq_len"
            )
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_rows, generator=g)[self.rank :: self.world_size]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch: input_ids, labels, position_ids (and weight, with weights), each (b, s)."""
        if self.cursor >= self.batches_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        b = self.micro_batch_size
        idx = self._order[self.cursor * b : (self.cursor + 1) * b]
        self.cursor += 1
        batch = {"input_ids": self.rows.input_ids[idx], "labels": self.rows.labels[idx],
                 "position_ids": self.rows.position_ids[idx]}
        if self.weights is not None:
            batch["weight"] = self.weights[idx]
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`.

        Raises:
            DataError: the data changed since the checkpoint (different row count or seed).
        """
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise DataError(
                f"the training data changed since the checkpoint ({state['num_rows']} rows, seed {state['seed']} "
                f"then; {self.num_rows} rows, seed {self.seed} now): resume needs the same data, or start fresh "
                "with --no-resume"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._epoch_order()
