"""Resource plans that can make progress: checked, fixed or refused before a stage starts.

A Ray stage reserves resources for its long-lived workers (augment's actor pool, train's worker
group, evaluate's scorer, invert/erase's per-class tasks). Ray Data's own read and write tasks
need CPU besides (one CPU each, by Ray Data's default). If the reservations leave less than that
on the cluster, the read tasks wait forever behind the actors, and the job hangs without a word.

:func:`check` compares what a stage will reserve with what the cluster has now and can scale to
(the autoscaler's limits when there is one) and either lets the plan run, lowers the number of
actors (said in one line), or raises a ConfigError that names the fields and values to change.

:func:`node_pinning` turns a stage's ``node_resource`` field (``gen_gpu``, ``train_gpu``: the
custom resources that ``cluster.yaml`` gives each node type) into a resource request, when the
cluster defines that resource, so work lands on the nodes meant for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError

__all__ = ["Demand", "ClusterCapacity", "capacity", "check", "node_pinning", "DATA_TASK_CPUS"]

log = logging.getLogger(__name__)

DATA_TASK_CPUS = 1.0
"""CPUs one Ray Data read or write task asks for (Ray Data's default)."""

PIN_AMOUNT = 0.01
"""Units of a node type's custom resource a CPU-only actor or task asks for (GPU ones ask num_gpus)."""


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


@dataclass
class ClusterCapacity:
    """Resources the cluster has now and the most it can scale to."""

    now: dict[str, float]
    most: dict[str, float]
    autoscaling: bool

    def total(self, resource: str) -> float:
        return float(self.most.get(resource, 0.0))


def capacity() -> ClusterCapacity:
    """The connected Ray cluster's resources, with the autoscaler's maxima when it has any."""
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    most = dict(now)
    autoscaling = False
    try:  # Ray Train reads the same record to refuse worker groups that can never start
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: without it, plan with what the cluster has now
        limits = None
    if limits:
        autoscaling = True
        for key, value in limits.items():
            most[key] = max(most.get(key, 0.0), float(value))
    return ClusterCapacity(now, most, autoscaling)


def check(stage: str, demand: Demand, cap: Optional[ClusterCapacity] = None) -> int:
    """The number of units to start (demand.count, or fewer when the plan has to leave CPUs to
    Ray Data); raises ConfigError when no count can make progress."""
    cap = cap or capacity()
    for resource, amount in demand.per_unit.items():
        have = cap.total(resource)
        if amount > have:
            raise ConfigError(
                f"{stage}: each {demand.label} asks for {amount:g} {resource} but the cluster "
                f"{'can scale to' if cap.autoscaling else 'has'} {have:g} at most; "
                + _fix(demand, resource, have)
            )
    if not demand.needs_data_tasks:  # tasks that queue (per-class): each must fit somewhere, that is all
        return demand.count
    need = DATA_TASK_CPUS
    cpus, per = cap.total("CPU"), demand.per_unit.get("CPU", 0.0)
    count = demand.count
    for resource, amount in demand.per_unit.items():  # as many units as fit at all
        if amount > 0:
            room = cap.total(resource) - (need if resource == "CPU" else 0.0)
            count = min(count, int(room / amount + 1e-9))
    if count >= demand.count:
        if cap.autoscaling and any(demand.count * a > cap.now.get(r, 0.0) for r, a in demand.per_unit.items()):
            log.info("%s: %d %s fit once the autoscaler adds nodes", stage, demand.count, demand.label)
        return demand.count
    if count >= demand.min_count and demand.count_field:
        log.warning("%s: %d %s x %g CPU would leave %g of %g CPUs for Ray Data's read and write tasks "
                    "(they need %g): starting %d (%s %d -> %d)", stage, demand.count, demand.label, per,
                    cpus - demand.count * per, cpus, need, count, demand.count_field, demand.count, count)
        return count
    raise ConfigError(
        f"{stage}: {demand.count} {demand.label} x {per:g} CPU leave {max(cpus - demand.count * per, 0):g} of "
        f"{cpus:g} CPUs for Ray Data's read and write tasks, which need {need:g}: the job would wait forever. "
        + _fix(demand, "CPU", cpus - need)
    )


def _fix(demand: Demand, resource: str, room: float) -> str:
    """What to change: the fields that size the demand, with values that fit."""
    per = demand.per_unit.get(resource, 0.0)
    units = max(demand.min_count if demand.count_field else demand.count, 1)  # the units that must fit at once
    hints = []
    for name, value in demand.size_fields.items():
        if resource == "CPU" and "cpu" in name:
            fit = max(room / units, 0.0)
            hints.append(f"set {name} to at most {fit:.2g} (now {value:g})")
        elif resource == "GPU" and "gpu" in name:
            hints.append(f"set {name} to at most {room / units:g} (now {value:g}) or add GPU nodes")
    if demand.count_field and per > 0:
        hints.append(f"or lower {demand.count_field} (now {demand.count}) to {max(int(room / per), 0)}")
    text = "; ".join(hints) or "add nodes or lower the stage's resource fields"
    return text[:1].upper() + text[1:]


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
