"""Model shapes: the few config.json numbers that decide GPU memory.

Only stdlib here: the planner must never import torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# transformers' per-family default of tie_word_embeddings when config.json leaves it out
# (LlamaConfig/MistralConfig/Qwen2Config/MixtralConfig/Qwen2MoeConfig/Phi3Config: False; Gemma2Config: True).
_TIE_DEFAULT = {"gemma2": True}


class UnsupportedArchitecture(ValueError):
    """A config.json the planner does not model: refused rather than planned as something it is not."""

    code = "unsupported_architecture"


class UnsupportedQuantization(ValueError):
    """A pre-quantized checkpoint (config.json quantization_config): refused, its stored weights not modelled."""

    code = "unsupported_quantization"


@dataclass(frozen=True, slots=True)
class Linear:
    """One projection of a decoder layer: nn.Linear(in_features, out_features)."""

    name: str  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (qkv_proj, c_attn, w1, ...)
    in_features: int
    out_features: int
    bias: bool = False
    parent: str = ""  # the module holding it inside a decoder layer: self_attn, mlp, mlp.shared_expert, attn

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int  # the dense MLP's width (MoE: unused by the expert layers, see expert_intermediate_size)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # qwen2: q/k/v carry a bias (Qwen2Attention hard-codes bias=True)
    norms_per_layer: int = 2  # gemma2 has 4 (pre/post attention, pre/post feed-forward)
    final_logit_softcapping: float | None = None  # gemma2: tanh soft-cap of the logits (extra logits copy)
    attention_softcapping: float | None = None  # gemma2: tanh soft-cap of the attention scores (Gemma2Config: 50)
    linears: tuple[Linear, ...] = field(default=(), compare=False)
    # ---- mixture of experts (transformers 5.17 mixtral / qwen2_moe): every decoder layer is sparse ----------------
    num_experts: int = 0  # routed experts per layer (num_local_experts / num_experts); 0: a dense model
    experts_per_token: int = 0  # top-k (num_experts_per_tok)
    expert_intermediate_size: int = (
        0  # one expert's MLP width (mixtral: intermediate_size; qwen2_moe: moe_intermediate_size)
    )
    shared_expert_intermediate_size: int = 0  # qwen2_moe's always-on shared expert (an nn.Linear MLP); 0: none
    context_length: int | None = None  # max_position_embeddings, extended by rope scaling; None: not known

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
            Linear("q_proj", h, self.q_dim, b, "self_attn"),
            Linear("k_proj", h, self.kv_dim, b, "self_attn"),
            Linear("v_proj", h, self.kv_dim, b, "self_attn"),
            Linear("o_proj", self.q_dim, h, False, "self_attn"),
            Linear("gate_proj", h, i, False, "mlp"),
            Linear("up_proj", h, i, False, "mlp"),
            Linear("down_proj", i, h, False, "mlp"),
        )

    @property
    def layer_linear_numel(self) -> int:
        """Weights of the nn.Linear projections of one layer (what NF4 quantizes and peft's all-linear adapts)."""
        return sum(lin.weight_numel for lin in self.linears)

    @property
    def layer_other_numel(self) -> int:
        """Norm weights, biases and the MoE router of one layer (kept unquantized)."""
        biases = sum(lin.out_features for lin in self.linears if lin.bias)
        return self.norms_per_layer * self.hidden_size + biases + self.router_numel

    @property
    def router_numel(self) -> int:
        """mixtral/qwen2_moe TopKRouter.weight: an nn.Parameter [num_experts, hidden] (not an nn.Linear)."""
        return self.num_experts * self.hidden_size

    @property
    def expert_tensors(self) -> tuple[tuple[str, int], ...]:
        """The routed experts of one layer, (name, numel): transformers 5.17 MixtralExperts / Qwen2MoeExperts hold
        all experts as two 3-D nn.Parameters, gate_up_proj [E, 2i, h] and down_proj [E, h, i]. They are no
        nn.Linear: bitsandbytes leaves them unquantized and peft's target_modules cannot adapt them."""
        if not self.num_experts:
            return ()
        e, h, i = self.num_experts, self.hidden_size, self.expert_intermediate_size
        return (("gate_up_proj", e * 2 * i * h), ("down_proj", e * h * i))

    @property
    def layer_expert_numel(self) -> int:
        return sum(numel for _, numel in self.expert_tensors)

    @property
    def layer_numel(self) -> int:
        return self.layer_linear_numel + self.layer_other_numel + self.layer_expert_numel

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

    @property
    def active_mlp_width(self) -> int:
        """MLP intermediate features one token passes through: the dense width, or top-k experts + shared."""
        if not self.num_experts:
            return self.intermediate_size
        return self.experts_per_token * self.expert_intermediate_size + self.shared_expert_intermediate_size

    def module_names(self) -> tuple[str, ...]:
        """Every nn.Linear of a decoder layer as 'parent.name': what LoRA target_modules may name."""
        return tuple(f"{lin.parent}.{lin.name}" for lin in self.linears)

    # ---- construction from config.json -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], name: str = "") -> ModelShape:
        """Build from a model's config.json dict. Families the planner models are ARCHITECTURES' keys; any other
        model_type, a multimodal config and a pre-quantized checkpoint are refused (UnsupportedArchitecture,
        UnsupportedQuantization: ValueErrors with a `code`)."""
        cfg = dict(config)
        model_type = str(cfg.get("model_type", "llama"))
        try:
            for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
                int(cfg[key])
            if model_type not in _MOE_WIDTH_KEYS or model_type == "mixtral":
                int(cfg["intermediate_size"])
        except KeyError as missing:
            raise UnsupportedArchitecture(
                f"config.json lacks {missing.args[0]!r}: not a decoder-only model the planner knows"
            ) from None
        _refuse_out_of_scope(cfg, model_type)
        return ARCHITECTURES[model_type](cfg, name or str(cfg.get("_name_or_path", "")) or model_type)


def _refuse_out_of_scope(cfg: dict[str, Any], model_type: str) -> None:
    if cfg.get("vision_config") or cfg.get("audio_config") or model_type in _MULTIMODAL:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is multimodal: the planner models the language model only, not its vision "
            "or audio tower and their activations; it is refused rather than planned as a text model"
        )
    if model_type in _REFUSED:
        raise UnsupportedArchitecture(f"model_type {model_type!r}: {_REFUSED[model_type]}")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not a family the planner models (known: {', '.join(sorted(ARCHITECTURES))})"
        )
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise UnsupportedQuantization(
            f"config.json carries a quantization_config (quant_method {method!r}): pre-quantized checkpoints are "
            "neither planned nor trained; use the unquantized base model (method qlora quantizes it at load)"
        )


def context_length(cfg: dict[str, Any]) -> int | None:
    """The longest sequence the model's rotary embedding is configured for: max_position_embeddings, or the
    rope-scaled original length when that is longer. transformers modeling_rope_utils: 'linear', 'dynamic' and
    'yarn' stretch original_max_position_embeddings (else max_position_embeddings) by `factor`; 'llama3' and
    'longrope' configs already carry the extended max_position_embeddings (Llama-3.1: 131072 = 8192 x 16 not
    applied twice; their factor x original is at most it)."""
    mpe = cfg.get("max_position_embeddings") or cfg.get("seq_length")
    if not mpe:
        return None
    scaling = cfg.get("rope_scaling") or {}
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    kind = scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None
    if not factor or kind in ("llama3", "longrope", "su", "default", None):
        return int(mpe)
    original = int(scaling.get("original_max_position_embeddings") or mpe)
    return max(int(mpe), int(original * float(factor)))


# ---- the families -------------------------------------------------------------------------------------------
def _dense(cfg: dict[str, Any], name: str, **overrides: Any) -> ModelShape:
    """llama, mistral, qwen2, gemma2: q/k/v/o + gated MLP + RMSNorm (transformers modeling_llama layout)."""
    model_type = str(cfg.get("model_type", "llama"))
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    fields: dict[str, Any] = dict(
        name=name,
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(cfg["vocab_size"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", _TIE_DEFAULT.get(model_type, False))),
        attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        norms_per_layer=4 if model_type == "gemma2" else 2,
        final_logit_softcapping=cfg.get("final_logit_softcapping") if model_type == "gemma2" else None,
        attention_softcapping=cfg.get("attn_logit_softcapping", 50.0) if model_type == "gemma2" else None,
        context_length=context_length(cfg),
    )
    return ModelShape(**(fields | overrides))


def _qwen1(cfg: dict[str, Any], name: str) -> ModelShape:
    """First-generation Qwen (model_type 'qwen', trust_remote_code modeling_qwen.py): a fused c_attn
    Linear(h, 3h, bias=True), attn.c_proj Linear(h, h, bias=False), and an MLP whose config intermediate_size is
    twice its width (QWenMLP: ff_dim_in = config.intermediate_size // 2; w1, w2: Linear(h, ff), mlp.c_proj:
    Linear(ff, h)). Qwen-7B: 22016 // 2 = 11008 -> 7.72B parameters."""
    h, ff = int(cfg["hidden_size"]), int(cfg["intermediate_size"]) // 2
    linears = (
        Linear("c_attn", h, 3 * h, True, "attn"),
        Linear("c_proj", h, h, False, "attn"),
        Linear("w1", h, ff, False, "mlp"),
        Linear("w2", h, ff, False, "mlp"),
        Linear("c_proj", ff, h, False, "mlp"),
    )
    return _dense(
        cfg,
        name,
        intermediate_size=ff,
        num_kv_heads=int(cfg["num_attention_heads"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        linears=linears,
    )


def _phi3(cfg: dict[str, Any], name: str) -> ModelShape:
    """transformers modeling_phi3: fused qkv_proj Linear(h, q + 2 kv) and gate_up_proj Linear(h, 2i), no biases."""
    shape = _dense(cfg, name)
    h, i = shape.hidden_size, shape.intermediate_size
    linears = (
        Linear("qkv_proj", h, shape.q_dim + 2 * shape.kv_dim, False, "self_attn"),
        Linear("o_proj", shape.q_dim, h, False, "self_attn"),
        Linear("gate_up_proj", h, 2 * i, False, "mlp"),
        Linear("down_proj", i, h, False, "mlp"),
    )
    return _dense(cfg, name, linears=linears)


def _attention(shape: ModelShape) -> tuple[Linear, ...]:
    return shape.linears[:4]


def _mixtral(cfg: dict[str, Any], name: str) -> ModelShape:
    """transformers 5.17 modeling_mixtral: llama attention; MixtralSparseMoeBlock = TopKRouter (weight [E, h])
    + MixtralExperts (3-D gate_up_proj, down_proj); every layer sparse, no shared expert."""
    dense = _dense(cfg, name)
    return _dense(
        cfg,
        name,
        linears=_attention(dense),
        num_experts=int(cfg["num_local_experts"]),
        experts_per_token=int(cfg.get("num_experts_per_tok", 2)),
        expert_intermediate_size=dense.intermediate_size,
    )


def _qwen2_moe(cfg: dict[str, Any], name: str) -> ModelShape:
    """transformers 5.17 modeling_qwen2_moe: qwen2 attention (q/k/v bias: qkv_bias, default True);
    Qwen2MoeSparseMoeBlock = TopKRouter [E, h] + Qwen2MoeExperts (3-D) + shared_expert (a Qwen2MoeMLP of nn.Linear,
    shared_expert_intermediate_size) + shared_expert_gate Linear(h, 1). Refused when some layers are dense
    (mlp_only_layers, decoder_sparse_step > 1): the planner assumes identical layers."""
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise UnsupportedArchitecture(
            "qwen2_moe with dense layers (mlp_only_layers / decoder_sparse_step > 1) mixes "
            "two layer shapes; the planner models identical layers"
        )
    base = _dense(cfg, name, attention_bias=bool(cfg.get("qkv_bias", True)))
    h, shared = base.hidden_size, int(cfg.get("shared_expert_intermediate_size") or 0)
    linears = _attention(base)
    if shared:
        linears += (
            Linear("gate_proj", h, shared, False, "mlp.shared_expert"),
            Linear("up_proj", h, shared, False, "mlp.shared_expert"),
            Linear("down_proj", shared, h, False, "mlp.shared_expert"),
            Linear("shared_expert_gate", h, 1, False, "mlp"),
        )
    return _dense(
        cfg,
        name,
        attention_bias=base.attention_bias,
        linears=linears,
        num_experts=int(cfg["num_experts"]),
        experts_per_token=int(cfg.get("num_experts_per_tok", 4)),
        expert_intermediate_size=int(cfg["moe_intermediate_size"]),
        shared_expert_intermediate_size=shared,
    )


ARCHITECTURES: dict[str, Callable[[dict[str, Any], str], ModelShape]] = {
    "llama": _dense,
    "mistral": _dense,
    "qwen2": _dense,
    "gemma2": _dense,
    "qwen": _qwen1,
    "phi3": _phi3,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
}
# The families the planner models (kept for callers of the old name).
KNOWN_MODEL_TYPES = tuple(ARCHITECTURES)
# MoE families whose expert width is not intermediate_size.
_MOE_WIDTH_KEYS = {"mixtral": "intermediate_size", "qwen2_moe": "moe_intermediate_size"}
# Known families refused with their reason (planned wrongly otherwise).
_REFUSED = {
    "deepseek_v2": "DeepSeek-V2 (MLA attention with low-rank q/kv projections, first_k_dense_replace dense layers "
    "before the MoE ones, grouped routing) is not modelled; refused rather than planned as a llama",
    "deepseek_v3": "DeepSeek-V3 (MLA attention, first_k_dense_replace dense layers, 256 routed + shared experts) is "
    "not modelled; refused rather than planned as a llama",
}
# model_types whose checkpoints carry a vision or audio tower even when config.json lacks a vision_config.
_MULTIMODAL = {
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "llava",
    "llava_next",
    "mllama",
    "idefics3",
    "paligemma",
    "gemma3",
    "pixtral",
    "qwen2_audio",
    "qwen2_5_omni",
    "phi3_v",
    "phi4_multimodal",
}
