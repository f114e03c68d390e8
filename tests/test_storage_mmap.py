"""``map_tensor``: the mapped ``values`` of a packed table (offsets, advice, copy-on-write)."""

from __future__ import annotations

import mmap
import warnings
from pathlib import Path

import pytest
import torch

from amtl_compress.storage.format import read_packed_table, source_digest, write_packed_table
from amtl_compress.storage.header import map_tensor, read_header, read_tensor


def write_table(path: Path, n: int, d: int = 8, field: str = "e") -> torch.Tensor:
    torch.manual_seed(0)
    lengths = torch.randint(1, d + 1, (n,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = torch.randn(int(offsets[-1]))
    write_packed_table(
        path, values, offsets, embedding_dim=d, field=field,
        source_sha256=source_digest(torch.zeros(n, d)),
    )
    return values


def vm_flags(path: Path) -> list[list[str]]:
    """The VmFlags of every mapping of ``path`` in /proc/self/smaps."""
    flags, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:  # a mapping's first line: "start-end perms ... path"
            current = line.endswith(str(path))
        elif line.startswith("VmFlags:") and current:
            flags.append(line.split()[1:])
    return flags


@pytest.mark.parametrize("field", ["e", "a" * 5000])  # the long name pushes values past 4096
def test_mapped_values_equal_read_values_at_any_offset(tmp_path: Path, field: str) -> None:
    path = tmp_path / "t.safetensors"
    values = write_table(path, 300, field=field)
    entry = read_header(path).tensors["values"]
    assert (entry.offset >= mmap.ALLOCATIONGRANULARITY) == (len(field) > 100)
    mapped = map_tensor(path, entry)
    assert torch.equal(mapped, values)
    assert torch.equal(mapped, read_tensor(path, entry))


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_values_are_mapped_for_random_access(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path, 3000)
    table = read_packed_table(path, mmap=True)
    flags = vm_flags(path)
    assert flags, "values is not mapped"
    assert all("rr" in f for f in flags)  # MADV_RANDOM: no read-around on page faults
    assert table.values.numel() > 0


def test_mapped_values_are_copy_on_write_and_writable_without_warning(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_table(path, 50)
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable numpy arrays
        table = read_packed_table(path, mmap=True)
    table.values[0] = 99.0
    assert float(table.values[0]) == 99.0
    assert path.read_bytes() == before
    del table  # unmapping while the file is still there must not fail
    path.unlink()
