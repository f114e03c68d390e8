"""Bad data through the CLI: one ``Error:`` line naming the culprit, exit code 1, nothing written.

Every case starts from the synthetic fixture's train file, breaks one thing, and runs
``amtl-compress finetune`` on it. The checks after the run are the same for every case, so a
regression in any of them (a traceback, a second line, a half-created ``--out``) fails here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from amtl_compress.cli import app

runner = CliRunner(mix_stderr=False)


def _replace(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, array)


def _set(table: pa.Table, name: str, row: int, value: object) -> pa.Table:
    values = table.column(name).to_pylist()
    values[row] = value
    return _replace(table, name, pa.array(values, type=table.column(name).type))


# name -> (edit of the train table, field option, text the error must contain)
CASES: dict[str, tuple[Callable[[pa.Table], pa.Table], str, list[str]]] = {
    "missing field column": (
        lambda t: t.drop_columns(["item_id"]), "item_id", ["item_id", "train.parquet"],
    ),
    "missing label column": (lambda t: t.drop_columns(["label"]), "user_id", ["`label`"]),
    "negative id": (lambda t: _set(t, "user_id", 7, -3), "user_id", ["`user_id`", "row 7", "-3"]),
    "id >= table rows": (
        lambda t: _set(t, "user_id", 11, 400), "user_id",
        ["`user_id`", "row 11", "id 400", "[0, 400)"],
    ),
    "list id >= table rows": (
        lambda t: _set(t, "tags", 5, [1, 99]), "tags", ["`tags`", "row 5", "id 99"],
    ),
    "NaN in a dense column": (
        lambda t: _set(t, "activity", 4, float("nan")), "user_id", ["`activity`", "row 4"],
    ),
    "inf in a dense column": (
        lambda t: _set(t, "activity", 9, float("-inf")), "user_id", ["`activity`", "row 9"],
    ),
    "label outside {0, 1}": (
        lambda t: _set(t, "label", 2, 3), "user_id", ["`label`", "row 2", "not 0 or 1"],
    ),
    "null list cell": (lambda t: _set(t, "tags", 6, None), "tags", ["`tags`", "row 6"]),
    "no rows": (lambda t: t.slice(0, 0), "user_id", ["no rows"]),
    "field matches no module": (lambda t: t, "no_such_table", ["no_such_table", "user_id"]),
    "field names a dense column": (
        lambda t: t, "embeddings.user_id=activity", ["`activity`", "floats, not ids"],
    ),
}


def _finetune(base: Path, train: Path, valid: Path, out: Path, field: str):
    return runner.invoke(app, [
        "finetune", str(base), "--data", str(train), "--valid", str(valid), "--field", field,
        "--out", str(out), "--epochs", "1", "--batch-size", "512", "-q",
    ])


def _assert_clean_failure(result, out: Path, must_contain: list[str]) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    err = result.stderr
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    for text in must_contain:
        assert text in err, (text, err)
    # Nothing was written: not the run directory, not its resume state, no temporary sibling.
    assert [p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))
            ] == []


@pytest.mark.parametrize("case", list(CASES))
def test_bad_train_data_fails_with_one_line_and_writes_nothing(
    synthetic, baseline, tmp_path: Path, case: str
) -> None:
    edit, field, must_contain = CASES[case]
    train = tmp_path / "train.parquet"
    pq.write_table(edit(pq.read_table(synthetic.train)), train)
    out = tmp_path / "runs" / "r"
    out.parent.mkdir()
    result = _finetune(baseline, train, synthetic.valid, out, field)
    _assert_clean_failure(result, out, must_contain)


def test_bad_valid_data_is_caught_before_training(synthetic, baseline, tmp_path: Path) -> None:
    valid = tmp_path / "valid.parquet"
    pq.write_table(_set(pq.read_table(synthetic.valid), "item_id", 3, 10_000), valid)
    out = tmp_path / "runs" / "r"
    out.parent.mkdir()
    result = _finetune(baseline, synthetic.train, valid, out, "item_id")
    _assert_clean_failure(result, out, ["valid.parquet", "`item_id`", "row 3", "id 10000"])


@pytest.mark.parametrize("content", [b"", b"PAR1garbage"], ids=["zero bytes", "corrupt"])
def test_empty_or_corrupt_file(synthetic, baseline, tmp_path: Path, content: bytes) -> None:
    train = tmp_path / "train.parquet"
    train.write_bytes(content)
    out = tmp_path / "runs" / "r"
    out.parent.mkdir()
    result = _finetune(baseline, train, synthetic.valid, out, "user_id")
    _assert_clean_failure(result, out, ["train.parquet", "write the file again"])


def test_empty_lists_are_valid_input(synthetic, baseline, tmp_path: Path) -> None:
    """An empty list is an all-padding bag (docs/data.md), not an error: it pools to zeros."""
    table = pq.read_table(synthetic.train)
    tags = table.column("tags").to_pylist()
    for row in range(0, len(tags), 3):
        tags[row] = []
    train = tmp_path / "train.parquet"
    pq.write_table(_replace(table, "tags", pa.array(tags, type=pa.list_(pa.int64()))), train)
    assert sum(not t for t in tags) >= len(tags) // 3
    out = tmp_path / "r"
    result = _finetune(baseline, train, synthetic.valid, out, "tags")
    assert result.exit_code == 0, result.output
    assert (out / "lengths.safetensors").is_file()
    assert np.isfinite(float(result.stdout.split("after")[1].split()[0]))
