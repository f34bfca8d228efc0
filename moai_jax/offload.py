"""The optimizer state kept in host memory: AdamW's moments visit the devices only for the update.

A plan with `offload_optimizer` keeps every parameter-shaped leaf of the optimizer state (AdamW's two
moments, 8 bytes a float32 parameter) in the host's pinned memory, as DeepSpeed's ZeRO-Offload and
MaxText's `optimizer_memory_host_offload` do. The step brings each one to the devices for the update
(`jax.device_put` to `jax.memory.Space.Device`) and sends it back (`Space.Host`); the numbers are the
same as with the state on the devices, and XLA streams the transfers.

Compile-only devices (planning for GPUs this machine does not have) implement no memory kinds, so JAX
drops "pinned_host" from their shardings; `mark_host_arguments` puts it back on the lowered step's
arguments, so their compiler reports the step as the GPU's would run it.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax._src.lib.mlir import ir

HOST = "pinned_host"
CHOICES = {"auto": None, "on": True, "off": False}  # the scripts' --offload-optimizer


def offloaded_leaves(optimizer: optax.GradientTransformation, opt_shapes: Any, params: Any) -> Any:
    """True for the optimizer state's parameter-shaped leaves (what goes to host memory), False for the rest
    (step counts, scalars)."""
    return optax.tree_map_params(optimizer, lambda _, __: True, opt_shapes, params,
                                 transform_non_params=lambda _: False)


def in_host_memory(shardings: Any, offloaded: Any) -> Any:
    """`shardings` with the offloaded leaves' in host memory."""
    return jax.tree.map(lambda s, host: s.with_memory_kind(HOST) if host else s, shardings, offloaded)


def to_devices(opt_state: Any, offloaded: Any, grads: Any) -> Any:
    """Inside the step: the offloaded leaves brought to the devices for the update, not before the gradients
    are whole (an optimization barrier: else XLA starts the transfers early, and they wait on the devices
    through backward)."""
    opt_state, _ = jax.lax.optimization_barrier((opt_state, grads))
    return _placed(opt_state, offloaded, jax.memory.Space.Device)


def to_host(opt_state: Any, offloaded: Any) -> Any:
    """Inside the step: the updated offloaded leaves sent back to host memory."""
    return _placed(opt_state, offloaded, jax.memory.Space.Host)


def _placed(tree: Any, offloaded: Any, space) -> Any:
    return jax.tree.map(lambda x, host: jax.device_put(x, space) if host else x, tree, offloaded)


def mark_host_arguments(lowered: jax.stages.Lowered, host_arguments: list[bool]) -> None:
    """Mark the lowered step's arguments flagged in `host_arguments` (one flag per flattened argument) as in
    host memory, where the devices dropped the memory kind (compile-only devices). Its results are in host
    memory already: the step's `to_host` says so. The module's arguments are the constants JAX hoisted into
    arguments, then the arguments it kept (`kept_var_idx` counts both)."""
    lowering = lowered._lowering
    constants = len(getattr(lowering, "const_args", ()))  # none where a JAX hoists no constants
    flags = [False] * constants + list(host_arguments)
    module = lowering.stablehlo()
    with module.context:
        main = next(op for op in module.body.operations if ir.StringAttr(op.attributes["sym_name"]).value == "main")
        attrs = [{a.name: a.attr for a in ir.DictAttr(d)} for d in main.attributes["arg_attrs"]]
        kept = sorted(lowering.compile_args["kept_var_idx"])
        assert len(kept) == len(attrs), (len(kept), len(attrs))
        for position, index in enumerate(kept):
            if flags[index]:
                attrs[position]["mhlo.memory_kind"] = ir.StringAttr.get(HOST)
        main.attributes["arg_attrs"] = ir.ArrayAttr.get([ir.DictAttr.get(d) for d in attrs])
