"""Rotating the tables of a user's model: the walk over its modules (the math is core/rotation.py).

:func:`rotate_tables_` puts the rotated twin of a table in its place (a checkpoint saved with
dimension ordering holds ``<path>.rotation``), :func:`rotations_in` finds those keys, and
:func:`check_rotatable` refuses a table whose pooling does not commute with a rotation.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from amtl_compress.core.rotation import ROTATION_KEY, with_rotation
from amtl_compress.errors import SurgeryError


def check_rotatable(path: str, table: nn.Module) -> None:
    """Raise SurgeryError if ``table`` pools in a way a rotation does not commute with (max)."""
    if isinstance(table, nn.EmbeddingBag) and table.mode == "max":
        raise SurgeryError(
            f"module `{path}` is an EmbeddingBag with mode `max`, which does not commute with a "
            "rotation; use `ordering=\"none\"` for it"
        )


def rotate_tables_(model: nn.Module, rotations: Mapping[str, Tensor]) -> None:
    """Replace each module path of ``rotations`` by its rotated twin, in place.

    Args:
        model: a model whose modules at those paths are embedding tables (or lookups).
        rotations: module path -> float32 (D, D).

    Raises:
        SurgeryError: a path names no module, or a rotation is not (D, D) for its table.
    """
    modules = dict(model.named_modules())
    for path, rotation in rotations.items():
        table = modules.get(path)
        if table is None or path == "":
            raise SurgeryError(
                f"rotation for `{path}` names no submodule of the model; pass the model it was "
                "saved from"
            )
        dim = getattr(table, "embedding_dim", None)
        if tuple(rotation.shape) != (dim, dim):
            raise SurgeryError(
                f"rotation for `{path}` is {tuple(rotation.shape)} but the table is {dim} wide; "
                "pass the model it was saved from"
            )
        check_rotatable(path, table)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, with_rotation(table, rotation))


def rotations_in(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Module path -> rotation for every ``<path>.rotation`` key that the model lacks and whose
    path is an embedding table of ``model`` (the keys a rotated checkpoint adds)."""
    expected = model.state_dict()
    modules = dict(model.named_modules())
    found: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        path, _, leaf = key.rpartition(".")
        if leaf == ROTATION_KEY and key not in expected and isinstance(
            modules.get(path), (nn.Embedding, nn.EmbeddingBag)
        ):
            found[path] = value
    return found
