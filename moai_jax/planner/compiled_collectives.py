"""The collectives of a compiled step, read from the target compiler's optimized HLO (`compiled.as_text()`).

Each all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute (an async `-start` / `-done`
pair counted once, at its start) gives its kind, the bytes one device sends per execution, the size of its
groups and the mesh axes those groups span; inside while loops (the scan over layers, the micro-batch loop)
it runs the loop's trip count times (`known_trip_count`, else the bound its condition compares the
induction variable with; nested loops multiply). Bytes per device per execution, n the group size:

    all-gather          its result × (n − 1) / n        (n − 1 shards received)
    reduce-scatter      its operand × (n − 1) / n       (= its result × (n − 1))
    all-reduce          its operand × 2 (n − 1) / n     (a ring: a reduce-scatter, then an all-gather)
    all-to-all          its operand × (n − 1) / n
    collective-permute  its operand                     (one send per device)

A group's members are logical device ids: positions in the mesh's devices, row-major over the six axes
(`moai_jax.sharding.mesh.AXES`), so the axes a group spans are those along which its members' coordinates
differ. Groups are printed as lists (`{{0,1},{2,3}}`), as iota tiles (`[4,2]<=[8]`, `[2,4]<=[4,2]T(1,0)`) or
as axes of a mesh (`mesh['a'=4,'b'=2] {'a'}`, with `device_ids=(...)` when the mesh is permuted and `'a':(1)2`
for a sub-axis). Each collective is charged to the time model's term for its traffic (`Collective.term`) and
timed over the link its groups span (`time_model.link_bandwidth`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

from moai_jax.accelerator import Hardware
from moai_jax.planner.time_model import link_bandwidth
from moai_jax.sharding.mesh import AXES, MeshShape

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
PARAMETER_AXES = {"data", "fsdp", "expert", "context"}  # weights shard over fsdp × context × expert

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([\d,]*)\]")
_MENTIONS = re.compile("|".join(f" {k}(?:-start)?\\(" for k in KINDS))
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    bytes: float  # sent by one device per execution
    group_size: int
    axes: tuple[str, ...]  # the mesh axes its groups span, outermost first
    span: int  # a group's extent in device order (its last member's id − its first's + 1): the link it needs
    count: int = 1  # executions per step (trip counts of the loops around it multiplied)

    @property
    def term(self) -> str:
        """The time model's term for this traffic: `data` / `fsdp` (parameters and gradients, overlappable
        with compute) or `tensor`, `context`, `expert`, `stage` (activations, on the critical path)."""
        axes = set(self.axes)
        if self.kind == "all-to-all":
            return "expert"
        if self.kind == "collective-permute":
            return "stage" if "stage" in axes else "context"
        if axes == {"data"}:
            return "data"
        if "fsdp" in axes and axes <= PARAMETER_AXES or axes <= {"data", "fsdp"}:
            return "fsdp"
        return next(a for a in reversed(AXES) if a in axes and a not in ("data", "fsdp"))


def collectives(hlo: str, mesh: MeshShape) -> tuple[Collective, ...]:
    """Every collective of the optimized HLO module `hlo` on `mesh` (groups of one device left out)."""
    computations, entry = _computations(hlo)
    runs = _executions(computations, entry)
    found = []
    for name, lines in computations.items():
        for line in lines:
            m = _INSTRUCTION.match(line) if _MENTIONS.search(line) else None
            if not m or runs.get(name, 0) == 0:
                continue
            shape, op = m.group(2), m.group(3)
            kind = op.removesuffix("-start")
            if kind not in KINDS:
                continue
            c = _collective(kind, _result(op, shape), line, mesh)
            if c is not None:
                found.append(dataclasses.replace(c, count=runs[name]))
    return tuple(found)


def _collective(kind: str, result_bytes: float, line: str, mesh: MeshShape) -> Collective | None:
    if kind == "collective-permute":
        pairs = _group_lists(re.search(r"source_target_pairs=(\{[^=]*\})", line).group(1))
        groups, n = pairs, 2
    else:
        groups = replica_groups(_attribute(line, "replica_groups"), mesh.size)
        n = len(groups[0])
    if n <= 1 or not groups:
        return None
    moved = {"all-gather": result_bytes * (n - 1) / n, "reduce-scatter": result_bytes * (n - 1),
             "all-reduce": result_bytes * 2 * (n - 1) / n, "all-to-all": result_bytes * (n - 1) / n,
             "collective-permute": result_bytes}[kind]
    span = max(max(g) - min(g) + 1 for g in groups)
    return Collective(kind, moved, n, spanned_axes(groups, mesh), span)


def spanned_axes(groups: list[list[int]], mesh: MeshShape) -> tuple[str, ...]:
    """The mesh axes along which some group's members differ, outermost first."""
    sizes = tuple(mesh.sizes().values())
    varying = set()
    for group in groups:
        coords = np.array(np.unravel_index(group, sizes))  # [axis, member]
        varying |= {a for a, row in zip(AXES, coords) if len(set(row)) > 1}
    return tuple(a for a in AXES if a in varying)


def replica_groups(text: str | None, devices: int) -> list[list[int]]:
    """A collective's `replica_groups=` as lists of device ids, in any of XLA's three spellings; no groups
    (`{}` or none printed) is one group of all `devices`."""
    text = (text or "").strip()
    if text in ("", "{}"):
        return [list(range(devices))]
    if text.startswith("{"):
        return _group_lists(text)
    if text.startswith("mesh"):
        return _mesh_axes_groups(text)
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        raise ValueError(f"replica groups {text!r}: not a list, an iota tile or mesh axes")
    shape = [int(x) for x in m.group(1).split(",")]
    return _iota(m.group(2), m.group(3)).reshape(shape[0], -1).tolist()


def _iota(reshape: str, transpose: str | None) -> np.ndarray:
    dims = [int(x) for x in reshape.split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose([int(x) for x in transpose.split(",")]) if transpose else ids


def _mesh_axes_groups(text: str) -> list[list[int]]:
    """`mesh['a'=4,'b'=2], device_ids=([4,2]T(1,0)) {'a','b':(1)2}` → the groups varying along those axes."""
    m = re.fullmatch(r"mesh\[([^\]]*)\](?:, device_ids=\((.*)\))?\s*(?:\{(.*)\})?", text)
    if not m:
        raise ValueError(f"replica groups {text!r}: not mesh axes")
    axes = re.findall(r"'?([\w.\-]+)'?=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    if m.group(2) is None:
        ids = np.arange(math.prod(sizes))
    elif "[" in m.group(2):
        tile = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", m.group(2).strip())
        ids = _iota(tile.group(1), tile.group(2)).reshape(-1)
    else:
        ids = np.array([int(x) for x in re.findall(r"\d+", m.group(2))])
    dims, grouped = [], []  # each axis split into (before, sub-axis, after) where a sub-axis is named
    subaxes = {}
    for ref in filter(None, (r.strip() for r in (m.group(3) or "").split(","))):
        r = re.fullmatch(r"'?([\w.\-]+?)'?(?::\((\d+)\)(\d+))?", ref)
        subaxes.setdefault(r.group(1), []).append((int(r.group(2) or 0), int(r.group(3) or 0)))
    for name, size in zip(names, sizes):
        refs = sorted(subaxes.get(name, []))
        if not refs:
            dims.append(size)
            continue
        if refs[0][1] == 0:  # the whole axis
            grouped.append(len(dims))
            dims.append(size)
            continue
        done = 1
        for pre, sub in refs:
            if pre > done:
                dims.append(pre // done)
            grouped.append(len(dims))
            dims.append(sub)
            done = pre * sub
        if done < size:
            dims.append(size // done)
    grid = ids.reshape(dims)
    rest = [d for d in range(len(dims)) if d not in grouped]
    group_size = math.prod(dims[d] for d in grouped)
    return grid.transpose(rest + grouped).reshape(-1, group_size).tolist()


def _group_lists(text: str) -> list[list[int]]:
    return [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}", text)]


def _attribute(line: str, name: str) -> str | None:
    """The value of `name=` in an instruction line: up to the next top-level `, word=` (braces nest)."""
    start = line.find(f"{name}=")
    if start < 0:
        return None
    text, depth = line[start + len(name) + 1:], 0
    for i, ch in enumerate(text):
        depth += ch in "{[(" and 1 or ch in "}])" and -1 or 0
        if depth == 0 and re.match(r", (?!device_ids=)[a-z_]+=", text[i:]):
            return text[:i]
    return text


def _result(op: str, shape: str) -> float:
    """Bytes of a collective's result: an async start's shape is (operands, results, ...), except an
    all-reduce-start's, which is its result."""
    if op.endswith("-start") and op != "all-reduce-start":
        shape = _elements(shape)[1]
    return sum(DTYPE_BYTES.get(t, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in _ARRAY.findall(shape))


def _elements(shape: str) -> list[str]:
    """The top-level elements of a tuple shape `(a, (b, c), d)`."""
    shape = re.sub(r"/\*.*?\*/", "", shape.strip())[1:-1]
    out, depth, start = [], 0, 0
    for i, ch in enumerate(shape):
        depth += ch in "({[" and 1 or ch in ")}]" and -1 or 0
        if ch == "," and depth == 0:
            out.append(shape[start:i])
            start = i + 1
    return out + [shape[start:]]


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """(computation name → its instruction lines, the entry computation's name)."""
    out, current, entry = {}, None, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            out[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            out[current].append(line)
    return out, entry


def _executions(computations: dict[str, list[str]], entry: str | None) -> dict[str, int]:
    """How many times each computation runs per execution of the entry: a while's body and condition its
    trip count times per run of their caller, everything else it calls once per run (nested loops multiply)."""
    calls = defaultdict(list)  # caller → [(callee, times)]
    for name, lines in computations.items():
        for line in filter(lambda x: "=%" in x, lines):  # only a call names a computation: condition=%..., calls=%...
            trips = _trip_count(line, computations) if " while(" in line else 1
            for role, callee in _CALLS.findall(line):
                calls[name].append((callee, trips if role in ("body", "condition") else 1))
            for branches in _BRANCHES.findall(line):
                calls[name] += [(b.strip().lstrip("%"), 1) for b in branches.split(",") if b.strip()]
    runs: dict[str, int] = defaultdict(int)
    for name in _callers_first(entry, calls):
        runs[name] += 1 if name == entry else 0
        for callee, times in calls[name]:
            runs[callee] += runs[name] * times
    return runs


def _callers_first(entry: str | None, calls: dict[str, list[tuple[str, int]]]) -> list[str]:
    """The computations reachable from `entry`, each after every computation that calls it."""
    order, seen = [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        for callee, _ in calls.get(name, ()):
            visit(callee)
        order.append(name)

    if entry is not None:
        visit(entry)
    return order[::-1]


def _trip_count(line: str, computations: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's `known_trip_count`, else the integer its condition compares the
    induction variable with (a loop from 0, step 1), else 1."""
    m = _TRIP_COUNT.search(line)
    if m:
        return int(m.group(1))
    condition = re.search(r"condition=%([\w.\-]+)", line)
    body = computations.get(condition.group(1), []) if condition else []
    if any("direction=LT" in x for x in body):
        bounds = [int(c) for x in body for c in re.findall(r"s32\[\] constant\((\d+)\)", x)]
        if bounds:
            return max(bounds)
    return 1


def seconds_by_term(found: tuple[Collective, ...], hardware: Hardware) -> dict[str, float]:
    """Seconds of communication per time-model term: each collective's bytes over the link its groups span."""
    out: dict[str, float] = defaultdict(float)
    for c in found:
        out[c.term] += c.count * c.bytes / link_bandwidth(hardware, c.span)
    return dict(out)


def bytes_by_term(found: tuple[Collective, ...]) -> dict[str, int]:
    """Bytes one device sends per step, per time-model term and kind: {"fsdp all-gather": ..., ...}."""
    out: dict[str, float] = defaultdict(float)
    for c in found:
        out[f"{c.term} {c.kind}"] += c.count * c.bytes
    return {k: int(v) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

