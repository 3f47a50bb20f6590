"""Causal-LM loss as a SUM over learned tokens; the caller divides by the learned tokens of the whole
optimizer step, so gradient accumulation weighs every token equally (not every micro-batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from planner import policy
from worker.training.data import IGNORE_INDEX
from worker.training.kernels import liger_loss_sum

# Positions per chunk in the fused path: the planner counts the fp32 logits of one chunk (policy).
FUSED_CHUNK_TOKENS = policy.FUSED_CHUNK_TOKENS
# A sharded model's fused loss, registered with FSDP2 as a forward method of the root (worker/training/sharded.py):
# the fused path calls the decoder and lm_head directly, past the root's forward that would gather their shards.
SHARDED_FUSED_LOSS = "ftjobs_fused_loss_sum"


def loss_sum(model, batch: dict[str, torch.Tensor], *, fused: bool) -> torch.Tensor:
    """Packed rows (data.collate_packed) carry position_ids and no attention_mask: transformers builds the
    block-diagonal mask from the position restarts only without a KV cache, hence use_cache=False."""
    targets = batch["labels"][:, 1:]  # position t predicts token t+1
    if not fused:
        logits = model(**model_inputs(batch), use_cache=False).logits
        logits = logits[:, :-1].float()  # fp32 for a numerically sound log-softmax
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    if hasattr(model, SHARDED_FUSED_LOSS):
        return getattr(model, SHARDED_FUSED_LOSS)(batch, targets)
    return fused_loss_sum(model, batch, targets)


def model_inputs(batch: dict) -> dict:
    """What a collated batch passes to the model: all but the labels (input_ids, and attention_mask or
    position_ids, and for a padding-free batch the cu_seq_lens_* / max_length_* that bound its examples)."""
    return {name: value for name, value in batch.items() if name != "labels"}


def fused_loss_sum(model, batch, targets) -> torch.Tensor:
    """Never materialise the [batch, seq, vocab] logits: run the decoder, keep only the positions that are
    learned (chat data: often a small fraction), and apply lm_head + cross-entropy chunk by chunk under
    activation checkpointing, so at most one chunk of logits exists in forward and backward.
    Not applied: logit soft-capping or scaling that some architectures add after lm_head (Gemma 2, Cohere)."""
    return _fused_token_losses(model, batch, targets, reduction="sum")


def _fused_token_losses(model, batch, targets, *, reduction: str) -> torch.Tensor:
    """The fused path's cross-entropy of the learned positions: summed, or one value per position ("none")."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(**model_inputs(batch), use_cache=False)
    hidden = hidden.last_hidden_state[:, :-1]
    learned = targets != IGNORE_INDEX
    hidden, targets = hidden[learned], targets[learned]
    liger = liger_loss_sum(causal_lm, hidden, targets, reduction=reduction)
    if liger is not None:
        return liger
    lm_head = causal_lm.get_output_embeddings()

    def chunk_loss(hidden_chunk, target_chunk):
        return F.cross_entropy(lm_head(hidden_chunk).float(), target_chunk, reduction=reduction)

    chunks = [
        checkpoint(chunk_loss, hidden[start : start + FUSED_CHUNK_TOKENS], targets[start : start + FUSED_CHUNK_TOKENS],
                   use_reentrant=False)
        for start in range(0, hidden.size(0), FUSED_CHUNK_TOKENS)
    ]  # fmt: skip
    if reduction == "none":
        return torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32)
    return torch.stack(chunks).sum() if chunks else hidden.new_zeros((), dtype=torch.float32)


def sequence_logps(model, batch: dict, *, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of the batch (a row, or one example of a padding-free row): the summed log-probability of its
    learned tokens, and how many there are. Preference objectives score whole completions with it."""
    targets = batch["labels"][:, 1:]
    learned = targets != IGNORE_INDEX
    if fused:
        token_logps = -_fused_token_losses(model, batch, targets, reduction="none")
    else:
        logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1].float()
        token_nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        )
        token_logps = -token_nll[learned.reshape(-1)]
    rows, count = _sequence_of_positions(batch, targets)
    sequence = rows[learned]
    sums = token_logps.new_zeros(count).index_add(0, sequence, token_logps)
    tokens = token_logps.new_zeros(count).index_add(0, sequence, torch.ones_like(token_logps))
    return sums, tokens


def _sequence_of_positions(batch: dict, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """For every target position, which sequence it belongs to, and how many sequences there are: the row of a
    padded batch, or for a padding-free one the example that holds the predicted token (cu_seq_lens)."""
    if "cu_seq_lens_q" not in batch:
        rows = torch.arange(targets.size(0), device=targets.device)[:, None].expand_as(targets)
        return rows, targets.size(0)
    bounds = batch["cu_seq_lens_q"]
    predicted = torch.arange(1, targets.size(1) + 1, device=targets.device, dtype=bounds.dtype)
    return torch.searchsorted(bounds[1:], predicted, right=True)[None, :], bounds.numel() - 1
