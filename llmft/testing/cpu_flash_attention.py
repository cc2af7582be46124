"""A CPU stand-in for the flash-attn kernels, behind transformers' own flash_attention_2 path.

Only the two kernels are replaced (``flash_attn_func`` and ``flash_attn_varlen_func``, with flash-attn's signatures);
everything around them is transformers' real code: ``flash_attention_forward`` (the cast of fp32 queries to the
autocast dtype or the weights' dtype), ``_flash_attention_forward`` (varlen dispatch on ``cu_seq_lens``, unpadding
by the attention mask) and the mask functions. Like flash-attn, the kernels refuse any dtype but bf16/fp16, so a
forward that would hand fp32 to flash-attn on a GPU fails here too. Their math is SDPA per segment, with
flash-attn's causal alignment (bottom-right when queries and keys differ in length, as in decoding).

Legend: t = tokens of all segments, h = query heads, hk = key/value heads, d = head dim, b = batch, s = sequence.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F

CALLS: Counter = Counter()  # "varlen" / "dense" kernel calls, and the dtypes seen


def _check_dtype(*tensors: torch.Tensor) -> None:
    for t in tensors:
        CALLS[str(t.dtype)] += 1
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")  # flash-attn's own message


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """q (sq, h, d), k/v (sk, hk, d) -> (sq, h, d); causal aligned bottom-right as flash-attn does."""
    sq, sk = q.shape[0], k.shape[0]
    mask = None
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)  # (sq, sk)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=scale, enable_gqa=True)  # (1, h, sq, d)
    return out[0].transpose(0, 1)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q (t, h, d), k/v (t_k, hk, d): each segment [cu[i], cu[i+1]) attends only within itself."""
    _check_dtype(q, k, v)
    CALLS["varlen"] += 1
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        out[cq[i] : cq[i + 1]] = _attend(q[cq[i] : cq[i + 1]], k[ck[i] : ck[i + 1]], v[ck[i] : ck[i + 1]], causal,
                                         softmax_scale)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (b, sq, h, d), k/v (b, sk, hk, d)."""
    _check_dtype(q, k, v)
    CALLS["dense"] += 1
    return torch.stack([_attend(q[i], k[i], v[i], causal, softmax_scale) for i in range(q.shape[0])])


@contextlib.contextmanager
def cpu_flash_attention():
    """Make ``attn_implementation="flash_attention_2"`` load and run on CPU with the kernels above.

    Patches, undone on exit: transformers' loaded flash implementation, its dispatch check (no CUDA, no flash-attn
    package here) and llmft's availability check.
    """
    import transformers.modeling_flash_attention_utils as fau
    from transformers.modeling_utils import PreTrainedModel

    import llmft.model.load as build

    names = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
             "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn")
    saved = {n: getattr(fau, n) for n in names}
    check = PreTrainedModel._check_and_adjust_attn_implementation
    available = build.flash_attn_available

    def dispatch(self, attn_implementation, *args, **kwargs):
        if attn_implementation == "flash_attention_2":
            return attn_implementation
        return check(self, attn_implementation, *args, **kwargs)

    fau._loaded_implementation = "flash_attention_2"
    fau._flash_fn, fau._flash_varlen_fn, fau._flash_with_kvcache_fn = flash_attn_func, flash_attn_varlen_func, None
    fau._pad_fn, fau._unpad_fn = fau._pad_input, fau._unpad_input
    fau._process_flash_kwargs_fn = fau._lazy_define_process_function(flash_attn_varlen_func)
    fau._process_with_kvcache_kwargs_fn = dict
    PreTrainedModel._check_and_adjust_attn_implementation = dispatch
    build.flash_attn_available = lambda: True
    CALLS.clear()
    try:
        yield CALLS
    finally:
        for n, value in saved.items():
            setattr(fau, n, value)
        PreTrainedModel._check_and_adjust_attn_implementation = check
        build.flash_attn_available = available
