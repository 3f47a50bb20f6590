"""The OpenAI fine-tuning API's shapes, as the official SDK reads and sends them (openai-python 3.57:
types/fine_tuning/*, types/file_object.py). Times are unix seconds, as OpenAI gives them.

The request models refuse unknown fields, as OpenAI refuses unrecognized arguments; every ftjobs option not in
OpenAI's vocabulary goes under the one `ftjobs` field (service/openai_compat.py merges it into the JobSpec).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from domain.spec import MAX_SEED


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Request):
    batch_size: Literal["auto"] | int | None = Field(
        None, description="Sequences per optimizer step; 'auto': the largest micro-batch the planner fits"
    )
    learning_rate_multiplier: Literal["auto"] | float | None = Field(
        None, description="Times ftjobs' default learning rate, 2e-4 (LoRA's usual rate)"
    )
    n_epochs: Literal["auto"] | int | None = Field(None, description="'auto': 3")


class SupervisedMethod(_Request):
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] | None = Field(
        None, description="DPO's beta; 'auto': ftjobs' default, 0.1"
    )


class DpoMethod(_Request):
    hyperparameters: DpoHyperparameters | None = None


class MethodIn(_Request):
    type: Literal["supervised", "dpo"] = Field(
        description="supervised: chat messages; dpo: OpenAI's preference file (input.messages, preferred_output, "
        "non_preferred_output), trained as objective dpo"
    )
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class FineTuningJobCreate(_Request):
    model: str = Field(
        min_length=1,
        max_length=1024,
        description="The base model: a directory under the server's model roots, or a cached hub id",
    )
    training_file: str = Field(min_length=1, max_length=128, description="An uploaded file's id (POST /v1/files)")
    validation_file: str | None = Field(
        None, min_length=1, max_length=128, description="An uploaded file's id: the eval loss is taken on its rows"
    )
    hyperparameters: Hyperparameters | None = Field(None, description="As OpenAI's, deprecated there for `method`")
    method: MethodIn | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="None: one is drawn and reported on the job")
    suffix: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Added to the fine_tuned_model name",
    )
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[dict[str, Any]] | None = Field(None, max_length=0, description="None are offered")
    ftjobs: dict[str, Any] | None = Field(
        None,
        description="Any native JobSpec fields (POST /v1/jobs) but base_model and dataset, merged over what "
        'the OpenAI fields give: e.g. {"method": "lora", "lora": {"r": 8}, "training": '
        '{"max_steps": 100}, "memory": {"optimizer": "paged_adamw_8bit"}}. With the SDK: '
        'extra_body={"ftjobs": {...}}. The defaults make a QLoRA job (NF4, r 16) on chat '
        "messages, checkpointed at the end of each epoch, the last three kept",
    )


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error")
    param: str | None = Field(description="The request field at fault, where one is")
    code: str = Field(description="ftjobs' stable problem code, e.g. does_not_fit, file_not_found")


class OpenAIError(BaseModel):
    """OpenAI's error envelope, which the SDK's exceptions read their message from."""

    error: OpenAIErrorBody


class JobErrorOut(BaseModel):
    code: str
    message: str
    param: str | None = None


class HyperparametersOut(BaseModel):
    batch_size: int | Literal["auto"]
    learning_rate_multiplier: float
    n_epochs: float


class SupervisedOut(BaseModel):
    hyperparameters: HyperparametersOut


class DpoHyperparametersOut(HyperparametersOut):
    beta: float


class DpoOut(BaseModel):
    hyperparameters: DpoHyperparametersOut


class MethodOut(BaseModel):
    type: Literal["supervised", "dpo", "kto", "orpo"] = Field(
        description="The job's objective: supervised (sft), dpo, or ftjobs' kto and orpo (native jobs)"
    )
    supervised: SupervisedOut | None = None
    dpo: DpoOut | None = None


FineTuningStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    status: FineTuningStatus = Field(
        description="A cancelling job (its training process being stopped) reads "
        "as cancelled; the native GET /v1/jobs/{id} tells them apart"
    )
    model: str
    fine_tuned_model: str | None = Field(
        description="Names the result once the job succeeded; its files are the "
        "job's artifacts, GET /v1/jobs/{id}/artifacts/..."
    )
    organization_id: str = Field(description="The tenant")
    training_file: str = Field(description="The uploaded file's id, or the data-root path of a native job")
    validation_file: str | None
    hyperparameters: HyperparametersOut
    method: MethodOut
    seed: int
    suffix: str | None
    metadata: dict[str, str]
    error: JobErrorOut | None
    trained_tokens: int | None = Field(description="Tokens through the model so far (padding excluded)")
    estimated_finish: int | None = Field(description="Unix time the running job is expected to end")
    result_files: list[str]
    integrations: list[dict[str, str]]


class FineTuningJobPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str = Field(description="Pass as `after` for older events")
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] = Field(description="The native event's data (GET /v1/jobs/{id}/events)")


class FineTuningJobEventPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent] = Field(description="Newest first")
    has_more: bool


class CheckpointMetricsOut(BaseModel):
    step: int
    train_loss: float | None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: CheckpointMetricsOut
    download_url: str = Field(description="The checkpoint as a tar: a peft adapter for lora/qlora jobs")


class FineTuningJobCheckpointPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint] = Field(description="Newest first")
    has_more: bool
