"""The TorchRec version pair: pyproject's extra, scripts/setup-venv and docs/dlrm.md agree."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCHREC = "torchrec==1.8.0"
FBGEMM = "fbgemm-gpu-cpu==1.8.0"


def test_extra_setup_and_docs_name_the_same_pair() -> None:
    # (tomllib is Python 3.11+; the project supports 3.10)
    block = re.search(r"^torchrec = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert block, "pyproject.toml has no `torchrec` extra"
    extra = re.findall(r'"([^"]+)"', block.group(1))
    assert FBGEMM in extra
    # torchrec itself is not in the extra: its metadata would pull the CUDA fbgemm-gpu.
    assert not any(re.match(r"torchrec\b", r) for r in extra)
    setup = (ROOT / "scripts" / "setup-venv").read_text()
    assert f'torchrec="{TORCHREC}"' in setup and '--no-deps "$torchrec"' in setup
    docs = (ROOT / "docs" / "dlrm.md").read_text()
    assert 'pip install "amtl-compress[torchrec]"' in docs
    assert f"pip install --no-deps {TORCHREC}" in docs


def test_installed_pair_is_the_cpu_one() -> None:
    try:
        version = importlib.metadata.version("torchrec")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchrec is not installed")
    assert version == TORCHREC.split("==")[1]
    assert importlib.metadata.version("fbgemm-gpu-cpu") == FBGEMM.split("==")[1]
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("fbgemm-gpu")  # the CUDA build


def test_without_torchrec_the_adapter_is_one_error_with_the_install_commands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from amtl_compress.errors import ConfigError
    from amtl_compress.models import adapters

    monkeypatch.setitem(sys.modules, "torchrec", None)  # `import torchrec` raises ImportError
    monkeypatch.setattr(adapters, "_REGISTRY", {
        k: v for k, v in adapters._REGISTRY.items() if k != "torchrec"})
    with pytest.raises(ConfigError, match="needs the package `torchrec`") as exc:
        adapters.get_adapter("torchrec")
    message = str(exc.value)
    assert "\n" not in message
    assert 'amtl-compress[torchrec]' in message and f"--no-deps {TORCHREC}" in message
