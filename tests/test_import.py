"""`import amtl_compress` stays light; the public names load their modules on first access.

Each check runs in a fresh interpreter, since this test process has long imported torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "pyarrow", "typer")


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; return the JSON it prints."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_does_not_load_heavy_dependencies() -> None:
    got = _run(
        "import json, sys\n"
        "import amtl_compress\n"
        "amtl_compress.__version__, dir(amtl_compress)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    assert got == [], f"`import amtl_compress` imported {got}"


def test_a_lazy_name_imports_its_module_on_access() -> None:
    got = _run(
        "import json, sys\n"
        "import amtl_compress\n"
        "before = 'torch' in sys.modules\n"
        "obj = amtl_compress.AMTLConfig\n"
        "module = sys.modules.get(obj.__module__)\n"
        "print(json.dumps({'before': before, 'module': obj.__module__,\n"
        "                  'same': getattr(module, 'AMTLConfig', None) is obj,\n"
        "                  'torch': 'torch' in sys.modules}))\n"
    )
    assert got["before"] is False
    assert got["module"].startswith("amtl_compress.")
    assert got["same"] is True and got["torch"] is True


def test_every_public_name_resolves_and_unknown_names_fail() -> None:
    got = _run(
        "import json, sys\n"
        "import amtl_compress\n"
        "bad = []\n"
        "for name in amtl_compress.__all__:\n"
        "    obj = getattr(amtl_compress, name)\n"
        "    if name != '__version__' and not obj.__module__.startswith('amtl_compress.'):\n"
        "        bad.append(name)\n"
        "try:\n"
        "    amtl_compress.no_such_name\n"
        "    unknown = 'no error'\n"
        "except AttributeError as exc:\n"
        "    unknown = str(exc)\n"
        "print(json.dumps({'bad': bad, 'unknown': unknown}))\n"
    )
    assert got["bad"] == []
    assert "no_such_name" in got["unknown"]
