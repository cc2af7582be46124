"""Packing tokenized examples into fixed-length training rows.

Legend: n = rows, s = sequence length, b = micro batch.

Two modes:

``concat`` (Together's long-context pre-training): examples are concatenated in order and cut every ``s``
tokens. Attention crosses example boundaries and an example may continue in the next row. Position ids
run 0..s-1 in every row. Nothing is padded, so efficiency is 100% except for the final partial row::

    row 0   tokens  [a a a a a b b b]      position_ids  0 1 2 3 4 5 6 7
    row 1   tokens  [b b c c c c c c]      position_ids  0 1 2 3 4 5 6 7

``isolated`` (instruction data, few-shot demos, exact per-example losses): whole examples are placed into rows by bin
packing (:func:`pack_bins`: 99.5-99.98% full on instruction-length data). Position ids restart at 0 for every example.
Each token attends only to earlier tokens of its own example, and the first token of each example carries no label (its
predecessor belongs to another example). Padding fills the rest of a row with label -100. An example longer than ``s``
is split into consecutive chunks of at most ``s`` tokens; nothing is truncated::

    tokens        [a a a b b c c p]        (p = pad)
    position_ids   0 1 2 0 1 0 1 0
    labels         - a a - b - c -         (- = -100; prompt tokens are -100 too)
    attention      a0: a0                  mask (1 = may attend), block-diagonal and causal:
                   a1: a0 a1                   1 . . . . . . .
                   a2: a0 a1 a2                1 1 . . . . . .
                   b0: b0                      1 1 1 . . . . .
                   b1: b0 b1                   . . . 1 . . . .
                   ...                         . . . 1 1 . . .
                                               . . . . . 1 . .
                                               . . . . . 1 1 .
                                               . . . . . . . 1

How the isolation is enforced depends on the attention kernel; :func:`attention_kwargs` builds the right
inputs. flash_attention_2 gets varlen ``cu_seq_lens`` with the rows flattened, as transformers' padding-free
path expects. sdpa gets the block-causal mask of shape (b, 1, s, s) as an additive mask (0 / -inf) in the compute
dtype: torch's sdpa turns a boolean mask into exactly that, but as a new tensor in every layer, which autograd then
saves per layer (L copies of s^2 elements); given the additive mask, every layer reads and saves the same one.
eager gets it with the dtype's most negative value instead of -inf. With sdpa, ``position_ids`` alone do NOT
isolate: transformers then builds a plain causal mask.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where tensors are made: the data engine's workers only tokenize, without torch
    import torch

IGNORE = -100


@dataclass
class Example:
    """One tokenized example: ``tokens`` (int32) and ``loss_mask`` (True where the token is trained on)."""

    tokens: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_parts(cls, bos: list[int], prompt: list[int], text: list[int], eos: list[int]) -> Example:
        """``bos + prompt + text + eos``, trained on ``text + eos`` (BOS and the prompt are context only)."""
        tokens = np.asarray(bos + prompt + text + eos, dtype=np.int32)
        mask = np.ones(len(tokens), dtype=bool)
        mask[: len(bos) + len(prompt)] = False
        return cls(tokens, mask)


def special_ids(tokenizer, add_eos: bool = True) -> tuple[list[int], list[int]]:
    """([BOS] or [], [EOS] or []): what wraps every document, for tokenizers with or without those tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    return bos, eos


@dataclass
class PackedRows:
    """Packed training rows, each tensor of shape (n, s), plus how well they were filled."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    mode: str
    real_tokens: int  # non-pad tokens placed
    dropped_tokens: int  # concat: the final partial row; isolated: always 0
    split_examples: int  # isolated: examples longer than s split into chunks

    @property
    def efficiency(self) -> float:
        """Non-pad tokens / token slots."""
        return self.real_tokens / max(1, self.input_ids.numel())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """input_ids, labels, position_ids of rows ``idx``, each (b, s): the interface the loader serves from, shared
        with the on-disk :class:`llmft.data.store.RowStore`."""
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx], "position_ids": self.position_ids[idx]}


def pack_concat(examples: list[Example], seq_len: int) -> PackedRows:
    """Concatenate all examples and cut into rows of ``seq_len``; the last partial row is dropped (reported)."""
    tokens = np.concatenate([e.tokens for e in examples])
    trained = np.concatenate([e.loss_mask for e in examples])
    cut = len(tokens) // seq_len * seq_len
    return _concat_rows(tokens[:cut], trained[:cut], seq_len, dropped=len(tokens) - cut)


def _concat_rows(tokens: np.ndarray, trained: np.ndarray, seq_len: int, dropped: int) -> PackedRows:
    """Concat rows from a whole number of rows of ``tokens``, labelled where ``trained``."""
    import torch

    n = len(tokens) // seq_len
    input_ids = torch.from_numpy(tokens.astype(np.int64)).view(n, seq_len)  # (n, s)
    labels = input_ids.clone()
    labels[~torch.from_numpy(trained).view(n, seq_len)] = IGNORE
    position_ids = torch.arange(seq_len).expand(n, seq_len).contiguous()  # (n, s)
    return PackedRows(input_ids, labels, position_ids, "concat", n * seq_len, dropped, 0)


def _chunks(examples: list[Example], seq_len: int) -> tuple[list[Example], int]:
    out, split = [], 0
    for e in examples:
        if len(e) <= seq_len:
            out.append(e)
            continue
        split += 1
        out.extend(Example(e.tokens[i : i + seq_len], e.loss_mask[i : i + seq_len]) for i in range(0, len(e), seq_len))
    return out, split


class _Pool:
    """The unplaced items, indexed by length: take the largest that fits, or a given item, in O(log distinct)."""

    def __init__(self, lengths: list[int]):
        self.lengths = lengths
        self.by_length: dict[int, list[int]] = {}  # length -> item indices, lowest index last (popped first)
        for i in range(len(lengths) - 1, -1, -1):
            self.by_length.setdefault(lengths[i], []).append(i)
        self.count = {n: len(v) for n, v in self.by_length.items()}  # unplaced items per length
        self.sizes = sorted(self.by_length)  # distinct lengths with unplaced items, ascending
        self.placed = np.zeros(len(lengths), dtype=bool)

    def largest_fitting(self, room: int) -> int | None:
        k = bisect.bisect_right(self.sizes, room) - 1
        return self.sizes[k] if k >= 0 else None

    def take_length(self, n: int) -> int:
        stack = self.by_length[n]
        while self.placed[stack[-1]]:  # already placed through take_item
            stack.pop()
        return self.take_item(stack.pop())

    def take_item(self, i: int) -> int:
        n = self.lengths[i]
        self.placed[i] = True
        self.count[n] -= 1
        if not self.count[n]:
            del self.count[n], self.by_length[n]
            self.sizes.pop(bisect.bisect_left(self.sizes, n))
        return i


def _fullest_subset(room: int, sizes: list[int], count: dict[int, int]) -> list[int]:
    """Lengths (with repeats, at most ``count[n]`` of each) whose sum is the largest possible <= ``room``.

    Bounded subset-sum as a bitset: bit x of ``reach`` is set when a sum of x is possible. ``c`` copies of a
    length are added as groups of 1, 2, 4, ... copies, so each length costs O(log c) shifts. Lengths are added
    longest first; the backtrack then uses a short item only where the long ones cannot make the sum, which
    keeps the short, flexible items for later rows.
    """
    mask = (1 << (room + 1)) - 1
    reach, steps = 1, []  # steps: (group length, copies, item length, reach before the group)
    for n in reversed(sizes[: bisect.bisect_right(sizes, room)]):
        left, group = min(count[n], room // n), 1
        while left:
            k = min(group, left)
            steps.append((k * n, k, n, reach))
            reach = (reach | (reach << (k * n))) & mask
            left, group = left - k, group * 2
        if reach >> room & 1:
            break  # an exact fill exists
    x, chosen = reach.bit_length() - 1, []
    for size, k, n, before in reversed(steps):
        if not before >> x & 1:  # sum x needs this group
            x -= size
            chosen += [n] * k
    return chosen


def pack_bins(lengths: list[int], capacity: int, seed: int = 0, lookahead: int = 6) -> list[list[int]]:
    """Bins of item indices with sums <= ``capacity``, as few as we can make them.

    Each bin is filled in three steps:

    1. an item longer than half the capacity, if any remain, opens the bin (the longest one): such items
       can never share a bin with each other, so they go first and everything else fills around them;
    2. items are added in a seeded random order while the room left exceeds ``lookahead`` times the longest
       item that still fits: every bin then gets a representative share of short and long items, so the
       unplaced lengths keep the same spread until the end;
    3. the rest of the room is filled by an exact subset sum over the unplaced lengths (see
       :func:`_fullest_subset`), unless best-fit greedy already fills it exactly.

    Best-fit-decreasing alone leaves a gap shorter than the shortest item in every bin when all lengths are
    close (one Natural Instructions task: 144-187 tokens, 97.9% full at 2048); the subset sum closes those
    gaps (99.8%), and broad distributions fill to within one bin of the lower bound (99.98% on 300k lognormal
    lengths, bench/packing.py). Deterministic for a given ``seed``.

    Raises:
        ValueError: an item is longer than ``capacity``.
    """
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}")
    pool = _Pool(lengths)
    order = np.random.default_rng(seed).permutation(len(lengths)).tolist()
    at, bins = 0, []
    while pool.sizes:
        room, members = capacity, []
        if pool.sizes[-1] > capacity // 2:
            members.append(pool.take_length(pool.sizes[-1]))
            room -= lengths[members[-1]]
        while (longest := pool.largest_fitting(room)) is not None and room > lookahead * longest:
            while pool.placed[order[at]]:
                at += 1
            nxt = order[at]  # the next unplaced item in random order, or the longest that fits if it does not
            i = pool.take_item(nxt) if lengths[nxt] <= room else pool.take_length(longest)
            members.append(i)
            room -= lengths[i]
        if pool.largest_fitting(room) is not None:
            greedy, left, used = [], room, {}
            while (n := _largest_unused(pool, left, used)) is not None:
                greedy.append(n)
                used[n] = used.get(n, 0) + 1
                left -= n
            fill = greedy if left == 0 else _fullest_subset(room, pool.sizes, pool.count)
            members += [pool.take_length(n) for n in fill]
        bins.append(members)
    return bins


def _largest_unused(pool: _Pool, room: int, used: dict[int, int]) -> int | None:
    """The longest unplaced length <= ``room`` with copies left after ``used``."""
    k = bisect.bisect_right(pool.sizes, room) - 1
    while k >= 0 and pool.count[pool.sizes[k]] <= used.get(pool.sizes[k], 0):
        k -= 1
    return pool.sizes[k] if k >= 0 else None


def pack_isolated(examples: list[Example], seq_len: int, pad_id: int) -> PackedRows:
    """Bin-pack whole examples into rows; per-example position ids and labels (see module doc)."""
    items, split = _chunks(examples, seq_len)
    return _layout(items, pack_bins([len(e) for e in items], seq_len), seq_len, pad_id, split)


def _layout(items: list[Example], bins: list[list[int]], seq_len: int, pad_id: int, split: int) -> PackedRows:
    """Rows holding ``bins`` of ``items`` (each bin's items in their original order), padded to ``seq_len``."""
    import torch

    n = len(bins)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.int64)  # (n, s)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.int64)  # (n, s)
    position_ids = torch.zeros((n, seq_len), dtype=torch.int64)  # (n, s)
    real = 0
    for row, members in enumerate(bins):
        at = 0
        for i in sorted(members):  # keep the original order inside a row (few-shot demos read in order)
            e = items[i]
            k = len(e)
            toks = torch.from_numpy(e.tokens.astype(np.int64))
            input_ids[row, at : at + k] = toks
            lab = toks.clone()
            lab[~torch.from_numpy(e.loss_mask)] = IGNORE
            lab[0] = IGNORE  # nothing of this example precedes its first token
            labels[row, at : at + k] = lab
            position_ids[row, at : at + k] = torch.arange(k)
            at += k
        real += at
        position_ids[row, at:] = torch.arange(seq_len - at)  # padding: one more segment of its own
    return PackedRows(input_ids, labels, position_ids, "isolated", real, 0, split)


# ------------------------------------------------------------------------------- packing a stream


def _row_weights(members: list[list[Example]], seq_len: int) -> torch.Tensor:
    """(n, s) float32: each placed example's ``weight`` (1.0 without one) over its tokens, 0 on padding."""
    import torch

    w = torch.zeros((len(members), seq_len), dtype=torch.float32)
    for r, row in enumerate(members):
        at = 0
        for e in row:
            w[r, at : at + len(e)] = getattr(e, "weight", 1.0)
            at += len(e)
    return w


def pack_stream(examples: Iterable[Example], seq_len: int, mode: str, pad_id: int, window_tokens: int,
                weights: bool = False, min_fill: float = 0.99) -> Iterator[tuple[PackedRows, torch.Tensor | None]]:
    """Pack a stream of examples a window at a time: the rows (and, with ``weights``, each token's example
    ``weight``, 0 on padding), chunk by chunk, so that memory holds one window of rows, not all of them.

    ``concat``: the same rows as :func:`pack_concat` over the whole stream, for any window (the tokens past the
    last full row of a window start the next one; the final partial row is dropped and counted).
    ``isolated``: :func:`pack_bins` over each window of about ``window_tokens`` tokens; the items of the rows
    less than ``min_fill`` full go back into the next window (at most a quarter window of them), so that only
    the last rows of the stream are left part-empty. One window (a stream shorter than ``window_tokens``) gives
    exactly :func:`pack_isolated`'s rows.

    Raises:
        ValueError: an unknown mode.
    """
    if mode == "concat":
        yield from _concat_stream(examples, seq_len, window_tokens, weights)
    elif mode == "isolated":
        yield from _isolated_stream(examples, seq_len, pad_id, window_tokens, weights, min_fill)
    else:
        raise ValueError(f"packing mode {mode!r}; expected concat or isolated")


def _concat_stream(examples: Iterable[Example], seq_len: int, window_tokens: int,
                   weights: bool) -> Iterator[tuple[PackedRows, torch.Tensor | None]]:
    import torch

    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (tokens, loss mask, weights) not yet in a row
    held = 0

    def rows(final: bool):
        nonlocal parts, held
        tokens = np.concatenate([p[0] for p in parts])
        trained = np.concatenate([p[1] for p in parts])
        w = np.concatenate([p[2] for p in parts])
        cut = len(tokens) // seq_len * seq_len
        parts = [] if final else [(tokens[cut:], trained[cut:], w[cut:])]
        held = len(tokens) - cut
        packed = _concat_rows(tokens[:cut], trained[:cut], seq_len, dropped=held if final else 0)
        return packed, torch.from_numpy(w[:cut]).view(-1, seq_len) if weights else None

    for e in examples:
        parts.append((e.tokens, e.loss_mask, np.full(len(e), getattr(e, "weight", 1.0), np.float32)))
        held += len(e)
        if held >= window_tokens + seq_len:
            yield rows(final=False)
    if parts:
        yield rows(final=True)


def _isolated_stream(examples: Iterable[Example], seq_len: int, pad_id: int, window_tokens: int, weights: bool,
                     min_fill: float) -> Iterator[tuple[PackedRows, torch.Tensor | None]]:
    carry: list[Example] = []  # the items of the last window's part-empty rows
    window: list[Example] = []
    held, split = 0, 0

    def rows(final: bool):
        nonlocal carry, window, held, split
        items = carry + window
        bins = [sorted(b) for b in pack_bins([len(e) for e in items], seq_len)]
        keep, back, back_tokens = [], [], 0
        for b in bins:
            fill = sum(len(items[i]) for i in b)
            if not final and fill < min_fill * seq_len and back_tokens + fill <= window_tokens // 4:
                back += b
                back_tokens += fill
            else:
                keep.append(b)
        carry, window, held = [items[i] for i in sorted(back)], [], back_tokens
        packed = _layout(items, keep, seq_len, pad_id, split)
        split = 0
        return packed, _row_weights([[items[i] for i in b] for b in keep], seq_len) if weights else None

    for e in examples:
        chunks, n_split = _chunks([e], seq_len)
        if n_split:
            chunks = [_weighted(c, e) for c in chunks]
        split += n_split
        window += chunks
        held += len(e)
        if held >= window_tokens:
            yield rows(final=False)
    if window or carry:
        yield rows(final=True)


def _weighted(chunk: Example, whole: Example) -> Example:
    """A chunk of ``whole`` that keeps its weight (if it has one)."""
    if hasattr(whole, "weight"):
        chunk.weight = whole.weight  # type: ignore[attr-defined]
    return chunk


# ------------------------------------------------------------------------------- isolation at run time


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(b, s) -> (b, s): a new segment starts wherever the position id is 0."""
    return (position_ids == 0).cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(b, s) position ids -> (b, 1, s, s) bool, True where query i may attend key j (same segment, j <= i)."""
    import torch

    seg = segment_ids(position_ids)  # (b, s)
    s = position_ids.shape[-1]
    allowed = seg[:, :, None] == seg[:, None, :]  # (b, s, s)
    allowed &= torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril_()  # in place: 2 bytes per pair
    return allowed[:, None]  # (b, 1, s, s)


def additive_block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype, fill: float = float("-inf")
                               ) -> torch.Tensor:
    """(b, s) position ids -> (b, 1, s, s) of ``dtype``: 0 where query i may attend key j, ``fill`` elsewhere.

    With ``fill`` = -inf this is the tensor torch's sdpa makes from :func:`block_causal_mask` itself (same values,
    same results), made once instead of once per layer. At most 1 + itemsize bytes per (i, j) pair while it is built.
    """
    import torch

    allowed = block_causal_mask(position_ids)  # (b, 1, s, s) bool
    return torch.full(allowed.shape, fill, dtype=dtype, device=position_ids.device).masked_fill_(allowed, 0.0)


def attention_kwargs(batch: dict[str, torch.Tensor], attention: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Model inputs that confine attention to each packed example, for the given attention kernel.

    Args:
        batch: ``input_ids``, ``labels``, ``position_ids``, each (b, s).
        attention: "flash_attention_2", "sdpa" or "eager".
        dtype: the attention's compute dtype (its query's): the mask's dtype, so that no layer converts it.

    Returns:
        The batch with what the kernel needs: flattened rows + ``cu_seq_lens_*`` for flash_attention_2, a
        (b, 1, s, s) additive ``attention_mask`` of ``dtype`` for sdpa (0 / -inf) and eager (0 / the most negative
        value).
    """
    import torch

    if attention == "flash_attention_2":
        flat = {k: v.reshape(1, -1) for k, v in batch.items()}  # (1, b*s): varlen over all segments
        pos = flat["position_ids"][0]
        starts = torch.nonzero(pos == 0).flatten()
        cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        return {**flat, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}
    fill = torch.finfo(dtype).min if attention == "eager" else float("-inf")
    return {**batch, "attention_mask": additive_block_causal_mask(batch["position_ids"], dtype, fill)}
