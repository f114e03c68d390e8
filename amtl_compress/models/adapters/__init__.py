"""Model adapters: how a batch of the data contract (docs/data.md) reaches a model's ``forward``.

amtl-compress reads batches as ``dict[str, Tensor]`` (column -> tensor). A model written for that
contract is called as ``model(features)`` (the ``features`` adapter, the default). Models with
another calling convention are run unmodified through an adapter that turns the dict into their
arguments:

- ``dlrm``: facebookresearch/dlrm's ``DLRM_Net``, ``forward(dense_x, lS_o, lS_i)`` from columns
  ``dense_*`` / ``cat_*`` (docs/dlrm.md);
- ``torchrec``: ``torchrec.models.dlrm.DLRM``, ``forward(dense_features, sparse_features)`` with a
  ``KeyedJaggedTensor`` (optional dependency: docs/dlrm.md, "TorchRec", says how to install it).

Adapters are looked up by name with :func:`get_adapter`; the built-in ones are imported on first
use, so that torchrec is imported only when the ``torchrec`` adapter is asked for.
:func:`detect_adapter` picks one for a model when the choice is unambiguous.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from amtl_compress.errors import ConfigError

__all__ = [
    "ModelAdapter",
    "adapter_names",
    "detect_adapter",
    "get_adapter",
    "register_adapter",
    "unwrap_model",
]


@runtime_checkable
class ModelAdapter(Protocol):
    """How to run one family of models on a batch of the data contract.

    Attributes:
        name: the adapter's name (``"features"``, ``"dlrm"``, ``"torchrec"``), as given to
            ``--adapter`` and recorded in the model spec.
    """

    name: str

    def forward(self, model: nn.Module, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's raw output for a batch of the data contract (docs/data.md).

        Args:
            model: the model (possibly wrapped in DistributedDataParallel: call ``model(...)``,
                read attributes from :func:`unwrap_model`).
            features: column -> tensor of B rows, on the model's device.

        Returns:
            The model's output, one value per row (B,) or (B, 1); logits or probabilities, as
            the model gives them (the caller checks which).
        """
        ...

    def default_fields(self, model: nn.Module, columns: Sequence[str]) -> dict[str, str]:
        """Module path -> data column for the tables to compress when the user names none.

        Args:
            model: the (unwrapped) model.
            columns: the data's feature columns (label excluded).

        Returns:
            ``{}`` when the adapter has no default (the user must pass ``fields``).
        """
        ...


# Built-in adapters imported on demand: name -> module that calls register_adapter on import.
_BUILTIN = {
    "features": "amtl_compress.models.adapters.features",
    "dlrm": "amtl_compress.models.adapters.dlrm",
    "torchrec": "amtl_compress.models.adapters.torchrec",
}
# Adapters that need an optional package: name -> (top-level package, how to install it).
# torchrec goes in with --no-deps: its metadata asks for the CUDA fbgemm-gpu (docs/dlrm.md).
_OPTIONAL = {"torchrec": ("torchrec", "pip install 'amtl-compress[torchrec]' && "
                                      "pip install --no-deps torchrec==1.8.0")}

_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make ``adapter`` available to :func:`get_adapter` under ``adapter.name``; returns it.

    Registering a name again replaces the earlier adapter (a module re-imported in tests).

    Raises:
        ConfigError: ``adapter`` lacks ``name``, ``forward`` or ``default_fields``.
    """
    name = getattr(adapter, "name", None)
    if not isinstance(name, str) or not name or not isinstance(adapter, ModelAdapter):
        raise ConfigError(
            f"cannot register `{adapter!r}` as a model adapter: it needs a `name` string and the "
            "methods `forward(model, features)` and `default_fields(model, columns)`"
        )
    _REGISTRY[name] = adapter
    return adapter


def adapter_names() -> list[str]:
    """Every adapter name :func:`get_adapter` accepts (built-in and registered), sorted."""
    return sorted({*_BUILTIN, *_REGISTRY})


def get_adapter(name: str) -> ModelAdapter:
    """The adapter called ``name``.

    Raises:
        ConfigError: ``name`` is unknown, or its optional dependency (torchrec) is not
            installed.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if not isinstance(name, str) or name not in _BUILTIN:
        raise ConfigError(
            f"`adapter={name!r}` is unknown: use one of {', '.join(map(repr, adapter_names()))}"
        )
    if name in _OPTIONAL:
        package, install = _OPTIONAL[name]
        try:
            importlib.import_module(package)
        except ImportError as exc:
            raise ConfigError(
                f"`adapter={name!r}` needs the package `{package}`, which cannot be imported "
                f"({_first_line(exc)}): install it with `{install}`"
            ) from None
    importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:  # a built-in module that forgot to register: a bug here
        raise ConfigError(f"adapter module `{_BUILTIN[name]}` did not register `{name}`")
    return _REGISTRY[name]


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without its DistributedDataParallel / DataParallel wrapper, if any."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def detect_adapter(model: nn.Module) -> str:
    """The adapter name for ``model`` when the choice is unambiguous, else ``"features"``.

    - ``"torchrec"``: the model's class comes from a ``torchrec`` module (read from the class,
      so torchrec is not imported here);
    - ``"dlrm"``: a ``DLRM_Net``-like model, i.e. an ``emb_l`` ``nn.ModuleList`` of embedding
      tables and a ``forward(dense_x, lS_o, lS_i)``;
    - ``"features"`` otherwise (``model(features)``, docs/data.md).
    """
    model = unwrap_model(model)
    module = type(model).__module__ or ""
    if module == "torchrec" or module.startswith("torchrec."):
        return "torchrec"
    if isinstance(getattr(model, "emb_l", None), nn.ModuleList) and _takes_three_inputs(model):
        return "dlrm"
    return "features"


def _takes_three_inputs(model: nn.Module) -> bool:
    # DLRM_Net.forward(self, dense_x, lS_o, lS_i): three positional inputs, whatever the names.
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) == 3


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
