"""Memory planning: every device tensor gets an aligned address in the target's DRP-AI memory area.

Activations reuse memory when their lifetimes do not overlap (greedy by size, lowest fitting offset);
the plan also reports the no-reuse total for comparison. `check_layout` validates any plan, including
one read back from deploy.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from backends.graph_view import GraphView
from compiler.errors import MemoryPlanError

REGION_ORDER = ("data_in", "data_out", "data", "weight", "work")


@dataclass
class MemoryPlan:
    """Regions (name, base, size, alignment) and tensors (name, region, offset, size, lifetime, shape, dtype)."""

    regions: list[dict]
    tensors: list[dict]
    total: int
    activation_peak: int
    activation_no_reuse: int
    unsized: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form (the `memory` part of deploy.json, plus the tensors)."""
        return {"regions": self.regions, "tensors": self.tensors, "total": self.total,
                "activation_peak": self.activation_peak, "activation_no_reuse": self.activation_no_reuse,
                "unsized_tensors": self.unsized}

    def addr_map_lines(self) -> list[str]:
        """The Renesas text form: `name hex_offset hex_size`, regions first, then tensors by address."""
        rows = [(r["name"], r["base"], r["size"]) for r in self.regions]
        rows += [(t["name"], t["offset"], t["size"]) for t in sorted(self.tensors, key=lambda t: t["offset"])]
        return [f"{'_'.join(name.split())} {offset:#x} {size:#x}" for name, offset, size in rows]


def align(value: int, alignment: int) -> int:
    """`value` rounded up to a multiple of `alignment`."""
    return -(-value // alignment) * alignment


def plan_memory(model: onnx.ModelProto, target, partition=None) -> MemoryPlan:
    """Lay out the model's device tensors in the target's area; MemoryPlanError when it does not fit."""
    view = GraphView(model)
    order = partition.order if partition is not None else [n.name for n in view.nodes]
    step = {name: i for i, name in enumerate(order)}
    last = max(len(order) - 1, 0)
    nodes = {n.name: n for n in view.nodes}
    life: dict[str, list[int]] = {}
    region: dict[str, str] = {}
    unsized: list[str] = []

    def touch(name: str, at: int, kind: str | None = None):
        store = view.storage_of(name)
        if store in view.consts:
            region[store] = "weight"
            life[store] = [0, last]
            return
        span = life.setdefault(store, [at, at])
        span[0], span[1] = min(span[0], at), max(span[1], at)
        region.setdefault(store, kind or "data")

    for name in view.inputs:
        touch(name, 0, "data_in")
    for node_name in order:
        node = nodes[node_name]
        for i in node.input:
            if i:
                touch(i, step[node_name])
        for o in node.output:
            if o:
                touch(o, step[node_name])
    for name in view.outputs:
        store = view.storage_of(name)
        region[store] = "data_out" if store not in view.inputs else region.get(store, "data_in")
        touch(name, last)

    sizes = {}
    for name in life:
        size = view.nbytes(name)
        if size is None:
            unsized.append(name)
            size = 0
        sizes[name] = size
    alignment = target.alignment
    placed: dict[str, int] = {}
    region_sizes = {}
    for reg in REGION_ORDER:
        members = [n for n in life if region.get(n) == reg]
        if reg == "data":
            offsets, used = _interval_allocate(members, sizes, life, alignment)
        else:
            offsets, used = {}, 0
            for n in sorted(members, key=lambda n: (life[n][0], n)):
                offsets[n] = used
                used = align(used + sizes[n], alignment)
        placed.update({n: (reg, off) for n, off in offsets.items()})
        region_sizes[reg] = align(used, alignment)

    regions, base = [], target.memory_base
    for reg in REGION_ORDER:
        regions.append({"name": reg, "base": base, "size": region_sizes[reg], "alignment": alignment})
        base = align(base + region_sizes[reg], alignment)
    bases = {r["name"]: r["base"] for r in regions}
    tensors = []
    for name, (reg, off) in placed.items():
        shape, dtype = view.value_infos.get(name, (None, None))
        tensors.append({"name": name, "region": reg, "offset": bases[reg] + off, "size": sizes[name],
                        "lifetime": list(life[name]), "shape": [d if isinstance(d, int) else 1 for d in (shape or [])],
                        "dtype": dtype})
    tensors.sort(key=lambda t: (REGION_ORDER.index(t["region"]), t["offset"], t["name"]))
    total = base - target.memory_base
    no_reuse = sum(align(sizes[n], alignment) for n in life if region.get(n) == "data")
    if total > target.memory_size:
        biggest = max((t for t in tensors if t["region"] == "data"), key=lambda t: t["size"], default=None)
        peak = f"activation peak {region_sizes['data'] / 2**20:.1f} MiB" + (
            f", largest tensor '{biggest['name']}' {biggest['size'] / 2**20:.1f} MiB" if biggest else "")
        raise MemoryPlanError(f"model needs {total / 2**20:.1f} MiB of DRP-AI memory ({peak}, weights "
                              f"{region_sizes['weight'] / 2**20:.1f} MiB) but {target.name} has "
                              f"{target.memory_size / 2**20:.1f} MiB")
    return MemoryPlan(regions, tensors, total, region_sizes["data"], no_reuse, unsized)


def _interval_allocate(names, sizes, life, alignment) -> tuple[dict[str, int], int]:
    """Greedy by size: each tensor goes at the lowest aligned offset free during its whole lifetime."""
    offsets: dict[str, int] = {}
    placed: list[tuple[int, int, int, int]] = []  # start, end, offset, size
    for n in sorted(names, key=lambda n: (-sizes[n], life[n][0], n)):
        start, end = life[n]
        size = align(max(sizes[n], 1), alignment)
        busy = sorted((off, off + sz) for s, e, off, sz in placed if s <= end and start <= e)
        candidate = 0
        for lo, hi in busy:
            if candidate + size <= lo:
                break
            candidate = max(candidate, align(hi, alignment))
        offsets[n] = candidate
        placed.append((start, end, candidate, size))
    used = max((off + sz for _, _, off, sz in placed), default=0)
    return offsets, used


def check_layout(tensors: list[dict], regions: list[dict], area_base: int, area_size: int,
                 alignment: int) -> list[str]:
    """Problems of a layout: regions outside the area or misaligned, tensors outside their region,
    misaligned, or overlapping another tensor of the same region while both are alive."""
    problems = []
    by_name = {r["name"]: r for r in regions}
    for r in regions:
        if r["base"] % alignment:
            problems.append(f"region '{r['name']}' base {r['base']:#x} is not aligned to {alignment}")
        if r["base"] < area_base or r["base"] + r["size"] > area_base + area_size:
            problems.append(f"region '{r['name']}' [{r['base']:#x}, {r['base'] + r['size']:#x}) is outside the "
                            f"DRP-AI area [{area_base:#x}, {area_base + area_size:#x})")
    for t in tensors:
        r = by_name.get(t["region"])
        if r is None:
            problems.append(f"tensor '{t['name']}' is in unknown region '{t['region']}'")
            continue
        if t["offset"] % alignment:
            problems.append(f"tensor '{t['name']}' offset {t['offset']:#x} is not aligned to {alignment}")
        if t["offset"] < r["base"] or t["offset"] + t["size"] > r["base"] + r["size"]:
            problems.append(f"tensor '{t['name']}' [{t['offset']:#x}, +{t['size']:#x}) is outside region '{r['name']}'")
    live = sorted((t for t in tensors if t["size"] > 0), key=lambda t: t["offset"])
    for i, a in enumerate(live):
        for b in live[i + 1:]:
            if b["offset"] >= a["offset"] + a["size"]:
                break
            if a["lifetime"][0] <= b["lifetime"][1] and b["lifetime"][0] <= a["lifetime"][1]:
                problems.append(f"tensors '{a['name']}' and '{b['name']}' overlap in memory while both are alive")
    return problems
