"""scripts/finetune.py's main without a new process: `finetune_here(*args)` in the calling test's process, and,
run as a script, once per group of arguments (the groups separated by `--then`): several trainings in the same
processes of one job, which start (import JAX, join the job) once. test_distributed runs
`python -m moai_jax.launch --processes 2 -- tests/finetune_runs.py ARGS --then ARGS`, test_checkpoint a new
process of it. As a script every group runs; the exit status is the first nonzero one."""

import contextlib
import functools
import io
import subprocess
import sys
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

FINETUNE = Path(__file__).resolve().parents[1] / "scripts" / "finetune.py"


@functools.cache
def finetune_script():
    spec = spec_from_file_location("finetune", FINETUNE)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finetune_here(*args) -> subprocess.CompletedProcess:
    """finetune.py's main in this process, with its devices (no start-up to pay): its exit status and what it
    printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = finetune_script().main([str(a) for a in args])
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


if __name__ == "__main__":
    groups = [[]]
    for arg in sys.argv[1:]:
        if arg == "--then":
            groups.append([])
        else:
            groups[-1].append(arg)
    statuses = [finetune_script().main(group) for group in groups]
    sys.exit(next((status for status in statuses if status), 0))
