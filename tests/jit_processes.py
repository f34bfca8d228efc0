"""test_jit's NNX tutorial loop in one process of a job, passing its own rows of every global batch.
Process 0 prints the losses as JSON. Run by test_jit: `python -m moai_jax.launch --processes 2 -- this`."""

import json

import jax
from test_jit import batches, nnx_program

import moai_jax as moai

acc = moai.Accelerator(8)  # 4 devices from each of the 2 processes
rows = len(batches(steps=1)[0]["y"]) // jax.process_count()
mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
losses, *_ = nnx_program(lambda f: acc.jit(f, fsdp=8), rows=mine)
print(json.dumps(losses))
