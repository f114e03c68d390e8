"""The offsets rule of a packed table, written once (storage/offsets.py) for files and modules."""

from __future__ import annotations

import pytest
import torch

from amtl_compress.storage.offsets import FILE_MIN_LENGTH, offsets_problem


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_a_valid_index_has_no_problem(dtype: torch.dtype) -> None:
    assert offsets_problem(torch.tensor([0, 2, 3, 7], dtype=dtype), 7, 4) is None
    assert offsets_problem(torch.tensor([0], dtype=dtype), 0, 4) is None  # N = 0


@pytest.mark.parametrize("offsets, problem", [
    ([1, 2, 3, 7], "offsets[0] is 1, must be 0"),
    ([0, 3, 2, 7], "offsets decrease at row 1 (3 -> 2)"),
    ([0, 1, 2, 7], "row 2 has length 5, outside [0, embedding_dim=4]"),
    ([0, 2, 4, 8], "offsets[N] = 8 points past the end of `values` (7 entries)"),
    ([0, 2, 3, 6], "offsets[N] = 6 but `values` holds 7 entries"),
    ([0, -(2**63), 3, 7], f"offsets decrease at row 0 (0 -> {-(2**63)})"),
    ([0, 2**63 - 1, 3, 7], f"row 0 has length {2**63 - 1}, outside [0, embedding_dim=4]"),
])
def test_the_first_problem_is_named(offsets: list[int], problem: str) -> None:
    assert offsets_problem(torch.tensor(offsets), 7, 4) == problem


def test_empty_rows_are_valid_for_lookups_but_not_in_files() -> None:
    offsets = torch.tensor([0, 2, 2, 7])
    assert offsets_problem(offsets, 7, 5) is None
    assert offsets_problem(offsets, 7, 5, FILE_MIN_LENGTH) == (
        "row 1 has length 0, outside [1, embedding_dim=5]"
    )
