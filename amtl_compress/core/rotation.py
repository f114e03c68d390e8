"""Dimension ordering: an orthogonal rotation that puts a trained table's information first.

AMTL keeps a prefix of every row (Eq. 1), but the dimensions of a trained table have no
importance order, so "keep the first k" cuts arbitrary information at attach time. With
``AMTLConfig(ordering="pca")`` :func:`~amtl_compress.surgery.attach.attach_amtl_` rotates each
table onto its principal axes (the eigenvectors of W^T W, largest eigenvalue first) and undoes the
rotation after the lookup::

    R = f16(Q^T)          the (D, D) ``rotation``: float16 values, kept in float32
    W' = W R^{-1}         (N, D) stored and masked (solved in float64); column j of W' is the
                          j-th principal axis (up to R's rounding)
    e_i = m_i * W'[i]     Eq. 1 on the rotated row
    out_i = e_i R

At full length ``out_i = W[i] R^{-1} R = W[i]`` up to float32 rounding, so the warm start keeps
the model's outputs; a prefix of a rotated row keeps (to R's rounding) as much of the table's
energy (sum of squares) as any k dims can. R is rounded to float16 values so that a float32 pack
stores it in 2 bytes an entry without loss (docs/format.md, "Rotation"); it is then not exactly
orthogonal, which is why W' is W R^{-1} rather than W Q (:func:`onto_principal_axes`).
Pooling commutes with R for mode sum and mean bags (R is applied after pooling), not for max
bags, which are rejected.

The modules here hold a plain (or packed) table plus R; their state_dict keys are the table's
own plus ``<path>.rotation``, so a rotated model's checkpoint loads with
:func:`amtl_compress.checkpoint.load_model`. What walks a user's model (rotate its tables, find
the rotations of a checkpoint) is in :mod:`amtl_compress.surgery.rotate`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from amtl_compress.errors import SurgeryError

#: Values of ``AMTLConfig.ordering``: ``"none"`` keeps the table's own dims, ``"pca"`` rotates.
ORDERINGS = ("none", "pca")
#: Suffix of a rotation's state_dict key: ``<module path>.rotation``.
ROTATION_KEY = "rotation"
#: Rows of W multiplied at a time in float64 by :func:`onto_principal_axes` (bounds its memory).
_CHUNK_ROWS = 65536


@torch.no_grad()
def principal_axes(weight: Tensor) -> Tensor:
    """The rotation R = Q^T whose rows are the principal axes of a table's rows.

    Q holds the eigenvectors of the uncentred second moment W^T W (the dot products a model
    computes are uncentred), ordered by decreasing eigenvalue, so ``W @ Q`` concentrates the
    rows' energy in the leading dims. Computed in float64, returned in float32.

    Args:
        weight: float (N, D), the trained table.

    Returns:
        float32 (D, D) orthogonal R (``R @ R.T`` = I up to float32 rounding).
    """
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    return _axes_of(w.T @ w)


def _axes_of(gram: Tensor) -> Tensor:
    """R = Q^T (float32 (D, D)) from a float64 (D, D) second moment W^T W (see
    :func:`principal_axes`)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    q = eigenvectors[:, eigenvalues.argsort(descending=True)]
    # eigh's signs are arbitrary; make each axis' largest component positive so R is
    # reproducible across LAPACK builds.
    sign = torch.sign(q.gather(0, q.abs().argmax(dim=0, keepdim=True)))
    q = q * torch.where(sign == 0, 1.0, sign)
    return q.T.contiguous().float()


def float16_exact(rotation: Tensor) -> Tensor:
    """``rotation`` rounded to the nearest float16 values (ties to even), kept in float32.

    Entries of a rotation are in [-1, 1], so nothing overflows; each moves by at most 2^-11 of
    itself (2^-25 absolute in float16's subnormal range).
    """
    return rotation.detach().to(torch.float16).to(torch.float32)


@torch.no_grad()
def onto_principal_axes(weight: Tensor, rotation: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A table rotated onto its principal axes with a float16-exact rotation: (W', R).

    The model computes ``E = W`` (or ``E = W R0`` for a table already rotated by an earlier run,
    ``rotation`` = R0). With Q the principal axes of E (:func:`principal_axes`), R =
    :func:`float16_exact` (Q^T) and ``W' = E R^{-1}``, computed in float64 and rounded once to
    ``weight``'s dtype, so ``W' R`` reproduces E to that rounding, as ``W Q Q^T`` did. R's
    entries are float16 values (a float32 pack stores them as such, losslessly). R differs from
    the orthogonal Q^T by at most 2^-11 of each entry, so every singular value of R is within
    2^-11 sqrt(D) of 1 (1.004 at D = 64, 1.125 at D = 65536): R is always invertible and well
    conditioned. For a composed table, R replaces R0 (R ~ Q^T R0 with Q the axes of W), so the
    composition is float16-exact too.

    Args:
        weight: float (N, D), the table as stored (W, or W' of an earlier run).
        rotation: float32 (D, D) R0 applied after the lookup, or None.

    Returns:
        (W' of ``weight``'s dtype and device (N, D), R float32 (D, D) on ``weight``'s device,
        every entry a float16 value).
    """
    w = weight.detach()
    gram = _gram(w)
    carried = None if rotation is None else rotation.detach().to("cpu", torch.float64)
    if carried is not None:
        gram = carried.T @ gram @ carried  # second moment of E = W R0
    axes = float16_exact(_axes_of(gram))
    # W' = E R^{-1} = W (R0 R^{-1}): one (D, D) float64 factor, applied chunk by chunk.
    inverse = torch.linalg.inv(axes.double())
    factor = inverse if carried is None else carried @ inverse
    factor = factor.to(w.device)
    rotated = torch.empty_like(w)
    for start in range(0, w.shape[0], _CHUNK_ROWS):
        rows = w[start : start + _CHUNK_ROWS]
        rotated[start : start + rows.shape[0]] = (rows.double() @ factor).to(w.dtype)
    return rotated, axes.to(w.device)


def _gram(weight: Tensor) -> Tensor:
    """W^T W in float64 on the CPU, (D, D), summed over row chunks (no float64 copy of W)."""
    d = weight.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, weight.shape[0], _CHUNK_ROWS):
        rows = weight[start : start + _CHUNK_ROWS].to("cpu", torch.float64)
        gram += rows.T @ rows
    return gram


def rotate_rows(rows: Tensor, rotation: Tensor) -> Tensor:
    """``rows @ rotation`` over the last dim: (..., D) x (D, D) -> (..., D), the rows' dtype.

    Every rotated module (masked, plain, packed) calls this one function, so the fine-tuned model
    and its float32 packed twin run the same op on the same inputs and agree bitwise.
    """
    shape = rows.shape
    return torch.mm(rows.reshape(-1, shape[-1]), rotation.to(rows.dtype)).reshape(shape)


class RotatedEmbedding(nn.Embedding):
    """``nn.Embedding`` whose looked-up rows are multiplied by ``rotation`` (D, D) float32.

    ids int64 (any shape) -> float (*ids.shape, D). state_dict: ``weight`` (N, D), ``rotation``.
    """

    rotation: Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs: object) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)  # type: ignore[arg-type]
        self.register_buffer("rotation", torch.eye(embedding_dim))

    def forward(self, input: Tensor) -> Tensor:
        return rotate_rows(super().forward(input), self.rotation)


class RotatedEmbeddingBag(nn.EmbeddingBag):
    """``nn.EmbeddingBag`` (mode sum or mean) whose pooled rows are multiplied by ``rotation``.

    Same call as the base; returns float (B, D). state_dict: ``weight`` (N, D), ``rotation``.
    """

    rotation: Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs: object) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)  # type: ignore[arg-type]
        self.register_buffer("rotation", torch.eye(embedding_dim))

    def forward(
        self,
        input: Tensor,
        offsets: Tensor | None = None,
        per_sample_weights: Tensor | None = None,
    ) -> Tensor:
        return rotate_rows(super().forward(input, offsets, per_sample_weights), self.rotation)


class RotatedLookup(nn.Module):
    """Any lookup module (e.g. ``PackedEmbedding``) followed by ``rotation`` (D, D).

    Args:
        table: the lookup; its outputs are float (..., D).
        rotation: float32 (D, D).
    """

    rotation: Tensor

    def __init__(self, table: nn.Module, rotation: Tensor) -> None:
        super().__init__()
        self.table = table
        self.register_buffer("rotation", rotation.detach().to(torch.float32).contiguous())

    @property
    def embedding_dim(self) -> int:
        return int(self.rotation.shape[0])

    def forward(self, *args: Tensor | None, **kwargs: Tensor | None) -> Tensor:
        return rotate_rows(self.table(*args, **kwargs), self.rotation)


def with_rotation(table: nn.Module, rotation: Tensor) -> nn.Module:
    """A rotated module that shares ``table``'s parameters (no copy).

    ``nn.Embedding`` -> :class:`RotatedEmbedding`, ``nn.EmbeddingBag`` ->
    :class:`RotatedEmbeddingBag` (their state_dict keys stay ``weight`` + ``rotation``), any other
    module -> :class:`RotatedLookup`.
    """
    rotation = rotation.detach().to(torch.float32).contiguous()
    if isinstance(table, (RotatedEmbedding, RotatedEmbeddingBag, RotatedLookup)):
        raise SurgeryError(f"`{type(table).__name__}` is already rotated; rotate a plain table")
    if isinstance(table, nn.EmbeddingBag):
        kind: type[nn.Module] = RotatedEmbeddingBag
    elif isinstance(table, nn.Embedding):
        kind = RotatedEmbedding
    else:
        return RotatedLookup(table, rotation)
    rotated = kind.__new__(kind)
    rotated.__dict__.update(table.__dict__)  # same hyper-parameters, same Parameter object
    rotated._parameters = dict(table._parameters)
    rotated._buffers = dict(table._buffers)
    rotated._modules = dict(table._modules)
    rotated.register_buffer("rotation", rotation.to(table.weight.device))
    return rotated


def unrotated(table: nn.Module) -> tuple[nn.Module, Tensor | None]:
    """Inverse of :func:`with_rotation`: (the plain table sharing the weights, rotation or None)."""
    if isinstance(table, RotatedLookup):
        return table.table, table.rotation
    if isinstance(table, (RotatedEmbedding, RotatedEmbeddingBag)):
        kind = nn.EmbeddingBag if isinstance(table, nn.EmbeddingBag) else nn.Embedding
        plain = kind.__new__(kind)
        plain.__dict__.update(table.__dict__)
        plain._parameters = dict(table._parameters)
        plain._buffers = {k: v for k, v in table._buffers.items() if k != ROTATION_KEY}
        plain._modules = dict(table._modules)
        return plain, table.rotation
    return table, None
