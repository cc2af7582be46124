"""Loss-spike detection: a warning (and a ``spike`` flag in the metrics) when a step's loss jumps well above the
recent ones. It changes nothing in training; it tells you where to look (a bad batch, too high a learning rate)
before a spike turns into divergence, which :mod:`llmft.train.stop` handles.

Rule: step loss > ``factor`` x the median of the previous ``window`` finite step losses. The median ignores an
earlier spike, and needing a full window means the fast fall at the start of a run is never compared with its
first steps alone.
"""

from __future__ import annotations

import statistics
from collections import deque


class SpikeDetector:
    """Feed it every step's loss; ``update`` says whether that loss is a spike.

    ``factor=None`` disables detection. Non-finite losses are not spikes (the NaN guard owns them) and are not
    added to the window.
    """

    def __init__(self, factor: float | None, window: int):
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)

    def update(self, loss: float) -> float | None:
        """The median the loss is compared with when ``loss`` is a spike, else None."""
        if loss != loss or loss in (float("inf"), float("-inf")):
            return None
        spike = None
        if self.factor is not None and len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if loss > self.factor * median:
                spike = median
        self.recent.append(loss)
        return spike

    def state_dict(self) -> list[float]:
        return list(self.recent)

    def load_state_dict(self, recent: list[float]) -> None:
        self.recent.extend(recent)
