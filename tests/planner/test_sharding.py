"""FSDP2 per-rank terms (planner/fsdp.py), hand-computed for zero2 and zero3 at N = 2 and 8.

The model: a llama with h=1024, i=4096, 8 layers, 8 heads of 128 (no GQA), vocab 32000, untied. By hand:
  one layer's projections: q, k, v, o = 4 x 1024 x 1024 = 4,194,304; gate, up, down = 3 x 1024 x 4096 = 12,582,912
  -> 16,777,216 + 2 norms x 1024 = 16,779,264 per layer; embed = lm_head = 32000 x 1024 = 32,768,000
  num_params = 2 x 32,768,000 + 8 x 16,779,264 + 1024 (final norm) = 199,771,136
"""

from __future__ import annotations

import pytest

from domain.spec import JobSpec
from planner import ModelShape, plan
from planner.catalog import find_model
from planner.core import WORKER, _phases_with_host, build_setup
from planner.fsdp import NCCL_BYTES

GIB = 2**30
SHAPE = ModelShape.from_config(
    {
        "model_type": "llama",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    name="fsdp-toy",
)
PARAMS = 199_771_136
LAYER = 16_779_264
EMBED = 32_768_000


def spec(**body) -> JobSpec:
    return JobSpec.model_validate({"base_model": "fsdp-toy", "training": {"micro_batch_size": 1}, **body})


def phases(s: JobSpec):
    return _phases_with_host(SHAPE, build_setup(s, SHAPE, 1, WORKER), WORKER)


def test_toy_model_size():
    assert SHAPE.num_params == PARAMS and SHAPE.layer_numel == LAYER


# full fine-tune in bf16 (params, grads and states in bf16; FSDP gathers and reduces in bf16):
#   weights 2 B x 199,771,136 = 399,542,272 -> /N;  adamw states 2 x 2 B x params = 799,084,544 -> /N
#   gradients (layer_backward, all of them) 399,542,272 -> /N
#   zero3: one unsharded layer 2 B x 16,779,264 = 33,558,528; layer_backward holds 2 (prefetch) = 67,117,056;
#          forward_loss holds the [norm, lm_head] group 2 x (32,768,000 + 1024) = 65,538,048 + one layer = 99,096,576
#   zero2: every layer and embed_tokens stay unsharded: 8 x 33,558,528 + 2 x 32,768,000 = 334,004,224 at
#          layer_backward; + the head group at forward_loss = 399,542,272 (the whole bf16 model)
#   reduce-scatter: the largest group is embed_tokens (32,768,000 > 16,779,264): 32,768,000 x (2 + 2 x 2) = 196,608,000
FULL_BF16 = [
    # (N, sharding, weights, states, grads, gathered forward_loss, gathered layer_backward)
    (2, "zero3", 199_771_136, 399_542_272, 199_771_136, 99_096_576, 67_117_056),
    (8, "zero3", 49_942_784, 99_885_568, 49_942_784, 99_096_576, 67_117_056),
    (2, "zero2", 199_771_136, 399_542_272, 199_771_136, 399_542_272, 334_004_224),
    (8, "zero2", 49_942_784, 99_885_568, 49_942_784, 399_542_272, 334_004_224),
]


@pytest.mark.parametrize("n, sharding, weights, states, grads, gathered_fwd, gathered_bwd", FULL_BF16)
def test_full_bf16_per_rank_terms(n, sharding, weights, states, grads, gathered_fwd, gathered_bwd):
    s = spec(method="full", memory={"precision": "bf16"}, resources={"num_gpus": n, "sharding": sharding})
    by_phase, _, host = phases(s)
    fwd, bwd, step = by_phase["forward_loss"], by_phase["layer_backward"], by_phase["optimizer_step"]
    assert fwd["weights"] == weights and fwd["optimizer_states"] == states
    assert bwd["gradients"] == grads and step["gradients"] == grads
    assert fwd["fsdp_allgathered_params"] == gathered_fwd
    assert bwd["fsdp_allgathered_params"] == gathered_bwd
    assert step["fsdp_allgathered_params"] == 0  # everything resharded after backward
    assert bwd["fsdp_reduce_scatter"] == 196_608_000 and "fsdp_reduce_scatter" not in fwd
    assert fwd["nccl_buffers"] == NCCL_BYTES and host == {}


# lora r=16 all-linear, bf16-mixed (MixedPrecisionPolicy: gathers in bf16, reduces in fp32), zero3, N=2:
#   adapters per layer: r x (in + out): q/k/v/o 4 x 16 x 2048 = 131,072; gate/up/down 3 x 16 x 5120 = 245,760
#   -> 376,832 per layer, 3,014,656 in all; fp32: 12,058,624 B -> 6,029,312 per rank
#   frozen bf16 weights 399,542,272 -> 199,771,136 per rank
#   one gathered layer: 2 B x (16,777,216 + 2048) + 2 B x 376,832 adapters = 34,312,192; layer_backward: x2
#   reduce-scatter: 376,832 x (2 B bf16 grads + 2 x 4 B fp32 reduce inputs) = 3,768,320
def test_lora_zero3_two_ranks():
    s = spec(method="lora", memory={"precision": "bf16-mixed"}, resources={"num_gpus": 2})
    by_phase, _, _ = phases(s)
    bwd = by_phase["layer_backward"]
    assert bwd["weights"] == 199_771_136 and bwd["trainable_params"] == 6_029_312
    assert bwd["fsdp_allgathered_params"] == 2 * 34_312_192
    assert bwd["fsdp_reduce_scatter"] == 3_768_320
    p = plan(s, SHAPE, 80 * GIB)
    assert p.num_gpus == 2 and p.sharding == "zero3"
    assert {"weights", "trainable_params"} <= set(p.sharded_terms)
    assert "activations" not in p.sharded_terms


# offload, full bf16:
#   params (N=8, zero3): weights 49,942,784 + states 99,885,568 + grads 49,942,784 = 199,771,136 per rank on the
#     host, 1,598,169,088 for the 8 ranks; none of them on the GPU
#   optimizer (N=2): states 399,542,272 + fp32 param and grad copies 4 B x 99,885,568 = 399,542,272 each
#     = 1,198,626,816 per rank, 2,397,253,632 for both
@pytest.mark.parametrize(
    "n, offload, per_rank, on_gpu_gone",
    [
        (8, "params", 199_771_136, ("weights", "optimizer_states", "gradients")),
        (2, "optimizer", 1_198_626_816, ("optimizer_states",)),
    ],
)
def test_offload_moves_terms_to_host(n, offload, per_rank, on_gpu_gone):
    s = spec(method="full", memory={"precision": "bf16"}, resources={"num_gpus": n, "offload": offload})
    p = plan(s, SHAPE, 80 * GIB)
    assert sum(p.host_breakdown.values()) == per_rank and p.host_memory_bytes == per_rank * n
    assert not set(on_gpu_gone) & set(p.breakdown)
    if offload == "optimizer":
        assert p.breakdown["weights"] == 199_771_136


def test_more_ranks_lower_the_per_rank_peak():
    peaks = [plan(spec(method="full", resources={"num_gpus": n}), SHAPE, None).peak_vram_bytes for n in (2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)
    zero2 = plan(spec(method="full", resources={"num_gpus": 8, "sharding": "zero2"}), SHAPE, None).peak_vram_bytes
    assert zero2 > peaks[-1]


def test_single_gpu_is_unchanged_by_the_new_fields():
    s = spec(method="full")
    assert plan(s, SHAPE, None) == plan(spec(method="full", resources={"num_gpus": 1, "offload": "none"}), SHAPE, None)
    assert "fsdp_allgathered_params" not in plan(s, SHAPE, None).breakdown


@pytest.mark.parametrize(
    "resources, memory, method, needle",
    [
        ({"num_gpus": 2}, {"optimizer": "paged_adamw_8bit"}, "full", "bitsandbytes"),
        ({"num_gpus": 2, "sharding": "zero2"}, {"optimizer": "adamw_8bit"}, "lora", "bitsandbytes"),
        ({"num_gpus": 2}, {"optimizer": "cpu_offload"}, "full", "resources.offload"),
        ({"num_gpus": 2}, {"optimizer": "galore_adamw"}, "full", "GaLore"),
        ({"offload": "params"}, {}, "full", "needs FSDP2 sharding"),
        ({"num_gpus": 9}, {}, "full", "less than or equal to 8"),
    ],
)
def test_combinations_that_do_not_shard_are_refused(resources, memory, method, needle):
    with pytest.raises(ValueError, match=needle):
        spec(method=method, memory=memory, resources=resources)


def test_qlora_8bit_does_not_shard():
    with pytest.raises(ValueError, match="bits 8"):
        spec(method="qlora", quantization={"bits": 8}, resources={"num_gpus": 2})


def test_does_not_fit_suggests_gpus_a_worker_has():
    q7b = find_model("Qwen/Qwen2.5-7B")  # full bf16-mixed adamw: ~7.6e9 x 16 B of model states, no single 80 GiB fits
    s = spec(method="full", memory={"optimizer": "adamw_8bit"})
    lone = plan(s, q7b, 80 * GIB, max_num_gpus=1)
    assert not any("num_gpus" in sg.patch.get("resources", {}) for sg in lone.suggestions)
    many = plan(s, q7b, 80 * GIB, max_num_gpus=8)
    sharded = [sg for sg in many.suggestions if "num_gpus" in sg.patch.get("resources", {})]
    assert sharded, many.suggestions
    assert all(sg.patch["memory"]["optimizer"] == "adamw" for sg in sharded)  # 8-bit bnb does not shard
    assert all(2 <= sg.patch["resources"]["num_gpus"] <= 8 for sg in sharded)
    assert all(sg.headroom_bytes >= 0 for sg in sharded)


def test_nothing_fits_names_the_smallest_gpu_and_count():
    l70 = ModelShape.from_config(
        {
            "model_type": "llama",
            "hidden_size": 8192,
            "intermediate_size": 28672,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "vocab_size": 128256,
        },
        name="l70",
    )
    p = plan(spec(method="lora", memory={"precision": "bf16"}), l70, 24 * GIB)
    assert p.fits is False and p.suggestions == []
    # peak + max(5%, 1 GiB) rounded up to a GiB: the peak exceeds 19 GiB, so the 5% margin applies
    need = -(-p.peak_vram_bytes * 100 // 95)
    assert p.min_gpu_memory_bytes == -(-need // GIB) * GIB
    assert "needs a GPU of at least" in p.reasons[-1]
    on_80 = plan(spec(method="full", memory={"precision": "bf16"}), l70, 80 * GIB)
    assert on_80.fits is False and on_80.suggestions == []
    assert on_80.min_num_gpus is None and "even 8 GPUs" in on_80.reasons[-1]
    one_k = {"micro_batch_size": 1, "max_seq_length": 1024}
    on_40 = plan(spec(method="lora", memory={"precision": "bf16"}, training=one_k), l70, 40 * GIB)
    assert on_40.fits is False and on_40.suggestions == [] and on_40.min_num_gpus == 5
    assert "or 5 GPUs of 40.0 GiB with zero3" in on_40.reasons[-1]
    fits = [
        plan(
            spec(method="lora", memory={"precision": "bf16"}, training=one_k, resources={"num_gpus": n}), l70, 40 * GIB
        ).fits
        for n in (4, 5)
    ]
    assert fits == [False, True]
