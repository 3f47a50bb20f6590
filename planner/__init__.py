"""The VRAM planner: predicts the peak GPU memory of a fine-tuning job from its spec and the model's shape.

Pure Python (stdlib + pydantic): never imports torch, transformers, fastapi, sqlalchemy or celery.

    from planner import plan, Plan, Suggestion, ModelShape
    from planner.catalog import find_model
    p = plan(spec, find_model("Qwen/Qwen2.5-7B"), gpu_memory_bytes=80 * 2**30)
"""

from planner.core import Plan, Suggestion
from planner.plan import plan
from planner.shapes import ModelShape

__all__ = ["ModelShape", "Plan", "Suggestion", "plan"]
