"""scripts/finetune.py's main once per group of arguments, the groups separated by `--then`: several trainings
in the same processes of one job, which start (import JAX, join the job) once. Run by test_distributed:
`python -m moai_jax.launch --processes 2 -- tests/finetune_runs.py ARGS --then ARGS`, and by test_checkpoint.
Every group runs; the exit status is the first nonzero one."""

import sys
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

spec = spec_from_file_location("finetune", Path(__file__).resolve().parents[1] / "scripts" / "finetune.py")
finetune = module_from_spec(spec)
spec.loader.exec_module(finetune)
groups = [[]]
for arg in sys.argv[1:]:
    if arg == "--then":
        groups.append([])
    else:
        groups[-1].append(arg)
statuses = [finetune.main(group) for group in groups]
sys.exit(next((status for status in statuses if status), 0))
