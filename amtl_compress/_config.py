"""The one validation style of the package's configs (AMTLConfig, FinetuneConfig, TrainConfig,
DLRMConfig).

Every config is a frozen dataclass with typed defaults, an ``Args:`` docstring and a ``version``
field; ``__post_init__`` validates every field and raises :class:`ConfigError` (a ValueError)
naming the field; ``to_dict`` gives JSON-ready data and ``from_dict`` inverts it, refusing unknown
keys and a version this code does not know (a newer amtl-compress wrote it). Keys that are
missing get their defaults, so files written before a field existed still read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from amtl_compress.errors import ConfigError


def check_version(cls: type, version: object, known: tuple[int, ...]) -> None:
    """Raise ConfigError unless ``version`` is one of ``known`` (the versions ``cls`` reads)."""
    if isinstance(version, bool) or version not in known:
        raise ConfigError(
            f"{cls.__name__} `version` {version!r} is not supported (known: {list(known)}); "
            "upgrade amtl-compress to read this config"
        )


def known_keys(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` as a dict, after checking that every key is a field of the dataclass ``cls``.

    Raises:
        ConfigError: ``data`` is not a mapping, or has keys that are not fields (all named).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{cls.__name__} must be read from a dict, got {type(data).__name__}; "
            f"pass what `{cls.__name__}.to_dict()` returned"
        )
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} keys {unknown}; expected a subset of {sorted(known)}"
        )
    return dict(data)
