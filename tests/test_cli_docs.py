"""docs/cli.md is the `--help` of every command; this test fails when the two drift apart.

Regenerate after changing the CLI: AMTL_REGENERATE_DOCS=1 pytest tests/test_cli_docs.py
"""

import os
from pathlib import Path

import typer
from typer.testing import CliRunner

from amtl_compress.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HEADER = (
    "# Command line reference\n\n"
    "Generated from `--help` by `tests/test_cli_docs.py` (regenerate with\n"
    "`AMTL_REGENERATE_DOCS=1 pytest tests/test_cli_docs.py`). Every command is a thin layer over\n"
    "the Python API (docs/design.md). Known errors print one line `Error: ...` on stderr and exit\n"
    "with code 1; set `AMTL_COMPRESS_DEBUG=1` to see the traceback instead.\n"
)


def render() -> str:
    runner = CliRunner()
    env = {"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}
    parts = [HEADER]
    commands = [c.name for c in typer.main.get_command(app).commands.values()]
    for name in [None, *commands]:
        args = ["--help"] if name is None else [name, "--help"]
        result = runner.invoke(app, args, env=env, prog_name="amtl-compress")
        assert result.exit_code == 0, result.output
        title = "amtl-compress" if name is None else f"amtl-compress {name}"
        text = "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())
        parts.append(f"\n## `{title}`\n\n```text\n{text}\n```\n")
    return "".join(parts)


def test_cli_docs_match_help():
    text = render()
    if os.environ.get("AMTL_REGENERATE_DOCS"):
        DOC.write_text(text, encoding="utf-8")
    assert DOC.read_text(encoding="utf-8") == text, (
        "docs/cli.md is stale; run AMTL_REGENERATE_DOCS=1 pytest tests/test_cli_docs.py"
    )
