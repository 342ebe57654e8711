"""A stalled stage says why: no batch, task or epoch for a while -> one line on what waits on what.

Stages call :meth:`Watchdog.progress` whenever a unit of work completes (a batch file committed,
a class task finished, an epoch checkpointed; or a `probe` the watchdog polls). If none completes
for ``stall_warning`` seconds, it logs once what the cluster has, what the stage holds and what
waits, and what to change. With ``stall_timeout`` set, the stage fails with a StageError instead
of waiting longer.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Optional

from .errors import StageError

__all__ = ["Watchdog", "checkpoint_probe", "cluster_summary", "sigint_kept"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def sigint_kept() -> Any:
    """Give the process its SIGINT handler back when the block ends.

    Ray Train's ``fit()`` installs a handler of its own (Ctrl-C aborts that run) and leaves it
    installed after the run. A later stage in the same process (a pipeline, a sweep trial) then
    never sees KeyboardInterrupt: neither the user's Ctrl-C nor a watchdog's ``stall_timeout``
    interrupts it until its work returns by itself."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def cluster_summary() -> str:
    """Total and free resources, and what is pending, as far as Ray tells the driver."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    parts = []
    for key in sorted(k for k in total if k in ("CPU", "GPU") or not k.startswith(("node:", "memory",
                                                                                        "object_store"))):
        parts.append(f"{key} {free.get(key, 0):g} free of {total[key]:g}")
    summary = "cluster: " + ", ".join(parts)
    address = _dashboard_url()
    if address is None:  # the state API is served by the dashboard; without one, the resources are what there is
        return summary
    try:
        from ray.util.state import list_actors, list_tasks

        waiting = list_tasks(address=address, filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], limit=100,
                             raise_on_missing_output=False)
        alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000,
                            raise_on_missing_output=False)
        pending = list_actors(address=address, filters=[("state", "=", "PENDING_CREATION")], limit=100,
                              raise_on_missing_output=False)
        names = sorted({t.name for t in waiting})[:4]
        summary += (f"; {len(alive)} actors alive, {len(pending)} waiting to be placed; {len(waiting)} tasks waiting "
                    f"for resources{' (' + ', '.join(names) + ')' if names else ''}")
    except Exception:
        pass
    return summary


def _dashboard_url() -> Optional[str]:
    """The dashboard of this driver's own cluster, or None when it runs none.

    Ray's state API, given this cluster's address, asks it where its dashboard is and hears
    127.0.0.1:8265 even when it runs none: there it may find another Ray cluster on this machine
    and list that one's tasks as ours."""
    import ray

    try:
        url = ray._private.worker.global_worker.node.address_info.get("webui_url")
    except Exception:  # a Ray Client driver holds no node; it cannot tell
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def checkpoint_probe(uri: str, endpoint_url: Optional[str] = None) -> Callable[[], Any]:
    """A probe for a run's checkpoint folder: the names of the folders under `uri`. Their number is
    no probe: once checkpoints are pruned (num_to_keep) each new one replaces an old one and the
    count stays put, so a healthy run would read as stalled."""
    from . import storage

    return lambda: tuple(sorted(storage.list_dirs(uri, endpoint_url)))


class Watchdog:
    """Context manager around a stage's long wait; see the module docstring."""

    def __init__(self, stage: str, what: str, warning_after: Optional[float], fail_after: Optional[float] = None,
                 hint: str = "", probe: Optional[Callable[[], Any]] = None, poll_seconds: float = 1.0) -> None:
        self.stage, self.what, self.hint = stage, what, hint
        self.warning_after, self.fail_after = warning_after, fail_after
        self.probe, self.poll = probe, poll_seconds
        self.last = time.monotonic()
        self.warned = False
        self.fired: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._seen: Any = None
        self._lock = threading.Lock()
        self._active = True

    def progress(self) -> None:
        """A unit of work completed."""
        self.last = time.monotonic()
        self.warned = False

    def __enter__(self) -> "Watchdog":
        if self.fail_after and threading.current_thread() is not threading.main_thread():
            log.info("%s: stall_timeout acts only in a driver's main thread; here a stall is reported, not failed",
                     self.stage)
            self.fail_after = None
        if self.warning_after or self.fail_after:
            self._thread = threading.Thread(target=self._watch, name=f"watchdog {self.stage}", daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            if self.probe is not None:
                try:
                    seen = self.probe()
                except Exception:
                    seen = self._seen
                if seen != self._seen:
                    self._seen = seen
                    self.progress()
            idle = time.monotonic() - self.last
            if self.warning_after and idle >= self.warning_after and not self.warned:
                self.warned = True
                log.warning("%s: no %s finished for %.0fs. %s.%s", self.stage, self.what, idle, _safe_summary(),
                            f" If this does not move: {self.hint}" if self.hint else "")
            if self.fail_after and idle >= self.fail_after:
                message = (f"{self.stage} stalled: no {self.what} finished for {idle:.0f}s (stall_timeout "
                           f"{self.fail_after:g}s). {_safe_summary()}.{' ' + self.hint if self.hint else ''}")
                with self._lock:  # only while the stage is still inside the block
                    if self._active:
                        self.fired = message
                        # a real SIGINT, not interrupt_main(): it also wakes a main thread blocked in a wait
                        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        with self._lock:
            self._active = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.fired and exc_type in (None, KeyboardInterrupt):
            if exc_type is None:  # fired as the block ended, or a library swallowed the interrupt
                try:
                    time.sleep(0.5)  # a signal still on its way lands here, not in the caller
                except KeyboardInterrupt:
                    pass
            raise StageError(self.fired) from None
        return False


def _safe_summary() -> str:
    try:
        return cluster_summary()
    except Exception as exc:  # never let the diagnosis hide the stall
        return f"(cluster state unavailable: {exc})"
