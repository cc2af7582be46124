"""Serving packed rows to the training loop: seeded epochs, data-parallel sharding, exact resume.

The rows are either in memory (:class:`PackedRows`) or the on-disk row store of a data build
(:class:`llmft.data.store.RowStore`): the loader only asks them for the rows of each batch, so a rank reads (and
holds) the rows it serves, not the corpus.

Legend: n = rows, s = sequence length, b = micro batch.
"""

from __future__ import annotations

import torch

from llmft.data.packing import PackedRows
from llmft.data.sources import DataError
from llmft.data.store import RowStore


class PackedLoader:
    """Micro-batches of packed rows, in a seeded order that can be saved and resumed.

    Each epoch visits every row once in a fresh permutation (``seed + epoch``). With several data-parallel
    ranks, rank r takes positions r, r + world, r + 2*world, ... of that permutation, so ranks never share a
    row. The state is (epoch, batches served in the epoch); restoring it continues at the exact next batch.
    The row store of a reweighted data build also serves each row's per-token loss weights (``weight``).

    Raises:
        DataError: fewer rows than micro_batch_size x ranks.
    """

    def __init__(self, rows: PackedRows | RowStore, micro_batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.rows, self.micro_batch_size, self.seed = rows, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_rows = len(rows)
        self.batches_per_epoch = self.num_rows // world_size // micro_batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training data fills {self.num_rows} rows of {rows.seq_len} tokens: fewer than "
                f"micro_batch_size x ranks = {micro_batch_size * world_size}. Add data or lower model.max_seq_len"
            )
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_rows, generator=g)[self.rank :: self.world_size]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch: input_ids, labels, position_ids (and weight, from a reweighted build), each (b, s)."""
        if self.cursor >= self.batches_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        b = self.micro_batch_size
        idx = self._order[self.cursor * b : (self.cursor + 1) * b]
        self.cursor += 1
        return self.rows.batch(idx)

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
