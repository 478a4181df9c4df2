"""Several processes, one run: start-up, agreement on settings, barriers, gathering.

Multi-host runs (a TPU-pod slice, several GPU hosts, or processes on one machine)
start one lark-jax process per host with the same command plus ``--coordinator
HOST:PORT --num-processes N --process-id I`` (or ``--distributed`` where JAX
detects the cluster itself: Cloud TPU, SLURM). ``initialize`` connects them;
after it ``jax.devices()`` lists every process's devices and ``jax.local_devices()``
this process's own.

How a dead process is noticed: every process sends heartbeats to the
coordinator; when one stops for ``heartbeat_timeout`` seconds (killed, crashed,
preempted) JAX ends every other process with a fatal error that names the
silent task ("stopped sending heartbeats"). A run therefore never hangs on a
lost peer for longer than that timeout; it is continued with ``--resume`` on
every process.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from lark_jax.errors import LarkError
from lark_jax.runs import differences

# jax is imported inside the functions: the CLI builds its parser without it.


@dataclasses.dataclass(frozen=True)
class ClusterArgs:
    """The multi-host options shared by ``score``, ``train`` and ``eval``."""

    distributed: bool = False
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: int = 300
    heartbeat_timeout: int = 100

    @property
    def enabled(self) -> bool:
        return self.distributed or self.coordinator is not None


def add_arguments(p) -> None:
    g = p.add_argument_group("multi-host (TPU pods, several GPU hosts)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (auto-detects TPU pods / SLURM)")
    g.add_argument("--coordinator", help="host:port of process 0 (implies --distributed)")
    g.add_argument("--num-processes", type=int, help="processes in the run (with --coordinator)")
    g.add_argument("--process-id", type=int, help="this process's index, 0 .. N-1")
    g.add_argument("--init-timeout", type=int, default=ClusterArgs.init_timeout,
                   help="seconds to wait for every process to join before failing")
    g.add_argument("--heartbeat-timeout", type=int, default=ClusterArgs.heartbeat_timeout,
                   help="seconds of silence after which a process counts as dead and the "
                        "others stop")


def from_args(args) -> ClusterArgs:
    return ClusterArgs(args.distributed, args.coordinator, args.num_processes,
                       args.process_id, args.init_timeout, args.heartbeat_timeout)


def join(args) -> bool:
    """``initialize`` from a command's parsed options (see :func:`add_arguments`)."""
    return initialize(from_args(args))


def initialize(c: ClusterArgs) -> bool:
    """Join the run described by ``c``; returns whether this is a multi-process run."""
    import jax

    if not c.enabled:
        return False
    if c.coordinator is not None:
        if c.num_processes is None or c.process_id is None:
            raise LarkError("--coordinator needs --num-processes and --process-id")
        if c.num_processes < 1:
            raise LarkError(f"--num-processes must be >= 1, got {c.num_processes}")
        if not 0 <= c.process_id < c.num_processes:
            raise LarkError(f"--process-id must be in 0..{c.num_processes - 1} "
                            f"(--num-processes {c.num_processes}), got {c.process_id}")
        if ":" not in c.coordinator:
            raise LarkError(f"--coordinator must be HOST:PORT, got {c.coordinator!r}")
    if c.init_timeout < 1 or c.heartbeat_timeout < 1:
        raise LarkError("--init-timeout and --heartbeat-timeout must be >= 1 second")
    if c.coordinator is not None and c.process_id != 0:
        # JAX aborts the process (no Python error) when the coordinator cannot be
        # reached in time, so wait for its port here and fail with a clear message.
        _wait_for_port(c.coordinator, c.init_timeout)
    try:
        jax.distributed.initialize(coordinator_address=c.coordinator,
                                   num_processes=c.num_processes, process_id=c.process_id,
                                   initialization_timeout=c.init_timeout,
                                   heartbeat_timeout_seconds=c.heartbeat_timeout)
    except (RuntimeError, ValueError) as e:  # jaxlib's XlaRuntimeError is a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LarkError(f"could not join the run at {c.coordinator or '(auto-detected)'} "
                        f"within --init-timeout {c.init_timeout}s: {first}") from None
    return jax.process_count() > 1


def _wait_for_port(address: str, timeout: float) -> None:
    import socket
    import time

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        port_n = int(port)
    except ValueError:
        raise LarkError(f"--coordinator must be HOST:PORT, got {address!r}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port_n), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise LarkError(f"could not join the run: the coordinator {address} did not "
                                f"answer within --init-timeout {timeout:g}s ({e.strerror or e}); "
                                "is process 0 running and the address reachable?") from None
        time.sleep(0.25)


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (a no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _broadcast_bytes(data: bytes) -> bytes:
    """Process 0's ``data`` on every process."""
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    own = np.frombuffer(data[:n].ljust(n, b"\0"), np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(own), np.uint8).tobytes()


def check_same_settings(settings: dict, what: str) -> None:
    """Refuse to run when the processes were started with different ``settings``.

    Every process must get the same command apart from ``--process-id``. Each
    process compares its settings with process 0's and names the fields that
    differ; every process learns (from digests gathered from all) which
    processes differ, so all of them stop, none waits for a peer that quit.
    """
    import hashlib

    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    own = json.dumps(settings, sort_keys=True, default=str)
    digest = np.frombuffer(hashlib.sha256(own.encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    first = json.loads(_broadcast_bytes(own.encode()))
    odd = [q for q in range(len(digests)) if not np.array_equal(digests[q], digests[0])]
    if not odd:
        return
    me = jax.process_index()
    if me in odd:
        diffs = differences(first, json.loads(own))
        raise LarkError(f"process {me} was started with other {what} settings than process 0 "
                        f"({'; '.join(diffs)}); start every process with the same options")
    raise LarkError(f"process(es) {', '.join(map(str, odd))} were started with other {what} "
                    "settings than process 0 (their error names them); start every process "
                    "with the same options")


def gather_to_host(tree):
    """Every leaf as a full NumPy array on every process (collective: all processes call)."""
    import jax

    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        tree)
