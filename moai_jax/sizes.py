"""Memory sizes as users write them ("64GB", "300MB", "16GiB") and as moai_jax shows them ("3.17 GiB", "800 B")."""

from __future__ import annotations

from moai_jax.errors import FlavorError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30, "TIB": 2**40}
SHOWN = ("KiB", "MiB", "GiB", "TiB")


def parse_bytes(text: str) -> int:
    """A memory size as users write it ("64GB", "300MB", "16GiB", "1e9") → bytes."""
    t = str(text).strip().upper().replace(" ", "")
    number = t.rstrip("KMGTIB")
    try:
        value = float(number) * UNITS[t[len(number):]]
    except (ValueError, KeyError):
        raise FlavorError(f"device memory {text!r}: write it like 64GB, 300MB or 16GiB") from None
    if not value >= 1 or value == float("inf"):
        raise FlavorError(f"device memory {text!r} must be a positive size such as 64GB or 300MB")
    return int(value)


def format_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit that keeps the number at least 1: "3.17 GiB", "12.50 MiB", "800 B"."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in SHOWN:
        n /= 1024
        if abs(n) < 1024:
            break
    return f"{n:.2f} {unit}"
