"""Start one job of several processes on this machine, joined by `jax.distributed`.

    python -m moai_jax.launch --processes 2 -- scripts/finetune.py --flavor 8 --batch-size 8

Each process runs `python <command>` with the coordinator on 127.0.0.1 at a free port and its
place in the job in `MOAI_COORDINATOR_ADDRESS`, `MOAI_NUM_PROCESSES`, `MOAI_PROCESS_ID`. Only
process 0's output is shown (it is the one that prints), or every process's with `--all-output`,
each line prefixed with its process number. When one process fails, the launcher says which in
one line, stops the others (showing of their output only `error:` lines from then on) and exits
with the failure's status (128 + signal for a killed one). For development, tests and one host
with several devices per process; on a cluster the scheduler (srun, a Kubernetes Indexed Job,
mpirun) starts the processes instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

GRACE_SECONDS = 3  # after a failure, the others may finish on their own (say the same error) this long
KILL_SECONDS = 5  # then SIGTERM, and SIGKILL this much later


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moai_jax.launch", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s --processes N [--all-output] -- SCRIPT [ARGS...]")
    p.add_argument("--processes", type=int, required=True, help="how many processes to start, joined as one job")
    p.add_argument("--all-output", action="store_true",
                   help="show every process's output, each line prefixed with its process number "
                        "(default: process 0's only)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="after --: what each process runs with python")
    args = p.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.processes < 1:
        p.error(f"--processes must be at least 1, not {args.processes}")
    if not args.command:
        p.error("give the command after --, e.g. -- scripts/finetune.py --flavor 8")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


class Job:
    """The running processes, their output forwarded line by line."""

    def __init__(self, command: list[str], processes: int, all_output: bool):
        address = f"127.0.0.1:{free_port()}"
        self.all_output = all_output
        self.failed: int | None = None  # the first process that failed
        self.procs: list[subprocess.Popen] = []
        self.last_error: list[deque] = [deque(maxlen=1) for _ in range(processes)]
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        for i in range(processes):
            env = {**os.environ, "MOAI_COORDINATOR_ADDRESS": address, "MOAI_NUM_PROCESSES": str(processes),
                   "MOAI_PROCESS_ID": str(i), "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen([sys.executable, *command], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
            self.procs.append(proc)
            show = all_output or i == 0
            prefix = f"[{i}] " if all_output else ""
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                thread = threading.Thread(target=self._forward, args=(i, stream, out if show else None, prefix,
                                                                      stream is proc.stderr), daemon=True)
                thread.start()
                self._threads.append(thread)
        self.say(f"launch: {processes} processes joined at {address}, pids "
                 + ", ".join(f"{i}: {p.pid}" for i, p in enumerate(self.procs)))

    def _forward(self, index: int, stream, out, prefix: str, is_stderr: bool) -> None:
        for line in stream:
            if is_stderr and line.strip():
                self.last_error[index].append(line.strip())
            if self.failed not in (None, index) and not line.startswith("error:"):
                continue  # once one failed, the others' complaints about it are noise; their own errors are not
            if out is not None:
                with self._lock:
                    out.write(prefix + line)
                    out.flush()

    def say(self, line: str) -> None:
        with self._lock:
            print(line, file=sys.stderr, flush=True)

    def wait(self) -> int:
        """Until all succeed (0) or one fails: then stop the others and return its status."""
        while True:
            statuses = [p.poll() for p in self.procs]
            failed = next((i for i, s in enumerate(statuses) if s not in (None, 0)), None)
            if failed is not None:
                self.failed = failed
                self._report(failed, statuses[failed])
                self.stop()
                status = statuses[failed]
                return 128 - status if status < 0 else status
            if all(s == 0 for s in statuses):
                self._drain()
                return 0
            time.sleep(0.05)

    def _report(self, index: int, status: int) -> None:
        others = len(self.procs) - 1
        self._drain(timeout=0.5)
        last = self.last_error[index][0] if self.last_error[index] else ""
        shown = self.all_output or index == 0
        said = f" ({last[:300]})" if last.startswith("error:") and not shown else ""
        stopping = f"; stopping the other {others}" if others and any(p.poll() is None for p in self.procs) else ""
        self.say(f"launch: process {index} {describe(status)}{said}{stopping}")

    def stop(self) -> None:
        """Let the others end on their own for a moment, then SIGTERM, then SIGKILL: none is left running."""
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        for sig, wait in ((signal.SIGTERM, KILL_SECONDS), (signal.SIGKILL, None)):
            for p in self.procs:
                if p.poll() is None:
                    p.send_signal(sig)
            for p in self.procs:
                try:
                    p.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
        self._drain()

    def _drain(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    job = Job(args.command, args.processes, args.all_output)

    def interrupted(signum, _frame):
        job.say(f"launch: {signal.Signals(signum).name}; stopping the processes")
        job.stop()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        return job.wait()
    finally:
        for p in job.procs:
            if p.poll() is None:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
