"""The collectives of a compiled step, read from its HLO, against references computed without the compiler.

Replica groups in XLA's three spellings and loops' trip counts on small hand-written HLO; then the planner's
verifying compile on 8 CPU devices, the very program tests/test_trainer.py's Trainer compiles for the same mesh
(same model, optimizer and batch), so the persistent cache serves whichever of the two comes second: a
data-parallel gradient all-reduce of every float32 gradient, fsdp weight all-gathers and tensor all-reduces
spanning exactly their axes, the scan over layers counted once per layer. Last, the planner on an H100 profile
with a made-up verifier: a plan slower as compiled than the next estimate loses to it.
"""

import dataclasses
import functools
import math
import types

import pytest
from flax import nnx

import moai_jax as moai
from moai_jax.accelerator import HARDWARE, Accelerator, hardware_profile
from moai_jax.models import Decoder, ModelConfig, param_count
from moai_jax.optimizer import adamw
from moai_jax.planner.compiled_collectives import (Collective, collectives, replica_groups, seconds_by_term,
                                                   spanned_axes)
from moai_jax.sharding.mesh import MeshShape
from moai_jax.sharding.rules import partition_spec
from moai_jax.step import Verified, compile_step

CONFIG = dataclasses.replace(ModelConfig.preset("tiny"), num_heads=8, num_kv_heads=4, head_dim=8)  # test_trainer's
BATCH, SEQ = 16, 32


def test_replica_groups_in_every_spelling_and_the_axes_they_span():
    mesh = MeshShape(fsdp=4, tensor=2)  # device id = 2 × fsdp + tensor
    by_fsdp, by_tensor = [[0, 2, 4, 6], [1, 3, 5, 7]], [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert replica_groups("{{0,2,4,6},{1,3,5,7}}", 8) == by_fsdp
    assert replica_groups("[4,2]<=[8]", 8) == by_tensor
    assert replica_groups("[2,4]<=[4,2]T(1,0)", 8) == by_fsdp
    assert replica_groups("mesh['axis_0'=4,'axis_1'=2] {'axis_0'}", 8) == by_fsdp
    assert replica_groups("mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}", 8) == by_fsdp
    assert replica_groups("mesh['a'=8] {'a':(2)2}", 8) == [[0, 2], [1, 3], [4, 6], [5, 7]]  # a sub-axis
    assert replica_groups("{}", 8) == [list(range(8))]
    assert spanned_axes(by_fsdp, mesh) == ("fsdp",) and spanned_axes(by_tensor, mesh) == ("tensor",)
    assert spanned_axes([list(range(8))], mesh) == ("fsdp", "tensor")


LOOPS = """HloModule loops

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %all-reduce-start = f32[8]{0} all-reduce-start(%x), replica_groups={{0,1},{2,3}}, to_apply=%add
  %all-reduce-done = f32[8]{0} all-reduce-done(%all-reduce-start)
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %all-reduce-done)
}

%inner_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %w = (s32[], f32[8]{0}) while(%p), condition=%inner_cond, body=%inner_body
  %y = f32[8]{0} get-tuple-element(%w), index=1
  %all-gather-start = (f32[8]{0}, f32[16]{0}) all-gather-start(%y), replica_groups=[2,2]<=[2,2]T(1,0)
  %all-gather-done = f32[16]{0} all-gather-done(%all-gather-start)
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %y)
}

%outer_cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]{0}) while(%t0), condition=%outer_cond, body=%outer_body,\
 backend_config={"known_trip_count":{"n":"5"}}
  %z = f32[8]{0} get-tuple-element(%w), index=1
  ROOT %collective-permute = f32[8]{0} collective-permute(%z), source_target_pairs={{0,2},{2,0},{1,3},{3,1}}
}
"""


def test_loops_multiply_and_an_async_pair_counts_once():
    found = {c.kind: c for c in collectives(LOOPS, MeshShape(stage=2, tensor=2))}  # device id = 2 × stage + tensor
    assert sorted(found) == ["all-gather", "all-reduce", "collective-permute"]
    reduce, gather, permute = found["all-reduce"], found["all-gather"], found["collective-permute"]
    assert (reduce.count, reduce.bytes, reduce.axes, reduce.term) == (5 * 3, 32 * 2 * 1 / 2, ("tensor",), "tensor")
    assert (gather.count, gather.bytes, gather.axes, gather.term) == (5, 64 * 1 / 2, ("stage",), "stage")
    assert (permute.count, permute.bytes, permute.axes, permute.term) == (1, 32, ("stage",), "stage")
    assert gather.span == 3 and reduce.span == 2  # ids 0 and 2 are three devices apart in order; 0 and 1 two


@functools.cache
def planned(mesh: str):
    """The planner's plan with `mesh` fixed, as tests/test_trainer.py's Trainer makes it, and its compiled step."""
    acc = Accelerator(8)
    abstract = nnx.eval_shape(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0), attention="xla"))
    compiled = []

    def verifier(candidate):
        _, executable, verified = compile_step(candidate, abstract, acc.devices, adamw(1e-3))
        compiled.append(executable)
        return verified

    p = moai.plan(CONFIG, BATCH, SEQ, acc, micro_batches=1, compute_dtype="float32", optimizer=adamw(1e-3),
                  verifier=verifier, **MeshShape.parse(mesh).sizes())
    return p, collectives(compiled[-1].as_text(), p.mesh)


def sent(found, kind, axes):
    return sum(c.count * c.bytes for c in found if c.kind == kind and c.axes == axes)


def test_data_parallel_steps_all_reduce_every_float32_gradient_over_data():
    p, found = planned("data=8")
    assert {c.axes for c in found} == {("data",)}
    gradients = 4 * param_count(CONFIG)  # float32
    assert sent(found, "all-reduce", ("data",)) == pytest.approx(2 * 7 / 8 * gradients, rel=1e-3)  # + the loss's
    assert any(c.count == CONFIG.num_layers for c in found)  # the layers' gradients, inside the scan's backward
    assert p.compiled_collective_bytes == {"data all-reduce": int(sent(found, "all-reduce", ("data",)))}
    cpu = HARDWARE["cpu"]
    assert p.compiled_step_seconds["data"] == pytest.approx(
        sent(found, "all-reduce", ("data",)) / cpu.intra_host_bandwidth, abs=1e-6)  # rounded to 6 decimals
    assert p.compiled_step_seconds["compute"] == p.estimated_step_seconds["compute"]
    assert p.compiled_step_seconds["data"] == pytest.approx(p.estimated_step_seconds["data"], rel=1e-2)  # guessed
    assert p.compiled_line().startswith("as compiled: ") and "data all-reduces" in str(p)


def test_fsdp_gathers_weights_and_tensor_all_reduces_activations_over_their_own_axes():
    p, found = planned("data=2,fsdp=2,tensor=2")
    abstract = nnx.eval_shape(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    names = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))
    sizes = p.mesh.sizes()
    gathered = 0.0  # one pass over the weights: each device gathers its tensor shard's other fsdp half
    for path, x in nnx.traversals.flatten_mapping(params).items():
        spec = partition_spec(nnx.traversals.flatten_mapping(names)[path], x.shape, sizes)
        axes = [a for s in spec if s for a in ((s,) if isinstance(s, str) else s)]
        if "fsdp" in axes:
            gathered += 4 * math.prod(x.shape) / math.prod(sizes[a] for a in axes) * (2 - 1)
    gathers = [c for c in found if c.kind == "all-gather"]
    assert gathers and {c.axes for c in gathers} == {("fsdp",)}
    assert gathered <= sent(found, "all-gather", ("fsdp",)) <= 2 * gathered  # forward, and again in backward
    activation = BATCH // 4 * SEQ * CONFIG.hidden_size * 4  # [rows, hidden] of a device: batch over data × fsdp
    tensor = sent(found, "all-reduce", ("tensor",))
    assert tensor >= CONFIG.num_layers * (2 + 2) * activation * 2 * (2 - 1) / 2  # per layer 2 forward, 2+ backward
    assert {c.term for c in found if c.axes == ("tensor",)} == {"tensor"}
    assert {c.term for c in found if c.axes == ("fsdp",)} == {"fsdp"}
    assert p.compiled_collective_bytes["tensor all-reduce"] == int(tensor)
    assert seconds_by_term(found, HARDWARE["cpu"])["tensor"] >= p.compiled_step_seconds["tensor"]  # some hidden


def test_a_plan_slower_as_compiled_than_the_next_estimate_has_that_one_compiled_and_loses_to_it():
    h100 = types.SimpleNamespace(flavor=8, hardware=hardware_profile("h100"), devices=[], family="gpu")
    compiled = []

    def verifier(candidate):  # the first compile sends a terabyte over fsdp, the second nothing
        compiled.append(candidate)
        sent = (Collective("all-gather", 1e12, 8, ("fsdp",), 8),) if len(compiled) == 1 else ()
        return Verified(1, "8 × H100 (made up)", 0.0, collectives=sent)

    p = moai.plan(ModelConfig.preset("llama3-8b"), 32, 1024, h100, verifier=verifier)
    first, second = compiled
    assert first.compiled_step_seconds is None and len(compiled) == 2  # the planner's plans, before their compile
    assert (p.mesh, p.remat, p.micro_batches) == (second.mesh, second.remat, second.micro_batches)
    assert p.compiled_step_seconds["total"] == p.compiled_step_seconds["compute"] <= p.estimated_step_seconds["total"]
    lost = p.alternatives[0]
    assert (lost["mesh"], lost["remat"]) == (first.mesh.sizes(), first.remat) and "as compiled" in lost["why_not"]
    assert "fastest as compiled of the 2 plans" in p.why
