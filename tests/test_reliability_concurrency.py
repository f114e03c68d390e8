"""Concurrency: two writers of one packed directory, and readers while it is being replaced."""

from __future__ import annotations

import shutil

import pytest

import amtl_compress._io as io_module
import amtl_compress.lookup.load as load_module
from amtl_compress._io import lock_path, output_lock
from amtl_compress.errors import OutputExistsError
from amtl_compress.lookup.load import load_packed, load_packed_model
from amtl_compress.models.factory import build_model
from amtl_compress.storage.manifest import read_manifest
from amtl_compress.storage.pack import pack
from tests.reliability_helpers import make_run_dir, start_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the same model shape but different rows: a packed dir tells which it holds."""
    root = tmp_path_factory.mktemp("runs")
    make_run_dir(root / "small", rows=50, seed=1)
    make_run_dir(root / "big", rows=150_000, seed=2)
    return {"small": root / "small", "big": root / "big"}


def _user_rows(packed) -> int:
    return load_packed_model(packed, mmap=True).embeddings.user_id.num_embeddings


def _temporaries(out):
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.is_dir()]


BUSY = "is being written by another process; wait for it to finish or choose another output"


@pytest.mark.parametrize(
    "overwrite", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fresh", "overwrite"]
)
def test_two_packs_into_one_directory_one_wins_the_other_fails_cleanly(
    runs, tmp_path, overwrite: bool
) -> None:
    out = tmp_path / "packed"
    extra = ["--overwrite"] if overwrite else []
    if overwrite:
        pack(runs["small"], out, progress=False)
    # Started together, both spend the same time importing, then race for the output.
    procs = [start_cli("pack", str(runs["big"]), "--out", str(out), "-q", *extra)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    errors = [err for code, err in results if code != 0]
    if overwrite and codes == [0, 0]:
        pass  # one finished before the other started: two clean replaces in a row
    else:
        assert codes == [0, 1], results
        assert errors[0].count("\n") == 1 and errors[0].startswith("Error: output ")
        assert f"`{out}`" in errors[0]
        assert BUSY in errors[0] or (not overwrite and "exists; pass --overwrite" in errors[0])
    # The winner's output is complete: every file matches its manifest checksum.
    assert load_packed(build_model(read_manifest(out).model), out, verify=True)
    assert _user_rows(out) == 150_000
    assert _temporaries(out) == [] and not lock_path(out).exists()


def test_a_held_lock_refuses_a_second_writer_in_process(runs, tmp_path) -> None:
    out = tmp_path / "packed"
    with output_lock(out):
        with pytest.raises(OutputExistsError, match="being written by another process"):
            pack(runs["small"], out, progress=False)
        assert not out.exists()
    pack(runs["small"], out, progress=False)  # released: the next writer gets it
    assert _user_rows(out) == 50


def test_readers_see_the_old_or_the_new_complete_version(runs, tmp_path) -> None:
    out = tmp_path / "packed"
    pack(runs["small"], out, progress=False)
    writer = start_cli("pack", str(runs["big"]), "--out", str(out), "--overwrite", "-q")
    seen = []
    while writer.poll() is None:
        # Any mix of the two versions fails load_packed's checks (N of the manifest, the table
        # file and the model built from the manifest's spec must all agree).
        seen.append(_user_rows(out))
    _, err = writer.communicate()
    assert writer.returncode == 0, err
    seen.append(_user_rows(out))
    assert set(seen) <= {50, 150_000} and seen[0] == 50 and seen[-1] == 150_000
    assert seen == sorted(seen)  # never back to the old version once the new one was seen


def test_a_read_that_straddles_a_replace_is_retried(runs, tmp_path, monkeypatch) -> None:
    """Deterministic version of the race: the directory is replaced in the middle of a read."""
    out = tmp_path / "packed"
    pack(runs["small"], out, progress=False)
    real = load_module.read_packed_table
    calls = {"n": 0}

    def replace_then_read(path, mmap=True):
        calls["n"] += 1
        if calls["n"] == 1:  # the old manifest is read; now a writer swaps the directory
            pack(runs["big"], out, overwrite=True, progress=False)
        return real(path, mmap=mmap)

    monkeypatch.setattr(load_module, "read_packed_table", replace_then_read)
    assert _user_rows(out) == 150_000  # retried on the new version, not a mix of both
    assert calls["n"] == 2


def test_replace_without_an_atomic_exchange_is_still_seen_whole(
    runs, tmp_path, monkeypatch
) -> None:
    """Where renameat2 is missing the directory is briefly absent; readers retry past that."""
    monkeypatch.setattr(io_module, "_exchange", lambda a, b: False)
    out = tmp_path / "packed"
    pack(runs["small"], out, progress=False)
    real = load_module.read_manifest
    calls = {"n": 0}

    def read_during_gap(directory):
        calls["n"] += 1
        if calls["n"] == 1:  # between the two renames: the old version is aside, no new one yet
            aside = tmp_path / ".packed.gap.old"
            out.rename(aside)
            try:
                return real(directory)
            finally:  # the new version (another inode) is renamed in
                shutil.copytree(aside, out)
                shutil.rmtree(aside)
        return real(directory)

    monkeypatch.setattr(load_module, "read_manifest", read_during_gap)
    assert _user_rows(out) == 50 and calls["n"] == 2
    pack(runs["big"], out, overwrite=True, progress=False)
    assert _user_rows(out) == 150_000
    assert _temporaries(out) == []
