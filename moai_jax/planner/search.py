"""`plan()`: rank every candidate by estimated step time among those whose estimated memory fits, then
verify the winner by compiling its real train step on abstract inputs; over budget → the next one. On a
GPU or TPU compiler, a faster candidate estimated over the budget by less than the memory model errs high
is compiled first, and chosen if the compiler fits it; and where the compiled step's collectives
(planner/compiled_collectives.py) put it behind the estimate of a candidate not compiled yet, that one is
compiled too and the faster as compiled is chosen.

Where nothing fits with the optimizer state on the devices and a plan with it in host memory is estimated near
the budget, the search runs again with it there (`moai_jax.offload`): slower by the moments' trips over the host
link, but the same numbers.

Deterministic and allocation-free. Knobs the user fixes are honored; the rest stay automatic.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moai_jax.accelerator import Accelerator, Hardware
from moai_jax.errors import FlavorError, NoPlanFits
from moai_jax.models import ModelConfig, flops_per_token
from moai_jax.models.llama import REMAT_POLICIES
from moai_jax.models.lora import LoraConfig
from moai_jax.models.lora import flops_per_token as lora_flops
from moai_jax.planner.candidates import Candidate, Fixed, batch_split_error, candidates, check_fixed
from moai_jax.planner.compiled_collectives import bytes_by_term, seconds_by_term
from moai_jax.planner.explain import alternatives, compile_ceiling, lost_as_compiled, step_seconds, why_chosen
from moai_jax.planner.memory import OVER_TOLERANCE, estimate_bytes, sharded_param_elements
from moai_jax.planner.plan import Plan
from moai_jax.planner.time_model import estimate_seconds
from moai_jax.planner.verify import out_of_memory
from moai_jax.planner.verify import verify as verify_plan
from moai_jax.sizes import format_bytes
from moai_jax.step import Verified

MAX_VERIFIES = 3  # candidates compiled before giving up on verification
# How far over the budget an estimate may be and still be worth a compile, where no estimate fits and host memory
# for the optimizer state is the next try (which is tried only if one of its estimates is within it): the
# estimates at full size have run up to 15% high
OFFLOAD_RATHER_OVER = 0.25
SIMPLER_WITHIN = 0.02  # candidates this close to the fastest are ordered simplest first


class HostMemoryMayFit(NoPlanFits):
    """No plan fits with the optimizer state on the devices, and one with it in host memory is estimated near the
    budget: `plan` searches again with it there."""


@dataclasses.dataclass(frozen=True)
class Scored:
    candidate: Candidate
    memory: dict[str, int]
    seconds: dict[str, float]

    @property
    def simplicity(self) -> tuple:
        c = self.candidate
        return (c.mesh.stage, c.mesh.context, c.mesh.tensor, c.micro_batches, REMAT_POLICIES.index(c.remat),
                c.loss != "whole", c.mesh.fsdp)


def score(config: ModelConfig, batch_size: int, seq_len: int, hardware: Hardware, candidate: Candidate,
          compute_dtype: str, lora: LoraConfig | None = None, family: str = "cpu",
          collectives: dict[str, float] | None = None) -> Scored:
    """A candidate's estimated memory (as the `family`'s compiler allocates it) and step time (with
    `collectives`, the compiled step's communication seconds per term in place of the guessed ones)."""
    c = candidate
    compute_bytes = jnp.dtype(compute_dtype).itemsize
    memory = estimate_bytes(config, batch_size, seq_len, c.mesh, micro_batches=c.micro_batches, remat=c.remat,
                            loss=c.loss, lora=lora, base_bytes=compute_bytes, family=family,
                            offload_optimizer=c.offload_optimizer)
    seconds = estimate_seconds(config, batch_size, seq_len, c.mesh, hardware, micro_batches=c.micro_batches,
                               remat=c.remat, compute_bytes=compute_bytes, lora=lora, collectives=collectives,
                               offload_optimizer=c.offload_optimizer)
    return Scored(c, memory, seconds)


def rank(config: ModelConfig, batch_size: int, seq_len: int, flavor: int, hardware: Hardware, budget: int,
         fixed: Fixed, compute_dtype: str, lora: LoraConfig | None = None,
         family: str = "cpu") -> tuple[list[Scored], list[Scored]]:
    """(fitting candidates fastest first, the rest smallest first)."""
    scored = [score(config, batch_size, seq_len, hardware, c, compute_dtype, lora, family)
              for c in candidates(flavor, config, batch_size, seq_len, hardware.devices_per_host, fixed)]
    fits = fastest_first([s for s in scored if s.memory["total"] <= budget])
    over = sorted((s for s in scored if s.memory["total"] > budget), key=lambda s: (s.memory["total"], s.candidate.key))
    return fits, over


def fastest_first(scored: list[Scored]) -> list[Scored]:
    """By estimated step time, fastest first; near-ties (within SIMPLER_WITHIN of the fastest) simplest first."""
    scored = sorted(scored, key=lambda s: (s.seconds["total"], s.candidate.key))
    near = [s for s in scored if s.seconds["total"] <= scored[0].seconds["total"] * (1 + SIMPLER_WITHIN)]
    near.sort(key=lambda s: (s.simplicity, s.seconds["total"], s.candidate.key))
    return near + scored[len(near):]


def within_tolerance(fits: list[Scored], over: list[Scored], budget: int) -> Scored | None:
    """The fastest candidate estimated over the budget by no more than the memory model errs high on a GPU or
    TPU compiler (OVER_TOLERANCE) and faster than every candidate estimated to fit by more than a near-tie
    (SIMPLER_WITHIN): it may well fit, and only a compile can tell (None where there is none)."""
    best = fits[0].seconds["total"]
    near = [s for s in over if s.memory["total"] <= budget * (1 + OVER_TOLERANCE)
            and s.seconds["total"] * (1 + SIMPLER_WITHIN) < best]
    return fastest_first(near)[0] if near else None


def next_to_compile(fits: list[Scored], over: list[Scored], budget: int, target_compiler: bool, verify: bool,
                    rejected: list[tuple[Scored, str]], ceiling: float | None = None):
    """The candidates to compile, one at a time, at most MAX_VERIFIES: on a GPU or TPU compiler first the one
    `within_tolerance` of the budget, if any; then the fastest fitting ones, less those estimated at no less
    than one that compiled over the budget (the caller appends those to `rejected`, with why): a plan the
    estimate puts above one that did not fit is not worth a compile. Where no estimate fits, or every compile
    of the fastest came out over the budget, a GPU or TPU compiler judges the smallest (`smallest_layouts`), of
    those estimated at no more than `ceiling` where one is given."""
    if not verify:
        yield from fits[:1]
        return
    if not fits:
        near = [s for s in over if ceiling is None or s.memory["total"] <= ceiling]
        yield from smallest_layouts(near) if target_compiler else []
        return
    first = within_tolerance(fits, over, budget) if target_compiler else None
    queue = ([first] if first else []) + fits
    tried: set[int] = set()

    def worth_a_compile(s: Scored) -> bool:  # not tried, and below and unlike every compile over the budget
        return (id(s) not in tried and s.memory["total"] < compile_ceiling(rejected)
                and all(layout(s) != layout(r) for r, _ in rejected))

    while len(tried) < MAX_VERIFIES:
        s = next(filter(worth_a_compile, queue), None)
        if s is None:
            break
        tried.add(id(s))
        yield s
    if target_compiler and rejected and len(rejected) == len(tried):  # every compile over: the estimates run low
        yield from smallest_layouts(sorted(filter(worth_a_compile, fits),
                                           key=lambda s: (s.memory["total"], s.candidate.key)))


def outranked(compiled: Plan, fits: list[Scored], tried: list[Scored]) -> bool:
    """Whether the step as compiled is slower, by more than a near-tie, than the estimate of a fitting
    candidate not compiled yet: on a GPU or TPU compiler that one is compiled too (within MAX_VERIFIES)."""
    seconds = (compiled.compiled_step_seconds or {}).get("total")
    return seconds is not None and any(s.seconds["total"] * (1 + SIMPLER_WITHIN) < seconds
                                       for s in fits if all(s is not t for t in tried))


def fastest_as_compiled(fitted: list[tuple[Scored, Plan]], start: float, ranked_against) -> Plan:
    """Of the plans compiled within the budget (in the order compiled), the fastest as compiled; the others
    lead its alternatives (`ranked_against(scored)`: the alternatives of a candidate), each with its seconds
    as compiled."""
    scored, best = min(fitted, key=lambda sp: step_seconds(sp[1]))
    others = [p for _, p in fitted if p is not best]
    if others:
        best = dataclasses.replace(best, alternatives=lost_as_compiled(best, others, ranked_against(scored)),
                                   why=f"{best.why}; the fastest as compiled of the {len(fitted)} plans compiled "
                                       f"within the budget ({step_seconds(best):.3f} s a step)")
    return dataclasses.replace(best, planning_seconds={**best.planning_seconds,
                                                       "total": round(time.perf_counter() - start, 3)})


def smallest_layouts(scored: list[Scored]):
    """The smallest estimates of `scored` (sorted by size), one candidate per layout (a loss mode alone is not
    worth a compile of its own), at most MAX_VERIFIES; the caller keeps the first the compiler fits."""
    layouts = set()
    for s in scored:
        if layout(s) not in layouts:
            layouts.add(layout(s))
            yield s
            if len(layouts) == MAX_VERIFIES:
                return


def layout(s: Scored) -> tuple:
    """What a compile tells about: the mesh, micro-batches and remat (the loss mode changes little)."""
    return s.candidate.mesh, s.candidate.micro_batches, s.candidate.remat


def smallest_flavor(config, batch_size, seq_len, hardware, memory_fraction, fixed: Fixed, start: int,
                    compute_dtype: str = "bfloat16", lora: LoraConfig | None = None, family: str = "cpu") -> int | None:
    """The smallest flavor above `start` where some candidate's estimate fits (mesh axes left automatic)."""
    loose = dataclasses.replace(fixed, data=None, fsdp=None, tensor=None, stage=None)
    budget = int(memory_fraction * hardware.memory_bytes)
    sizes = sorted({n for n in range(start + 1, 17)} | {n for n in range(8, 4097, 8) if n > start})
    for n in sizes:
        for c in candidates(n, config, batch_size, seq_len, hardware.devices_per_host, loose):
            if c.remat != "full" and loose.remat is None:
                continue  # the most memory-saving policy answers "does anything fit"
            if estimate_bytes(config, batch_size, seq_len, c.mesh, micro_batches=c.micro_batches, remat=c.remat,
                              loss=c.loss, lora=lora, base_bytes=jnp.dtype(compute_dtype).itemsize,
                              family=family)["total"] <= budget:
                return n
    return None


def host_hint(config, batch_size, seq_len, accelerator, budget, fixed: Fixed, compute_dtype, needed: int,
              memory_fraction: float) -> str:
    """What would fit when simulated devices share one host's memory (more of them would not help):
    the largest halved batch that fits, and the host memory the asked-for batch needs."""
    flavor, hardware = accelerator.flavor, accelerator.hardware
    halved = (batch_size >> i for i in range(1, batch_size.bit_length()))
    smaller = next((b for b in halved if rank(config, b, seq_len, flavor, hardware, budget, fixed, compute_dtype)[0]),
                   None)
    return (f"the {flavor} simulated device(s) share this host's {format_bytes(accelerator.host_memory)} of available "
            f"memory: {f'batch {smaller} fits, or ' if smaller else ''}batch {batch_size} needs a host with about "
            f"{format_bytes(needed * flavor / memory_fraction)} available (or plan for real devices with "
            f"--hardware, e.g. h100)")


def plan(model_config: ModelConfig, batch_size: int, seq_len: int, accelerator: Accelerator,
         memory_fraction: float = 0.8, *, verify: bool = True, data: int | None = None, fsdp: int | None = None,
         tensor: int | None = None, micro_batches: int | None = None, remat: str | None = None,
         loss: str | None = None, compute_dtype: str | None = None, optimizer=None, stage: int | None = None,
         expert: int | None = None, context: int | None = None,
         verifier: Callable[[Plan], Verified] | None = None, lora: LoraConfig | None = None,
         offload_optimizer: bool | None = None) -> Plan:
    """The fastest plan whose memory fits `memory_fraction` of each device, verified by a compile.
    With `lora` (a models.lora.LoraConfig), only LoRA adapters train on a frozen base in the compute dtype.
    `offload_optimizer`: keep the optimizer state in host memory (True), on the devices (False), or in host
    memory only where no plan fits with it on the devices (None; never under LoRA, whose state is small, nor
    where XLA:CPU verifies, whose devices' memory is the host's).

    `verifier` compiles a candidate and measures it (default: the train step of an abstract Decoder
    of `model_config`); the Trainer passes its own, so the verifying compile is the one it runs."""
    knobs = dict(locals())
    start = time.perf_counter()
    if offload_optimizer is not None or lora is not None or getattr(accelerator, "family", "cpu") == "cpu":
        return _plan(**knobs | {"offload_optimizer": bool(offload_optimizer)})
    try:
        return _plan(**knobs | {"offload_optimizer": False}, then_offload=True)
    except HostMemoryMayFit as on_devices:
        try:
            chosen = _plan(**knobs | {"offload_optimizer": True})
        except NoPlanFits:
            raise NoPlanFits(f"{on_devices}; nor does any with the optimizer state in host memory") from None
    moments = 2 * 4 * sharded_param_elements(model_config, chosen.mesh)
    return dataclasses.replace(chosen, why=(
        f"no plan fits with the optimizer state on the devices, so AdamW's moments ({format_bytes(moments)} a device) "
        f"are kept in host memory and cross the host link each step "
        f"({chosen.estimated_step_seconds['host']:.3f} s); {chosen.why}"),
        planning_seconds={**chosen.planning_seconds, "total": round(time.perf_counter() - start, 3)})


def _plan(model_config: ModelConfig, batch_size: int, seq_len: int, accelerator: Accelerator,
          memory_fraction: float, *, verify: bool, data: int | None, fsdp: int | None, tensor: int | None,
          micro_batches: int | None, remat: str | None, loss: str | None, compute_dtype: str | None, optimizer,
          stage: int | None, expert: int | None, context: int | None, verifier: Callable[[Plan], Verified] | None,
          lora: LoraConfig | None, offload_optimizer: bool, then_offload: bool = False) -> Plan:
    """`plan` with the optimizer state's place fixed. `then_offload`: where nothing fits and a plan with the state
    in host memory is estimated near the budget, raise HostMemoryMayFit, and where that is so before any compile,
    compile no estimate more than OFFLOAD_RATHER_OVER over the budget."""
    start = time.perf_counter()
    if not isinstance(memory_fraction, (int, float)) or not 0 < memory_fraction <= 1:
        raise FlavorError(f"memory fraction must be in (0, 1], e.g. 0.8, not {memory_fraction!r}")
    for name, value in (("batch size", batch_size), ("sequence length", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise FlavorError(f"{name} must be a whole number >= 1, not {value!r}")
    hardware, flavor = accelerator.hardware, accelerator.flavor
    compute_dtype = compute_dtype or ("float32" if hardware.name == "cpu" else "bfloat16")
    if compute_dtype not in ("float32", "bfloat16", "float16"):
        raise FlavorError(f"compute dtype {compute_dtype!r}: choose float32, bfloat16 or float16")
    fixed = Fixed(data=data, fsdp=fsdp, tensor=tensor, micro_batches=micro_batches, remat=remat, loss=loss,
                  stage=stage, expert=expert, context=context, offload_optimizer=offload_optimizer)
    check_fixed(fixed, flavor, model_config, batch_size, seq_len, hardware.devices_per_host)
    budget = int(memory_fraction * hardware.memory_bytes)
    if lora is not None:
        lora.check(model_config)
    family = getattr(accelerator, "family", "cpu")  # the compiler that verifies: its memory model ranks
    fits, over = rank(model_config, batch_size, seq_len, flavor, hardware, budget, fixed, compute_dtype, lora, family)
    ranked_seconds = time.perf_counter() - start
    if not over and not fits:
        raise batch_split_error(batch_size, fixed, lambda rows: candidates(
            flavor, model_config, rows, seq_len, hardware.devices_per_host, fixed))

    def base(s: Scored, why: str, alts) -> Plan:
        c = s.candidate
        tokens = batch_size * seq_len
        step = s.seconds["total"]
        flops = flops_per_token(model_config, seq_len) if lora is None else lora_flops(model_config, seq_len, lora)
        mfu = flops * tokens / step / (flavor * hardware.peak_flops)
        return Plan(flavor=flavor, hardware=hardware.name, mesh=c.mesh, batch_size=batch_size, seq_len=seq_len,
                    micro_batches=c.micro_batches, remat=c.remat, loss=c.loss, compute_dtype=compute_dtype,
                    estimated_bytes_per_device=s.memory, budget_bytes_per_device=budget,
                    estimated_step_seconds={k: round(v, 6) for k, v in s.seconds.items()},
                    estimated_tokens_per_sec=round(tokens / step, 1), estimated_mfu=round(mfu, 4), why=why,
                    alternatives=tuple(alts), planning_seconds={"rank": round(ranked_seconds, 3)},
                    candidates_considered=len(fits) + len(over), candidates_fitting=len(fits),
                    lora=None if lora is None else lora.to_dict(), offload_optimizer=c.offload_optimizer)

    def as_compiled(result: Verified, candidate: Candidate) -> dict:
        """The Plan's fields for the step as compiled: its collectives in place of the guessed communication."""
        if result.collectives is None:
            return {}
        seconds = score(model_config, batch_size, seq_len, hardware, candidate, compute_dtype, lora, family,
                        seconds_by_term(result.collectives, hardware)).seconds
        return {"compiled_step_seconds": {k: round(v, 6) for k, v in seconds.items()},
                "compiled_collective_bytes": bytes_by_term(result.collectives)}

    rejected: list[tuple[Scored, str]] = []
    compiled: list[Verified] = []  # over the budget
    fitted: list[tuple[Scored, Plan]] = []  # compiled within the budget
    tried: list[Scored] = []
    # On a GPU or TPU target (attached or compile-only) the compiler has the last word: a faster candidate
    # estimated just over the budget is compiled first, and where no estimate fits the smallest is compiled
    # too; either is chosen if the target's compiler fits it in the budget. A plan whose collectives as
    # compiled make it slower than another's estimate has that one compiled too; the fastest as compiled wins.
    target_compiler = getattr(accelerator, "family", "cpu") != "cpu"
    near_budget = budget * (1 + OFFLOAD_RATHER_OVER)

    @functools.cache  # asked before the compiles and again where none fitted: ranked once
    def host_memory_may_fit() -> bool:  # a candidate with the optimizer state in host memory estimated near the budget
        offloaded = rank(model_config, batch_size, seq_len, flavor, hardware, budget,
                         dataclasses.replace(fixed, offload_optimizer=True), compute_dtype, lora, family)
        return any(s.memory["total"] <= near_budget for s in offloaded[0] + offloaded[1])

    ceiling = near_budget if then_offload and not fits and host_memory_may_fit() else None
    for s in next_to_compile(fits, over, budget, target_compiler, verify, rejected, ceiling):
        if not fits:
            why = (f"no estimate fits the {format_bytes(budget)} budget; this is the smallest of {len(over)} "
                   f"candidates (estimated at {format_bytes(s.memory['total'])}) that the compiler fits")
        elif s.memory["total"] > budget:  # within_tolerance's: chosen only if the compiler fits it
            why = (f"estimated at {format_bytes(s.memory['total'])}, over the {format_bytes(budget)} budget by less "
                   f"than the memory model errs high ({OVER_TOLERANCE:.0%}), and more than {SIMPLER_WITHIN:.0%} faster "
                   f"than every candidate estimated to fit, so compiled first: the compiler fits it; "
                   + why_chosen(s, [s, *fits], [o for o in over if o is not s], fixed))
        else:
            why = why_chosen(s, fits, over, fixed)
            if rejected:  # the faster ones the estimate fitted did not fit as compiled (see the alternatives)
                why = f"{len(rejected)} faster candidate(s) compiled over the budget; " + why
        chosen = base(s, why, alternatives(s, fits, over, budget, rejected))
        if not verify:
            return chosen
        started = time.perf_counter()
        try:
            result = (verifier(chosen) if verifier is not None
                      else verify_plan(chosen, model_config, accelerator.devices, optimizer))
        except jax.errors.JaxRuntimeError as e:  # a TPU step that does not fit fails to compile
            result = out_of_memory(e, accelerator.devices[0], chosen.mesh.size, time.perf_counter() - started,
                                   budget)
        timing = {**chosen.planning_seconds, "verify": round(result.seconds, 3),
                  "total": round(time.perf_counter() - start, 3)}
        tried.append(s)
        if result.bytes_per_device <= budget:
            fitted.append((s, dataclasses.replace(chosen, verified_bytes_per_device=result.bytes_per_device,
                                                  verified_on=result.backend, planning_seconds=timing,
                                                  **as_compiled(result, s.candidate))))
            if not (target_compiler and outranked(fitted[-1][1], fits, tried)):
                break
            continue
        compiled.append(result)
        rejected.append((s, f"compiled to {format_bytes(result.bytes_per_device)} on {result.backend}, over the "
                            f"{format_bytes(budget)} budget" + (f" ({result.error})" if result.error else "")))

    if fitted:
        return fastest_as_compiled(fitted, start,
                                   lambda c: alternatives(c, fits, over, budget, rejected, ranked_as_compiled=True))
    nearest = min(range(len(compiled)), key=lambda i: compiled[i].bytes_per_device) if compiled else None
    best = rejected[nearest][0] if compiled else over[0]  # the compile nearest the budget, or the smallest estimate
    needed = max(compiled[nearest].bytes_per_device if compiled else best.memory["total"], budget + 1)
    measured = f" as compiled for {compiled[nearest].backend}" if compiled else ""
    shared = getattr(accelerator, "host_memory", None)  # simulated devices share this host's memory
    if shared:
        hint = host_hint(model_config, batch_size, seq_len, accelerator, budget, fixed, compute_dtype, needed,
                         memory_fraction)
    unfit = HostMemoryMayFit if then_offload and (ceiling is not None or host_memory_may_fit()) else NoPlanFits
    if all(v is not None for v in (data, fsdp, tensor, micro_batches, remat)):
        raise unfit(
            f"out of memory: the fixed plan ({best.candidate.describe()}) needs {format_bytes(needed)} per device"
            f"{measured} but {format_bytes(budget)} are available "
            f"({memory_fraction:g} × {format_bytes(hardware.memory_bytes)} of {hardware.name}); "
            + (hint if shared else "use a larger flavor, a smaller batch, or leave knobs automatic"))
    if not shared:
        bigger = smallest_flavor(model_config, batch_size, seq_len, hardware, memory_fraction, fixed, flavor,
                                 compute_dtype, lora, family)
        hint = (f"the smallest flavor that fits is {bigger}" if bigger
                else "no flavor up to 4096 fits; reduce the batch size or sequence length")
        if lora is None and rank(model_config, batch_size, seq_len, flavor, hardware, budget, fixed, compute_dtype,
                                 LoraConfig(), family)[0]:
            hint += f"; LoRA (--use-lora) fits flavor {flavor}"
    fixed_text = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(fixed).items() if v not in (None, False))
    raise unfit(
        f"no plan fits {flavor} × {hardware.name} at batch {batch_size} × {seq_len}"
        f"{' with ' + fixed_text if fixed_text else ''}: the best found ({best.candidate.describe()}) needs "
        f"{format_bytes(needed)} per device{measured}, {format_bytes(needed - budget)} over the budget of "
        f"{format_bytes(budget)}; {hint}")
