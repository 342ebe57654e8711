"""A real multi-node Ray cluster on this machine, for the fault and placement tests.

`ray start --head` plus `ray start --address` worker nodes, each a separate raylet with its own
small CPU count and custom resources, each on its own loopback address (127.0.0.2, .3, ...: Ray
tells nodes apart by IP, and loopback keeps all traffic on this machine). Every node is started
in a new session, so killing a node means SIGKILL to every process of that session (its raylet,
its workers and agents; Ray workers change their process group but not their session), and
stopping the cluster touches only what it started (`ray stop` would stop every Ray here).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

BIN = os.path.dirname(sys.executable)

# Ray's own health-check timing (a lost node is declared dead in well under a minute): shorter
# timeouts had live nodes of a loaded 2-core machine declared dead. Only start-up gets more time.
HEALTH = {"RAY_raylet_start_wait_time_s": "120"}


def free_ports(n: int) -> list[int]:
    """`n` loopback ports free right now (for `ray start` on this machine)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def kill_session(sid: int) -> int:
    """SIGKILL every live process of session `sid` (a node's raylet, workers and agents keep the
    session of the `ray start` that began it); how many there were."""
    pids = session_pids(sid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def session_pids(sid: int) -> list[int]:
    """Every live process whose session id is `sid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return out


class LocalCluster:
    """`LocalCluster(root)` starts the head; `add_node(name, cpus, resources)` adds a worker node
    carrying the custom resource `name` (so tests can pin work to it) besides `resources`."""

    def __init__(self, root: str, head_cpus: float = 1, env: Optional[dict] = None):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.env = {**os.environ, **HEALTH, **(env or {}), "PATH": f"{BIN}:{os.environ['PATH']}",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir = f"/tmp/rdfmn-{os.getpid()}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.names_by_ip: dict[str, str] = {}  # every node ever started, killed ones included
        self.args: dict[str, list[str]] = {}
        self.restarts: dict[str, int] = {}
        self._next_ip = 2
        gcs, dash, client = free_ports(3)
        self.address = f"127.0.0.2:{gcs}"
        self._start("head", ["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.2",
                             f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                             f"--num-cpus={head_cpus}"])
        self._wait_started("head", 0, 240)

    def _start(self, name: str, args: list[str]) -> None:
        ip = f"127.0.0.{self._next_ip}"  # a fresh address for every node, replacements included
        self._next_ip += 1
        agent, agent_grpc, rt_env, metrics, nm, om = free_ports(6)
        with open(os.path.join(self.root, f"{name}.log"), "a") as log:
            self.nodes[name] = subprocess.Popen(
                [f"{BIN}/ray", "start", "--block", f"--node-ip-address={ip}", *args,
                 f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                 f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
                 f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--temp-dir={self.temp_dir}",
                 "--disable-usage-stats"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.names_by_ip[ip] = name
        self.args[name] = args

    def add_node(self, name: str, cpus: float = 1, resources: Optional[dict] = None, timeout: float = 240) -> None:
        """Start a worker node and wait until its `ray start` says it is up (one node at a time keeps
        a loaded machine's GCS from timing out registrations)."""
        before = self._starts_logged(name)
        self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}",
                           f"--resources={json.dumps({name: 1, **(resources or {})})}"])
        self._wait_started(name, before, timeout)

    def _starts_logged(self, name: str) -> int:
        try:
            with open(os.path.join(self.root, f"{name}.log"), errors="replace") as f:
                return f.read().count("Ray runtime started")
        except FileNotFoundError:
            return 0

    def _wait_started(self, name: str, before: int, timeout: float) -> None:
        deadline = time.time() + timeout
        log_path = os.path.join(self.root, f"{name}.log")
        while time.time() < deadline:
            if self._starts_logged(name) > before:
                return
            if self.nodes[name].poll() is not None:
                self._restart_exited({name})
                if self.nodes[name].poll() is not None:  # out of restarts
                    break
            time.sleep(0.5)
        raise AssertionError(f"node {name} did not start within {timeout:.0f} s; see {log_path}")

    def _restart_exited(self, names: set[str]) -> None:
        """A node whose `ray start` gave up (on a loaded machine a raylet can time out at start-up)
        is started again, at most twice, on a fresh address."""
        for name in sorted(names):
            proc = self.nodes.get(name)
            if proc is not None and proc.poll() is not None and self.restarts.get(name, 0) < 2:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                kill_session(proc.pid)
                self._start(name, self.args[name])

    def connect(self, timeout: float = 300, **init_kwargs):
        """ray.init in this process as a driver on the head's address, once every node is up."""
        import ray

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        # A local ray.init earlier in this process (the single-node tests') leaves RAY_AUTH_MODE=token
        # in the environment; drivers of this cluster, whose nodes run without auth, must not use it.
        self._auth_mode = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        self.init_kwargs = init_kwargs
        deadline = time.time() + timeout
        while True:
            try:
                ray.init(address=self.address, _node_ip_address="127.0.0.2", log_to_driver=False,
                         configure_logging=False, **init_kwargs)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(2)
        self.wait_for(set(self.nodes) - {"head"}, deadline - time.time())
        return ray

    def wait_for(self, names: set[str], timeout: float = 180) -> None:
        """Until a live node carries each of `names`."""
        deadline = time.time() + timeout
        while not names <= set(self.node_names().values()):
            assert time.time() < deadline, f"nodes {sorted(names)} not up after {timeout:.0f} s"
            self._restart_exited(names)
            time.sleep(1)

    def node_names(self, include_dead: bool = False) -> dict[str, str]:
        """Ray node id -> the name given to add_node ("head" for the head)."""
        import ray

        out = {}
        for node in ray.nodes():
            if node["Alive"] or include_dead:
                out[node["NodeID"]] = self.names_by_ip.get(node["NodeManagerAddress"], "?")
        return out

    def node_of_pid(self, pid: int) -> Optional[str]:
        """The name of the live node whose session holds process `pid`."""
        try:
            sid = os.getsid(pid)
        except ProcessLookupError:
            return None
        return next((name for name, proc in self.nodes.items() if proc.pid == sid), None)

    def kill_node(self, name: str) -> int:
        """SIGKILL every process of the node (its raylet and workers): a lost machine. Returns how
        many processes died."""
        proc = self.nodes.pop(name)
        killed = kill_session(proc.pid)
        proc.wait()
        return killed

    def stop(self) -> None:
        if hasattr(self, "_auth_mode"):  # the environment as connect() found it
            if self._auth_mode is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = self._auth_mode
        for name in list(self.nodes)[::-1]:  # worker nodes first, the head last
            proc = self.nodes.pop(name)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)  # what is left is killed below
            except subprocess.TimeoutExpired:
                pass
            kill_session(proc.pid)
