"""moai_jax: one virtual accelerator for JAX.

    import moai_jax as moai
    acc = moai.Accelerator(flavor=8)
    trainer = moai.Trainer(model, optimizer, batch_size=512, seq_len=1024, accelerator=acc)
    print(trainer.plan)
"""

from moai_jax.native_log import without_cuda_probe_lines

with without_cuda_probe_lines():  # JAX's import
    from moai_jax.accelerator import Accelerator
from moai_jax.errors import (CheckpointError, DataError, FlavorError, GenerationError, ModelConfigError, ModelError,
                             MoaiError, NoPlanFits, WeightsError)
from moai_jax.generation import Generator, generate
from moai_jax.planner import Plan, plan
from moai_jax.trainer import Trainer

__all__ = ["Accelerator", "CheckpointError", "DataError", "FlavorError", "GenerationError", "Generator",
           "ModelConfigError", "ModelError", "MoaiError", "NoPlanFits", "Plan", "Trainer", "WeightsError", "generate",
           "plan"]
