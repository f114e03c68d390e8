"""``load_packed``: packed lookups swapped into a user model give the fine-tuned model's outputs."""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from amtl_compress._io import atomic_save_safetensors
from amtl_compress.errors import CheckpointError, PackedFormatError
from amtl_compress.lookup.load import load_packed
from amtl_compress.storage.format import prefix_mask, read_packed_table
from amtl_compress.storage.header import read_header
from amtl_compress.storage.pack import pack
from amtl_compress.storage.quantize import dequantize_values

TOY_MODEL = '''
import torch
from torch import nn


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.user = nn.Embedding(40, 8, padding_idx=0)
        self.bags = nn.ModuleDict({
            "mean": nn.EmbeddingBag(30, 6, mode="mean", padding_idx=2, include_last_offset=True),
            "max": nn.EmbeddingBag(20, 6, mode="max"),
            "sum": nn.EmbeddingBag(20, 6, mode="sum"),
        })
        self.norm = nn.BatchNorm1d(26)
        self.head = nn.Linear(26, 1)

    def forward(self, user, items, item_offsets, tags, weights):
        x = torch.cat([
            self.user(user),
            self.bags["mean"](items, item_offsets),
            self.bags["max"](tags),
            self.bags["sum"](tags, per_sample_weights=weights),
        ], dim=1)
        return self.head(self.norm(x)).squeeze(1)


def build():
    return Toy()
'''
SPEC = {"kind": "factory", "factory": "amtl_storage_load_toy:build"}
TABLES = ("user", "bags.mean", "bags.max", "bags.sum")


@pytest.fixture(autouse=True)
def reference_lookup(monkeypatch: pytest.MonkeyPatch):
    # These tests check load_packed's wiring; the lookup's own kernel is tested in test_lookup_*.
    # The reference gives the same bits and needs no compiler.
    monkeypatch.setenv("AMTL_COMPRESS_KERNEL", "reference")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="AMTL_COMPRESS_KERNEL=reference")
        yield


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "toy_pkg"
    folder.mkdir()
    (folder / "amtl_storage_load_toy.py").write_text(TOY_MODEL)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("amtl_storage_load_toy", None)
    yield importlib.import_module("amtl_storage_load_toy")
    sys.modules.pop("amtl_storage_load_toy", None)


@pytest.fixture
def tuned(tmp_path: Path, toy) -> nn.Module:
    """A 'fine-tuned' toy model (tails zeroed, BatchNorm stats moved) and its run directory."""
    torch.manual_seed(0)
    model = toy.build()
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.5, 2)
    lengths = {}
    with torch.no_grad():
        for path in TABLES:
            weight = model.get_submodule(path).weight
            n, d = weight.shape
            lengths[path] = torch.randint(1, d + 1, (n,))
            weight[~prefix_mask(lengths[path], d)] = 0.0
    run = tmp_path / "run"
    meta = {"amtl_compress.model": json.dumps(SPEC)}
    atomic_save_safetensors(model.state_dict(), run / "model.safetensors", meta)
    atomic_save_safetensors(lengths, run / "lengths.safetensors")
    return model.eval()


def batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    user = torch.randint(0, 40, (16,), generator=g)
    user[0] = 0  # the padding row
    items = torch.randint(0, 30, (50,), generator=g)
    items[:5] = 2  # padding_idx inside bags
    item_offsets = torch.tensor([0, 3, 3, 10, 17, 20, 26, 30, 31, 33, 38, 40, 41, 44, 47, 49, 50])
    tags = torch.randint(0, 20, (16, 4), generator=g)
    weights = torch.rand(16, 4, generator=g)
    return user, items, item_offsets, tags, weights


def test_load_packed_float32_matches_the_tuned_model_bitwise(tmp_path: Path, toy, tuned) -> None:
    pack(tmp_path / "run", tmp_path / "out", dtype="float32", progress=False)
    fresh = toy.build()
    result = load_packed(fresh, tmp_path / "out", verify=True)
    assert result is fresh
    from amtl_compress.lookup.modules import PackedEmbedding, PackedEmbeddingBag

    assert isinstance(fresh.user, PackedEmbedding)
    bag = fresh.bags["mean"]
    assert isinstance(bag, PackedEmbeddingBag)
    assert (bag.mode, bag.padding_idx, bag.include_last_offset) == ("mean", 2, True)
    assert fresh.bags["max"].mode == "max"
    assert "user.weight" not in dict(fresh.named_parameters())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(*batch()), tuned(*batch()))
        ids = torch.arange(40)
        assert torch.equal(fresh.user(ids), tuned.user(ids))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("mmap", [True, False])
def test_load_packed_lossy_dtypes_match_the_decoded_dense_model(
    tmp_path: Path, toy, tuned, dtype: str, mmap: bool
) -> None:
    pack(tmp_path / "run", tmp_path / "out", dtype=dtype, progress=False)
    fresh = load_packed(toy.build(), tmp_path / "out", mmap=mmap).eval()
    # The dense twin: each table replaced by its decoded rows, zero tails (what a lossless
    # lookup of the packed values must return).
    twin = toy.build()
    twin.load_state_dict(tuned.state_dict())
    twin.eval()
    for path in TABLES:
        table = read_packed_table(tmp_path / "out" / f"{path}.safetensors")
        decoded = dequantize_values(table.values, table.offsets, table.scale, table.bias)
        weight = twin.get_submodule(path).weight
        with torch.no_grad():
            weight.zero_()
            weight[prefix_mask(table.lengths, weight.shape[1])] = decoded
    with torch.no_grad():
        out, expected, original = fresh(*batch()), twin(*batch()), tuned(*batch())
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out, original, rtol=0.05, atol=0.05)  # and close to the fp32 model


def test_load_packed_state_dict_and_device_move(tmp_path: Path, toy, tuned) -> None:
    pack(tmp_path / "run", tmp_path / "out", dtype="int8", progress=False)
    model = load_packed(toy.build(), tmp_path / "out")
    keys = set(model.state_dict())
    assert {"user.values", "user.offsets", "user.scale", "user.bias", "head.weight"} <= keys
    assert "user.weight" not in keys
    assert torch.equal(model.norm.running_mean, tuned.norm.running_mean)


# --- the model does not fit -------------------------------------------------------------------


def changed(toy, edit) -> nn.Module:
    model = toy.build()
    edit(model)
    return model


FIX = "; pass the model it was packed from"


# The messages are the contract (one line: what does not fit; the fix), so they are pinned whole.
@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: delattr(m, "user"),
         "the model has no module `user`, which the packed directory replaces" + FIX),
        (lambda m: setattr(m, "user", nn.Linear(8, 40)),
         "module `user` is a `Linear` but was packed from a `Embedding`" + FIX),
        (lambda m: setattr(m, "user", nn.EmbeddingBag(40, 8)),
         "module `user` is a `EmbeddingBag` but was packed from a `Embedding`" + FIX),
        (lambda m: setattr(m, "user", nn.Embedding(41, 8)),
         "module `user` is (41, 8) but its packed table is (40, 8)" + FIX),
        (lambda m: setattr(m, "user", nn.Embedding(40, 8, max_norm=1.0)),
         "module `user` renormalises rows (max_norm=1.0), which a packed table cannot do; build "
         "the model without max_norm"),
        (lambda m: setattr(m, "extra", nn.Linear(2, 2)),
         "`{rest}` does not fit the model (missing `extra.bias`, `extra.weight`)" + FIX),
        (lambda m: delattr(m, "norm"),
         "`{rest}` does not fit the model (unexpected `norm.bias`, `norm.num_batches_tracked`, "
         "`norm.running_mean`, `norm.running_var`, `norm.weight`)" + FIX),
        (lambda m: setattr(m, "head", nn.Linear(26, 2)),
         "`{rest}` tensor `head.bias` has shape [1] but the model's is [2]" + FIX),
    ],
    ids=["missing", "not embedding", "kind", "N", "max_norm", "missing keys", "unexpected",
         "shape"],
)
def test_model_mismatch_raises_and_leaves_model_untouched(
    tmp_path: Path, toy, tuned, edit, message: str
) -> None:
    pack(tmp_path / "run", tmp_path / "out", progress=False)
    model = changed(toy, edit)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_packed(model, tmp_path / "out")
    assert str(info.value) == message.replace("{rest}", str(tmp_path / "out" / "rest.safetensors"))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- the directory is broken ------------------------------------------------------------------


def test_directory_errors(tmp_path: Path, toy, tuned) -> None:
    out = tmp_path / "out"
    with pytest.raises(PackedFormatError, match="packed directory .* does not exist"):
        load_packed(toy.build(), out)
    pack(tmp_path / "run", out, progress=False)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())

    def load_with(doc: dict | str, message: str) -> None:
        manifest_path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(PackedFormatError, match=message):
            load_packed(toy.build(), out)

    load_with("{", "manifest.json`: not valid JSON")
    load_with({**manifest, "format_version": 3}, "`format_version` 3 is not supported")
    load_with({**manifest, "format": "x"}, "`format` is 'x', expected `amtl-packed-model`")
    tables = manifest["tables"]
    for bad_file in ("../run/model.safetensors", ".hidden", "manifest.json"):
        evil = {**tables, "user": {**tables["user"], "file": bad_file}}
        load_with({**manifest, "tables": evil}, "names an invalid file")
    gone = {**tables, "user": {**tables["user"], "file": "gone.safetensors"}}
    load_with({**manifest, "tables": gone}, "names `gone.safetensors`, which is missing")
    same = {**tables, "user": {**tables["user"], "file": tables["bags.max"]["file"]}}
    load_with({**manifest, "tables": same}, "two entries name the same file")
    kind = {**tables, "user": {**tables["user"], "kind": "Linear"}}
    load_with({**manifest, "tables": kind}, r"`tables.user`.kind is 'Linear'")
    swapped = {**tables, "user": {**tables["user"], "file": tables["bags.sum"]["file"]},
               "bags.sum": {**tables["bags.sum"], "file": tables["user"]["file"]}}
    load_with({**manifest, "tables": swapped}, "holds .* but `manifest.json` lists")
    dims = {**tables, "user": {**tables["user"], "num_embeddings": 41}}
    load_with({**manifest, "tables": dims}, r"\('user', 40, 8, 'float32'\) but `manifest.json`")
    load_with({**manifest, "rest": {"file": "rest.safetensors", "sha256": "x"}}, "rest.sha256")

    manifest_path.unlink()
    with pytest.raises(PackedFormatError, match="has no `manifest.json`"):
        load_packed(toy.build(), out)


def test_verify_catches_a_flipped_bit_that_validation_cannot(tmp_path: Path, toy, tuned) -> None:
    out = tmp_path / "out"
    pack(tmp_path / "run", out, progress=False)
    path = out / "user.safetensors"
    raw = bytearray(path.read_bytes())
    values = read_header(path).tensors["values"]
    raw[values.offset + values.nbytes - 1] ^= 0x01  # inside `values`: header and index stay valid
    path.write_bytes(bytes(raw))
    load_packed(toy.build(), out)  # structure is fine, so the default path loads it
    with pytest.raises(PackedFormatError, match="user.safetensors`: SHA-256 differs"):
        load_packed(toy.build(), out, verify=True)


def test_corrupt_table_file_is_rejected_before_lookup(tmp_path: Path, toy, tuned) -> None:
    out = tmp_path / "out"
    pack(tmp_path / "run", out, progress=False)
    path = out / "bags.max.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(PackedFormatError, match="bags.max.safetensors`: truncated file"):
        load_packed(toy.build(), out)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_load_packed_with_the_compiled_kernel(
    tmp_path: Path, toy, tuned, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """The same wiring through the compiled lookup (builds it once, ~1-2 min, if not cached)."""
    from amtl_compress.lookup import ops

    monkeypatch.delenv("AMTL_COMPRESS_KERNEL")
    if not ops.kernel_available():
        pytest.skip("the lookup kernel cannot be built here (no C++ compiler?)")
    pack(tmp_path / "run", tmp_path / "out", dtype=dtype, progress=False)
    model = load_packed(toy.build(), tmp_path / "out").eval()
    with torch.no_grad():
        out = model(*batch())  # compiled kernel
        monkeypatch.setenv("AMTL_COMPRESS_KERNEL", "reference")
        assert torch.equal(out, model(*batch()))  # same bits from the reference
        if dtype == "float32":
            assert torch.equal(out, tuned(*batch()))


def test_a_model_built_on_the_meta_device_is_filled_without_its_dense_tables(
    tmp_path: Path, toy, tuned
) -> None:
    # Serving a table larger than RAM: the user's model is built with no memory behind it.
    pack(tmp_path / "run", tmp_path / "out", dtype="float32", progress=False)
    with torch.device("meta"):
        fresh = toy.build()
    load_packed(fresh, tmp_path / "out").eval()
    leftover = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    assert leftover == []
    with torch.no_grad():
        assert torch.equal(fresh(*batch()), tuned(*batch()))


def test_load_packed_model_builds_on_meta_and_falls_back_for_non_persistent_buffers(
    tmp_path: Path, toy, tuned, monkeypatch: pytest.MonkeyPatch
) -> None:
    from amtl_compress.lookup.load import load_packed_model

    pack(tmp_path / "run", tmp_path / "out", dtype="float32", progress=False)
    devices: list[str] = []
    real_build = toy.build

    def build():
        model = real_build()
        devices.append(model.head.weight.device.type)
        return model

    monkeypatch.setattr(toy, "build", build)
    model = load_packed_model(tmp_path / "out")
    assert devices == ["meta"]
    with torch.no_grad():
        assert torch.equal(model(*batch()), tuned(*batch()))

    def build_with_scratch():
        model = build()
        model.register_buffer("scratch", torch.zeros(3), persistent=False)
        return model

    devices.clear()
    monkeypatch.setattr(toy, "build", build_with_scratch)
    model = load_packed_model(tmp_path / "out")
    assert devices == ["meta", "cpu"]  # rebuilt for real: no file holds `scratch`
    assert not model.scratch.is_meta
    with torch.device("meta"):
        meta_model = build_with_scratch()
    with pytest.raises(CheckpointError, match="`scratch` is on the meta device"):
        load_packed(meta_model, tmp_path / "out")


# --- device= ----------------------------------------------------------------------------------


def test_device_cpu_is_the_default_path(tmp_path: Path, toy, tuned) -> None:
    from amtl_compress.lookup.load import load_packed_model

    pack(tmp_path / "run", tmp_path / "out", dtype="int8", progress=False)
    default = load_packed(toy.build(), tmp_path / "out").eval()
    on_cpu = load_packed(toy.build(), tmp_path / "out", device="cpu").eval()
    model = load_packed_model(tmp_path / "out", device=torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(on_cpu(*batch()), default(*batch()))
        assert torch.equal(model(*batch()), default(*batch()))
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_device_cuda_without_cuda_is_one_error_before_anything_is_read(
    tmp_path: Path, toy
) -> None:
    from amtl_compress.errors import ConfigError
    from amtl_compress.lookup.load import load_packed_model

    model = toy.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: load_packed(model, tmp_path / "missing", device="cuda"),
                 lambda: load_packed_model(tmp_path / "missing", device="cuda:0")):
        with pytest.raises(ConfigError, match=r"^`device='cuda(:0)?'` but CUDA is not available "
                                              r"\(.*\); pass `device='cpu'`$"):
            call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="`device='gpu'` is not a device torch knows"):
        load_packed(model, tmp_path / "missing", device="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_cuda_serves_the_model_on_the_gpu(tmp_path: Path, toy, tuned,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from amtl_compress.lookup.load import load_packed_model

    monkeypatch.delenv("AMTL_COMPRESS_KERNEL")  # CUDA tables: the Triton kernels
    pack(tmp_path / "run", tmp_path / "out", dtype="float32", progress=False)
    model = load_packed_model(tmp_path / "out", device="cuda")
    assert {t.device.type for t in model.state_dict().values()} == {"cuda"}
    with torch.no_grad():
        out = model(*(t.cuda() for t in batch())).cpu()
    assert torch.allclose(out, tuned(*batch()), rtol=1e-5, atol=1e-5)  # the MLP: cuBLAS
