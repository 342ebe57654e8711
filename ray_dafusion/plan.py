"""Resource plans that can make progress: checked, fixed or refused before a stage starts.

A Ray stage reserves resources for its long-lived workers (augment's actor pool, train's worker
group, evaluate's scorer, invert/erase's per-class tasks). Ray Data's own read and write tasks
need CPU besides (one CPU each, by Ray Data's default). If the reservations leave less than that
free on every node, the read tasks wait forever behind the actors, and the job hangs without a
word. Ray places each worker on one node, so the plan is checked node by node, never against the
cluster's sum: two 3-CPU tasks cannot run on four 2-CPU nodes, though the cluster has 8 CPUs.

:func:`check` packs a stage's workers onto the nodes the cluster has now and, under an autoscaler,
the nodes its node types can still add (up to each type's max_workers), and either lets the plan
run, lowers the number of actors (said in one line), or raises a ConfigError that names the
fields and values to change and what each node holds.

:func:`node_pinning` turns a stage's ``node_resource`` field (``gen_gpu``, ``train_gpu``: the
custom resources that ``cluster.yaml`` gives each node type) into a resource request, when the
cluster defines that resource, so work lands on the nodes meant for it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .errors import ConfigError

__all__ = ["Demand", "ClusterCapacity", "capacity", "check", "node_pinning", "DATA_TASK_CPUS"]

log = logging.getLogger(__name__)

DATA_TASK_CPUS = 1.0
"""CPUs one Ray Data read or write task asks for (Ray Data's default)."""

PIN_AMOUNT = 0.01
"""Units of a node type's custom resource a CPU-only actor or task asks for (GPU ones ask num_gpus)."""

_EPS = 1e-9
_MEMORY = ("memory", "object_store_memory")
"""Resources a node type may state but an alive node reports as measured: not compared to match them."""


@dataclass
class Demand:
    """What a stage reserves for its long-lived workers: `count` units of `per_unit` each."""

    label: str
    count: int
    per_unit: dict[str, float]
    count_field: Optional[str] = None
    """The config field that sets `count`, when the plan may lower it (e.g. max_actors)."""
    min_count: int = 1
    size_fields: dict[str, float] = field(default_factory=dict)
    """The config fields that size one unit, and their values, for the error message."""
    needs_data_tasks: bool = True
    """Whether Ray Data read/write tasks must run beside these workers."""
    all_at_once: bool = True
    """Whether the units must all run at once (an actor pool, a Ray Train worker group); tasks that
    queue (per-class ones) need only that each fits on some node."""


@dataclass
class ClusterCapacity:
    """The resources of each node the cluster has now, and of the nodes it can still add."""

    nodes: list[dict[str, float]]
    """One entry per alive node: its total resources."""
    can_add: list[tuple[dict[str, float], Optional[int]]] = field(default_factory=list)
    """(resources of one node of an autoscaler node type, how many more it can start; None: no limit)."""
    autoscaling: bool = False

    def shapes(self, now_only: bool = False) -> list[tuple[dict[str, float], Optional[int]]]:
        """(node resources, how many such nodes) for every node there is or, unless now_only, can be."""
        return [(node, 1) for node in self.nodes] + ([] if now_only else list(self.can_add))

    def total(self, resource: str) -> float:
        return sum(_times(node.get(resource, 0.0), n) for node, n in self.shapes())


def _connect() -> None:
    """Join or start Ray as Ray Data does on its first call, when the caller has not: ``ray.init()``
    with Ray's defaults (RAY_ADDRESS, else a Ray running on this machine, else a new local one;
    RAY_ENABLE_AUTO_CONNECT=0 turns it off, as for Ray). Every Ray stage plans first, and
    ray.nodes() would raise before Ray is up, so a stage called from Python needs no ray.init."""
    import ray

    if ray.is_initialized():
        return
    try:
        from ray._private.auto_init_hook import auto_init_ray  # what ray.data.read_* call first
    except ImportError:  # a private module: without it, what it does
        def auto_init_ray() -> None:
            if os.environ.get("RAY_ENABLE_AUTO_CONNECT", "") != "0":
                ray.init()
    log.info("no Ray connected: ray.init() with Ray's defaults, as Ray Data would")
    auto_init_ray()


def capacity() -> ClusterCapacity:
    """The Ray cluster's alive nodes, with the nodes the autoscaler can add when it has any (Ray is
    joined or started first if this process is not connected)."""
    import ray

    _connect()
    nodes = [{k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}
             for n in ray.nodes() if n.get("Alive")]
    try:  # Ray Train and Ray Data read the same record to plan against an autoscaler's node types
        from ray._private.state import state

        config = state.get_cluster_config()
        types = [({k: float(v) for k, v in g.resources.items()}, None if g.max_count < 0 else int(g.max_count))
                 for g in config.node_group_configs] if config is not None else []
    except Exception:  # a private API: without it, plan with the nodes the cluster has now
        types = []
    types = [(resources, most) for resources, most in types if any(v > 0 for v in resources.values())]
    return ClusterCapacity(nodes, _can_add(nodes, types), autoscaling=bool(types))


def _can_add(nodes: list[dict[str, float]], types: list[tuple[dict[str, float], Optional[int]]]
             ) -> list[tuple[dict[str, float], Optional[int]]]:
    """The nodes each node type can still start: its max count less the alive nodes of its shape
    (an alive node counts against the first type whose every resource it has, in equal amount)."""
    left = [most for _, most in types]
    for node in nodes:
        for i, (resources, _) in enumerate(types):
            if left[i] != 0 and all(abs(node.get(k, 0.0) - v) < _EPS for k, v in resources.items()
                                    if k not in _MEMORY):
                left[i] = None if left[i] is None else left[i] - 1
                break
    return [(resources, n) for (resources, _), n in zip(types, left) if n != 0]


def _times(value: float, n: Optional[int]) -> float:
    """`value` on each of n nodes (None: any number of them)."""
    if value <= 0:
        return 0.0
    return math.inf if n is None else value * n


def _per_node(unit: dict[str, float], node: dict[str, float]) -> float:
    """How many units one node holds (inf when a unit asks for nothing)."""
    fits = [math.floor(node.get(r, 0.0) / a + _EPS) for r, a in unit.items() if a > 0]
    return max(min(fits), 0) if fits else math.inf


def _placeable(unit: dict[str, float], shapes: list[tuple[dict[str, float], Optional[int]]],
               reserve: float = 0.0) -> float:
    """The most units that run at once on these nodes, each unit on one node; with reserve > 0,
    one node keeps `reserve` CPUs free beside them (for Ray Data's read and write tasks).

    The units are alike, so filling each node with as many as it holds is the best packing; the
    reserve then goes to the node where it costs the fewest units."""
    holds = [_per_node(unit, node) for node, _ in shapes]
    total = sum(_times(k, n) for k, (_, n) in zip(holds, shapes))
    if reserve <= 0:
        return total
    best = 0.0
    for k, (node, _) in zip(holds, shapes):
        if node.get("CPU", 0.0) + _EPS < reserve:
            continue
        kept = _per_node(unit, {**node, "CPU": node["CPU"] - reserve})
        best = max(best, total if math.isinf(total) else total - k + kept)
    return best


def _amounts(resources: dict[str, float], keys: Iterable[str]) -> str:
    return ", ".join(f"{k} {resources.get(k, 0.0):g}" for k in keys)


def _nodes_text(cap: ClusterCapacity, keys: list[str]) -> str:
    """Per-node capacities in the demand's resources, e.g. "nodes: 4 x (CPU 2, GPU 0); the
    autoscaler can add 8 x (CPU 8, GPU 1, gen_gpu 1)"."""
    def grouped(entries: list[tuple[dict[str, float], Optional[int]]]) -> str:
        counts: dict[tuple[float, ...], Optional[int]] = {}
        for node, n in entries:
            key = tuple(node.get(k, 0.0) for k in keys)
            before = counts.get(key, 0)
            counts[key] = None if n is None or before is None else before + n
        return ", ".join(f"{'any number' if n is None else n} x ({_amounts(dict(zip(keys, key)), keys)})"
                         for key, n in sorted(counts.items(), reverse=True))
    text = f"nodes now: {grouped(cap.shapes(now_only=True)) or 'none'}"
    if cap.autoscaling:
        text += f"; the autoscaler can add {grouped(cap.can_add) or 'none (every node type is at max_workers)'}"
    return text


def check(stage: str, demand: Demand, cap: Optional[ClusterCapacity] = None) -> int:
    """The number of units to start (demand.count, or fewer when the plan has to leave CPUs to
    Ray Data); raises ConfigError when no count can make progress."""
    cap = cap or capacity()
    unit = {r: a for r, a in demand.per_unit.items() if a > 0}
    keys = ["CPU"] + [r for r in demand.per_unit if r != "CPU"]
    shapes = cap.shapes()
    what = f"{demand.count} {demand.label} x ({_amounts(demand.per_unit, demand.per_unit)})"
    # 1. one unit must fit on one node (tasks that queue, as per-class ones, need no more)
    if _placeable(unit, shapes) < 1:
        raise ConfigError(
            f"{stage}: {what}: no node {'can have' if cap.autoscaling else 'has'} that much for one of them; "
            f"{_nodes_text(cap, keys)}. " + _fix(demand, cap, 1, 0.0)
        )
    if not demand.all_at_once:
        return demand.count
    # 2. every unit at once, with one node keeping a CPU free for Ray Data's read and write tasks when
    # they run beside the units
    need = DATA_TASK_CPUS if demand.needs_data_tasks else 0.0
    fit = int(min(demand.count, _placeable(unit, shapes, need)))
    if fit >= demand.count:
        if cap.autoscaling and _placeable(unit, cap.shapes(now_only=True), need) < demand.count:
            log.info("%s: %d %s fit once the autoscaler adds nodes", stage, demand.count, demand.label)
        return demand.count
    at_once = _placeable(unit, shapes)
    why = (f"at most {at_once:g} of them fit on the nodes at once" if at_once < demand.count else
           f"however they are placed, no node keeps {need:g} CPU free for Ray Data's read and write tasks")
    if fit >= demand.min_count and demand.count_field:
        log.warning("%s: %s: %s; %s: starting %d (%s %d -> %d)", stage, what, why, _nodes_text(cap, keys), fit,
                    demand.count_field, demand.count, fit)
        return fit
    raise ConfigError(
        f"{stage}: {what}: {why}, so the job would wait forever; {_nodes_text(cap, keys)}. "
        + _fix(demand, cap, None, need)
    )


def _fix(demand: Demand, cap: ClusterCapacity, units: Optional[int], reserve: float) -> str:
    """What to change: the fields that size one unit, with the largest values that fit, and the count."""
    units = units or max(demand.min_count if demand.count_field else demand.count, 1)  # must fit at once
    shapes = cap.shapes()
    hints = []
    for name, value in demand.size_fields.items():
        resource = "CPU" if "cpu" in name else "GPU" if "gpu" in name else None
        if resource is None or demand.per_unit.get(resource, 0.0) <= 0:
            continue
        most = _largest(demand.per_unit, resource, shapes, units, reserve)
        if most is not None and most < value:
            extra = " or add GPU nodes" if resource == "GPU" else ""
            hints.append(f"set {name} to {'at most ' if most > 0 else ''}{most:g} (now {value:g}){extra}")
    fit = int(min(demand.count, _placeable({r: a for r, a in demand.per_unit.items() if a > 0}, shapes, reserve)))
    if demand.count_field and fit >= 1:
        hints.append(f"or lower {demand.count_field} (now {demand.count}) to {fit}")
    text = "; ".join(hints) or "add nodes or lower the stage's resource fields"
    return text[:1].upper() + text[1:]


def _largest(per_unit: dict[str, float], resource: str, shapes: list[tuple[dict[str, float], Optional[int]]],
             units: int, reserve: float) -> Optional[float]:
    """The largest amount of `resource` per unit (in hundredths) with which `units` units fit, or
    None when they do not fit even asking for none of it."""
    def fits(hundredths: int) -> bool:
        unit = {r: (hundredths / 100 if r == resource else a) for r, a in per_unit.items()}
        return _placeable({r: a for r, a in unit.items() if a > 0}, shapes, reserve) >= units

    lo, hi = 0, int(max((node.get(resource, 0.0) for node, _ in shapes), default=0.0) * 100 + _EPS)
    if not fits(lo):
        return None
    while lo < hi:  # fits(lo) holds; fits is monotone: more per unit never fits more units
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo / 100


def node_pinning(node_resource: Optional[str], num_gpus: float, cap: Optional[ClusterCapacity] = None,
                 stage: str = "") -> dict[str, float]:
    """`{node_resource: amount}` when the cluster defines that custom resource, else {} (a laptop
    or a cluster without node types runs anywhere)."""
    if not node_resource:
        return {}
    cap = cap or capacity()
    if cap.total(node_resource) <= 0:
        return {}
    amount = num_gpus if num_gpus > 0 else PIN_AMOUNT
    log.info("%s: pinned to nodes with resource %s (%g per worker)", stage, node_resource, amount)
    return {node_resource: amount}
