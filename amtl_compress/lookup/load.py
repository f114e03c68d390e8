"""Serving a packed directory: ``load_packed`` swaps its tables into the user's model, in place.

``load_packed`` reads a directory written by :func:`amtl_compress.storage.pack.pack` (the file
readers of :mod:`amtl_compress.storage`), builds a :class:`PackedEmbedding` /
:class:`PackedEmbeddingBag` per table (wrapped in a ``RotatedLookup`` for a version 2 table),
and puts them and the remaining weights into the model; ``load_packed_model`` first builds that
model from the manifest's spec.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from amtl_compress.core.rotation import with_rotation
from amtl_compress.errors import CheckpointError, ConfigError, PackedFormatError
from amtl_compress.lookup.modules import PackedEmbedding, PackedEmbeddingBag
from amtl_compress.models.factory import build_model
from amtl_compress.storage.format import PackedTable, read_packed_table
from amtl_compress.storage.header import read_header, read_tensor
from amtl_compress.storage.manifest import Manifest, ManifestTable, file_sha256, read_manifest

#: The fix for a damaged or inconsistent directory (``pack`` is both the function and the command).
_FIX = "re-create the directory by running `pack` again"


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, checked to exist here (CUDA built in, the GPU visible).

    Raises:
        ConfigError: not a device name torch knows, or a CUDA device this process cannot use.
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"`device={str(device)!r}` is not a device torch knows; pass "
                          "`device='cpu'` or `device='cuda'`") from None
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise ConfigError(f"`device={str(device)!r}` but CUDA is not available ({why}, torch "
                          f"{torch.__version__}); pass `device='cpu'`")
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ConfigError(f"`device={str(device)!r}` but this machine has {count} CUDA "
                          f"device(s), cuda:0 to cuda:{count - 1}; pass one of them")
    return resolved


def load_packed(
    model: nn.Module,
    packed_dir: str | os.PathLike[str],
    mmap: bool = True,
    verify: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Swap packed lookups into ``model`` and load the remaining weights (modified in place).

    Each module path of the manifest must hold an ``nn.Embedding`` / ``nn.EmbeddingBag`` of the
    same kind, N and D as packed; it is replaced by a ``PackedEmbedding`` /
    ``PackedEmbeddingBag`` (``mode``, ``padding_idx`` and ``include_last_offset`` are taken from
    the replaced module). Every other tensor of the model's state_dict must be in
    ``rest.safetensors`` and vice versa. Everything is validated before the model is touched, so
    a failure leaves it unchanged. A directory that ``pack(..., overwrite=True)`` replaces during
    the read is read again, so the model gets one complete version, never a mix
    (docs/reliability.md).

    Args:
        model: the model the directory was packed from, e.g. ``build_model(manifest.model)``.
        packed_dir: directory written by :func:`amtl_compress.storage.pack.pack`.
        mmap: memory-map each table's ``values`` (tables larger than RAM stay on disk).
        verify: also check every file's SHA-256 against the manifest (reads every byte; slow for
            large tables). Header and offsets validation always runs.
        device: where to serve the model, e.g. ``"cuda"``: the packed tables are copied there
            (lookups on CUDA run the Triton kernels, docs/lookup.md), then the whole model is
            moved with ``model.to(device)``. None (default) leaves the tables on the CPU
            (memory-mapped with ``mmap``) and the model where it is. Checked first
            (:func:`resolve_device`); a failure while moving (out of GPU memory) can leave the
            model partly moved.

    Returns:
        ``model``, whose packed tables now return float32 (.., D) rows zero-padded past L_i
        (times the table's ``rotation`` for a version 2 table: a ``RotatedLookup`` around the
        packed module).

    Raises:
        PackedFormatError: the directory or a file violates docs/format.md, or (verify) a
            checksum differs.
        CheckpointError: the model does not fit the directory (missing or wrong module, N/D or
            kind mismatch, missing/unexpected/misshapen weights).
        ConfigError: ``device`` is not a device this process can use.
    """
    packed_dir = Path(packed_dir)
    target = None if device is None else resolve_device(device)
    return _apply(model, packed_dir, *_read_snapshot(packed_dir, mmap, verify), device=target)


def _apply(
    model: nn.Module,
    packed_dir: Path,
    manifest: Manifest,
    tables: dict[str, PackedTable],
    rest: dict[str, torch.Tensor],
    device: torch.device | None = None,
) -> nn.Module:
    """Check that one read version of a packed directory fits ``model``, then put it in (and
    move the model to ``device`` unless None)."""
    replacements: dict[str, nn.Module] = {}
    for path, table in tables.items():
        old = _module_at(model, path)
        kind = manifest.tables[path].kind
        _check_fits(old, path, kind, table)
        common = {"scale": table.scale, "bias": table.bias, "name": path}
        if isinstance(old, nn.EmbeddingBag):
            replacement: nn.Module = PackedEmbeddingBag(
                table.values, table.offsets, table.embedding_dim, mode=old.mode,
                padding_idx=old.padding_idx, include_last_offset=old.include_last_offset,
                **common,
            )
        else:
            replacement = PackedEmbedding(
                table.values, table.offsets, table.embedding_dim, **common
            )
        if table.rotation is not None:
            # Version 2 (docs/format.md): the padded rows are rotated back, as in fine-tuning.
            replacement = with_rotation(replacement, table.rotation)
        # Each table goes to the device before the model changes: running out of GPU memory
        # here leaves the model as it was.
        replacements[path] = replacement if device is None else replacement.to(device)

    _check_rest(model, rest, set(tables), packed_dir / manifest.rest_file)
    # A model built on the meta device (no memory behind its dense tables) takes the loaded
    # tensors as they are; anything the state_dict cannot fill would stay without data.
    on_meta = any(t.is_meta for t in model.state_dict().values())
    if on_meta:
        _check_no_meta_outside_state(model, set(tables))

    # Validation is over: from here on the model changes.
    with torch.no_grad():
        model.load_state_dict(rest, strict=False, assign=on_meta)
    for path, module in replacements.items():
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
    if device is not None:
        model.to(device)  # the packed tables are there already: only the rest moves
    return model


#: How often a reader retries when ``pack(..., overwrite=True)`` replaced the directory while it
#: read.
_READ_ATTEMPTS = 5


def _identity(directory: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read_snapshot(
    packed_dir: Path, mmap: bool, verify: bool
) -> tuple[Manifest, dict[str, PackedTable], dict[str, torch.Tensor]]:
    """Read the manifest, every table and the rest weights of one complete version.

    ``pack(..., overwrite=True)`` swaps a new directory in under the same name while this reads;
    a read that straddles the swap would mix files of two versions. So the directory's inode is
    compared before and after, and the read is repeated when it changed (mapped files of the old
    version stay valid after it is deleted).
    """
    for attempt in range(_READ_ATTEMPTS):
        before = _identity(packed_dir)
        try:
            manifest = read_manifest(packed_dir)
            if verify:
                _verify_checksums(packed_dir, manifest)
            tables = {path: _read_table(packed_dir, path, entry, mmap)
                      for path, entry in manifest.tables.items()}
            rest = _read_rest(packed_dir / manifest.rest_file)
        except (PackedFormatError, OSError):
            now = _identity(packed_dir)
            if attempt + 1 < _READ_ATTEMPTS and (now != before or now is None):
                if now is None:  # between the two renames of a replace without renameat2
                    time.sleep(0.05)
                continue
            raise
        if _identity(packed_dir) == before:
            return manifest, tables, rest
    raise PackedFormatError(
        f"`{packed_dir}` was replaced {_READ_ATTEMPTS} times while being read; retry once "
        "`pack` has finished"
    )


def _read_table(packed_dir: Path, path: str, entry: ManifestTable, mmap: bool) -> PackedTable:
    file = packed_dir / entry.file
    table = read_packed_table(file, mmap=mmap)
    listed = (path, entry.num_embeddings, entry.embedding_dim, entry.dtype)
    found = (table.field, table.num_embeddings, table.embedding_dim, table.dtype)
    if listed != found:
        raise PackedFormatError(
            f"`{file}` holds (field, N, D, dtype) = {found} but `manifest.json` lists "
            f"{listed}; {_FIX}"
        )
    return table


def _verify_checksums(packed_dir: Path, manifest: Manifest) -> None:
    expected = {t.file: t.sha256 for t in manifest.tables.values()}
    expected[manifest.rest_file] = manifest.rest_sha256
    for name, sha in expected.items():
        if file_sha256(packed_dir / name) != sha:
            raise PackedFormatError(
                f"`{packed_dir / name}`: SHA-256 differs from `manifest.json` (corrupted or "
                f"modified file); {_FIX}"
            )


def _module_at(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(
            f"the model has no module `{path}`, which the packed directory replaces; pass the "
            "model it was packed from"
        ) from None


def _check_fits(module: nn.Module, path: str, kind: str, table: PackedTable) -> None:
    # EmbeddingBag first: a user subclass of both is treated as the bag it behaves like.
    found = (
        "EmbeddingBag" if isinstance(module, nn.EmbeddingBag)
        else "Embedding" if isinstance(module, nn.Embedding)
        else type(module).__name__
    )
    if found != kind:
        raise CheckpointError(
            f"module `{path}` is a `{found}` but was packed from a `{kind}`; pass the model it "
            "was packed from"
        )
    dims = (module.num_embeddings, module.embedding_dim)
    if dims != (table.num_embeddings, table.embedding_dim):
        raise CheckpointError(
            f"module `{path}` is ({dims[0]}, {dims[1]}) but its packed table is "
            f"({table.num_embeddings}, {table.embedding_dim}); pass the model it was packed from"
        )
    if module.max_norm is not None:
        raise CheckpointError(
            f"module `{path}` renormalises rows (max_norm={module.max_norm}), which a packed "
            "table cannot do; build the model without max_norm"
        )


def _read_rest(path: Path) -> dict[str, torch.Tensor]:
    header = read_header(path, PackedFormatError, _FIX)
    return {name: read_tensor(path, entry) for name, entry in header.tensors.items()}


def _check_rest(
    model: nn.Module, rest: dict[str, torch.Tensor], packed: set[str], rest_file: Path
) -> None:
    """The strict state_dict check, minus the weights that the packed tables replace."""
    own = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if not any(name.startswith(f"{p}.") for p in packed)
    }
    missing = sorted(own.keys() - rest.keys())
    unexpected = sorted(rest.keys() - own.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {_some(unexpected)}")
        raise CheckpointError(
            f"`{rest_file}` does not fit the model ({'; '.join(parts)}); pass the model it was "
            "packed from"
        )
    for name, tensor in rest.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"`{rest_file}` tensor `{name}` has shape {list(tensor.shape)} but the model's "
                f"is {list(own[name].shape)}; pass the model it was packed from"
            )


def _check_no_meta_outside_state(model: nn.Module, packed: set[str]) -> None:
    """Meta tensors that neither ``rest`` nor a packed table will replace (non-persistent)."""
    in_state = set(model.state_dict())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta and name not in in_state and not any(
            name.startswith(f"{p}.") for p in packed
        ):
            raise CheckpointError(
                f"the model's `{name}` is on the meta device but is not in its state_dict, so "
                "no file can fill it; build the model on a real device (e.g. cpu)"
            )


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_packed_model(
    packed_dir: str | os.PathLike[str], factory: str | None = None, mmap: bool = True,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build the model named by the manifest's spec (or ``factory``) and :func:`load_packed` it.

    Args:
        packed_dir: directory written by :func:`amtl_compress.storage.pack.pack`.
        factory: ``package.module:function`` overriding the manifest's model spec.
        device: where to serve it (``"cuda"``), as in :func:`load_packed`; None: the CPU.

    The model is built on the meta device, so its dense tables never take memory (a table larger
    than RAM stays on disk, memory-mapped); a model that keeps tensors outside its state_dict
    (non-persistent buffers) is built on the CPU instead.

    Returns:
        The model in eval mode, with its packed tables swapped in.
    """
    packed_dir = Path(packed_dir)
    target = None if device is None else resolve_device(device)
    # One read serves both the spec and the weights, so a concurrent replace cannot pair the
    # old version's model with the new version's tables.
    snapshot = _read_snapshot(packed_dir, mmap, verify=False)
    spec = {"kind": "factory", "factory": factory} if factory else snapshot[0].model
    model = build_model(spec, device="meta")
    in_state = set(model.state_dict())
    if any(name not in in_state for name, _ in model.named_buffers()):
        model = build_model(spec)
    return _apply(model, packed_dir, *snapshot, device=target).eval()
