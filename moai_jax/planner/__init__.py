"""Automatic parallelization: candidates, memory and time models, verification, explanation.

    plan = moai_jax.planner.plan(ModelConfig.preset("llama3-8b"), 64, 1024, Accelerator(16, "mi250"))
"""

from moai_jax.planner.plan import Plan
from moai_jax.planner.search import plan

__all__ = ["Plan", "plan"]
