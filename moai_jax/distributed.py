"""Several processes, one virtual accelerator: joining a `jax.distributed` job and agreeing on it.

A job is N processes (one per machine, or one per group of devices on a machine) that run the same
program; JAX's coordination service joins them and their devices form one mesh. A process learns
its place in the job from the first of:

1. explicit values: `join(coordinator_address, num_processes, process_id)`, which the scripts pass
   from `--coordinator-address HOST:PORT --num-processes N --process-id I`;
2. the environment: `MOAI_COORDINATOR_ADDRESS`, `MOAI_NUM_PROCESSES`, `MOAI_PROCESS_ID` (for
   launchers that set only environment variables, such as `python -m moai_jax.launch`);
3. JAX's own cluster detection: SLURM (`srun`), Open MPI (`mpirun`), Kubernetes, Cloud TPU pods.

With none of them, or a job of one, the process is alone and nothing is started. The flavor counts
the devices of all processes: each brings flavor / N of its own (on a CPU, simulates that many).

Timeouts, in seconds, overridable through the environment: `MOAI_INIT_TIMEOUT` (how long to wait
for the coordinator and the other processes, default 300), `MOAI_HEARTBEAT_TIMEOUT` (a process
silent this long is dead and the others stop, default 20), `MOAI_SHUTDOWN_TIMEOUT` (how long a
finished process waits for the others at exit, default 60).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import socket
import sys
import time

from moai_jax.errors import FlavorError, MoaiError

TIMEOUTS = {"MOAI_INIT_TIMEOUT": 300, "MOAI_HEARTBEAT_TIMEOUT": 20, "MOAI_SHUTDOWN_TIMEOUT": 60}


class JobError(MoaiError):
    """A job whose processes cannot be joined: a bad address or process id, or disagreeing processes."""


@dataclasses.dataclass(frozen=True)
class Job:
    """This process's place in the job: `process_id` of `num_processes`, joined at `coordinator_address`."""

    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str | None = None

    def local_share(self, flavor: int) -> int:
        """The devices this process brings to a flavor: flavor / processes, or a FlavorError."""
        if flavor % self.num_processes:
            raise FlavorError(f"flavor {flavor} does not split over {self.num_processes} processes; use a multiple "
                              f"of {self.num_processes} (each process brings flavor / {self.num_processes} devices)")
        return flavor // self.num_processes


_joined: Job | None = None
_agreed: dict[str, str] = {}


def add_arguments(parser) -> None:
    """The three flags that place a process in a job (each defaults to its MOAI_* environment variable)."""
    group = parser.add_argument_group("several processes (default: alone, or as SLURM / Open MPI / Kubernetes say)")
    group.add_argument("--coordinator-address", default=None,
                       help="HOST:PORT of process 0, where the others join (env MOAI_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, default=None, help="processes in the job (env MOAI_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None,
                       help="this process's number, 0 to N-1 (env MOAI_PROCESS_ID)")


def join_from_args(args) -> Job:
    """`join` with the values of `add_arguments`'s flags."""
    return join(args.coordinator_address, args.num_processes, args.process_id)


def join(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> Job:
    """Join this process's job (once; later calls return it). Must run before JAX starts its backends."""
    global _joined
    given = _given(coordinator_address, num_processes, process_id)
    if _joined is not None:
        if given is not None and given != _joined:
            raise JobError(f"this process already joined a job as process {_joined.process_id} of "
                           f"{_joined.num_processes}; it cannot join another")
        return _joined
    job = given or _detected() or Job()
    if job.num_processes > 1:
        _initialize(job)
    _joined = job
    return job


def _given(address: str | None, count: int | str | None, index: int | str | None) -> Job | None:
    """The job named explicitly or by the MOAI_* variables, checked; None when neither names one."""
    address = address or os.environ.get("MOAI_COORDINATOR_ADDRESS") or None
    count = count if count is not None else os.environ.get("MOAI_NUM_PROCESSES")
    index = index if index is not None else os.environ.get("MOAI_PROCESS_ID")
    if address is None and count is None and index is None:
        return None
    count, index = _whole("--num-processes", count, 1), _whole("--process-id", index, 0)
    if not 0 <= index < count:
        raise JobError(f"--process-id {index} is outside the job's processes 0 to {count - 1}; give each of the "
                       f"{count} processes its own id from 0 to {count - 1}")
    if count > 1:
        host, _, port = (address or "").rpartition(":")
        if not host or not port.isdigit():
            raise JobError(f"--coordinator-address {address!r}: give process 0's HOST:PORT, the same for every "
                           "process, e.g. node001:12355")
    return Job(count, index, address)


def _whole(flag: str, value, default: int) -> int:
    if value is None:
        return default
    try:
        return int(str(value).strip())
    except ValueError:
        raise JobError(f"{flag} must be a whole number, not {value!r}") from None


def _detected() -> Job | None:
    """The job a scheduler started (JAX's cluster detection), or None when there is none or it is of one."""
    from jax._src import clusters  # JAX's detectors: SLURM, Open MPI, Kubernetes, Cloud TPU

    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            count = env.get_process_count()
            return Job(count, env.get_process_id(), None) if count > 1 else None
    return None


def local_share(flavor: int) -> int:
    """The devices this process brings to `flavor`, once every process of its job agrees on the flavor."""
    job = join()
    agree("flavor", flavor, "start every process with the same --flavor")
    return job.local_share(flavor)


def timeout(name: str) -> int:
    """One of the TIMEOUTS in seconds, from the environment when set there."""
    value = os.environ.get(name, TIMEOUTS[name])
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise JobError(f"{name}={value!r}: give a whole number of seconds, at least 1")
    return seconds


def _initialize(job: Job) -> None:
    import jax

    init = timeout("MOAI_INIT_TIMEOUT")
    if job.coordinator_address is not None and job.process_id > 0:
        _wait_for_coordinator(job.coordinator_address, init)  # JAX aborts, without a word we can catch
    jax.distributed.initialize(job.coordinator_address, job.num_processes, job.process_id,
                               initialization_timeout=init,
                               heartbeat_timeout_seconds=timeout("MOAI_HEARTBEAT_TIMEOUT"),
                               shutdown_timeout_seconds=timeout("MOAI_SHUTDOWN_TIMEOUT"))


def _wait_for_coordinator(address: str, seconds: int) -> None:
    """Return once something listens at `address`; a JobError after `seconds` of nobody."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise JobError(f"nobody listens at the coordinator address {address} (waited {seconds} s, "
                               "MOAI_INIT_TIMEOUT); start process 0 there, or pass its HOST:PORT") from None
            time.sleep(0.2)


def agree(what: str, value, advice: str) -> None:
    """Check that every process of the job has the same `value` (JSON-able); a JobError on every process
    otherwise, naming who differs. Processes must call it in the same order. Alone: nothing to check."""
    job = join()
    text = json.dumps(value, sort_keys=True, default=str)
    if job.num_processes == 1 or _agreed.get(what) == text:
        return
    values = [json.loads(v) for v in exchange(f"agree/{what}", text)]
    if any(v != values[0] for v in values):
        shown = "; ".join(f"process {i}: {_differing(v, values)}" for i, v in enumerate(values))
        raise JobError(f"the processes disagree on the {what} ({shown}); {advice}")
    _agreed[what] = text


def _differing(value, values: list) -> str:
    """The parts of `value` that not every process shares (all of it unless a dict)."""
    if isinstance(value, dict):
        keys = sorted(k for k in value if any(v.get(k) != value[k] for v in values))
        return ", ".join(f"{k} {value[k]}" for k in keys)
    return str(value)


_exchanges: dict[str, int] = {}


def exchange(name: str, text: str) -> list[str]:
    """Every process's `text`, by process id, through the coordination service (no device work)."""
    from jax._src import distributed

    job, client = join(), distributed.global_state.client
    round_ = _exchanges[name] = _exchanges.get(name, 0) + 1
    key = f"moai_jax/{name}/{round_}"
    client.key_value_set(f"{key}/{job.process_id}", text)
    wait_ms = timeout("MOAI_INIT_TIMEOUT") * 1000
    return [client.blocking_key_value_get(f"{key}/{i}", wait_ms) for i in range(job.num_processes)]


@functools.cache
def hosts() -> list[str]:
    """The machine each process runs on, by process id (one name alone)."""
    job = join()
    return [socket.gethostname()] if job.num_processes == 1 else exchange("hosts", socket.gethostname())


@contextlib.contextmanager
def only_first_prints():
    """Inside, only process 0 writes to stdout: one step line per step, whatever the process count.
    Errors (stderr) still come from every process."""
    if join().process_id == 0:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield
        sys.stdout.flush()
