"""The newer training options on the CPU: torchao optimizers, int8/FP4 qlora, PiSSA, LoRA+, freeze modules,
packing, the validation split, the merged model. CUDA-only pieces skip (or are refused) with the reason."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from domain.errors import UnsupportedOnDevice
from domain.spec import GaloreOptions
from worker.training import data, loading, train
from worker.training.loss import loss_sum

NEEDS_CUDA = "torchao CPUOffloadOptimizer offloads from a GPU: needs CUDA"


def run(spec, base, dataset, out):
    reports = []
    result = train(spec, base_model_dir=base, dataset_path=dataset, output_dir=out, on_progress=reports.append)
    return result, reports


@pytest.mark.parametrize(
    "method, memory, fields",
    [
        ("lora", {"optimizer": "adamw_4bit"}, {}),
        ("qlora", {"optimizer": "adamw_4bit", "precision": "fp16-mixed"}, {"quantization": {"quant_type": "fp4"}}),
        ("qlora", {"optimizer": "adamw_8bit"}, {"quantization": {"bits": 8}}),
        ("qlora", {}, {"quantization": {"bits": 8}, "lora": {"loraplus_lr_ratio": 16}}),
        ("lora", {"fused_loss": False}, {"lora": {"init": "pissa"}, "training": {"packing": True}}),
        ("freeze", {"optimizer": "paged_adamw_8bit"}, {"freeze": {"trainable_modules": ["mlp", "lm_head"]}}),
        ("full", {"optimizer": "galore_adamw", "precision": "bf16"}, {"galore": {"rank": 8, "update_proj_gap": 1}}),
        ("freeze", {"optimizer": "galore_adamw"}, {"galore": {"proj_type": "full", "rank": 4}}),
        pytest.param(
            "full",
            {"optimizer": "galore_adamw_8bit"},
            {},
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="galore-torch's GaLoreAdamW8bit synchronizes CUDA: needs CUDA"
            ),
        ),
        pytest.param(
            "lora",
            {"optimizer": "cpu_offload"},
            {},
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA),
        ),
        pytest.param(
            "full",
            {"optimizer": "cpu_offload"},
            {"training": {"gradient_accumulation_steps": 2}},
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA),
        ),
    ],
)
def test_new_options_train(make_spec, tiny_llama, demo_dataset, tmp_path, method, memory, fields):
    training = fields.pop("training", {})
    spec = make_spec(method, memory=memory, training=training, **fields)
    result, reports = run(spec, tiny_llama, demo_dataset, tmp_path)
    assert result.steps == 2 and [r.step for r in reports] == [1, 2]
    assert all(math.isfinite(r.loss) and r.loss > 0 and isinstance(r.learning_rate, float) for r in reports)
    saved = "adapter/adapter_model.safetensors" if method in ("lora", "qlora") else "model/model.safetensors"
    assert saved in result.artifacts


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA worker runs these optimizers")
@pytest.mark.parametrize("method, optimizer", [("lora", "cpu_offload"), ("full", "galore_adamw_8bit")])
def test_cuda_only_optimizers_are_refused_on_a_cpu_worker_before_loading(
    make_spec, demo_dataset, tmp_path, method, optimizer
):
    spec = make_spec(method, memory={"optimizer": optimizer})
    with pytest.raises(UnsupportedOnDevice, match="is not supported on a cpu worker") as caught:  # no model exists
        train(spec, base_model_dir=tmp_path / "no-model", dataset_path=demo_dataset, output_dir=tmp_path / "out")
    assert caught.value.code == "unsupported_on_device" and not (tmp_path / "out").exists()


def test_galore_projects_the_decoder_layers_2d_weights_only(make_spec, tiny_llama):
    spec = make_spec("full", memory={"optimizer": "galore_adamw"}, galore={"rank": 8})
    model = loading.load_model(spec, tiny_llama, torch.device("cpu"), loading.precision_plan(spec.memory.precision))
    projected, plain = loading.parameter_groups(spec, model)
    names = {id(p): name for name, p in model.named_parameters()}
    assert projected["rank"] == 8 and projected["update_proj_gap"] == 200 and "rank" not in plain
    assert {names[id(p)].split(".")[-2] for p in projected["params"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert all(p.ndim == 2 and ".layers." in names[id(p)] for p in projected["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"model.embed_tokens.weight", "model.norm.weight"}


@pytest.mark.parametrize("proj_type, kept_numel", [("std", 64 * 4), ("full", 64 * 4 + 4 * 128)])
def test_galore_projection_keeps_only_its_rank_r_matrix(make_spec, proj_type, kept_numel):
    # galore-torch slices U / Vh of an fp32 SVD: as a view the slice would keep the whole 64 x 64 U (or 64 x 128
    # Vh) alive; the worker's projector copies the r-wide slice out (what the planner counts).
    spec = make_spec("full", memory={"optimizer": "galore_adamw"})
    weight = torch.nn.Parameter(torch.randn(64, 128))
    options = GaloreOptions(rank=4, proj_type=proj_type)
    optimizer = loading.build_optimizer(
        spec, loading.galore_groups([("model.layers.0.mlp.up_proj.weight", weight)], 1e-3, options), torch.device("cpu")
    )
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    matrix = optimizer.state[weight]["projector"].ortho_matrix
    held = sum(m.untyped_storage().nbytes() for m in (matrix if isinstance(matrix, list) else [matrix]))
    assert held == kept_numel * 4


def test_loraplus_groups(make_spec, tiny_llama):
    spec = make_spec("lora", lora={"loraplus_lr_ratio": 16, "use_dora": True}, training={"learning_rate": 1e-3})
    model = loading.load_model(spec, tiny_llama, torch.device("cpu"), loading.precision_plan(spec.memory.precision))
    slow, fast = loading.parameter_groups(spec, model)
    assert slow["lr"] == 1e-3 and fast["lr"] == pytest.approx(16e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_A" in names[id(p)] for p in slow["params"])
    assert all("lora_B" in names[id(p)] or "magnitude" in names[id(p)] for p in fast["params"])
    assert len(slow["params"]) + len(fast["params"]) == len(loading.trainable_parameters(model))


def test_pissa_adapter_is_converted_for_the_original_base(make_spec, tiny_llama, demo_dataset, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = make_spec("lora", lora={"init": "pissa", "r": 4}, training={"learning_rate": 1e-2})
    run(spec, tiny_llama, demo_dataset, tmp_path)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["r"] == 8  # PiSSA -> LoRA conversion doubles the rank
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tokens = torch.tensor([[5, 60, 300, 7, 99, 512]])
    with torch.no_grad():
        before = base(tokens).logits
        after = PeftModel.from_pretrained(base, tmp_path / "adapter")(tokens).logits
    assert not torch.allclose(before, after, atol=1e-4) and torch.isfinite(after).all()


def test_freeze_trainable_modules_trains_only_those(make_spec, tiny_llama, demo_dataset, tmp_path):
    spec = make_spec("freeze", freeze={"trainable_modules": ["layers.0.mlp"]}, training={"learning_rate": 1e-2})
    run(spec, tiny_llama, demo_dataset, tmp_path)
    before, after = load_file(tiny_llama / "model.safetensors"), load_file(tmp_path / "model/model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}


def test_freeze_unknown_module_is_an_error(make_spec, tiny_llama, demo_dataset, tmp_path):
    with pytest.raises(ValueError, match="match no parameter"):
        run(make_spec("freeze", freeze={"trainable_modules": ["no_such"]}), tiny_llama, demo_dataset, tmp_path)


def test_packed_rows_do_not_attend_across_examples(make_spec, tiny_llama):
    """The loss of a packed row equals the sum of its examples' own losses: no cross-example attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa").eval()
    examples = [data.TokenizedExample(list(range(5, 5 + n)), list(range(5, 5 + n))) for n in (7, 11, 4)]
    packed = data.pack_examples(examples, max_seq_length=32, seed=0)
    assert len(packed) == 1 and packed[0].examples == 3 and len(packed[0].input_ids) == 22
    cpu = torch.device("cpu")
    with torch.no_grad():
        together = loss_sum(model, data.collate_any(packed, 0, cpu), fused=False)
        alone = sum(loss_sum(model, data.collate([e], 0, cpu), fused=False) for e in examples)
        fused = loss_sum(model, data.collate_any(packed, 0, cpu), fused=True)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused, alone, rtol=1e-5, atol=1e-4)


def test_validation_fraction_reports_eval_loss(make_spec, tiny_llama, demo_dataset, tmp_path):
    spec = make_spec("lora", training={"validation_fraction": 0.25, "max_steps": 3})
    result, reports = run(spec, tiny_llama, demo_dataset, tmp_path)
    assert reports[-1].eval_loss is not None and math.isfinite(reports[-1].eval_loss)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["validation_examples"] > 0 and summary["eval_loss"] == reports[-1].eval_loss
    rows = len((demo_dataset).read_text().splitlines())
    assert summary["examples"] + summary["validation_examples"] <= rows


def test_merge_adapter_saves_a_bf16_model(make_spec, tiny_llama, demo_dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = make_spec("qlora", output={"merge_adapter": True}, training={"learning_rate": 1e-2})
    result, _ = run(spec, tiny_llama, demo_dataset, tmp_path)
    assert "model/model.safetensors" in result.artifacts and "adapter/adapter_model.safetensors" in result.artifacts
    merged = load_file(tmp_path / "model/model.safetensors")
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert not any("lora" in name for name in merged)
    base = load_file(tiny_llama / "model.safetensors")
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # loads as a plain model
    # ... and serves alone: its own tokenizer and chat template, listed as artifacts.
    from transformers import AutoTokenizer

    assert "model/tokenizer.json" in result.artifacts
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "model").chat_template
        == AutoTokenizer.from_pretrained(tiny_llama).chat_template
    )
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == spec.base_model
