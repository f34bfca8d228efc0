"""Tokenized documents → rows of `block_size` tokens: packed with segment ids, or one document per row.

A document longer than the block is cut into block-size pieces, each its own segment; pieces with
no loss token (a prompt without its answer, a lone token) are dropped. Packing places the pieces by
best fit, longest first, which leaves little padding. Rows are kept as lists of pieces over the flat
token array and turned into arrays only when a batch asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100  # the label of a token without loss


@dataclass(frozen=True)
class Documents:
    """Documents as spans of one flat token array and its loss mask (1 where the token is trained on)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def take(self, indices: np.ndarray) -> Documents:
        return Documents(self.tokens, self.loss_mask, self.starts[indices], self.lengths[indices])


@dataclass(frozen=True)
class Rows:
    """Rows of one split: row r holds pieces `row_start[r]:row_start[r+1]` (spans of the flat tokens)."""

    docs: Documents
    piece_starts: np.ndarray
    piece_lengths: np.ndarray
    row_start: np.ndarray
    block_size: int
    pad_id: int
    split_documents: int  # documents longer than the block, cut into pieces

    def __len__(self) -> int:
        return len(self.row_start) - 1

    @property
    def efficiency(self) -> float:
        """Share of the rows' tokens that are document tokens, not padding."""
        return float(self.piece_lengths.sum()) / max(1, len(self) * self.block_size)

    def batch(self, row_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The batch arrays of these rows, each int32 [len(row_ids), block_size]; row id -1 is an empty row."""
        shape = (len(row_ids), self.block_size)
        input_ids = np.full(shape, self.pad_id, np.int32)
        labels = np.full(shape, IGNORE, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        positions = np.zeros(shape, np.int32)
        for r, row in enumerate(row_ids):
            at = 0
            pieces = range(self.row_start[row], self.row_start[row + 1]) if row >= 0 else ()
            for segment, piece in enumerate(pieces, start=1):
                start, n = self.piece_starts[piece], self.piece_lengths[piece]
                tokens = self.docs.tokens[start : start + n]
                input_ids[r, at : at + n] = tokens
                labels[r, at : at + n - 1] = np.where(self.docs.loss_mask[start + 1 : start + n], tokens[1:], IGNORE)
                segment_ids[r, at : at + n] = segment
                positions[r, at : at + n] = np.arange(n)
                at += n
        return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "positions": positions}


def _pieces(docs: Documents, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents cut into block-size pieces, keeping those with at least one label."""
    counts = -(-docs.lengths // block_size)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.arange(counts.sum()) - first
    starts = np.repeat(docs.starts, counts) + k * block_size
    lengths = np.minimum(block_size, np.repeat(docs.lengths, counts) - k * block_size)
    answers = np.concatenate([[0], np.cumsum(docs.loss_mask, dtype=np.int64)])
    labelled = answers[starts + lengths] - answers[starts + 1] > 0
    return starts[labelled], lengths[labelled]


def _best_fit(lengths: np.ndarray, block_size: int) -> list[list[int]]:
    """Pieces into rows, longest first, each into the open row it fills most tightly."""
    rows: list[list[int]] = []
    open_rows: dict[int, list[int]] = {}  # free space → rows with exactly that much free
    free_bits = 0  # bit c set when some row has exactly c tokens free
    for piece in np.argsort(-lengths, kind="stable"):
        n = int(lengths[piece])
        fitting = free_bits >> n
        if fitting:
            free = n + (fitting & -fitting).bit_length() - 1
            row = open_rows[free].pop()
            if not open_rows[free]:
                free_bits &= ~(1 << free)
            rows[row].append(int(piece))
        else:
            free, row = block_size, len(rows)
            rows.append([int(piece)])
        left = free - n
        if left > 1:
            open_rows.setdefault(left, []).append(row)
            free_bits |= 1 << left
    return rows


def make_rows(docs: Documents, block_size: int, pad_id: int, packing: bool) -> Rows:
    """The rows of these documents: packed with segment ids, or padded one piece per row."""
    starts, lengths = _pieces(docs, block_size)
    if packing:
        rows = _best_fit(lengths, block_size)
        order = np.array([p for row in rows for p in row], np.int64)
        row_start = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
        starts, lengths = starts[order], lengths[order]
    else:
        row_start = np.arange(len(starts) + 1, dtype=np.int64)
    return Rows(docs, starts, lengths, row_start, block_size, pad_id, int((docs.lengths > block_size).sum()))
