"""Model specs: the JSON that says how to rebuild a model (docs/design.md, "Model spec").

``{"kind": "dlrm", "config": {...}}`` rebuilds the reference :class:`DLRM`;
``{"kind": "factory", "factory": "package.module:function"}`` imports ``package.module`` and calls
``function()`` with no arguments, which must return the user's ``nn.Module``.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from amtl_compress.errors import CheckpointError
from amtl_compress.models.dlrm import DLRM, DLRMConfig

# `package.module:function`, where function may be a dotted attribute path (`mod:Class.build`).
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def model_spec_for(
    model_or_config: nn.Module | DLRMConfig, factory: str | None = None
) -> dict[str, Any]:
    """The spec that rebuilds ``model_or_config`` with :func:`build_model`.

    A :class:`DLRM` or :class:`DLRMConfig` gives a ``dlrm`` spec. Any other model needs the
    ``factory`` (``"package.module:function"``) that builds it, since a module cannot tell how it
    was made; a given ``factory`` always wins.

    Raises:
        CheckpointError: ``factory`` is malformed, or a non-DLRM model comes without one.
    """
    if factory is not None:
        check_factory(factory)
        return {"kind": "factory", "factory": factory}
    if isinstance(model_or_config, DLRM):
        return {"kind": "dlrm", "config": model_or_config.config.to_dict()}
    if isinstance(model_or_config, DLRMConfig):
        return {"kind": "dlrm", "config": model_or_config.to_dict()}
    raise CheckpointError(
        f"cannot describe a `{type(model_or_config).__name__}` model for rebuilding: "
        "pass the factory that builds it, `package.module:function`"
    )


def check_factory(factory: str) -> None:
    """Raise CheckpointError unless ``factory`` reads ``package.module:function``."""
    if not isinstance(factory, str) or not _FACTORY_RE.match(factory):
        raise CheckpointError(
            f"model factory `{factory}` is not of the form `package.module:function`: "
            "name an importable module and a function in it that takes no arguments"
        )


def build_model(spec: dict[str, Any], device: str | torch.device | None = None) -> nn.Module:
    """Build a fresh (untrained) model from a spec.

    Args:
        spec: the model spec (module docstring).
        device: build under ``with torch.device(device):`` (``"meta"``: no storage behind the
            tensors). A factory's module is imported before that context is entered: importing
            may run tensor code (torchrec calls ``Tensor.item()`` at import), which fails on
            ``meta``.

    Raises:
        CheckpointError: unknown kind, a bad DLRM config, a factory that cannot be imported, is
            not callable, raises, or returns something other than an ``nn.Module``.
    """
    kind = spec.get("kind") if isinstance(spec, dict) else None
    on_device = contextlib.nullcontext() if device is None else torch.device(device)
    if kind == "dlrm":
        try:
            with on_device:
                return DLRM(DLRMConfig.from_dict(spec.get("config") or {}))
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"model spec has a bad DLRM config: {_first_line(exc)}") from None
    if kind == "factory":
        factory = spec.get("factory")
        function = _factory_function(factory)
        with on_device:
            return _call_factory(factory, function)
    raise CheckpointError(
        f"model spec kind `{kind}` is unknown: use `dlrm` or `factory` "
        "(or pass `model_factory=package.module:function`)"
    )


def _factory_function(factory: Any) -> Callable[[], Any]:
    """Import ``package.module`` of ``factory`` and return its function (not called)."""
    check_factory(factory)
    module_name, attr_path = factory.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(
            f"cannot import module `{module_name}` of model factory `{factory}` "
            f"({_first_line(exc)}): install it or put its folder on PYTHONPATH"
        ) from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise CheckpointError(
                f"model factory `{factory}`: `{module_name}` has no attribute `{attr_path}`; "
                "check the name after the colon"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise CheckpointError(f"model factory `{factory}` is not callable: name a function")
    return obj


def _call_factory(factory: str, function: Callable[[], Any]) -> nn.Module:
    try:
        model = function()
    except Exception as exc:  # the user's code: report what it raised, in one line
        raise CheckpointError(
            f"model factory `{factory}` raised {type(exc).__name__}: {_first_line(exc)}; "
            "it must build the model with no arguments"
        ) from exc
    if not isinstance(model, nn.Module):
        raise CheckpointError(
            f"model factory `{factory}` returned a `{type(model).__name__}`, not a "
            "torch.nn.Module: return the model"
        )
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
