"""Drop-in ``nn.Embedding`` / ``nn.EmbeddingBag`` replacements that read a packed table.

Both modules hold only buffers (no Parameters): ``values`` (nnz_values,) float32/float16/
bfloat16/int8 or int4 (uint8, two values a byte), ``offsets`` (N + 1,) int64 and, for int8 /
int4, ``scale`` / ``bias`` (N,) float32. See :mod:`amtl_compress.lookup.reference` for the
layout. ``values`` is only ever read, so it may
be a read-only memory map (``torch.from_numpy(np.memmap(..., mode="r"))``).

On CPU they call the compiled kernel (:mod:`amtl_compress.lookup.ops`); on CUDA the Triton kernels
(:mod:`amtl_compress.lookup.triton_ops`, where Triton imports); on other devices, or with
``AMTL_COMPRESS_KERNEL=reference``, the pure-torch reference. All give the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from amtl_compress.errors import PackedFormatError
from amtl_compress.lookup import ops, triton_ops
from amtl_compress.lookup.reference import (
    BAG_MODES,
    QUANTIZED_DTYPES,
    VALUE_DTYPES,
    packed_embedding_bag_reference,
    packed_embedding_reference,
)
from amtl_compress.storage.offsets import offsets_problem

_BUFFERS = ("values", "offsets", "scale", "bias")


def _num_values(values: Tensor, offsets: Tensor) -> int | None:
    """S, the values a table holds: ``len(values)``, or for int4 (uint8, two a byte)
    ``offsets[N]`` when ``values`` has exactly ceil(S / 2) bytes for it; None when it has not."""
    if values.dtype != torch.uint8:
        return values.numel()
    if offsets.numel() < 1:
        return None
    s = int(offsets[-1])
    return s if s >= 0 and (s + 1) // 2 == values.numel() else None


def _validate(table: str, values: Tensor, offsets: Tensor, scale: Tensor | None,
              bias: Tensor | None, embedding_dim: int) -> None:
    """Check a whole packed table (O(N), never reads ``values``); raise PackedFormatError.

    The offsets part is the one offsets rule (:mod:`amtl_compress.storage.offsets`) with lower
    bound 0: a table built in memory may have empty rows, looked up as D zeros.
    """
    where = f"table `{table}`"
    if not isinstance(embedding_dim, int) or embedding_dim < 1:
        raise PackedFormatError(f"{where}: `embedding_dim` must be a positive int, got "
                                f"{embedding_dim!r}")
    if not isinstance(values, Tensor) or values.dim() != 1 or values.dtype not in VALUE_DTYPES:
        got = f"{values.dim()}-D {values.dtype}" if isinstance(values, Tensor) else type(values)
        raise PackedFormatError(f"{where}: `values` must be a 1-D float32/float16/bfloat16/int8 "
                                f"or uint8 (int4) tensor, got {got}")
    if (not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.dtype != torch.int64
            or offsets.numel() < 1):
        raise PackedFormatError(f"{where}: `offsets` must be a non-empty 1-D int64 tensor "
                                "(N + 1,)")
    n = offsets.numel() - 1
    num_values = _num_values(values, offsets)
    if num_values is None:  # int4: S = offsets[N] values in ceil(S / 2) bytes
        raise PackedFormatError(f"{where}: int4 (uint8) `values` must hold ceil(S / 2) bytes "
                                f"for S = offsets[N] = {int(offsets[-1])} values, got "
                                f"{values.numel()} bytes")
    problem = offsets_problem(offsets, num_values, embedding_dim)
    if problem is not None:
        raise PackedFormatError(f"{where}: {problem}; `offsets` must start at 0, rise by 0 to "
                                f"embedding_dim = {embedding_dim} per row and end at "
                                f"len(values) = {num_values}")
    quantized = values.dtype in QUANTIZED_DTYPES
    for label, t in (("scale", scale), ("bias", bias)):
        if quantized and (t is None or t.dtype != torch.float32 or t.shape != (n,)):
            raise PackedFormatError(f"{where}: int8 / int4 (uint8) `values` need `{label}` "
                                    f"float32 of shape ({n},)")
        if not quantized and t is not None:
            raise PackedFormatError(f"{where}: `{label}` is only used with int8 / int4 (uint8) "
                                    f"`values`; drop it or quantize `values` (got "
                                    f"{values.dtype})")
    devices = {t.device for t in (values, offsets, scale, bias) if t is not None}
    if len(devices) > 1:
        raise PackedFormatError(f"{where}: all tensors must be on one device, got "
                                f"{sorted(map(str, devices))}")


class _KernelOffsets(NamedTuple):
    """The int32 copy of ``offsets`` the kernel reads, and what it was derived from.

    Valid while ``source`` is still the offsets buffer (same object; unchanged version unless an
    inference tensor, which has no version counter), ``values`` is the same object of the same
    length and ``embedding_dim`` is unchanged; see ``_PackedLookup._kernel_offsets``.
    """

    source: Tensor  # the int64 offsets buffer it was derived from
    inference: bool  # source is an inference tensor: keyed by identity alone
    version: int  # source._version when derived (-1 for an inference tensor)
    derived: Tensor  # what the kernel reads: the int32 copy, or source itself
    values: Tensor  # the values buffer it was validated against
    num_values: int
    embedding_dim: int
    unchecked: bool  # derived is a validated private copy: the unchecked operators may read it


class _PackedLookup(nn.Module):
    """Buffers and state_dict handling shared by the two lookup modules."""

    values: Tensor
    offsets: Tensor
    scale: Tensor | None
    bias: Tensor | None

    def __init__(self, values: Tensor, offsets: Tensor, embedding_dim: int,
                 scale: Tensor | None, bias: Tensor | None, name: str) -> None:
        super().__init__()
        self.name = name
        self.embedding_dim = embedding_dim
        _validate(self._table_name, values, offsets, scale, bias, embedding_dim)
        # .contiguous() is a no-op (no copy) for the usual contiguous / memory-mapped inputs.
        self.register_buffer("values", values.detach().contiguous())
        self.register_buffer("offsets", offsets.detach().contiguous())
        self.register_buffer("scale", None if scale is None else scale.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self._offsets_cache: _KernelOffsets | None = None  # see _kernel_offsets

    @property
    def _table_name(self) -> str:
        return self.name or type(self).__name__

    @property
    def num_embeddings(self) -> int:
        """N, the number of rows."""
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> Tensor:
        """(N,) int64: kept values per row, ``offsets[1:] - offsets[:-1]`` (L_i = k_i + 1)."""
        return self.offsets[1:] - self.offsets[:-1]

    def _kernel_offsets(self, offsets: Tensor, values: Tensor) -> tuple[Tensor, bool]:
        """``offsets`` as the kernels (compiled, or Triton on CUDA) read it, and whether they may
        skip per-row checks.

        An int32 copy when len(values) < 2^31: half the bytes of the (N + 1,) index each lookup
        goes through, so more of it stays in cache. Derived in memory only (state_dict keeps the
        int64 buffer) and rebuilt when the buffer is replaced or edited in place (its version
        counter moves; inference-mode tensors have none and are keyed by identity), or when
        ``values`` or ``embedding_dim`` change. The copy is validated whole when derived (O(N),
        once): if it is a valid packed index for the current ``values`` and D
        (:func:`~amtl_compress.storage.offsets.offsets_problem`), the unchecked operators skip
        the per-row offset checks (ids are still checked). The copy is private, so nothing can
        edit it after the check; anything else takes the checked operators.
        """
        cached = self._offsets_cache
        # Inference-mode tensors have no version counter (reading it raises, slowly): keyed by
        # identity alone, a flag the cache keeps so the hot path asks nothing else.
        if (cached is not None and cached.source is offsets and cached.values is values
                and (cached.inference or cached.version == offsets._version)
                and cached.num_values == values.numel()
                and cached.embedding_dim == self.embedding_dim):
            return cached.derived, cached.unchecked
        inference = offsets.is_inference()
        unchecked = False
        # Values the table holds (int4: S = offsets[N]); None (no valid copy: the checked
        # operators) if the buffers changed since _validate.
        num_values = _num_values(values, offsets)
        if (num_values is not None and num_values < 2**31 and offsets.dtype == torch.int64
                and offsets.numel() >= 1):
            derived = offsets.to(torch.int32)
            # The copy itself is checked: it is the very tensor the unchecked operators read.
            unchecked = offsets_problem(derived, num_values, self.embedding_dim) is None
        else:
            derived = offsets
        self._offsets_cache = _KernelOffsets(
            offsets, inference, -1 if inference else offsets._version, derived, values,
            values.numel(), self.embedding_dim, unchecked)
        return derived, unchecked

    def _index_error(self, ids: Tensor, exc: IndexError) -> IndexError:
        """``exc`` restated with the table name and N (``exc`` itself if no id is out of range)."""
        n = self.num_embeddings
        bad = ids[(ids < 0) | (ids >= n)]
        if not bad.numel():
            return exc
        return IndexError(f"table `{self._table_name}`: id {int(bad[0])} is outside [0, {n}) "
                          f"({bad.numel()} such ids); ids must be row numbers of this table")

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # The default copies into the existing buffers, which needs equal shapes; a packed table
        # of another checkpoint has other sizes, so take the incoming tensors as they are (moved to
        # this module's device). Shares memory with the state_dict where no move is needed.
        incoming: dict[str, Tensor | None] = {}
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict:
                incoming[name] = state_dict[key]
            elif self._buffers.get(name) is not None:
                missing_keys.append(key)
            else:
                incoming[name] = None
        if strict:
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k[len(prefix):] not in _BUFFERS)
        if len(incoming) < len(_BUFFERS):
            return  # reported through missing_keys
        device = self.offsets.device
        moved = {k: None if t is None else t.detach().to(device).contiguous()
                 for k, t in incoming.items()}
        _validate(self._table_name, moved["values"], moved["offsets"], moved["scale"],
                  moved["bias"], self.embedding_dim)
        for name, t in moved.items():
            self._buffers[name] = t
        self._offsets_cache = None  # would be rebuilt anyway; frees the old copy now

    def _apply(self, fn: Any, recurse: bool = True) -> _PackedLookup:
        self._offsets_cache = None  # .to() / .cpu() / ... replace the buffers: drop the old copy
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        int4 = self.values.dtype == torch.uint8
        kept = int(self.offsets[-1]) if int4 else self.values.numel()
        return (f"{self.num_embeddings}, {self.embedding_dim}, name={self._table_name!r}, "
                f"values={'int4' if int4 else self.values.dtype}, kept={kept}")


class PackedEmbedding(_PackedLookup):
    """``nn.Embedding`` over a packed table: ids of any shape -> (*ids.shape, D) float32.

    Row ``i`` comes back as its kept prefix (dequantised for int8 / int4) followed by zeros.

    Args:
        values: (nnz_values,) float32/float16/bfloat16/int8, kept prefixes back to back, or for
            int4 a uint8 tensor of ceil(nnz_values / 2) bytes, two values a byte (low nibble
            first; :mod:`amtl_compress.lookup.reference`).
        offsets: (N + 1,) int64, ``offsets[0] == 0``, every row length
            ``offsets[i+1] - offsets[i]`` in [0, embedding_dim] (an empty row is looked up as
            zeros), ``offsets[N] == len(values)``.
        embedding_dim: D.
        scale, bias: (N,) float32, required with int8 / int4 values (value = q * scale + bias).
        name: the table's name, used in error messages (e.g. the module path it replaces).

    Raises:
        PackedFormatError: the tensors do not form a valid packed table.
    """

    def __init__(self, values: Tensor, offsets: Tensor, embedding_dim: int,
                 scale: Tensor | None = None, bias: Tensor | None = None, name: str = "") -> None:
        super().__init__(values, offsets, embedding_dim, scale, bias, name)

    def forward(self, input: Tensor) -> Tensor:
        """Look up ``input`` (any shape, int32/int64, in [0, N)) -> (*input.shape, D) float32.

        Raises IndexError (naming the table and N) for ids outside [0, N).
        """
        # self._buffers instead of attribute access: nn.Module.__getattr__ costs ~0.5 us a name.
        b = self._buffers
        values = b["values"]
        try:
            if ops.use_reference(values):  # not on CPU, or the reference forced
                if triton_ops.use_triton(values):
                    offsets, unchecked = self._kernel_offsets(b["offsets"], values)
                    return triton_ops.packed_embedding_triton(
                        values, offsets, b["scale"], b["bias"], input, self.embedding_dim,
                        checked=not unchecked)
                return packed_embedding_reference(values, b["offsets"], b["scale"], b["bias"],
                                                  input, self.embedding_dim)
            offsets, unchecked = self._kernel_offsets(b["offsets"], values)
            op = (ops._unchecked_ops() if unchecked else ops.compiled_ops()).embedding
            return op(values, offsets, b["scale"], b["bias"], input, self.embedding_dim)
        except IndexError as exc:
            raise self._index_error(input, exc) from None


class PackedEmbeddingBag(_PackedLookup):
    """``nn.EmbeddingBag`` over a packed table: pooled (B, D) float32 per bag.

    Pools straight from the packed rows (no padded copy per id), with torch's arithmetic: for
    float32 values the result is bitwise ``F.embedding_bag`` on the dense zero-tailed table.

    Args:
        values, offsets, embedding_dim, scale, bias, name: the packed table, as in
            :class:`PackedEmbedding`.
        mode: "sum", "mean" or "max".
        padding_idx: ids equal to it are skipped (and not counted by "mean"); negative values
            count from the end, as in ``nn.EmbeddingBag``.
        include_last_offset: ``offsets`` passed to forward has B + 1 entries, the last == nnz.
    """

    def __init__(self, values: Tensor, offsets: Tensor, embedding_dim: int,
                 scale: Tensor | None = None, bias: Tensor | None = None, mode: str = "mean",
                 padding_idx: int | None = None, include_last_offset: bool = False,
                 name: str = "") -> None:
        super().__init__(values, offsets, embedding_dim, scale, bias, name)
        if mode not in BAG_MODES:
            raise ValueError(f"table `{self._table_name}`: mode must be one of sum, mean, max, "
                             f"got {mode!r}")
        n = self.num_embeddings
        if padding_idx is not None:
            if not -n <= padding_idx < n:
                raise ValueError(f"table `{self._table_name}`: padding_idx must be within "
                                 f"[-{n}, {n}), got {padding_idx}")
            padding_idx = padding_idx % n
        self.mode = mode
        self.padding_idx = padding_idx
        self.include_last_offset = include_last_offset

    def forward(self, input: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        """Pool bags of ids, like ``nn.EmbeddingBag.forward``.

        Args:
            input: (nnz,) ids with ``offsets`` (B,) (or (B + 1,) with include_last_offset), or
                (B, bag_len) ids without offsets (fixed-length bags).
            offsets: start of each bag in ``input`` (1-D input only).
            per_sample_weights: float32 of input's shape, mode "sum" only.

        Returns:
            (B, D) float32; empty bags give zeros.
        """
        if per_sample_weights is not None and input.shape != per_sample_weights.shape:
            raise ValueError(f"embedding_bag: If per_sample_weights ({per_sample_weights.shape}) "
                             f"is not None, then it must have the same shape as the input "
                             f"({input.shape})")
        include_last_offset = self.include_last_offset
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("if input is 2D, then offsets has to be None, as input is "
                                 "treated is a mini-batch of fixed length sequences")
            bags, bag_len = input.shape
            offsets = torch.arange(bags, dtype=input.dtype, device=input.device) * bag_len
            input = input.reshape(-1)
            include_last_offset = False
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        elif input.dim() == 1:
            if offsets is None:
                raise ValueError("offsets has to be a 1D Tensor but got None")
            if offsets.dim() != 1:
                raise ValueError("offsets has to be a 1D Tensor")
        else:
            raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension "
                             f"{input.dim()}")
        if per_sample_weights is not None and self.mode != "sum":
            raise NotImplementedError(
                "embedding_bag: per_sample_weights was not None. per_sample_weights is only "
                f"supported for mode='sum' (got mode='{self.mode}'). Please either set "
                "mode='sum' or don't pass per_sample_weights.")
        b = self._buffers
        values = b["values"]
        try:
            if ops.use_reference(values):  # not on CPU, or the reference forced
                if triton_ops.use_triton(values):
                    kernel_offsets, unchecked = self._kernel_offsets(b["offsets"], values)
                    return triton_ops.packed_embedding_bag_triton(
                        values, kernel_offsets, b["scale"], b["bias"], input, offsets,
                        per_sample_weights, self.mode, self.embedding_dim, self.padding_idx,
                        include_last_offset, checked=not unchecked)
                return packed_embedding_bag_reference(
                    values, b["offsets"], b["scale"], b["bias"], input, offsets,
                    per_sample_weights, self.mode, self.embedding_dim, self.padding_idx,
                    include_last_offset)
            kernel_offsets, unchecked = self._kernel_offsets(b["offsets"], values)
            op = (ops._unchecked_ops() if unchecked else ops.compiled_ops()).embedding_bag
            return op(values, kernel_offsets, b["scale"], b["bias"], input, offsets,
                      per_sample_weights, self.mode, self.embedding_dim, self.padding_idx,
                      include_last_offset)
        except IndexError as exc:
            raise self._index_error(input, exc) from None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, mode={self.mode!r}, padding_idx={self.padding_idx}, "
                f"include_last_offset={self.include_last_offset}")
