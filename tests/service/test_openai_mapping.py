"""OpenAI's create request onto the native JobSpec (service/openai_compat.py), and events back: each case
against the expected spec fields or the refusal, with the field it names."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from service.errors import InvalidCursor, InvalidSpec
from service.openai_compat import event_cursor, event_out, to_spec
from service.schemas_openai import FineTuningJobCreate

FILE = "file_" + "a" * 24


def request(**fields) -> FineTuningJobCreate:
    return FineTuningJobCreate.model_validate({"model": "/models/tiny", "training_file": FILE, "seed": 1, **fields})


def test_the_defaults_make_a_qlora_job_on_chat_messages_checkpointed_every_epoch():
    spec = to_spec(request())
    assert (spec.base_model, spec.dataset.file_id, spec.dataset_format.value) == ("/models/tiny", FILE, "messages")
    assert spec.method.value == "qlora" and spec.quantization_options.bits == 4 and spec.lora_options.r == 16
    training = spec.training
    assert (training.epochs, training.micro_batch_size, training.learning_rate, training.seed) == (3, "auto", 2e-4, 1)
    assert training.checkpoint_every_epoch and training.keep_checkpoints == 3
    assert spec.validation_dataset is None and spec.output.suffix is None and spec.metadata == {}


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}}, (2, 8, 1e-4)),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": 5, "batch_size": "auto"}},
                }
            },
            (5, "auto", 2e-4),
        ),
        ({"hyperparameters": {"n_epochs": "auto", "learning_rate_multiplier": "auto"}}, (3, "auto", 2e-4)),
    ],
)
def test_hyperparameters_at_either_place(fields, expected):
    training = to_spec(request(**fields)).training
    assert (training.epochs, training.micro_batch_size, training.learning_rate) == pytest.approx(expected)


def test_the_ftjobs_field_reaches_every_option_merged_over_the_mapping():
    spec = to_spec(
        request(
            suffix="v1",
            metadata={"team": "a"},
            validation_file="file_" + "b" * 24,
            hyperparameters={"n_epochs": 2},
            ftjobs={
                "method": "lora",
                "lora": {"r": 8},
                "training": {"max_steps": 10},
                "memory": {"optimizer": "adamw_8bit"},
                "metadata": {"run": "x"},
            },
        )
    )
    assert spec.method.value == "lora" and spec.lora.r == 8 and spec.memory.optimizer.value == "adamw_8bit"
    assert spec.training.max_steps == 10 and spec.training.epochs == 2 and spec.training.checkpoint_every_epoch
    assert spec.metadata == {"team": "a", "run": "x"} and spec.output.suffix == "v1"
    assert spec.validation_dataset.file_id == "file_" + "b" * 24


def test_without_a_seed_one_is_drawn_and_kept_on_the_spec():
    seeds = {to_spec(request(seed=None)).training.seed for _ in range(5)}
    assert len(seeds) > 1


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"ftjobs": {"base_model": "/other"}}, "ftjobs.base_model", "set by `model`"),
        ({"ftjobs": {"training": {"epoch": 2}}}, "ftjobs.training.epoch", "Extra inputs are not permitted"),
        (
            {"ftjobs": {"method": "full", "lora": {"r": 4}}},
            None,
            "'lora' options apply to lora and qlora",
        ),  # whole spec
        ({"training_file": "file-abc"}, "training_file", "String should match pattern"),
        (
            {
                "hyperparameters": {"n_epochs": 1},
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
            },
            "hyperparameters",
            "not both",
        ),
        ({"hyperparameters": {"batch_size": 0}}, "ftjobs.training.micro_batch_size", "between 1 and 4096"),
    ],
)
def test_refusals_name_the_field_at_fault(fields, param, message):
    with pytest.raises(InvalidSpec) as refused:
        to_spec(request(**fields))
    assert refused.value.extra["param"] == param and message in refused.value.detail


def test_events_read_as_openais_with_their_cursor():
    at = datetime(2026, 12, 2, tzinfo=UTC)
    failed = event_out(
        SimpleNamespace(
            seq=7,
            kind="state",
            created_at=at,
            data={"status": "failed", "error": {"code": "out_of_memory", "message": "ran out of cuda memory"}},
        )
    )
    assert (failed.id, failed.level, failed.type, failed.created_at) == (
        "ftevent-7",
        "error",
        "message",
        int(at.timestamp()),
    )
    assert failed.message == "job failed: ran out of cuda memory"
    progress = event_out(
        SimpleNamespace(seq=8, kind="progress", created_at=at, data={"step": 2, "total_steps": 4, "loss": 1.5})
    )
    assert progress.type == "metrics" and progress.message == "step 2/4: training loss=1.5000"
    assert event_cursor("ftevent-8") == 8 and event_cursor(None) == 2**63 - 1
    for bad in ("ftevent-x", "ftevent-99999999999999999999", "8"):
        with pytest.raises(InvalidCursor):
            event_cursor(bad)


def test_a_malformed_metadata_filter_is_refused_not_ignored(api):
    assert api.get("/v1/fine_tuning/jobs", params={"metadata[team]": "search"}).status_code == 200
    for query in ("metadata%5B%5D=null", "metadata=team"):  # metadata[]=null, and a bare metadata=
        response = api.get(f"/v1/fine_tuning/jobs?{query}")
        assert 400 <= response.status_code < 500 and "metadata[key]=value" in response.text, response.text
