"""Streaming ``pack`` / ``pack_table``: round trips, chunking, run-directory errors, atomicity."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from amtl_compress._io import atomic_save_safetensors
from amtl_compress.errors import AmtlError, OutputExistsError, PackedFormatError, RunDirError
from amtl_compress.storage import pack as pack_module
from amtl_compress.storage import table_pack as table_pack_module
from amtl_compress.storage.format import (
    prefix_mask,
    read_packed_table,
    source_digest,
    write_packed_table,
)
from amtl_compress.storage.header import read_header
from amtl_compress.storage.manifest import read_manifest
from amtl_compress.storage.pack import pack, pack_table
from amtl_compress.storage.quantize import (
    dequantize_values,
    int4_encode,
    int8_encode,
    pack_nibbles,
)

# A user model the run directory's spec points at (`kind: factory`); written to tmp_path so the
# factory is importable exactly as a user's would be.
TOY_MODEL = '''
import torch
from torch import nn


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.tables = nn.ModuleDict({
            "user": nn.Embedding(50, 8),
            "item": nn.EmbeddingBag(30, 6, mode="sum"),
        })
        self.head = nn.Linear(14, 1)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, user, item, item_offsets):
        u = self.tables["user"](user)
        i = self.tables["item"](item, item_offsets)
        return self.head(torch.cat([u, i], dim=1)).squeeze(1)


def build():
    return Toy()
'''
SPEC = {"kind": "factory", "factory": "amtl_storage_toy:build"}


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The toy model's module, importable as ``amtl_storage_toy``."""
    folder = tmp_path / "toy_pkg"
    folder.mkdir()
    (folder / "amtl_storage_toy.py").write_text(TOY_MODEL)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("amtl_storage_toy", None)
    module = importlib.import_module("amtl_storage_toy")
    yield module
    sys.modules.pop("amtl_storage_toy", None)


def make_run_dir(path: Path, toy, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """A run directory as ``finetune`` writes it: tails zeroed, lengths per table, spec."""
    torch.manual_seed(seed)
    model = toy.build()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lengths = {}
    for name in ("tables.user", "tables.item"):
        weight = state[f"{name}.weight"]
        n, d = weight.shape
        lengths[name] = torch.randint(1, d + 1, (n,))
        weight[~prefix_mask(lengths[name], d)] = 0.0
    path.mkdir(parents=True)
    spec = {"amtl_compress.model": json.dumps(SPEC)}
    atomic_save_safetensors(state, path / "model.safetensors", spec)
    atomic_save_safetensors(lengths, path / "lengths.safetensors")
    (path / "config.json").write_text("{}")
    return state, lengths


def kept(weight: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return weight[prefix_mask(lengths, weight.shape[1])]


# --- pack_table -------------------------------------------------------------------------------


def source_file(tmp_path: Path, n: int = 37, d: int = 5, dtype=torch.float32, seed: int = 1):
    torch.manual_seed(seed)
    lengths = torch.randint(1, d + 1, (n,))
    weight = torch.randn(n, d) * 3
    weight[~prefix_mask(lengths, d)] = 0.0
    weight = weight.to(dtype)
    path = tmp_path / "source.safetensors"
    save_file({"other": torch.ones(3), "t.weight": weight}, str(path))
    return path, weight, lengths


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "int4"])
def test_pack_table_round_trip(tmp_path: Path, dtype: str) -> None:
    src, weight, lengths = source_file(tmp_path)
    out = tmp_path / "t.safetensors"
    report = pack_table(src, "t.weight", lengths, out, dtype, "t")
    table = read_packed_table(out)
    expected = kept(weight, lengths)
    decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
    assert torch.equal(table.lengths, lengths)
    if dtype == "float32":
        assert torch.equal(decoded, expected)  # exact: Eq. 1 prefixes, bit for bit
    elif dtype == "float16":
        assert torch.allclose(decoded, expected, rtol=2**-11, atol=2**-25)
    elif dtype == "bfloat16":
        assert torch.allclose(decoded, expected, rtol=2**-8, atol=0)
    else:
        assert table.scale is not None
        step = table.scale.repeat_interleave(table.lengths)
        assert ((decoded - expected).abs() <= 0.5 * step + 1e-6 * expected.abs().max()).all()
        # A per-row code: the error is bounded per row, far below the range.
        assert (decoded - expected).abs().max() < (0.05 if dtype == "int8" else 0.8)
    assert report.rows == 37 and report.embedding_dim == 5
    assert report.avg_kept == pytest.approx(float(lengths.double().mean()))
    assert report.bytes_before == 37 * 5 * 4
    header = read_header(out)
    assert report.bytes_after == out.stat().st_size - header.data_start
    assert report.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()


def test_source_sha256_is_the_hash_of_the_source_tensor_bytes(tmp_path: Path) -> None:
    src, weight, lengths = source_file(tmp_path)
    report = pack_table(src, "t.weight", lengths, tmp_path / "t.safetensors", "int8", "t")
    entry = read_header(src).tensors["t.weight"]
    raw = src.read_bytes()[entry.offset : entry.offset + entry.nbytes]
    assert report.source_sha256 == hashlib.sha256(raw).hexdigest() == source_digest(weight)
    assert read_packed_table(tmp_path / "t.safetensors").metadata["source_sha256"] == (
        report.source_sha256
    )


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4"])
def test_streaming_in_tiny_chunks_equals_one_chunk(tmp_path: Path, dtype: str) -> None:
    src, _, lengths = source_file(tmp_path)
    files = []
    for i, chunk_bytes in enumerate([1, 3 * 5 * 4, 7 * 5 * 4 + 1, 1 << 30]):
        out = tmp_path / f"t{i}.safetensors"
        pack_table(src, "t.weight", lengths, out, dtype, "t", chunk_bytes=chunk_bytes)
        files.append(out.read_bytes())
    assert all(f == files[0] for f in files[1:])


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4"])
@pytest.mark.parametrize("equal", [False, True])
def test_streaming_writer_equals_in_memory_writer(tmp_path: Path, dtype: str, equal: bool) -> None:
    src, weight, lengths = source_file(tmp_path)
    if equal:
        lengths = torch.full_like(lengths, 5)  # every row full: a `row_length` table
    pack_table(src, "t.weight", lengths, tmp_path / "a.safetensors", dtype, "t", chunk_bytes=64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values, scale, bias = kept(weight, lengths), None, None
    if dtype == "int8":
        values, scale, bias = int8_encode(values, lengths)
    elif dtype == "int4":
        codes, scale, bias = int4_encode(values, lengths)
        values = pack_nibbles(codes)
    stored = write_packed_table(
        tmp_path / "b.safetensors", values, offsets, embedding_dim=5, field="t",
        source_sha256=source_digest(weight), scale=scale, bias=bias,
    )
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert read_packed_table(tmp_path / "a.safetensors").stored == stored
    assert ("row_length" in read_header(tmp_path / "a.safetensors").metadata) == equal


@pytest.mark.parametrize("source_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pack_table_widens_other_source_dtypes(tmp_path: Path, source_dtype: torch.dtype) -> None:
    src, weight, lengths = source_file(tmp_path, dtype=source_dtype)
    pack_table(src, "t.weight", lengths, tmp_path / "t.safetensors", "float32", "t")
    table = read_packed_table(tmp_path / "t.safetensors")
    assert torch.equal(table.values, kept(weight, lengths).to(torch.float32))
    assert table.metadata["source_dtype"] == str(source_dtype).removeprefix("torch.")


def test_safetensors_reads_streamed_files(tmp_path: Path) -> None:
    src, weight, lengths = source_file(tmp_path)
    out = tmp_path / "t.safetensors"
    pack_table(src, "t.weight", lengths, out, "bfloat16", "t", chunk_bytes=40)
    with safe_open(str(out), framework="pt") as f:
        values = f.get_tensor("values")
        assert f.metadata()["field"] == "t"
    assert values.dtype == torch.bfloat16
    assert torch.equal(values, kept(weight, lengths).to(torch.bfloat16))


def test_pack_table_progress_goes_to_stderr(tmp_path: Path, capsys) -> None:
    src, _, lengths = source_file(tmp_path)
    pack_table(src, "t.weight", lengths, tmp_path / "t.safetensors", "float32", "t", progress=True)
    captured = capsys.readouterr()
    assert "row" in captured.err and "37" in captured.err
    assert captured.out == ""


def test_nan_in_a_kept_value_is_rejected_but_not_in_the_tail(tmp_path: Path) -> None:
    lengths = torch.tensor([2, 1])
    weight = torch.tensor([[1.0, 2.0, 0.0], [3.0, float("nan"), 0.0]])
    save_file({"t.weight": weight}, str(tmp_path / "s.safetensors"))
    out = tmp_path / "t.safetensors"
    pack_table(tmp_path / "s.safetensors", "t.weight", lengths, out, "int8", "t")
    assert read_packed_table(out).values.numel() == 3  # the NaN sat past L_1 = 1: dropped
    weight[0, 1] = float("inf")
    save_file({"t.weight": weight}, str(tmp_path / "s.safetensors"))
    with pytest.raises(
        RunDirError,
        match="table `t` row 0 holds a non-finite value; the fine-tuned model is broken, "
        r"re-run `finetune` \(e.g. with a lower `lr`\)$",
    ):
        pack_table(tmp_path / "s.safetensors", "t.weight", lengths, out, "float32", "t")


def test_float16_overflow_is_rejected(tmp_path: Path) -> None:
    weight = torch.tensor([[1.0, 70000.0]])
    save_file({"t.weight": weight}, str(tmp_path / "s.safetensors"))
    with pytest.raises(
        RunDirError,
        match=r"beyond float16's range .*; pack with `dtype=float32` or `dtype=bfloat16`$",
    ):
        pack_table(
            tmp_path / "s.safetensors", "t.weight", torch.tensor([2]), tmp_path / "t.safetensors",
            "float16", "t",
        )
    assert not (tmp_path / "t.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary left behind


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_constant_rows_decode_exactly_or_within_half_a_step(tmp_path: Path, dtype: str) -> None:
    # 0.25 and 1.5 are float16 values: scale 0, bias the value, exact. 0.3 and 1e-30 are not:
    # the scale covers the gap to the rounded bias and the error stays under scale / 2.
    weight = torch.tensor([[0.25, 0.25, 0.0], [1.5, 0.0, 0.0], [0.3, 0.3, 0.0], [1e-30, 0.0, 0.0]])
    save_file({"t.weight": weight}, str(tmp_path / "s.safetensors"))
    out = tmp_path / "t.safetensors"
    lengths = torch.tensor([2, 1, 2, 1])
    pack_table(tmp_path / "s.safetensors", "t.weight", lengths, out, dtype, "t")
    table = read_packed_table(out)
    assert table.scale is not None and table.bias is not None
    decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
    expected = weight[prefix_mask(lengths, 3)]
    step = table.scale.repeat_interleave(lengths)
    assert ((decoded - expected).abs() <= step / 2).all()
    if dtype == "int8":
        assert decoded[:3].tolist() == [0.25, 0.25, 1.5]
        assert table.scale[:2].tolist() == [0.0, 0.0]
        assert (decoded[3:5] - 0.3).abs().max() < 1e-4
    else:
        # Symmetric int4 codes a constant row c as 7 * f16up(c / 7): off by under 7 float16
        # ulps of c / 7, i.e. a relative error under 2**-8 (1e-30 is below float16's smallest
        # step, 6e-8: it decodes to 0, within half a step).
        assert ((decoded - expected).abs() <= expected.abs() * 2**-8 + 1e-7).all()


@pytest.mark.parametrize(
    "name,lengths,message",
    [
        ("missing.weight", torch.tensor([1]), "has no tensor `missing.weight`"),
        ("other", torch.tensor([1, 1, 1]), r"tensor `other` is F32\[3\], not a 2-D float table"),
        ("t.weight", torch.tensor([1, 2]), r"is torch.int64\[2\], expected int64 \[37\]"),
        ("t.weight", torch.full((37,), 6), r"row 0 has length 6, outside \[1, D=5\]"),
        ("t.weight", torch.zeros(37, dtype=torch.int64), r"row 0 has length 0"),
    ],
    ids=["no tensor", "1-D", "lengths shape", "length > D", "length 0"],
)
def test_pack_table_rejects_bad_input(
    tmp_path: Path, name: str, lengths: torch.Tensor, message: str
) -> None:
    src, _, _ = source_file(tmp_path)
    with pytest.raises(RunDirError, match=message):
        pack_table(src, name, lengths, tmp_path / "t.safetensors", "float32", "t")


def test_unknown_dtype_is_rejected(tmp_path: Path) -> None:
    src, _, lengths = source_file(tmp_path)
    with pytest.raises(PackedFormatError) as info:
        pack_table(src, "t.weight", lengths, tmp_path / "t.safetensors", "fp8", "t")
    assert str(info.value) == (
        "`dtype=fp8` is not a packed dtype; pass one of float32, float16, bfloat16, int8, int4"
    )


# --- pack (run directory -> packed directory) -------------------------------------------------


def test_pack_writes_tables_rest_and_manifest(tmp_path: Path, toy) -> None:
    state, lengths = make_run_dir(tmp_path / "run", toy)
    report = pack(tmp_path / "run", tmp_path / "out", dtype="int8", progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "rest.safetensors", "tables.item.safetensors", "tables.user.safetensors",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "amtl-packed-model" and manifest["format_version"] == 2
    assert manifest["model"] == SPEC
    user, item = manifest["tables"]["tables.user"], manifest["tables"]["tables.item"]
    assert (user["kind"], user["num_embeddings"], user["embedding_dim"]) == ("Embedding", 50, 8)
    assert (item["kind"], item["num_embeddings"], item["embedding_dim"]) == ("EmbeddingBag", 30, 6)
    assert user["dtype"] == "int8"
    for entry in (user, item, manifest["rest"]):
        assert entry["sha256"] == hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest()
    with safe_open(str(out / "rest.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["head.bias", "head.weight", "steps"]
        assert torch.equal(f.get_tensor("head.weight"), state["head.weight"])
    table = read_packed_table(out / "tables.user.safetensors")
    assert torch.equal(table.lengths, lengths["tables.user"])
    assert table.field == "tables.user"

    assert [t.field for t in report.tables] == ["tables.item", "tables.user"]
    assert report.tables[1].file == out / "tables.user.safetensors"
    assert report.bytes_before == (50 * 8 + 30 * 6) * 4
    assert report.bytes_after == sum(t.bytes_after for t in report.tables)
    # The byte split, in the report and in the manifest (docs/format.md, "Byte accounting").
    for t in report.tables:
        entry = manifest["tables"][t.field]["bytes"]
        kept = int(lengths[t.field].sum())
        assert (t.stored.values, t.stored.row_metadata, t.stored.rotation) == (
            kept, 4 * t.rows, 0,
        )
        assert t.stored.index in (0, t.rows)  # uint8 lengths (D <= 255), or none
        assert entry == t.stored.to_json()
        assert entry["total"] == entry["values"] + entry["index"] + entry["row_metadata"]
        assert entry["ratio"] == round(entry["total"] / entry["dense"], 4)
    text = report.format_table()
    assert "tables.user" in text and "total" in text and f"{report.ratio:.1%}" in text


def test_pack_refuses_existing_output_without_overwrite(tmp_path: Path, toy) -> None:
    make_run_dir(tmp_path / "run", toy)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError) as info:
        pack(tmp_path / "run", tmp_path / "out", progress=False)
    assert str(info.value) == (
        f"output directory `{tmp_path / 'out'}` exists; pass `overwrite=True` to replace it"
    )
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, AmtlError)
    assert list((tmp_path / "out").iterdir()) == []


def test_pack_overwrite_replaces_output(tmp_path: Path, toy) -> None:
    make_run_dir(tmp_path / "run", toy)
    pack(tmp_path / "run", tmp_path / "out", dtype="float32", progress=False)
    pack(tmp_path / "run", tmp_path / "out", dtype="bfloat16", overwrite=True, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tables"]["tables.user"]["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run", "toy_pkg"]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("fail_at", [1, 4, 8])
def test_interrupted_pack_leaves_nothing_and_keeps_previous_output(
    tmp_path: Path, toy, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    make_run_dir(tmp_path / "run", toy)
    pack(tmp_path / "run", tmp_path / "previous", dtype="float32", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "previous").iterdir()}

    calls = 0
    real = table_pack_module._as_bytes

    def failing(t: torch.Tensor):
        nonlocal calls
        calls += 1
        if calls == fail_at:  # mid-table: offsets or some chunk already written
            raise Interrupted
        return real(t)

    monkeypatch.setattr(table_pack_module, "_as_bytes", failing)
    monkeypatch.setattr(table_pack_module, "DEFAULT_CHUNK_BYTES", 40)
    for target, overwrite in ((tmp_path / "fresh", False), (tmp_path / "previous", True)):
        calls = 0
        with pytest.raises(Interrupted):
            pack(tmp_path / "run", target, dtype="float32", overwrite=overwrite, progress=False)
    assert not (tmp_path / "fresh").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "previous").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous", "run", "toy_pkg"]


def test_interrupted_before_manifest_leaves_nothing(
    tmp_path: Path, toy, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_run_dir(tmp_path / "run", toy)

    def failing(*args: object) -> None:
        raise Interrupted

    monkeypatch.setattr(pack_module, "write_manifest", failing)
    with pytest.raises(Interrupted):
        pack(tmp_path / "run", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "toy_pkg"]


def test_pack_run_dir_errors(tmp_path: Path, toy) -> None:
    run = tmp_path / "run"
    with pytest.raises(RunDirError) as info:
        pack(run, tmp_path / "out", progress=False)
    assert str(info.value) == (
        f"run directory `{run}` does not exist; pass the `out` of `finetune`"
    )
    state, lengths = make_run_dir(run, toy)
    (run / "lengths.safetensors").unlink()
    with pytest.raises(
        RunDirError,
        match="has no `lengths.safetensors`; re-run `finetune` to write a complete run directory$",
    ):
        pack(run, tmp_path / "out", progress=False)

    save_file({"tables.usr": lengths["tables.user"]}, str(run / "lengths.safetensors"))
    with pytest.raises(RunDirError, match="names table `tables.usr` but .* has no `tables.usr"):
        pack(run, tmp_path / "out", progress=False)

    save_file({"tables.user": lengths["tables.user"] * 0}, str(run / "lengths.safetensors"))
    with pytest.raises(RunDirError, match=r"row 0 has length 0, outside \[1, D=8\]"):
        pack(run, tmp_path / "out", progress=False)

    save_file({"tables.user": lengths["tables.user"].float()}, str(run / "lengths.safetensors"))
    with pytest.raises(RunDirError, match="tensor `tables.user` is F32, expected I64"):
        pack(run, tmp_path / "out", progress=False)

    save_file({"head": torch.ones(1, dtype=torch.int64)}, str(run / "lengths.safetensors"))
    with pytest.raises(RunDirError, match="no Embedding/EmbeddingBag at `head`"):
        pack(run, tmp_path / "out", progress=False)

    save_file(state, str(run / "model.safetensors"))  # no spec metadata
    with pytest.raises(RunDirError, match="has no `amtl_compress.model` metadata"):
        pack(run, tmp_path / "out", progress=False)

    (run / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(RunDirError, match=r"truncated file \(4 bytes"):
        pack(run, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_pack_reports_an_unbuildable_spec(tmp_path: Path, toy) -> None:
    make_run_dir(tmp_path / "run", toy)
    state, _ = make_run_dir(tmp_path / "run2", toy)
    spec = json.dumps({"kind": "factory", "factory": "no_such_module_xyz:build"})
    save_file(state, str(tmp_path / "run2" / "model.safetensors"), {"amtl_compress.model": spec})
    with pytest.raises(AmtlError, match="no_such_module_xyz"):
        pack(tmp_path / "run2", tmp_path / "out", progress=False)


def test_int8_rejects_a_row_whose_range_overflows(tmp_path: Path) -> None:
    save_file({"t.weight": torch.tensor([[-3e38, 3e38]])}, str(tmp_path / "s.safetensors"))
    with pytest.raises(
        RunDirError, match=r"row 0 \(values in \[-3e\+38, 3e\+38\]\) needs int8 parameters beyond "
        "float16's range .*; pack with `dtype=float32` or"
    ):
        pack_table(
            tmp_path / "s.safetensors", "t.weight", torch.tensor([2]), tmp_path / "t.safetensors",
            "int8", "t",
        )


def test_file_names_are_plain_unique_and_clear_of_rest() -> None:
    names = pack_module._file_names(["rest", "a/b", "a_b", ".hidden", "emb.user"])
    assert names == {
        "rest": "rest-2.safetensors",
        "a/b": "a_b.safetensors",
        "a_b": "a_b-2.safetensors",
        ".hidden": "hidden.safetensors",
        "emb.user": "emb.user.safetensors",
    }


def test_pack_never_replaces_its_own_run_directory(tmp_path: Path, toy) -> None:
    make_run_dir(tmp_path / "run", toy)
    for out in (tmp_path / "run", tmp_path):
        with pytest.raises(RunDirError, match="would replace the run directory"):
            pack(tmp_path / "run", out, overwrite=True, progress=False)
    assert (tmp_path / "run" / "model.safetensors").is_file()


# --- manifest versions and the byte split -------------------------------------------------------


def test_version_1_manifest_still_loads(tmp_path: Path, toy) -> None:
    from amtl_compress.lookup.load import load_packed

    make_run_dir(tmp_path / "run", toy)
    pack(tmp_path / "run", tmp_path / "out", progress=False)
    path = tmp_path / "out" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["format_version"] = 1
    for entry in doc["tables"].values():
        del entry["bytes"]
    path.write_text(json.dumps(doc))
    manifest = read_manifest(tmp_path / "out")
    assert all(t.bytes is None for t in manifest.tables.values())
    load_packed(toy.build(), tmp_path / "out", verify=True)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda b: b.pop("index"), r"\.bytes needs non-negative integers values, index"),
        (lambda b: b.update(values=-1), r"\.bytes needs non-negative integers"),
        (lambda b: b.update(total=b["total"] + 1), r"\.bytes does not add up"),
        (lambda b: b.update(ratio="0.5"), r"\.bytes\.ratio is not a number"),
    ],
    ids=["missing part", "negative", "total", "ratio"],
)
def test_manifest_bytes_are_checked(tmp_path: Path, toy, edit, message: str) -> None:
    make_run_dir(tmp_path / "run", toy)
    pack(tmp_path / "run", tmp_path / "out", progress=False)
    path = tmp_path / "out" / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc["tables"]["tables.user"]["bytes"])
    path.write_text(json.dumps(doc))
    with pytest.raises(PackedFormatError, match=message):
        read_manifest(tmp_path / "out")


def test_pack_int4_directory_reads_back(tmp_path: Path, toy) -> None:
    state, lengths = make_run_dir(tmp_path / "run", toy)
    report = pack(tmp_path / "run", tmp_path / "out", dtype="int4", progress=False)
    for t in report.tables:
        kept_count = int(lengths[t.field].sum())
        assert t.stored.values == (kept_count + 1) // 2
        table = read_packed_table(t.file)
        assert table.dtype == "int4" and table.values.dtype == torch.uint8
        decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
        assert table.scale is not None
        step = table.scale.repeat_interleave(table.lengths)
        expected = kept(state[f"{t.field}.weight"], lengths[t.field])
        assert ((decoded - expected).abs() <= step / 2 + 1e-6).all()
    text = report.format_table()
    assert "packed int4" in text and "row meta" in text


def test_int4_directory_loads_and_looks_up_the_decoded_rows(tmp_path: Path, toy) -> None:
    from amtl_compress.lookup.load import load_packed

    make_run_dir(tmp_path / "run", toy)
    pack(tmp_path / "run", tmp_path / "out", dtype="int4", progress=False)
    try:
        model = load_packed(toy.build(), tmp_path / "out")
    except PackedFormatError as e:
        if "`values` must be" in str(e):
            pytest.skip("the lookup modules do not take int4 `values` yet")
        raise
    table = read_packed_table(tmp_path / "out" / "tables.user.safetensors")
    decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
    rows = torch.zeros(table.num_embeddings, table.embedding_dim)
    rows[prefix_mask(table.lengths, table.embedding_dim)] = decoded
    ids = torch.arange(table.num_embeddings)
    with torch.no_grad():
        looked_up = model.tables["user"](ids)
    assert torch.allclose(looked_up, rows, rtol=0, atol=1e-6)
