"""The offsets rule of a packed table: where each row's kept values lie in ``values``.

A packed table stores row ``i`` as ``values[offsets[i]:offsets[i+1]]`` (docs/format.md). Its
(N + 1,) integer ``offsets`` are valid for ``num_values`` values and width D when::

    offsets[0] == 0
    min_length <= offsets[i+1] - offsets[i] <= D      for every row i
    offsets[N] == num_values

Then every row lies inside ``values`` and re-pads to D, so a lookup may read any row without a
per-row check. This module is the one place the rule is written; it is checked where a table
enters: the lookup modules check it on construction and ``load_state_dict`` (and on the int32
copy the kernel reads), the file reader checks it on read.

The bound: a lookup needs ``min_length = 0`` (an empty row is looked up as D zeros; ``pack_rows``
and the kernel accept it, and a user may build a ``PackedEmbedding`` with such rows), which is
the default. A packed file is stricter because it stores ``L_i = k_i + 1`` values per row, never
zero: its reader passes ``min_length=FILE_MIN_LENGTH`` (docs/format.md, "Reader validation").

A version 3 or 4 file stores the lengths L_i instead of the offsets (``offsets`` is their cumulative
sum, so the first and last conditions hold by construction): :func:`lengths_problem` is the
middle condition on them.
"""

from __future__ import annotations

import torch

#: Smallest row length a packed file may hold: AMTL keeps ``k_i + 1 >= 1`` values of every row.
FILE_MIN_LENGTH = 1


def offsets_problem(
    offsets: torch.Tensor, num_values: int, embedding_dim: int, min_length: int = 0
) -> str | None:
    """The first way ``offsets`` break the rule above, as one line of text, or None if valid.

    O(N) over ``offsets``; never reads ``values``. Wrapping integer subtraction cannot hide a
    violation: from ``offsets[0] == 0`` every accepted step keeps the offsets in [0, N * D].

    Args:
        offsets: (N + 1,) int32 or int64, N >= 0 (the caller checks dtype and shape).
        num_values: len(values).
        embedding_dim: D.
        min_length: smallest allowed row length (0 for lookups, ``FILE_MIN_LENGTH`` for files).

    Returns:
        e.g. ``"offsets decrease at row 1 (13 -> 12)"``, or None.
    """
    first = int(offsets[0])
    if first != 0:
        return f"offsets[0] is {first}, must be 0"
    steps = offsets[1:] - offsets[:-1]
    bad = ((steps < min_length) | (steps > embedding_dim)).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        step = int(steps[row])
        if step < 0:
            return f"offsets decrease at row {row} ({int(offsets[row])} -> {int(offsets[row + 1])})"
        return f"row {row} has length {step}, outside [{min_length}, embedding_dim={embedding_dim}]"
    end = int(offsets[-1])
    if end > num_values:
        return f"offsets[N] = {end} points past the end of `values` ({num_values} entries)"
    if end < num_values:
        return f"offsets[N] = {end} but `values` holds {num_values} entries"
    return None


def lengths_problem(
    lengths: torch.Tensor, embedding_dim: int, min_length: int = 0
) -> str | None:
    """The first row whose length is outside [``min_length``, D], as one line of text, or None.

    Args:
        lengths: (N,) int64 row lengths L_i (widened from the file's unsigned dtype).
        embedding_dim: D.
        min_length: smallest allowed row length (``FILE_MIN_LENGTH`` for files).

    Returns:
        e.g. ``"row 1 has length 0, outside [1, embedding_dim=4]"``, or None.
    """
    bad = ((lengths < min_length) | (lengths > embedding_dim)).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        return (
            f"row {row} has length {int(lengths[row])}, outside [{min_length}, "
            f"embedding_dim={embedding_dim}]"
        )
    return None
