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
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(**model_inputs(batch), use_cache=False)
    hidden = hidden.last_hidden_state[:, :-1]
    learned = targets != IGNORE_INDEX
    hidden, targets = hidden[learned], targets[learned]
    liger = liger_loss_sum(causal_lm, hidden, targets)
    if liger is not None:
        return liger
    lm_head = causal_lm.get_output_embeddings()

    def chunk_loss(hidden_chunk, target_chunk):
        return F.cross_entropy(lm_head(hidden_chunk).float(), target_chunk, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), FUSED_CHUNK_TOKENS):
        end = start + FUSED_CHUNK_TOKENS
        total = total + checkpoint(chunk_loss, hidden[start:end], targets[start:end], use_reentrant=False)
    return total
