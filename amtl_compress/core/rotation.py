"""Dimension ordering: an orthogonal rotation that puts a trained table's information first.

AMTL keeps a prefix of every row (Eq. 1), but the dimensions of a trained table have no
importance order, so "keep the first k" cuts arbitrary information at attach time. With
``AMTLConfig(ordering="pca")`` :func:`~amtl_compress.surgery.attach.attach_amtl_` rotates each
table onto its principal axes (the eigenvectors of W^T W, largest eigenvalue first) and undoes the
rotation after the lookup::

    W' = W Q              (N, D) stored and masked; column j of W' is the j-th principal axis
    e_i = m_i * W'[i]     Eq. 1 on the rotated row
    out_i = e_i R         R = Q^T, the (D, D) float32 ``rotation``

At full length ``out_i = W[i] Q Q^T = W[i]`` up to float rounding, so the warm start keeps the
model's outputs; a prefix of a rotated row keeps as much of the table's energy (sum of squares)
as any k dims can. Pooling commutes with R for mode sum and mean bags (R is applied after
pooling), not for max bags, which are rejected.

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
    eigenvalues, eigenvectors = torch.linalg.eigh(w.T @ w)
    q = eigenvectors[:, eigenvalues.argsort(descending=True)]
    # eigh's signs are arbitrary; make each axis' largest component positive so R is
    # reproducible across LAPACK builds.
    sign = torch.sign(q.gather(0, q.abs().argmax(dim=0, keepdim=True)))
    q = q * torch.where(sign == 0, 1.0, sign)
    return q.T.contiguous().float()


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
