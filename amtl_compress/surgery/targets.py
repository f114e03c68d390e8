"""Finding the embedding tables of a user model by name (peft-style targets)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from amtl_compress.errors import NoMatchingModuleError, SurgeryError
from amtl_compress.surgery.masked import MaskedEmbedding, MaskedEmbeddingBag

_SHOWN_PATHS = 10


def is_embedding_table(module: nn.Module) -> bool:
    """True for the modules AMTL can wrap: ``nn.Embedding`` and ``nn.EmbeddingBag``."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def target_matches(target: str, path: str) -> bool:
    """Whether ``target`` selects the module at ``path``.

    A target matches if it equals the path, if the path ends with ``"." + target``, or if
    ``re.fullmatch(target, path)`` (a target that is not a valid regex is only a plain name).
    """
    if path == target or path.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, path) is not None
    except re.error:
        return False


def embedding_paths(model: nn.Module) -> list[str]:
    """Paths (as in ``named_modules``) of the tables in ``model`` that targets can select.

    A table already wrapped by AMTL is reported at the wrapper's path (the wrapper counts as the
    table); the module inside it (``<path>.base_layer``) is not reported separately.
    """
    wrappers: list[str] = []
    paths: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, (MaskedEmbedding, MaskedEmbeddingBag)):
            wrappers.append(path)
            paths.append(path)
        elif is_embedding_table(module):
            paths.append(path)
    return paths


def find_embedding_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, str]:
    """Map each embedding module selected by ``targets`` to the target that selected it.

    Only ``nn.Embedding`` and ``nn.EmbeddingBag`` modules (or their AMTL wrappers) count; they may
    sit anywhere (ModuleDict, ModuleList, nested submodules). See :func:`target_matches`.

    Args:
        model: the user model.
        targets: names, ``.``-suffixes or full-match regexes of module paths.

    Returns:
        module path -> the target that matched it, in the model's module order.

    Raises:
        NoMatchingModuleError: a target matches no embedding module (the message lists up to
            10 embedding module paths that exist).
        SurgeryError: one module is matched by two different targets.
    """
    targets = list(dict.fromkeys(targets))
    paths = embedding_paths(model)
    matched: dict[str, str] = {}
    unmatched: list[str] = []
    for target in targets:
        hits = [p for p in paths if target_matches(target, p)]
        if not hits:
            unmatched.append(target)
        for path in hits:
            if path in matched:
                raise SurgeryError(
                    f"module `{path}` is matched by both targets `{matched[path]}` and "
                    f"`{target}`; make the targets select disjoint modules"
                )
            matched[path] = target
    if unmatched:
        asked = ", ".join(f"`{t}`" for t in unmatched)
        if not paths:
            raise NoMatchingModuleError(
                f"target(s) {asked} matched nothing: the model has no nn.Embedding or "
                "nn.EmbeddingBag module; AMTL can only wrap those"
            )
        shown = ", ".join(f"`{p}`" for p in paths[:_SHOWN_PATHS])
        more = f" (and {len(paths) - _SHOWN_PATHS} more)" if len(paths) > _SHOWN_PATHS else ""
        raise NoMatchingModuleError(
            f"target(s) {asked} matched no nn.Embedding/nn.EmbeddingBag module; the model has "
            f"{shown}{more}; pass a module path, a `.`-suffix of one, or a regex matching one"
        )
    order = {p: i for i, p in enumerate(paths)}
    return dict(sorted(matched.items(), key=lambda item: order[item[0]]))
