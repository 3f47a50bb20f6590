"""training.padding_free: a micro-batch runs as one row holding its examples end to end (data.collate_flat), with
no padding and no [batch, 1, seq, seq] mask. Attention is causal inside each example, bounded by cumulative
sequence lengths (cu_seq_lens, as FlashAttention's varlen kernels take them): torch's own varlen_attn
(FlashAttention-2) on CUDA in half precision, and elsewhere (the CPU, or fp32) one causal sdpa call per example.

The function is registered with transformers' AttentionInterface. A name that AttentionMaskInterface does not
know gets no mask built at all (masking_utils._preprocess_mask_arguments), which is the point: the example
boundaries come with the batch as the cu_seq_lens_* / max_length_* kwargs that the models pass to attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

VARLEN_ATTENTION = "ftjobs_varlen"
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, tokens, head_dim], key and value [1, kv_heads, tokens, head_dim] (transformers' layout);
    returns [1, tokens, heads, head_dim] as transformers' sdpa_attention_forward does."""
    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError("padding-free attention needs a batch from data.collate_flat (cu_seq_lens_q, max_length_q)")
    if softcap is not None or dropout:
        raise NotImplementedError("padding-free attention applies neither attention soft-capping nor dropout")
    if query.size(0) != 1:
        raise ValueError(f"padding-free attention takes one row of concatenated examples, got {query.size(0)}")
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # [tokens, heads, head_dim]
    if q.is_cuda and q.dtype in _FLASH_DTYPES:
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_length_q, scaling, sliding_window)
    else:
        out = _per_example_sdpa(query, key, value, cu_seq_lens_q, scaling, sliding_window)
    return out.unsqueeze(0), None


def _flash_varlen(q, k, v, cu_seq_lens, max_length, scaling, sliding_window) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    # transformers' sliding window: a token sees itself and the sliding_window - 1 tokens before it
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    return varlen_attn(
        q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length,
        scale=scaling, window_size=window, enable_gqa=q.size(1) != k.size(1),
    )  # fmt: skip


def _per_example_sdpa(query, key, value, cu_seq_lens, scaling, sliding_window) -> torch.Tensor:
    """[tokens, heads, head_dim]: sdpa is_causal on each example's slice, so no token sees another example and
    nothing is computed for the pairs across them."""
    bounds = cu_seq_lens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = (tensor[:, :, start:end] for tensor in (query, key, value))
        band = _sliding_window_mask(end - start, sliding_window, query.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=band, is_causal=band is None, scale=scaling, enable_gqa=q.size(1) != k.size(1)
        )
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def _sliding_window_mask(length: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """None while the example fits in the window (plain causal); else causal and at most sliding_window back."""
    if sliding_window is None or length <= sliding_window:
        return None
    positions = torch.arange(length, device=device)
    distance = positions[:, None] - positions[None, :]
    return (distance >= 0) & (distance < sliding_window)


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
