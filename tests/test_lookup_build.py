"""Building, caching and loading the kernel; what happens without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from amtl_compress.lookup import ops

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_second_process_loads_the_cached_build_without_rebuilding() -> None:
    library = ops.load_kernel()  # built by this process or an earlier one
    before = library.stat().st_mtime_ns
    result = _run("""
        import torch
        from amtl_compress.lookup import ops
        print(ops.load_kernel())
        print(ops.packed_embedding(torch.ones(3), torch.tensor([0, 1, 3]), None, None,
                                   torch.tensor([1]), 2).tolist())
    """)
    assert result.returncode == 0, result.stderr
    assert "building" not in result.stderr
    assert result.stdout.splitlines() == [str(library), "[[1.0, 1.0]]"]
    assert library.stat().st_mtime_ns == before


def test_without_a_compiler_the_error_is_one_clear_line_raised_once(tmp_path: Path) -> None:
    result = _run("""
        from amtl_compress.errors import KernelBuildError
        from amtl_compress.lookup import kernel_available, ops
        errors = []
        for _ in range(2):
            try:
                ops.load_kernel()
            except KernelBuildError as exc:
                errors.append(exc)
        print(errors[0] is errors[1], kernel_available())
        print(errors[0])
    """, CXX=str(tmp_path / "no-such-c++"), AMTL_COMPRESS_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    same, message = result.stdout.splitlines()
    assert same == "True False"  # cached: the failed build is not retried
    assert result.stderr.count("building the lookup kernel") == 1
    assert "could not build the lookup kernel with `" in message
    assert "no-such-c++" in message and "AMTL_COMPRESS_KERNEL=reference" in message
    log = Path(message.split("details: `")[1].split("`")[0])
    assert log.is_file() and log.read_text().strip()
    assert not list((tmp_path / "cache" / "kernels").glob("*/*.so"))


def test_reference_switch_needs_no_compiler(tmp_path: Path) -> None:
    result = _run("""
        import warnings
        import torch
        from amtl_compress.lookup import PackedEmbedding, PackedEmbeddingBag
        emb = PackedEmbedding(torch.arange(4.0), torch.tensor([0, 1, 4]), 3)
        bag = PackedEmbeddingBag(torch.arange(4.0), torch.tensor([0, 1, 4]), 3, mode="sum")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print(emb(torch.tensor([1, 0])).tolist(), bag(torch.tensor([[0, 1]])).tolist())
            emb(torch.tensor([1]))
        print(len(caught), caught[0].category.__name__)
    """, CXX=str(tmp_path / "no-such-c++"), AMTL_COMPRESS_CACHE=str(tmp_path / "cache"),
        AMTL_COMPRESS_KERNEL="reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]] [[1.0, 2.0, 3.0]]", "1 RuntimeWarning"]
    assert "building" not in result.stderr
    assert not (tmp_path / "cache").exists()


def test_cache_directory_is_keyed_by_torch_version_sources_and_flags(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ops.CACHE_ENV, str(tmp_path))
    key = ops.cache_dir()
    assert key.parent == tmp_path / "kernels"
    assert key.name.startswith("torch" + __import__("torch").__version__.replace("+", "-"))
    monkeypatch.setattr(ops, "_CFLAGS", (*ops._CFLAGS, "-DAMTL_TEST_FLAG"))
    assert ops.cache_dir() != key
    monkeypatch.delenv(ops.CACHE_ENV)
    assert str(ops.cache_dir()).startswith(str(Path.home() / ".cache" / "amtl-compress"))


@pytest.mark.slow
def test_two_processes_building_at_once_build_once(tmp_path: Path) -> None:
    code = "from amtl_compress.lookup import ops; print(ops.load_kernel())"
    env = {**os.environ, "AMTL_COMPRESS_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert outputs[0][0] == outputs[1][0]  # the same library path
    assert sum(err.count("building the lookup kernel") for _, err in outputs) == 1
    assert len(list((tmp_path / "kernels").glob("*/*.so"))) == 1
    assert not list((tmp_path / "kernels").glob(".build-*"))  # no temporary left behind
