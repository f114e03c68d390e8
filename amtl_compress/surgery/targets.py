"""Finding the embedding tables of a user model by name (peft-style targets)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from amtl_compress.errors import ConfigError, NoMatchingModuleError, SurgeryError
from amtl_compress.surgery.masked import MaskedEmbedding, MaskedEmbeddingBag

_SHOWN_PATHS = 10
#: A placeholder of a target template: ``{i}`` in ``emb_l.{i}`` (docs/dlrm.md).
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")


def is_embedding_table(module: nn.Module) -> bool:
    """True for the modules AMTL can wrap: ``nn.Embedding`` and ``nn.EmbeddingBag``."""
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def target_matches(target: str, path: str) -> bool:
    """Whether ``target`` selects the module at ``path``.

    A target matches if it equals the path, if the path ends with ``"." + target``, or if
    ``re.fullmatch(target, path)`` (a target that is not a valid regex is only a plain name).
    A **template**, a target with ``{name}`` placeholders (``emb_l.{i}``), matches a path (or a
    ``.``-suffix of one) where each placeholder stands for one part of the path without dots; see
    :func:`field_column` for the column it names.
    """
    if path == target or path.endswith("." + target):
        return True
    if _PLACEHOLDER.search(target):
        return _template_match(target, path) is not None
    try:
        return re.fullmatch(target, path) is not None
    except re.error:
        return False


def is_template(target: str) -> bool:
    """Whether ``target`` holds ``{name}`` placeholders (``emb_l.{i}``)."""
    return _PLACEHOLDER.search(target) is not None


def _template_match(target: str, path: str) -> re.Match[str] | None:
    pattern, seen, end = [], set(), 0
    for m in _PLACEHOLDER.finditer(target):
        pattern.append(re.escape(target[end:m.start()]))
        name = m.group(1)
        # A name used twice must stand for the same text both times.
        pattern.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^.]+)")
        seen.add(name)
        end = m.end()
    pattern.append(re.escape(target[end:]))
    return re.fullmatch(r"(?:.*\.)?" + "".join(pattern), path)


def check_field_template(target: str, column: str) -> None:
    """Raise ConfigError unless every placeholder of ``column`` is one of ``target``'s
    (``emb_l.{i}=cat_{i}`` is fine, ``emb_l.{i}=cat_{j}`` is not)."""
    known = set(_PLACEHOLDER.findall(target))
    unknown = [n for n in _PLACEHOLDER.findall(column) if n not in known]
    if unknown:
        raise ConfigError(
            f"`fields` entry `{target}={column}`: the column uses `{{{unknown[0]}}}`, which the "
            f"module template does not define; use the same placeholder on both sides, e.g. "
            "`emb_l.{i}=cat_{i}`"
        )


def field_column(target: str, column: str, path: str) -> str:
    """The data column of the table at ``path`` selected by ``target`` (a ``fields`` entry
    ``target=column``): ``column`` itself, or for a template its placeholders filled from the
    path (``emb_l.{i}=cat_{i}`` gives ``cat_3`` for ``emb_l.3``).

    Raises:
        ConfigError: the column uses a placeholder the target does not define.
    """
    if not is_template(target):
        return column
    check_field_template(target, column)
    match = _template_match(target, path)
    if match is None:
        raise ConfigError(f"`fields` template `{target}` does not match module `{path}`")
    return _PLACEHOLDER.sub(lambda m: match.group(m.group(1)), column)


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
        targets: names, ``.``-suffixes or full-match regexes of module paths, or templates
            (``emb_l.{i}``, :func:`target_matches`).

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
