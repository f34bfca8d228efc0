"""What goes wrong with a checkpoint folder, and how moai_jax tells: a full disk (as Orbax, TensorStore and
safetensors report it), a damaged checkpoint, and the noise a failed save or read leaves behind."""

from __future__ import annotations

import errno
import logging
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp


def disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk is full: an OSError, or the ones Orbax, TensorStore and safetensors wrap."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(error) or f"os_error_code='{errno.ENOSPC}'" in str(error)


def short(error: BaseException) -> str:
    """An error's kind and its first sentence, for a one-line message."""
    first = (str(error).strip().splitlines() or [""])[0]
    first = first[:first.find(". ", 20) + 1 or None]
    first = first if len(first) <= 160 else first[:157] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class Damaged(Exception):
    """A checkpoint whose metadata or arrays cannot be read; the message says which."""


def quiet_failed_writes() -> None:
    """When a read or write of a checkpoint fails, Orbax raises the failure, and what its other pending writes
    leave behind is noise: TensorStore's callbacks find Orbax's event loop closed (Python prints each as an
    ignored RuntimeError), and on a full disk asyncio logs each failed write at shutdown as 'never retrieved'.
    Drop both."""
    previous = sys.unraisablehook
    if getattr(previous, "moai_jax", False):
        return

    def hook(unraisable):
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.moai_jax = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not (record.getMessage().split("\n")[0].endswith("exception was never retrieved")
                            and record.exc_info is not None and disk_full(record.exc_info[1])))


def join_new_threads(before: set[threading.Thread], seconds: float = 10.0) -> None:
    """Wait (at most `seconds` in all) for the threads started since `before` to end, but thread pools' idle workers."""
    import concurrent.futures.thread as pool

    deadline = time.monotonic() + seconds
    for thread in set(threading.enumerate()) - before:
        if getattr(thread, "_target", None) is not pool._worker and thread is not threading.current_thread():
            threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))  # not Orbax's join, which re-raises


def same_shapes(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> bool:
    """Whether checkpoint `step`'s arrays have the shapes a restore asks for (or their index does not read):
    then a failing restore means damaged files, not another model or optimizer."""
    def shapes(tree):
        return sorted(tuple(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))
    try:
        saved = manager.item_metadata(step)
    except Exception:  # noqa: BLE001
        return True
    return all(shapes(saved[name]) == shapes(args[name].item) for name in ("params", "train"))
