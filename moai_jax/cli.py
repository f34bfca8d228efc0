"""The scripts' common way out: a user's mistake is one line `error: ...` on stderr and exit status 2.

    def main(argv=None) -> int:
        args = parse_args(argv)                 # --help stays quick: nothing heavy is imported before it
        from moai_jax.cli import run_script
        return run_script(run, args)
"""

from __future__ import annotations

from typing import Any, Callable

from moai_jax.errors import MoaiError, report_error
from moai_jax.native_log import without_cuda_probe_lines


def run_script(run: Callable[[Any], int], args: Any) -> int:
    """`run(args)`'s exit status, or 2 after printing a MoaiError as one line. Orbax's own log lines are
    silenced: it logs a failed save or a read-only folder before raising, and the error line says it once; so are
    the lines a CUDA plugin prints when it finds no GPU (moai_jax/native_log.py)."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        with without_cuda_probe_lines():
            return run(args)
    except MoaiError as e:
        return report_error(e)
