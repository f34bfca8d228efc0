"""Global batches in a fixed order for a seed, each process's slice of them, and a resumable position.

Epoch e visits the rows of a split in the order `default_rng([seed, e]).permutation(rows)`, in
batches of `batch_size` rows. Training drops the last partial batch of each epoch, so there are
`rows // batch_size` steps per epoch; the eval split visits every row once, its last batch filled
with empty rows (no loss), so there are `ceil(rows / batch_size)`. Process p of P yields rows `[p*B/P, (p+1)*B/P)` of each global
batch. `position` is a plain dict naming the next step; a checkpoint stores it and
`Batches(..., position=saved)` continues with the exact next batch, with any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from moai_jax.errors import DataError


class Batches:
    """The batches of one split of a `TokenizedData`, for `epochs` passes; iterate to get batch dicts."""

    def __init__(
        self,
        data,
        batch_size: int,
        *,
        seed: int = 0,
        epochs: int = 1,
        split: str = "train",
        process_index: int = 0,
        process_count: int = 1,
        position: dict | None = None,
    ):
        self._rows = data.split(split)
        rows = len(self._rows)
        if batch_size < 1 or batch_size % process_count:
            raise DataError(f"batch size {batch_size} does not split over {process_count} processes; use a multiple of {process_count}")
        if rows == 0:
            raise DataError(f"the {split} split has no rows; hold out some data (eval_fraction) or add a validation split")
        if rows < batch_size and split == "train":
            fits = rows - rows % process_count
            advice = f"use a batch size of at most {fits} (--batch-size)" if fits else "use more data"
            dropped = f"; {data.dropped}" if getattr(data, "dropped", "") else ""
            raise DataError(
                f"the {split} split has {rows} rows of {data.block_size} tokens, fewer than one batch of {batch_size}; "
                f"{advice} or a smaller block size{dropped}"
            )
        self.batch_size, self.seed, self.split = batch_size, seed, split
        self.steps_per_epoch = rows // batch_size if split == "train" else -(-rows // batch_size)
        self.steps = self.steps_per_epoch * epochs
        self._slice = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
        self._step = 0
        if position is not None:
            self._restore(position)

    @property
    def position(self) -> dict:
        """Plain state naming the next batch; store it in a checkpoint."""
        return {"step": self._step, "split": self.split, "seed": self.seed, "batch_size": self.batch_size, "rows": len(self._rows)}

    def _restore(self, position: dict) -> None:
        expected = self.position
        changed = [k for k in ("split", "seed", "batch_size", "rows") if position.get(k) != expected[k]]
        if changed:
            was = ", ".join(f"{k} {position.get(k)}" for k in changed)
            now = ", ".join(f"{k} {expected[k]}" for k in changed)
            raise DataError(f"the saved data position has {was} but this run has {now}; resume with the same data, batch size and seed")
        self._step = int(position["step"])

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        order, order_epoch = None, None
        while self._step < self.steps:
            epoch, index = divmod(self._step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = np.random.default_rng([self.seed, epoch]).permutation(len(self._rows)), epoch
                order = np.concatenate([order, np.full(-len(order) % self.batch_size, -1)])
            rows = order[index * self.batch_size : (index + 1) * self.batch_size][self._slice]
            self._step += 1
            yield self._rows.batch(rows)
