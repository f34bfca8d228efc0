"""Without the lines a CUDA plugin prints when it finds no GPU.

With `jax-cuda12-plugin` installed on a machine without a GPU (the `compile-cuda` extra, for compiling
plans for absent NVIDIA GPUs), XLA's C++ code writes "Could not find cuda drivers on your machine, GPU
will not be used." straight to file descriptor 2, with absl's notice that it logs before being set up,
as JAX is imported and again as its backends start. They say nothing a user can act on and they break a
script's one-line errors, so JAX's import, the Accelerator's first look at the devices and a script's
whole run go through `without_cuda_probe_lines()`, which passes every other line on as it comes. XLA:GPU's
warnings on a step over the device's memory go too: the planner's one-line verdict carries its numbers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import threading

CUDA_PROBE_LINE = re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
                             rb"STDERR|I\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your "
                             rb"machine, GPU will not be used\.")
# XLA:GPU's words on a step over the device's memory, which the planner's verdict repeats in its own one line
# ("needs N GiB per device as compiled for 8 × NVIDIA H100 ..."): its scheduler's and its rematerializer's
XLA_MEMORY_LINE = re.compile(rb"[EW]\d{4} [\d:.]+ +\d+ (gpu_hlo_schedule\.cc:\d+\] The byte size of input/output "
                             rb"arguments .* exceeds the base limit|hlo_rematerialization\.cc:\d+\] Can't reduce "
                             rb"memory use below ).*")


def cuda_plugin_installed() -> bool:
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
    except ModuleNotFoundError:  # no JAX plugin at all
        return False


@contextlib.contextmanager
def without_cuda_probe_lines():
    """Run the block with file descriptor 2 read through a pipe that drops the CUDA probe lines."""
    if not cuda_plugin_installed():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pass_on(out: int) -> None:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if not any(p.fullmatch(line.rstrip(b"\n")) for p in (CUDA_PROBE_LINE, XLA_MEMORY_LINE)):
                    os.write(out, line)
        os.close(out)

    thread = threading.Thread(target=pass_on, args=(os.dup(saved),), daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's write end: the thread reads to its end and stops
        os.close(saved)
        thread.join(timeout=10)  # a child process still holding the pipe keeps its lines flowing, unwaited
