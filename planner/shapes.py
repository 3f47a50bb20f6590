"""Model shapes: the few config.json numbers that decide GPU memory.

Only stdlib here: the planner must never import torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Decoder-only families whose layer layout the planner knows (q/k/v/o + gated MLP + RMSNorm).
KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2")

# transformers' per-family default of tie_word_embeddings when config.json leaves it out
# (LlamaConfig/MistralConfig/Qwen2Config: False; Gemma2Config: True).
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gemma2": True}


@dataclass(frozen=True, slots=True)
class Linear:
    """One projection of a decoder layer: nn.Linear(in_features, out_features)."""

    name: str  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # qwen2: q/k/v carry a bias (Qwen2Attention hard-codes bias=True)
    norms_per_layer: int = 2  # gemma2 has 4 (pre/post attention, pre/post feed-forward)
    final_logit_softcapping: float | None = None  # gemma2: tanh soft-cap of the logits (extra logits copy)
    linears: tuple[Linear, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.linears:
            object.__setattr__(self, "linears", self._layer_linears())

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def _layer_linears(self) -> tuple[Linear, ...]:
        h, i, b = self.hidden_size, self.intermediate_size, self.attention_bias
        return (
            Linear("q_proj", h, self.q_dim, b),
            Linear("k_proj", h, self.kv_dim, b),
            Linear("v_proj", h, self.kv_dim, b),
            Linear("o_proj", self.q_dim, h),
            Linear("gate_proj", h, i),
            Linear("up_proj", h, i),
            Linear("down_proj", i, h),
        )

    @property
    def layer_linear_numel(self) -> int:
        """Weights of the seven projections of one layer (what NF4 quantizes)."""
        return sum(lin.weight_numel for lin in self.linears)

    @property
    def layer_other_numel(self) -> int:
        """Norm weights and biases of one layer (kept unquantized)."""
        biases = sum(lin.out_features for lin in self.linears if lin.bias)
        return self.norms_per_layer * self.hidden_size + biases

    @property
    def layer_numel(self) -> int:
        return self.layer_linear_numel + self.layer_other_numel

    @property
    def embed_numel(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_numel(self) -> int:
        """Extra parameters of lm_head: 0 when it shares the embedding matrix."""
        return 0 if self.tie_word_embeddings else self.embed_numel

    @property
    def num_params(self) -> int:
        return self.embed_numel + self.lm_head_numel + self.num_layers * self.layer_numel + self.hidden_size

    @property
    def largest_linear_numel(self) -> int:
        return max(lin.weight_numel for lin in self.linears)

    # ---- construction from config.json -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "") -> ModelShape:
        """Build from a model's config.json dict (llama, mistral, qwen2, gemma2 and llama-like types)."""
        cfg = dict(config.get("text_config") or {}) | {k: v for k, v in config.items() if k != "text_config"}
        model_type = str(cfg.get("model_type", "llama"))
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            shape = cls(
                name=name or str(cfg.get("_name_or_path", "")) or model_type,
                model_type=model_type,
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", _TIE_DEFAULT.get(model_type, True))),
                attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
                norms_per_layer=4 if model_type == "gemma2" else 2,
                final_logit_softcapping=cfg.get("final_logit_softcapping") if model_type == "gemma2" else None,
            )
        except KeyError as missing:
            raise ValueError(f"config.json lacks {missing.args[0]!r}: not a decoder-only model the planner knows")
        return shape
