"""Why a plan was chosen, why each alternative lost, and the short table scripts/plan.py prints."""

from __future__ import annotations

import math
from typing import Any

from moai_jax.planner.experts import expert_verdict
from moai_jax.planner.plan import Plan
from moai_jax.sharding.mesh import MeshShape
from moai_jax.sizes import format_bytes

TOP_ALTERNATIVES = 5


def _compact(s) -> dict[str, Any]:
    c = s.candidate
    return {"mesh": c.mesh.sizes(),
            "micro_batches": c.micro_batches, "remat": c.remat, "loss": c.loss,
            "estimated_bytes_per_device": s.memory["total"], "estimated_step_seconds": round(s.seconds["total"], 6)}


def slower(alt, chosen) -> str:
    """How much slower `alt`'s estimated step is than the chosen plan's ("12.3% slower"); a plan estimated faster
    that was not chosen (it compiled over the budget, or lost as compiled) is said to be so."""
    ratio = alt.seconds["total"] / chosen.seconds["total"] - 1
    if ratio >= 0:
        return f"{ratio:.1%} slower"
    return f"estimated {-ratio:.1%} faster but not chosen (see the alternatives)"


def _slower_because(alt, chosen) -> str:
    a, c = alt.seconds, chosen.seconds
    ratio = a["total"] / c["total"] - 1
    parts = {"more compute (recompute or smaller matmuls)": a["compute"] - c["compute"],
             "exposed data/fsdp communication": max(0.0, a["data"] + a["fsdp"] - 0.8 * a["compute"])
             - max(0.0, c["data"] + c["fsdp"] - 0.8 * c["compute"]),
             "tensor-parallel all-reduces": a["tensor"] - c["tensor"],
             "pipeline bubble (stages idle while it fills and drains)": a.get("bubble", 0) - c.get("bubble", 0),
             "stage-to-stage transfers": a.get("stage", 0) - c.get("stage", 0),
             "context-parallel key/value gathers": a.get("context", 0) - c.get("context", 0),
             "expert-parallel all-to-alls": a.get("expert", 0) - c.get("expert", 0)}
    cause = max(parts, key=parts.get)
    if ratio <= 0:
        return "about as fast; the chosen layout is simpler"
    return f"{ratio:.1%} slower: {cause}"


def step_seconds(plan: Plan) -> float:
    """A plan's step: as compiled where a compile read its collectives, else as estimated."""
    return (plan.compiled_step_seconds or plan.estimated_step_seconds)["total"]


def lost_as_compiled(best: Plan, others: list[Plan], estimated: list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """`best`'s alternatives: the other plans compiled within the budget, each losing by its step as compiled,
    then the `estimated` ones (`alternatives(..., ranked_as_compiled=True)`)."""
    def key(a):
        return tuple(sorted(a["mesh"].items())), a["micro_batches"], a["remat"], a["loss"]

    lost = [{"mesh": p.mesh.sizes(), "micro_batches": p.micro_batches, "remat": p.remat, "loss": p.loss,
             "estimated_bytes_per_device": p.estimated_bytes_per_device["total"],
             "estimated_step_seconds": p.estimated_step_seconds["total"],
             "why_not": f"compiled: {step_seconds(p):.3f} s a step as compiled, over the chosen plan's "
                        f"{step_seconds(best):.3f} s"} for p in others]
    shown = {key(a) for a in lost}
    return (*lost, *(a for a in estimated if key(a) not in shown))


def compile_ceiling(rejected) -> float:
    """The smallest estimate of a candidate that compiled over the budget: a candidate estimated at no less is
    not worth a compile (search.next_to_compile skips it); infinity while none has."""
    return min((r.memory["total"] for r, _ in rejected), default=math.inf)


def alternatives(chosen, fits, over, budget: int, rejected, ranked_as_compiled: bool = False) -> list[dict[str, Any]]:
    """The top alternatives after `chosen`, each with why it lost (`ranked_as_compiled`: `chosen` won among
    plans compiled within the budget by their steps as compiled)."""
    out = [{**_compact(s), "why_not": reason} for s, reason in rejected]
    ceiling = compile_ceiling(rejected)
    for s in fits:
        if len(out) >= TOP_ALTERNATIVES:
            break
        if s is not chosen and all(s is not r for r, _ in rejected):
            faster = s.seconds["total"] < chosen.seconds["total"]
            if faster and s.memory["total"] >= ceiling:
                why_not = "not compiled: estimated at no less than a plan that compiled over the budget"
            elif faster and rejected:
                why_not = ("estimated faster, not compiled: after the plans above compiled over the budget, the "
                           "smallest estimates were compiled")
            elif faster and ranked_as_compiled:
                why_not = "estimated faster, not compiled: the compiled plans were ranked by their steps as compiled"
            else:
                why_not = _slower_because(s, chosen)
            out.append({**_compact(s), "why_not": why_not})
    faster_over = [s for s in over if s.seconds["total"] < chosen.seconds["total"]]
    faster_over.sort(key=lambda s: s.seconds["total"])
    for s in faster_over[:2]:
        out.append({**_compact(s), "why_not": f"faster but needs {format_bytes(s.memory['total'])}, over the "
                                              f"{format_bytes(budget)} budget"})
    return out


def why_chosen(s, fits, over, fixed) -> str:
    c = s.candidate
    reasons = []
    if c.mesh.tensor == 1 and c.mesh.fsdp == 1 and c.mesh.expert == 1 and c.mesh.context == 1:
        reasons.append("replicated state fits, so the batch is split over every device with no parameter traffic")
    elif c.mesh.fsdp > 1:
        reasons.append(f"parameters, gradients and optimizer state sharded over fsdp={c.mesh.fsdp}")
    if c.mesh.tensor > 1:
        reasons.append(f"tensor={c.mesh.tensor} splits heads and MLP inside a host")
    if c.remat != "none":
        reasons.append(f"remat {c.remat} to keep activations within memory")
    if c.micro_batches > 1:
        reasons.append(f"{c.micro_batches} micro-batches to bound activations")
    if c.loss == "chunked":
        reasons.append("loss computed in chunks so whole float32 logits never exist")
    if c.mesh.context > 1:
        reasons.append(context_verdict(s, fits, fixed))
    if any(f.candidate.mesh.expert > 1 for f in (s, *fits, *over)):  # a MoE model: why this expert degree
        reasons.append(expert_verdict(s, fits))
    reasons.append(pipeline_verdict(s, fits, over))
    return (f"fastest of {len(fits)} candidates that fit (of {len(fits) + len(over)}): " + "; ".join(reasons))


def context_verdict(s, fits, fixed) -> str:
    """Why the chosen plan splits each sequence over context: fixed, nothing without fits, or it is faster."""
    c = s.candidate
    whole = [f for f in fits if f.candidate.mesh.context == 1]
    if fixed.context is not None:
        return f"context={c.mesh.context} (fixed) splits each sequence over {c.mesh.context} devices"
    if not whole:
        return (f"context={c.mesh.context} splits each sequence over {c.mesh.context} devices: no plan that keeps "
                f"a sequence on one device fits")
    return (f"context={c.mesh.context} splits each sequence over {c.mesh.context} devices; the best plan keeping "
            f"a sequence on one device is {slower(whole[0], s)}")


def pipeline_verdict(s, fits, over) -> str:
    """Why the chosen plan has a pipeline, or why none of the pipelined candidates won."""
    c = s.candidate
    if c.mesh.stage > 1:
        ticks = c.micro_batches + c.mesh.stage - 1
        flat = [f for f in fits if f.candidate.mesh.stage == 1]
        considered = flat or any(o.candidate.mesh.stage == 1 for o in over)
        versus = (f"the best plan without stages is {slower(flat[0], s)}"
                  f" ({_cause(flat[0], s)})" if flat else "no plan without stages fits" if considered
                  else "stages fixed")
        return (f"pipeline of {c.mesh.stage} stages over {c.micro_batches} micro-batches (bubble "
                f"{(c.mesh.stage - 1) / ticks:.0%} of {ticks} ticks): {versus}")
    position = next(i for i, f in enumerate(fits) if f is s)  # those ranked before it compiled over budget
    if any(f.candidate.mesh.stage > 1 for f in fits[:position]):
        return "no pipeline: the faster plans with stages compiled over the memory budget"
    piped = [f for f in fits[position:] if f.candidate.mesh.stage > 1]
    if piped:
        p = piped[0]
        return (f"no pipeline: the best with stages ({p.candidate.mesh.stage} stages, {p.candidate.micro_batches} "
                f"micro-batches) is {slower(p, s)} ({_cause(p, s)})")
    if any(o.candidate.mesh.stage > 1 for o in over):
        return "no pipeline: no pipelined candidate fits in memory"
    return "no pipeline: none considered (stage fixed at 1, or no stage count divides both layers and flavor)"


def _cause(a, b) -> str:
    """The time term where `a` loses most to `b` (what a pipeline adds or saves)."""
    terms = ("compute", "bubble", "stage", "data", "fsdp", "tensor")
    worst = max(terms, key=lambda k: a.seconds.get(k, 0) - b.seconds.get(k, 0))
    names = {"compute": "compute", "bubble": "pipeline bubble", "stage": "stage-to-stage transfers",
             "data": "gradient all-reduce", "fsdp": "fsdp weight gathers", "tensor": "tensor all-reduces"}
    return (f"{names[worst]} {a.seconds.get(worst, 0):.3f} s against {b.seconds.get(worst, 0):.3f} s")


def table(plan: Plan) -> str:
    """The short human-readable report of a plan."""
    m = plan.estimated_bytes_per_device or {}
    t = plan.estimated_step_seconds or {}
    lines = [f"Plan for flavor {plan.flavor} × {plan.hardware}, batch {plan.batch_size} × {plan.seq_len}",
             f"  chosen: {plan.summary()}", f"  why:    {plan.why}", "", "  memory per device (estimated)"]
    for k, v in m.items():
        if k != "total" and v:
            lines.append(f"    {k:<12} {format_bytes(v):>12}")
    budget = plan.budget_bytes_per_device or 0
    lines.append(f"    {'total':<12} {format_bytes(m.get('total', 0)):>12}   budget {format_bytes(budget)}")
    if plan.verified_bytes_per_device is not None:
        lines.append(f"    {'compiled':<12} {format_bytes(plan.verified_bytes_per_device):>12}   on {plan.verified_on}")
    piped = f", bubble {t.get('bubble', 0):.3f}, stage {t.get('stage', 0):.3f}" if plan.mesh.stage > 1 else ""
    piped += f", context {t.get('context', 0):.3f}" if plan.mesh.context > 1 else ""
    piped += f", expert {t.get('expert', 0):.3f}" if plan.mesh.expert > 1 else ""
    piped += f", host {t.get('host', 0):.3f}" if plan.offload_optimizer else ""
    lines += ["", f"  step {t.get('total', 0):.3f} s (compute {t.get('compute', 0):.3f}, data {t.get('data', 0):.3f}, "
                  f"fsdp {t.get('fsdp', 0):.3f}, tensor {t.get('tensor', 0):.3f}{piped}) | "
                  f"{plan.estimated_tokens_per_sec or 0:,.0f} tokens/s | MFU {(plan.estimated_mfu or 0):.1%}"]
    if plan.compiled_step_seconds is not None:
        c = plan.compiled_step_seconds
        terms = [k for k in ("data", "fsdp", "tensor", "context", "expert", "stage", "host") if c.get(k)]
        lines += [f"  {plan.compiled_line()}",
                  f"    its seconds: compute {c['compute']:.3f}" + "".join(f", {k} {c[k]:.3f}" for k in terms)]
    if plan.alternatives:
        lines += ["", "  alternatives"]
        meshes = [str(MeshShape(**a["mesh"])) for a in plan.alternatives]
        width = max(map(len, meshes))  # one column, however many axes a mesh names (context=, stage=)
        for a, mesh in zip(plan.alternatives, meshes):
            lines.append(f"    {mesh:<{width}} mb {a['micro_batches']:<3} remat {a['remat']:<7} loss "
                         f"{a['loss']:<7} {format_bytes(a['estimated_bytes_per_device']):>11} "
                         f"{a['estimated_step_seconds']:8.3f} s  {a['why_not']}")
    if plan.planning_seconds:
        lines += ["", "  planned in " + ", ".join(f"{k} {v:.2f} s" for k, v in plan.planning_seconds.items())]
    return "\n".join(lines)
