"""How the training and evaluation loops call a model: its adapter and what its output means.

:class:`ModelCall` turns a batch of the data contract into logits (B,) for any model: the adapter
(``features``, ``dlrm``, ``torchrec``) makes the call, and a model that returns probabilities
(``DLRM_Net`` ends in a Sigmoid) has them turned into logits, so that the loss, AUC and logloss
are those of the model's real predictions. :func:`check_model_call` decides both before any
training, on one batch, and says what it decided (never silently).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from amtl_compress.errors import AmtlError, ConfigError
from amtl_compress.models.adapters import (
    ModelAdapter,
    detect_adapter,
    get_adapter,
    unwrap_model,
)

#: The values of ``output``: ``auto`` decides from the model (:func:`check_model_call`).
OUTPUTS = ("auto", "logits", "probs")
AUTO = "auto"
#: Probabilities are clamped to [EPS, 1 - EPS] before the logit: float32 holds 1 - 1e-7, and
#: -log(1e-7) = 16.1 bounds one row's logloss.
EPS = 1e-7
_DOCS = "docs/data.md, \"Your model\"; docs/dlrm.md"


@dataclass(frozen=True)
class ModelCall:
    """Calls a model on a batch dict and returns logits.

    Attributes:
        adapter: how the batch reaches the model's ``forward``.
        output: ``"logits"`` or ``"probs"``, what the model returns.
    """

    adapter: ModelAdapter
    output: str = "logits"

    def __call__(self, model: nn.Module, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B,) of ``model`` for ``features`` (column -> B rows); differentiable.

        A probability p becomes log(p) - log(1 - p) after clamping to [EPS, 1 - EPS]: the
        binary cross-entropy with logits of that is the model's own BCE, gradient included.
        """
        out = self.adapter.forward(model, features).reshape(-1)
        if self.output == "probs":
            p = out.float().clamp(EPS, 1.0 - EPS)
            return torch.log(p) - torch.log1p(-p)
        return out

    @property
    def is_plain(self) -> bool:
        """``model(features)`` returning logits: the contract of docs/data.md, nothing to say."""
        return self.adapter.name == "features" and self.output == "logits"

    @property
    def list_padding(self) -> int:
        """How the adapter wants list columns padded (``open_data(list_padding=...)``)."""
        return adapter_list_padding(self.adapter)

    def spec_entries(self) -> dict[str, str]:
        """What a model spec records of this call: ``output``, and ``adapter`` unless it is the
        default ``features`` (so that the specs of plain models keep their old form)."""
        out = {} if self.adapter.name == "features" else {"adapter": self.adapter.name}
        out["output"] = self.output
        return out


def adapter_list_padding(adapter: ModelAdapter) -> int:
    """The list padding ``adapter`` wants: its ``list_padding`` attribute, else 0."""
    return int(getattr(adapter, "list_padding", 0))


def _check_output_name(output: str | None) -> None:
    if output is not None and output not in OUTPUTS:
        raise ConfigError(
            f"`output={output!r}` is unknown: use `auto` (decided from the model), `logits` or "
            "`probs`"
        )


def resolve_adapter(
    model: nn.Module, adapter: str | None = None, spec: Mapping[str, Any] | None = None
) -> ModelAdapter:
    """The adapter to run ``model`` with: ``adapter`` if given (not ``"auto"``), else the one the
    model spec records, else :func:`detect_adapter`'s pick.

    Raises:
        ConfigError: an unknown adapter, or one whose package is missing.
    """
    name = adapter if adapter not in (None, AUTO) else None
    if name is None and spec is not None and isinstance(spec.get("adapter"), str):
        name = spec["adapter"]
    if name is None:
        name = detect_adapter(model)
    return get_adapter(name)


def recorded_output(
    output: str | None, spec: Mapping[str, Any] | None
) -> tuple[str, str]:
    """``(output, why)``: ``output`` if given (not ``"auto"``), else the model spec's, else
    ``"auto"``; ``why`` says where a fixed answer came from, for :func:`check_model_call`."""
    _check_output_name(output)
    if output not in (None, AUTO):
        return output, "as asked"
    if spec is not None and spec.get("output") in ("logits", "probs"):
        return str(spec["output"]), "as the model spec records"
    if spec is not None and spec.get("kind") == "dlrm":
        return "logits", "the reference DLRM returns logits"
    return AUTO, ""


def check_model_call(
    model: nn.Module,
    adapter: ModelAdapter,
    features: Mapping[str, torch.Tensor],
    output: str | tuple[str, str] = AUTO,
) -> tuple[ModelCall, str]:
    """Run ``model`` once on ``features`` through ``adapter``, check what comes back, and decide
    whether it is logits or probabilities.

    ``output="auto"`` reads probabilities when the last module the forward pass runs is an
    ``nn.Sigmoid``, or when every output of the batch lies in [0, 1]; logits otherwise.

    Args:
        model: the model (eval mode is used for this call, then the mode is restored).
        adapter: how to call it.
        features: one batch (column -> B rows), on the model's device.
        output: ``"auto"``, ``"logits"`` or ``"probs"``, or :func:`recorded_output`'s pair.

    Returns:
        (the call, a one-line note saying what the output was taken for and why).

    Raises:
        ConfigError: the forward pass raised TypeError (or another error of the call), the
            output is not a float tensor with one value per row, or ``output="probs"`` for
            outputs outside [0, 1].
    """
    output, given_why = output if isinstance(output, tuple) else (output, "as asked")
    _check_output_name(output)
    rows = int(next(iter(features.values())).shape[0]) if features else 0
    last: list[nn.Module] = []

    def remember(module: nn.Module, _args: object, _out: object) -> None:
        last[:] = [module]

    leaves = [m for m in unwrap_model(model).modules() if not list(m.children())]
    hooks = [m.register_forward_hook(remember) for m in leaves]
    was_training = model.training
    model.eval()
    how = f"`adapter={adapter.name!r}`"
    try:
        with torch.no_grad():
            out = adapter.forward(model, features)
    except AmtlError:
        raise
    except Exception as exc:  # the user's forward: say what the contract is, in one line
        hint = (
            "the model does not take the batch this adapter builds; for facebookresearch/dlrm's "
            "DLRM_Net pass `adapter=\"dlrm\"`, for TorchRec's DLRM `adapter=\"torchrec\"`, else "
            "`forward(batch: dict[str, Tensor])`"
        )
        raise ConfigError(
            f"calling the model with {how} raised {type(exc).__name__}: {_first_line(exc)}; "
            f"{hint} ({_DOCS})"
        ) from exc
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"{out.dtype} tensor"
        raise ConfigError(
            f"the model called with {how} returned a {what}; it must return one float per row, "
            f"shape (B,) or (B, 1) ({_DOCS})"
        )
    if out.numel() != rows or out.dim() > 2 or (out.dim() == 2 and out.shape[1] != 1):
        raise ConfigError(
            f"the model called with {how} returned shape {tuple(out.shape)} for a batch of "
            f"{rows} rows; it must return one logit or probability per row, shape ({rows},) or "
            f"({rows}, 1) ({_DOCS})"
        )
    sigmoid_last = bool(last) and isinstance(last[0], nn.Sigmoid)
    finite = bool(torch.isfinite(out).all())
    in_unit = finite and rows > 0 and bool(((out >= 0) & (out <= 1)).all())
    if output == AUTO:
        if sigmoid_last:
            output, why = "probs", "its last module is a Sigmoid"
        elif in_unit:
            output, why = "probs", f"its {rows} outputs on the first batch all lie in [0, 1]"
        else:
            output, why = "logits", "its outputs on the first batch leave [0, 1]"
    else:
        why = given_why
        if output == "probs" and finite and not in_unit:
            raise ConfigError(
                f"`output='probs'` but the model returned values in [{float(out.min()):.4g}, "
                f"{float(out.max()):.4g}], outside [0, 1]: pass `output='logits'` (or "
                "`output='auto'`)"
            )
    call = ModelCall(adapter, output)
    other = "logits" if output == "probs" else "probs"
    if output == "probs":
        note = (f"model output read as probabilities ({why}); loss and metrics use them as "
                f"such; pass `output={other!r}` if that is wrong")
    else:
        note = f"model output read as logits ({why}); pass `output={other!r}` if that is wrong"
    return call, note


def first_batch(batches: Any) -> dict[str, torch.Tensor]:
    """The features of the first ``(features, labels)`` of ``batches`` (ConfigError if none)."""
    for features, _ in batches:
        return features
    raise ConfigError("the data has no rows to check the model's output with")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
