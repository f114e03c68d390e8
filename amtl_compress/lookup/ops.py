"""The compiled lookup kernel: built on first use, cached on disk, called through ``torch.ops``.

The C++ source (``csrc/lookup.cpp``) registers the operators ``torch.ops.amtl_compress.
packed_embedding`` and ``packed_embedding_bag`` (CPU implementation). It is compiled once per
(torch version, source, flags) into ``$AMTL_COMPRESS_CACHE/kernels/<key>/`` (default base
``~/.cache/amtl-compress``) and loaded from there afterwards.

``AMTL_COMPRESS_KERNEL`` selects the implementation used by the modules on CPU:
``compiled`` (default) builds/loads the kernel and raises :class:`KernelBuildError` if it cannot;
``reference`` never builds and uses the pure-torch reference (slower), with one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from amtl_compress._io import atomic_write_text
from amtl_compress.errors import KernelBuildError

KERNEL_ENV = "AMTL_COMPRESS_KERNEL"
CACHE_ENV = "AMTL_COMPRESS_CACHE"
_LIBRARY_NAME = "amtl_compress_lookup"
_CSRC = Path(__file__).parent / "csrc"
# Compiled as separate translation units (ninja builds them in parallel); they include the
# headers beside them.
_SOURCES = (_CSRC / "lookup.cpp", _CSRC / "kernels_avx2.cpp", _CSRC / "kernels_avx512.cpp")
# -O3 but no -march: the cache may be shared between machines. kernels_avx2.cpp and
# kernels_avx512.cpp set their ISA themselves (#pragma GCC target); lookup.cpp picks one at run
# time.
# -ffp-contract=off keeps a*b+c two roundings, which the bitwise match with torch needs. -fopenmp
# makes at::parallel_for (inline, OpenMP) parallel; the resulting libgomp.so.1 dependency resolves
# to the copy torch has already loaded.
_CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")
_LDFLAGS = ("-fopenmp",)


class LookupOps(NamedTuple):
    """The two operators of one kind (``torch.ops`` OpOverloads), called by the modules."""

    embedding: Any  # (values, offsets, scale, bias, ids, D) -> (*ids.shape, D) float32
    embedding_bag: Any  # (values, offsets, scale, bias, input, bag_offsets, ...) -> (B, D)


_state: dict[str, object] = {}  # "path": loaded library, or "error": the KernelBuildError raised
_checked: LookupOps | None = None  # set once the kernel is loaded
_unchecked: LookupOps | None = None
_warned_reference = False


def kernel_mode() -> str:
    """``"compiled"`` or ``"reference"``, from ``AMTL_COMPRESS_KERNEL`` (default compiled)."""
    raw = os.environ.get(KERNEL_ENV)
    if raw is None or raw == "compiled":  # the per-call fast path
        return "compiled"
    mode = raw.strip().lower() or "compiled"
    if mode not in ("compiled", "reference"):
        raise KernelBuildError(f"`{KERNEL_ENV}` must be `compiled` or `reference`, got `{raw}`")
    return mode


# os.environ.get costs 0.3-0.7 us (it encodes the key); the modules ask on every call, so they
# look in the mapping os.environ keeps (and updates on every change) with the key pre-encoded.
_ENV_DATA: Any = getattr(os.environ, "_data", None)
_ENV_KEY: Any = os.environ.encodekey(KERNEL_ENV) if hasattr(os.environ, "encodekey") else None
_ENV_COMPILED: Any = (os.environ.encodevalue("compiled") if hasattr(os.environ, "encodevalue")
                      else None)


def use_reference(values: Tensor) -> bool:
    """True where the modules use the pure-torch reference for a table whose ``values`` these are:
    non-CPU devices, or ``AMTL_COMPRESS_KERNEL=reference`` (which warns once per process).
    """
    global _warned_reference
    if not values.is_cpu:
        return True
    if _ENV_DATA is not None and _ENV_KEY is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        if raw is None or raw == _ENV_COMPILED:  # the per-call fast path
            return False
    if kernel_mode() == "compiled":
        return False
    if not _warned_reference:
        _warned_reference = True
        warnings.warn(f"{KERNEL_ENV}=reference: using the pure-torch lookup, which is slower than "
                      "the compiled kernel", RuntimeWarning, stacklevel=3)
    return True


def cache_dir() -> Path:
    """Directory holding this build of the kernel: ``<base>/kernels/<torch version>-<hash>``.

    The hash covers the sources and the compiler flags, so any change gets a fresh build.
    """
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "amtl-compress")
    digest = hashlib.sha256()
    for src in sorted([*_CSRC.glob("*.cpp"), *_CSRC.glob("*.h")]):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    digest.update("\0".join(_CFLAGS + _LDFLAGS).encode())
    digest.update(torch.__version__.encode())
    version = torch.__version__.replace("+", "-")
    return base.expanduser() / "kernels" / f"torch{version}-{digest.hexdigest()[:16]}"


def _library_path(directory: Path) -> Path:
    return directory / f"{_LIBRARY_NAME}.so"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps the cache consistent
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's builder runs ``ninja`` from PATH; a venv used without activation lacks it there."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja
    except ImportError:
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _build_into(final: Path) -> None:
    """Compile into a private temporary directory, then rename it to ``final`` atomically.

    Also loads the library into this process (``cpp_extension.load`` does).
    """
    from torch.utils import cpp_extension

    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    print("building the lookup kernel (once, ~1-2 min)...", file=sys.stderr, flush=True)
    try:
        with _ninja_on_path():
            cpp_extension.load(
                name=_LIBRARY_NAME,
                sources=[str(s) for s in _SOURCES],
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(tmp),
                is_python_module=False,
                verbose=False,
            )
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must be readable
        if final.exists():  # a directory without the library (emptied by hand): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as exc:
        log = final.parent / f"{final.name}.build.log"
        with contextlib.suppress(OSError):
            atomic_write_text(log, f"{type(exc).__name__}: {exc}\n")
        cxx = os.environ.get("CXX", "c++")
        raise KernelBuildError(
            f"could not build the lookup kernel with `{cxx}` (details: `{log}`); install a C++ "
            f"compiler (g++ or clang++) and ninja, or set {KERNEL_ENV}=reference to use the "
            "slower pure-torch lookup"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_kernel() -> Path:
    """Load the compiled kernel into this process, building it first if it is not cached.

    Returns the path of the shared library. A failed build raises :class:`KernelBuildError`; the
    same error is raised again on later calls in this process without retrying the build.
    """
    if "path" in _state:
        return _state["path"]  # type: ignore[return-value]
    if "error" in _state:
        raise _state["error"]  # type: ignore[misc]
    final = cache_dir()
    library = _library_path(final)
    try:
        if not library.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(final.parent / f"{final.name}.lock"):
                if not library.exists():  # another process may have built it while we waited
                    _build_into(final)
                    _state["path"] = library
                    return library
        torch.ops.load_library(str(library))
    except KernelBuildError as exc:
        _state["error"] = exc
        raise
    except (OSError, RuntimeError) as exc:  # e.g. a damaged cached library
        err = KernelBuildError(f"could not load the lookup kernel `{library}` ({exc}); delete "
                               f"`{final}` to rebuild it, or set {KERNEL_ENV}=reference")
        _state["error"] = err
        raise err from exc
    _state["path"] = library
    return library


def kernel_available() -> bool:
    """True if the compiled kernel is loaded or can be built and loaded now (a build: ~1-2 min)."""
    try:
        load_kernel()
    except KernelBuildError:
        return False
    return True


def compiled_ops() -> LookupOps:
    """The operators ``(packed_embedding, packed_embedding_bag)``, loading the kernel first.

    Their arguments are those of :func:`packed_embedding` / :func:`packed_embedding_bag`; the
    modules call them directly to keep the per-call Python overhead small. They check every
    looked-up row's offsets (ValueError for a corrupt row) and every id (IndexError).
    """
    global _checked
    if _checked is None:
        load_kernel()
        namespace = torch.ops.amtl_compress
        _checked = LookupOps(namespace.packed_embedding.default,
                             namespace.packed_embedding_bag.default)
    return _checked


def _unchecked_ops() -> LookupOps:
    """The operators that do not check ``offsets`` per row, for the modules only.

    Same arguments as :func:`compiled_ops`' operators (the C++ ``packed_embedding_trusted`` /
    ``packed_embedding_bag_trusted``), but int32 ``offsets`` are not checked per row: only for a
    private copy the caller has validated whole with
    :func:`~amtl_compress.storage.offsets.offsets_problem`; other offsets could make them read
    outside ``values``. Ids are still checked (IndexError); int64 offsets are always checked.
    """
    global _unchecked
    if _unchecked is None:
        compiled_ops()
        namespace = torch.ops.amtl_compress
        _unchecked = LookupOps(namespace.packed_embedding_trusted.default,
                               namespace.packed_embedding_bag_trusted.default)
    return _unchecked


def packed_embedding(values: Tensor, offsets: Tensor, scale: Tensor | None, bias: Tensor | None,
                     ids: Tensor, embedding_dim: int) -> Tensor:
    """Compiled :func:`~amtl_compress.lookup.reference.packed_embedding_reference`.

    Shapes: values (nnz_values,) float32/float16/bfloat16/int8 or int4 as uint8
    (ceil(nnz_values / 2),) (contiguous), offsets (N + 1,) int64, scale/bias (N,) float32 for
    int8 / int4 else None, ids any shape int32/int64.
    Returns (*ids.shape, D) float32. IndexError for ids outside [0, N); ValueError for corrupt
    offsets of a looked-up row.
    """
    return compiled_ops().embedding(values, offsets, scale, bias, ids, embedding_dim)


def packed_embedding_bag(values: Tensor, offsets: Tensor, scale: Tensor | None,
                         bias: Tensor | None, input: Tensor, bag_offsets: Tensor,
                         per_sample_weights: Tensor | None, mode: str, embedding_dim: int,
                         padding_idx: int | None, include_last_offset: bool) -> Tensor:
    """Compiled :func:`~amtl_compress.lookup.reference.packed_embedding_bag_reference`.

    input (nnz,) int32/int64; bag_offsets (B,) or (B + 1,) with ``include_last_offset``;
    per_sample_weights (nnz,) float32 (mode "sum" only). Returns (B, D) float32.
    """
    return compiled_ops().embedding_bag(values, offsets, scale, bias, input, bag_offsets,
                                        per_sample_weights, mode, embedding_dim, padding_idx,
                                        include_last_offset)
