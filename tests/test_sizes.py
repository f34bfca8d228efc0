"""Memory sizes as users write them and as moai_jax shows them."""

import pytest

from moai_jax.errors import FlavorError
from moai_jax.sizes import format_bytes, parse_bytes


def test_sizes_read_and_shown():
    assert [parse_bytes(t) for t in ("64GB", "300MB", "16GiB", "1e9", "1KB")] == [64 * 10**9, 3 * 10**8, 16 * 2**30,
                                                                                  10**9, 1000]
    assert [format_bytes(n) for n in (800, 3_702_182, 11.48 * 2**30, 2048 * 2**40)] == [
        "800 B", "3.53 MiB", "11.48 GiB", "2048.00 TiB"]
    for bad in ("lots", "0", "-5GB", "nan", "inf"):
        with pytest.raises(FlavorError, match="device memory"):
            parse_bytes(bad)
