"""The Triton pin: pyproject's `triton` extra, scripts/setup-venv and the lookup code agree."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

from amtl_compress.lookup.triton_ops import TRITON_PIN

ROOT = Path(__file__).resolve().parent.parent


def test_extra_and_setup_install_the_pinned_triton_for_tests() -> None:
    block = re.search(r"^triton = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert block, "pyproject.toml has no `triton` extra"
    assert re.findall(r'"([^"]+)"', block.group(1)) == [
        f"triton=={TRITON_PIN}; platform_system == 'Linux'"]
    setup = (ROOT / "scripts" / "setup-venv").read_text()
    assert 'test|dev) extras="$extras,torchrec,triton" ;;' in setup
    assert "scripts/setup-venv" in (ROOT / "scripts" / "test").read_text()
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


def test_installed_triton_is_the_pinned_one() -> None:
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        pytest.skip("a GPU build of torch brings its own Triton, whatever the pin")
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("triton is not installed")
    assert version == TRITON_PIN
