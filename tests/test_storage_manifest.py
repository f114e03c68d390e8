"""``manifest.json`` errors whose exact wording is the contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amtl_compress.errors import PackedFormatError
from amtl_compress.storage.manifest import MANIFEST_NAME, MODEL_FORMAT_NAME, read_manifest


def test_unsupported_manifest_version_message(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_NAME
    path.write_text(json.dumps({"format": MODEL_FORMAT_NAME, "format_version": 3}))
    with pytest.raises(PackedFormatError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == (
        f"`{path}`: `format_version` 3 is not supported (this amtl-compress reads 1, 2; a later "
        "release wrote it); re-create the directory with `pack`"
    )


def test_missing_packed_directory_message(tmp_path: Path) -> None:
    with pytest.raises(PackedFormatError) as info:
        read_manifest(tmp_path / "nope")
    assert str(info.value) == (
        f"packed directory `{tmp_path / 'nope'}` does not exist; pass a directory written by "
        "`pack`"
    )
