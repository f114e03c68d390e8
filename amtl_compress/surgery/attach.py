"""Attaching AMTL layers to a user model in place, and taking them off again."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from amtl_compress.core.amtl import AMTL, AMTLConfig
from amtl_compress.core.rotation import onto_principal_axes, unrotated, with_rotation
from amtl_compress.errors import SurgeryError
from amtl_compress.surgery.masked import MaskedEmbedding, MaskedEmbeddingBag
from amtl_compress.surgery.rotate import check_rotatable
from amtl_compress.surgery.targets import find_embedding_modules

_Masked = (MaskedEmbedding, MaskedEmbeddingBag)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the child at ``path``; ModuleDict/ModuleList/Sequential children are attributes
    named by their key/index, so ``setattr`` on the parent covers them all."""
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)


def _check_counts(target: str, path: str, table: nn.Module, counts: object) -> Tensor:
    where = f"counts for target `{target}` (module `{path}`)"
    n = table.num_embeddings
    if not isinstance(counts, Tensor):
        raise SurgeryError(
            f"{where} must be a torch.Tensor, got {type(counts).__name__}; "
            f"pass an int64 tensor of shape ({n},)"
        )
    if counts.dtype == torch.bool or counts.is_floating_point() or counts.is_complex():
        raise SurgeryError(
            f"{where} must have an integer dtype, got {counts.dtype}; pass `counts.long()`"
        )
    if tuple(counts.shape) != (n,):
        raise SurgeryError(
            f"{where} must have shape ({n},) = (num_embeddings,), got {tuple(counts.shape)}; "
            "count every row id of the table, 0 for ids never seen"
        )
    if n and int(counts.min()) < 0:
        raise SurgeryError(f"{where} must be >= 0, got a minimum of {int(counts.min())}")
    return counts


def select_tables(
    model: nn.Module, targets: Iterable[str], ordering: str = "none"
) -> dict[str, tuple[str, nn.Module]]:
    """The plain tables that ``targets`` select, each checked to be wrappable by AMTL.

    Args:
        model: the user model.
        targets: module paths, ``.``-suffixes or full-match regexes
            (:func:`~amtl_compress.surgery.targets.find_embedding_modules`).
        ordering: ``"pca"`` also checks that each table can be rotated.

    Returns:
        module path -> (the target that selected it, the table).

    Raises:
        NoMatchingModuleError: a target selects no embedding module.
        SurgeryError: a module selected twice or already wrapped, a table shared by several
            paths, the model itself is the table, or (pca) a table that cannot be rotated.
    """
    matched = find_embedding_modules(model, list(targets))
    paths_of: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths_of.setdefault(id(module), []).append(path)
    selected: dict[str, tuple[str, nn.Module]] = {}
    for path, target in matched.items():
        if path == "":
            raise SurgeryError(
                f"target `{target}` selects the model itself; wrap the table in a parent "
                "nn.Module so AMTL can replace it"
            )
        table = model.get_submodule(path)
        if isinstance(table, _Masked):
            raise SurgeryError(
                f"module `{path}` (target `{target}`) already has an AMTL layer; "
                "call `detach_amtl(model)` first"
            )
        shared = paths_of[id(table)]
        if len(shared) > 1:
            others = ", ".join(f"`{p}`" for p in shared if p != path)
            raise SurgeryError(
                f"module `{path}` (target `{target}`) is the same table as {others}; "
                "AMTL cannot wrap a table registered under several paths"
            )
        if ordering == "pca":
            check_rotatable(path, table)
        selected[path] = (target, table)
    return selected


def attach_amtl_(
    model: nn.Module,
    counts: Mapping[str, Tensor],
    config: AMTLConfig = AMTLConfig(),  # noqa: B008 (frozen dataclass: immutable)
) -> dict[str, str]:
    """Wrap the selected embedding tables of ``model`` with AMTL layers, in place.

    ``nn.Embedding`` becomes :class:`MaskedEmbedding` and ``nn.EmbeddingBag`` becomes
    :class:`MaskedEmbeddingBag`. The whole request is validated before the model is touched, so
    on an error the model is unchanged. Each AMTL layer is moved to its table's device; its
    dtype is the table's if that is float32/float64, else float32 (the argmax over D logits
    needs the precision; the 0/1 mask is cast to the table's dtype exactly). Thanks to the warm
    start (see :class:`~amtl_compress.core.amtl.AMTL`), the model's outputs do not change
    (bitwise with ``ordering="none"``; up to float rounding with ``"pca"``, which rotates each
    table's weight in place onto its principal axes, see core/rotation.py). A table rotated by
    an earlier run (``RotatedEmbedding``) keeps its rotation.

    Args:
        model: the user model.
        counts: target (module path, ``.``-suffix or full-match regex, see
            :func:`~amtl_compress.surgery.targets.find_embedding_modules`) -> int64 (N,)
            training-data count of each row of the selected table(s).
        config: hyper-parameters shared by all attached layers.

    Returns:
        module path -> the target that selected it.

    Raises:
        NoMatchingModuleError: a target selects no embedding module.
        SurgeryError: no targets, a module selected twice or already wrapped, a table shared
            by several paths, the model itself is the table, or counts of the wrong
            type/dtype/shape/sign.
    """
    if not counts:
        raise SurgeryError("no targets given; pass {target: counts} for at least one table")
    selected = select_tables(model, counts, config.ordering)
    checked = {
        path: (table, _check_counts(target, path, table, counts[target]))
        for path, (target, table) in selected.items()
    }

    wrappers: dict[str, nn.Module] = {}
    for path, (table, table_counts) in checked.items():
        # A table rotated by an earlier run stays rotated: its rotation moves into the wrapper.
        table, rotation = unrotated(table)
        weight = table.weight
        if config.ordering == "pca":
            # W' = W R^{-1} with R the principal axes rounded to float16 values (composed with
            # an earlier run's rotation): a float32 pack stores R losslessly in float16.
            rotated, rotation = onto_principal_axes(weight, rotation)
            with torch.no_grad():
                weight.copy_(rotated)
            del rotated
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        amtl = AMTL(table_counts.detach().cpu(), table.embedding_dim, config)
        amtl = amtl.to(device=weight.device, dtype=dtype)
        kind = MaskedEmbedding if isinstance(table, nn.Embedding) else MaskedEmbeddingBag
        wrappers[path] = kind(table, amtl, rotation)
    for path, wrapper in wrappers.items():
        _set_submodule(model, path, wrapper)
    return {path: target for path, (target, _) in selected.items()}


def _wrappers(model: nn.Module) -> dict[str, MaskedEmbedding | MaskedEmbeddingBag]:
    return {path: m for path, m in model.named_modules() if isinstance(m, _Masked)}


def amtl_layers(model: nn.Module) -> dict[str, AMTL]:
    """Module path -> AMTL layer of every wrapped table (for the training loop and budget)."""
    return {path: wrapper.amtl for path, wrapper in _wrappers(model).items()}


def amtl_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of all AMTL layers (named ``<path>.amtl.<...>``), for their own optimiser
    group."""
    return [p for layer in amtl_layers(model).values() for p in layer.parameters()]


def model_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that is not in an AMTL layer (tables included)."""
    amtl_ids = {id(p) for p in amtl_parameters(model)}
    return [p for p in model.parameters() if id(p) not in amtl_ids]


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weight (N, D) of every ``nn.Embedding`` / ``nn.EmbeddingBag`` of ``model``, wrapped
    or not, each once: the embedding tables (torchrec's "sparse" parameters)."""
    tables: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            tables.setdefault(id(module.weight), module.weight)
    return list(tables.values())


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that is neither a table (:func:`table_parameters`) nor in
    an AMTL layer: MLPs, interaction and output layers (torchrec's "dense" parameters)."""
    table_ids = {id(p) for p in table_parameters(model)}
    return [p for p in model_parameters(model) if id(p) not in table_ids]


@torch.no_grad()
def detach_amtl(model: nn.Module, merge: bool = True) -> tuple[nn.Module, dict[str, Tensor]]:
    """Put every wrapped table back in place of its wrapper, in place.

    Args:
        model: a model prepared by :func:`attach_amtl_`.
        merge: if True, each table's row i is set to exactly 0.0 past its length (dims
            ``>= lengths[i]``), so the plain model computes what the masked model computed in
            eval mode. If False the raw weights are left as they are. A wrapper with a
            rotation puts back a ``RotatedEmbedding(Bag)`` (same weight, ``rotation`` buffer),
            so the model still computes the same outputs and its state_dict gains
            ``<path>.rotation``.

    Returns:
        (model, {module path: lengths int64 (N,) on the CPU, each k_i + 1 in [1, D]}). A model
        without AMTL layers is returned unchanged with an empty dict.
    """
    lengths: dict[str, Tensor] = {}
    for path, wrapper in _wrappers(model).items():
        table = wrapper.base_layer
        row_lengths = wrapper.amtl.lengths()
        if merge:
            dims = torch.arange(table.embedding_dim, device=row_lengths.device)
            dropped = dims >= row_lengths.unsqueeze(1)
            table.weight.masked_fill_(dropped.to(table.weight.device), 0.0)
        if wrapper.rotation is not None:
            table = with_rotation(table, wrapper.rotation)
        _set_submodule(model, path, table)
        lengths[path] = row_lengths.cpu()
    return model, lengths
