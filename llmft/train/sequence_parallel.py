"""Sequence parallelism: one sequence split across the ranks of a group, with DeepSpeed's Ulysses attention (ALST).

``parallel.sequence: N`` under the deepspeed launcher. Ranks [g N, (g+1) N) form sequence-parallel group g
(DeepSpeed's layout); the groups are the data-parallel ranks, so the world is (world / N) x N. Every rank of a
group reads the same rows (data-parallel shard g) and keeps 1/N of each row's tokens::

    row (b, s)  ──  labels shifted on the whole row, position ids of the whole row  ──┐
                                                                                      ├─ rank r: tokens
    [r s/N, (r+1) s/N)  ->  embeddings, norms, MLP, LM head and loss on (b, s/N)      ┘
    attention: all-to-all -> (b, H/N heads, s, d) over the whole row -> attention -> all-to-all back (b, s/N, h)

The loss of a rank is Σ (its tokens' weighted NLL) / D with D = (trained tokens of the step over all ranks) /
(data-parallel groups); DeepSpeed sums the gradients over every rank and divides by the data-parallel size, so
the step's loss and gradients are those of the unsharded step (tests/integration/test_sequence_parallel.py).

Packed documents stay isolated across slices: the attention gets the position ids of the whole row (Ulysses
gathers them) and a document starts wherever the position is 0. flash_attention_2 turns that into varlen
attention (the rows of a micro-batch are flattened into one, so each row is a document boundary too); sdpa, on
CPU, gets the block-causal mask built from them here (:func:`packed_sdpa`), once per forward: the layers of a
forward share it (and autograd saves it once), as the unsharded path shares the one in its batch.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llmft.config import Recipe, RecipeError, heads_problems
from llmft.data.packing import additive_block_causal_mask
from llmft.train.loss import IGNORE, causal_lm_loss

# sdpa that isolates packed documents by their position ids: the core attention under sequence parallelism
PACKED_SDPA = "llmft_packed_sdpa"


# the mask of the newest forward: (its position ids, dtype, weak reference). It lives as long as a layer's saved
# tensors hold it; a later layer of the same forward gets the same tensor instead of building one more
_MASK: list = []


def _shared_mask(pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive block-causal mask (b, 1, s, s) for ``pos`` (b, s): the one the previous layers made if it is
    still alive, else a new one."""
    if _MASK:
        seen, seen_dtype, ref = _MASK[0]
        mask = ref()
        if mask is not None and seen_dtype == dtype and seen.shape == pos.shape and torch.equal(seen, pos):
            return mask
    mask = additive_block_causal_mask(pos, dtype)
    _MASK[:] = [(pos.clone(), dtype, weakref.ref(mask))]
    return mask


def packed_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa confined to each packed document. query (b, h, s, d); ``kwargs["position_ids"]`` (b, s)
    of the same (whole) rows: a document starts wherever the position id is 0. A row holding one document runs
    plain causal attention (no mask); otherwise the additive (b, 1, s, s) block-causal mask, shared by the layers
    of a forward. Decoding (query shorter than the keys) and explicit masks pass through unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pos = kwargs.get("position_ids")
    q_len = query.shape[2]
    if attention_mask is None and pos is not None and q_len > 1 and pos.shape[-1] == q_len == key.shape[2]:
        if bool((pos[:, 1:] == 0).any()):  # several documents in a row
            attention_mask = _shared_mask(pos, query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_packed_sdpa() -> None:
    """Make :data:`PACKED_SDPA` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa)


@dataclass
class SequenceParallel:
    """This rank's place in its sequence-parallel group, and how its batches are cut."""

    size: int  # N: ranks sharing each sequence
    rank: int  # this rank's index in its group
    mpu: object  # DeepSpeed's parallel-state module (deepspeed.initialize(mpu=...))
    flatten: bool  # rows of a micro-batch joined into one (flash attention detects documents only in one row)
    attention: object = None  # DeepSpeed's UlyssesSPAttentionHF (its all-to-all is off in eval mode unless asked)
    loss_chunk: int = 0  # train.loss_chunk_tokens: evaluation scores a slice's positions this many at a time

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slice of a micro-batch (:func:`shard`)."""
        return shard(batch, self.rank, self.size, self.flatten)

    @contextlib.contextmanager
    def _all_to_all_in_eval(self, rows: int):
        """DeepSpeed's attention with its all-to-all in eval mode too (it runs each rank's tokens whole there), for
        ``rows`` rows a forward (it checks the micro-batch size it was registered with)."""
        a = self.attention
        names = ("disable_in_eval", "batch_size", "required_query_shape", "required_key_value_shape",
                 "required_context_shape")
        saved = {n: getattr(a, n) for n in names}
        a.disable_in_eval, a.batch_size = False, rows
        for n in names[2:]:  # [seq, batch, ...]
            setattr(a, n, torch.Size([saved[n][0], rows, *saved[n][2:]]))
        try:
            yield
        finally:
            for n, v in saved.items():
                setattr(a, n, v)

    @torch.no_grad()
    def window_nll(self, model: torch.nn.Module, x: torch.Tensor, first: int) -> float:
        """Σ NLL of the tokens ``x[0, first:]`` of one evaluation window x (1, w), each given the tokens before it,
        computed by the whole group: each rank runs the model on its w / N tokens (attention over the whole window
        through the all-to-all, as in training) and the sums are added over the group. Every rank of the group
        must call it with the same window; w must be divisible by N. A window that one rank could not hold in a
        whole forward is scored this way in 1 / N of the activations and logits.
        """
        w = x.shape[1]
        labels = x.clone()
        labels[:, :first] = IGNORE  # context only
        part = self.shard({"input_ids": x, "labels": labels,
                           "position_ids": torch.arange(w, device=x.device)[None]})  # each (1, w / N)
        with self._all_to_all_in_eval(rows=1):  # the training loss code: logits in chunks when training has them
            nll = causal_lm_loss(model, {**part, "use_cache": False}, 1, self.loss_chunk).float()  # Σ, this slice
        dist.all_reduce(nll, group=self.mpu.get_sequence_parallel_group())
        return float(nll)


def shard(batch: dict[str, torch.Tensor], rank: int, size: int, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s 1/``size`` of every row, with what it needs computed on the whole rows first.

    Args:
        batch: ``input_ids``, ``labels``, ``position_ids`` and optionally ``weight``, each (b, s).
        rank: index in the sequence-parallel group.
        size: ranks in the group; must divide s (b s when flattened).
        flatten: join the b rows into one (1, b s) row before slicing.

    Returns:
        ``input_ids``, ``position_ids`` and ``shift_labels`` (the token each position predicts: labels shifted
        by one on the whole row, IGNORE at each row's end), plus ``shift_weight`` (the predicted token's weight)
        when the batch has ``weight``; each (b, s / size), or (1, b s / size) when flattened.
    """
    shift = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
             "shift_labels": F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)}  # (b, s)
    if "weight" in batch:
        shift["shift_weight"] = F.pad(batch["weight"][:, 1:], (0, 1), value=0.0)
    if flatten:
        shift = {k: v.reshape(1, -1) for k, v in shift.items()}  # (1, b s)
    n = shift["input_ids"].shape[1] // size
    return {k: v[:, rank * n : (rank + 1) * n].contiguous() for k, v in shift.items()}


def check_launch(recipe: Recipe, world: int, distributed: bool) -> None:
    """Refuse a ``parallel.sequence`` the launch cannot run.

    Raises:
        RecipeError: sequence parallelism under the plain ``python`` launcher, or a world size it does not divide.
    """
    sp = recipe.parallel.sequence
    if sp == 1:
        return
    if not distributed:
        raise RecipeError([f"parallel.sequence: {sp} splits each sequence over {sp} ranks, which needs the "
                           f"deepspeed launcher. Fix: run `deepspeed --num_gpus {sp} launch/train.py RECIPE` "
                           "(on CPU: DS_ACCELERATOR=cpu deepspeed --num_accelerators N ...), or set "
                           "parallel.sequence: 1"])
    if sp > world or world % sp:
        how = f"is more than the {world} ranks" if sp > world else f"does not divide the {world} ranks"
        raise RecipeError([f"parallel.sequence: {sp} {how} of this launch (each group of {sp} ranks shares a "
                           f"sequence). Fix: launch a multiple of {sp} ranks, or set parallel.sequence to a divisor "
                           f"of {world}"])


def setup(model: torch.nn.Module, recipe: Recipe, attention: str) -> SequenceParallel | None:
    """Register DeepSpeed's Ulysses attention around the model's attention kernel and create the sequence-parallel
    groups; None when ``parallel.sequence`` is 1. Call after the process group exists, before
    ``deepspeed.initialize`` (which takes the returned ``mpu``).

    Args:
        model: the model to train (possibly PEFT-wrapped); sdpa models are switched to :data:`PACKED_SDPA`.
        recipe: the recipe (``parallel.sequence``, ``train.micro_batch_size``).
        attention: the kernel the model was built with (flash_attention_2 or sdpa).

    Raises:
        RecipeError: the model's heads do not split over the group, or the kernel cannot isolate documents.
    """
    sp = recipe.parallel.sequence
    if sp == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    problems = heads_problems(model.config.to_dict(), sp)
    if problems:
        raise RecipeError([f"{recipe.model.name}: parallel.sequence {problems[0]}"])
    if attention == "sdpa":
        register_packed_sdpa()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation(PACKED_SDPA)
        attention = PACKED_SDPA
    elif not attention.startswith("flash_attention"):
        raise RecipeError([f"model.attention: {attention} cannot isolate packed documents under sequence "
                           "parallelism. Fix: set model.attention: sdpa or flash_attention_2"])
    flatten = attention != PACKED_SDPA
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attention, sequence_parallel_size=sp,
        micro_batch_size=1 if flatten else recipe.train.micro_batch_size, seq_length_is_variable=True,
        disable_in_eval=True)  # eval-mode forwards (passkey decoding) run whole; window_nll turns it on
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # DeepSpeed keeps its attention object only in the closure of the function it registered under the kernel's name
    ulysses = inspect.getclosurevars(ALL_ATTENTION_FUNCTIONS[attention]).nonlocals["uattn"]
    return SequenceParallel(sp, mpu.get_sequence_parallel_rank(), mpu, flatten, ulysses,
                            recipe.train.loss_chunk_tokens)
