"""The ``torchrec`` adapter on a real ``torchrec.models.dlrm.DLRM`` (skipped without torchrec).

CI installs torchrec (scripts/setup-venv adds the ``torchrec`` extra to test/dev set-ups).
"""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch

from amtl_compress import AMTLConfig, attach_amtl_, detach_amtl, load_packed
from amtl_compress.core.rotation import RotatedLookup
from amtl_compress.errors import ConfigError
from amtl_compress.lookup.load import load_packed_model
from amtl_compress.lookup.modules import PackedEmbeddingBag
from amtl_compress.models.adapters import detect_adapter, get_adapter
from amtl_compress.models.factory import build_model
from amtl_compress.run_dir import write_run_dir
from amtl_compress.storage.format import prefix_mask
from amtl_compress.storage.pack import pack
from amtl_compress.surgery.masked import MaskedEmbeddingBag

torchrec = pytest.importorskip("torchrec")

from torchrec import EmbeddingBagCollection, EmbeddingBagConfig  # noqa: E402
from torchrec.models.dlrm import DLRM  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from amtl_compress.models.adapters.torchrec import torchrec_inputs  # noqa: E402

EBC = "sparse_arch.embedding_bag_collection.embedding_bags"


def small_dlrm(shared: bool = False, weighted: bool = False) -> DLRM:
    """Tables t_user (feature user_id) and t_tags (feature tags; also `genres` if shared)."""
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="t_user", embedding_dim=4, num_embeddings=10,
                           feature_names=["user_id"]),
        EmbeddingBagConfig(name="t_tags", embedding_dim=4, num_embeddings=6,
                           feature_names=["tags", "genres"] if shared else ["tags"]),
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables, is_weighted=weighted),
        dense_in_features=2, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1],
    )


def batch() -> dict[str, torch.Tensor]:
    # `tags` is a multi-hot list padded with -1: id 0 is a real row, row 1 is an empty bag.
    return {
        "user_id": torch.tensor([0, 3, 9]),
        "age": torch.tensor([1, 2, 3]),  # an integer column no feature reads: ignored
        "price": torch.tensor([0.5, -1.0, 2.0]),
        "tags": torch.tensor([[0, 5], [-1, -1], [2, -1]]),
        "activity": torch.tensor([1.0, 0.0, -3.0]),
    }


def test_detected_and_registered() -> None:
    adapter = get_adapter("torchrec")
    assert adapter.name == "torchrec" and adapter.list_padding == -1
    assert detect_adapter(small_dlrm()) == "torchrec"


def test_kjt_from_a_batch_keeps_id_0_and_empty_bags() -> None:
    dense, kjt = torchrec_inputs(batch(), ["user_id", "tags"], 2)
    assert torch.equal(dense, torch.tensor([[0.5, 1.0], [-1.0, 0.0], [2.0, -3.0]]))
    assert kjt.keys() == ["user_id", "tags"] and kjt.stride() == 3
    assert torch.equal(kjt.values(), torch.tensor([0, 3, 9, 0, 5, 2]))
    assert torch.equal(kjt.lengths(), torch.tensor([1, 1, 1, 2, 0, 1]))


def test_forward_is_the_models_own_on_the_same_kjt() -> None:
    model = small_dlrm().eval()
    by_hand = KeyedJaggedTensor(
        keys=["user_id", "tags"], values=torch.tensor([0, 3, 9, 0, 5, 2]),
        lengths=torch.tensor([1, 1, 1, 2, 0, 1]),
    )
    dense = torch.tensor([[0.5, 1.0], [-1.0, 0.0], [2.0, -3.0]])
    with torch.no_grad():
        want = model(dense, by_hand)
        got = get_adapter("torchrec").forward(model, batch())
    assert got.shape == (3, 1) and torch.equal(got, want)


def test_default_fields_map_tables_to_their_feature_columns() -> None:
    adapter = get_adapter("torchrec")
    columns = list(batch())
    assert adapter.default_fields(small_dlrm(), columns) == {
        f"{EBC}.t_user": "user_id", f"{EBC}.t_tags": "tags",
    }
    # A table shared by two features counts the first one's column.
    shared = small_dlrm(shared=True)
    assert adapter.default_fields(shared, [*columns, "genres"])[f"{EBC}.t_tags"] == "tags"
    # A table whose feature is no column is left out.
    assert adapter.default_fields(small_dlrm(), ["user_id"]) == {f"{EBC}.t_user": "user_id"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.pop("tags"), r"feature\(s\) `tags`, which are not columns"),
        (lambda b: b.pop("price"), r"takes 2 dense feature\(s\).*has 1 float column\(s\)"),
        (lambda b: b.update(extra=torch.zeros(3)), r"has 3 float column\(s\)"),
        (lambda b: b.update(user_id=torch.zeros(3)), "must hold integer ids"),
    ],
)
def test_batch_errors_are_one_line(change, message: str) -> None:
    features = batch()
    change(features)
    with pytest.raises(ConfigError, match=message) as exc:
        get_adapter("torchrec").forward(small_dlrm(), features)
    assert "\n" not in str(exc.value) and "docs/dlrm.md" in str(exc.value)


def test_model_errors_are_one_line() -> None:
    adapter = get_adapter("torchrec")
    with pytest.raises(ConfigError, match="is weighted"):
        adapter.forward(small_dlrm(weighted=True), batch())
    with pytest.raises(ConfigError, match="has no EmbeddingBagCollection"):
        adapter.forward(torch.nn.Linear(2, 1), batch())


def test_amtl_wraps_the_tables_inside_the_ebc() -> None:
    model = small_dlrm().eval()
    adapter = get_adapter("torchrec")
    with torch.no_grad():
        before = adapter.forward(model, batch())
    attach_amtl_(model, {"t_user": torch.arange(10), "t_tags": torch.arange(6)}, AMTLConfig())
    bags = model.sparse_arch.embedding_bag_collection.embedding_bags
    assert all(isinstance(bags[t], MaskedEmbeddingBag) for t in ("t_user", "t_tags"))
    with torch.no_grad():
        after = adapter.forward(model, batch())
    torch.testing.assert_close(after, before)  # warm start (up to the PCA rotation's rounding)
    model.train()
    adapter.forward(model, batch()).sum().backward()
    assert bags["t_user"].base_layer.weight.grad.abs().sum() > 0
    plain, lengths = detach_amtl(model)
    assert set(lengths) == {f"{EBC}.t_user", f"{EBC}.t_tags"}
    with torch.no_grad():
        torch.testing.assert_close(adapter.forward(plain.eval(), batch()), before)


# --- pack and load_packed on a run directory of a TorchRec DLRM ---------------------------------

FACTORY_MODULE = "amtl_torchrec_toy"
FACTORY = '''
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM


def build(device=None):
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="t_user", embedding_dim=4, num_embeddings=10,
                           feature_names=["user_id"]),
        EmbeddingBagConfig(name="t_tags", embedding_dim=4, num_embeddings=6,
                           feature_names=["tags"]),
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=device),
        dense_in_features=2, dense_arch_layer_sizes=[8, 4], over_arch_layer_sizes=[8, 1],
    )
'''


@pytest.fixture
def factory(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """``amtl_torchrec_toy:build``, importable; not imported yet (pack must import it first)."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / f"{FACTORY_MODULE}.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop(FACTORY_MODULE, None)
    yield f"{FACTORY_MODULE}:build"
    sys.modules.pop(FACTORY_MODULE, None)


def handmade_run(out, factory: str):
    """A run directory as finetune writes it: AMTL attached and detached, rows cut at random."""
    model = build_model({"kind": "factory", "factory": factory})
    attach_amtl_(model, {"t_user": torch.ones(10, dtype=torch.int64),
                         "t_tags": torch.ones(6, dtype=torch.int64)}, AMTLConfig())
    plain, lengths = detach_amtl(model)
    generator = torch.Generator().manual_seed(1)
    for path, length in lengths.items():
        length.copy_(torch.randint(1, 5, length.shape, generator=generator))
        with torch.no_grad():
            plain.get_submodule(path).weight[~prefix_mask(length, 4)] = 0.0
    spec = {"kind": "factory", "factory": factory}
    write_run_dir(out, False, plain, spec, lengths, {}, {}, {})
    return plain.eval()


@pytest.mark.filterwarnings("ignore:AMTL_COMPRESS_KERNEL=reference")
def test_pack_and_load_packed_on_a_torchrec_dlrm(factory: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AMTL_COMPRESS_KERNEL", "reference")  # the wiring; kernels: test_lookup_*
    tuned = handmade_run(tmp_path / "run", factory)
    sys.modules.pop(FACTORY_MODULE, None)  # pack builds the model on meta: imports it first
    pack(tmp_path / "run", tmp_path / "packed", progress=False)
    adapter = get_adapter("torchrec")
    with torch.no_grad():
        want = adapter.forward(tuned, batch())
    build = importlib.import_module(FACTORY_MODULE).build
    # The tables of the model may sit on meta (no memory for them; the rest on the CPU).
    for model in (load_packed(build(), tmp_path / "packed"),
                  load_packed(build(device=torch.device("meta")), tmp_path / "packed"),
                  load_packed_model(tmp_path / "packed")):
        table = model.sparse_arch.embedding_bag_collection.embedding_bags["t_tags"]
        assert isinstance(table, RotatedLookup) and isinstance(table.table, PackedEmbeddingBag)
        with torch.no_grad():
            assert torch.equal(adapter.forward(model.eval(), batch()), want)


# --- finetune -> pack -> load_packed end to end, Python API and CLI -----------------------------

E2E_MODULE = "amtl_torchrec_e2e"
E2E_FACTORY = '''
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM


def build():
    """The synthetic data set of tests/conftest.py: its columns are the feature names."""
    sizes = {"user_id": 400, "item_id": 200, "tags": 21}
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=n,
                                 feature_names=[f]) for f, n in sizes.items()]
    return DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables),
                dense_in_features=1, dense_arch_layer_sizes=[16, 8],
                over_arch_layer_sizes=[16, 1])
'''
TABLES = {f"{EBC}.t_{f}" for f in ("user_id", "item_id", "tags")}


@pytest.fixture(scope="module")
def e2e(synthetic, tmp_path_factory):
    """(factory, trained checkpoint): a TorchRec DLRM trained 1 epoch with a plain Adam loop."""
    from safetensors.torch import save_file

    from amtl_compress.data import open_data

    folder = tmp_path_factory.mktemp("torchrec_pkg")
    (folder / f"{E2E_MODULE}.py").write_text(E2E_FACTORY)
    sys.path.insert(0, str(folder))
    try:
        torch.manual_seed(0)
        model = importlib.import_module(E2E_MODULE).build()
        adapter = get_adapter("torchrec")
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        data = open_data(synthetic.train, list_padding=adapter.list_padding)
        for features, labels in data.batches(256, shuffle=True):
            logits = adapter.forward(model, features).reshape(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        base = folder / "base.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
        yield f"{E2E_MODULE}:build", base
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(E2E_MODULE, None)


def test_state_dict_paths_are_the_tables(e2e) -> None:
    # The checkpoint holds the EBC's tables at the paths the adapter maps (no renaming needed).
    from safetensors.torch import load_file

    names = load_file(str(e2e[1]))
    assert {k.removesuffix(".weight") for k in names if k.startswith(EBC)} == TABLES


def scores(model, path) -> torch.Tensor:
    """The model's logits on every row of ``path`` (lists padded with -1), through the adapter."""
    from amtl_compress.data.dataset import TabularData

    adapter = get_adapter("torchrec")
    data = TabularData.open(path, list_padding=adapter.list_padding)
    model.eval()
    with torch.no_grad():
        return torch.cat([adapter.forward(model, f).reshape(-1) for f, _ in data.batches(1000)])


def test_finetune_pack_load_packed_python_api(synthetic, e2e, tmp_path) -> None:
    from amtl_compress.checkpoint import load_model
    from amtl_compress.training.config import FinetuneConfig
    from amtl_compress.training.finetune import finetune

    factory, base = e2e
    config = FinetuneConfig(epochs=1, batch_size=512, target_ratio=0.5)  # no fields: the adapter's
    finetune(base, synthetic.train, synthetic.valid, tmp_path / "run", config,
             model_factory=factory, adapter="torchrec", progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["tables"]) == TABLES
    pack(tmp_path / "run", tmp_path / "packed", progress=False)
    tuned, _ = load_model(tmp_path / "run" / "model.safetensors", factory)
    want = scores(tuned, synthetic.test)
    build = importlib.import_module(E2E_MODULE).build
    for packed in (load_packed(build(), tmp_path / "packed"),
                   load_packed_model(tmp_path / "packed")):
        table = packed.sparse_arch.embedding_bag_collection.embedding_bags["t_tags"]
        assert isinstance(table, RotatedLookup) and isinstance(table.table, PackedEmbeddingBag)
        assert torch.equal(scores(packed, synthetic.test), want)


def test_finetune_pack_eval_cli(synthetic, e2e, tmp_path) -> None:
    from typer.testing import CliRunner

    from amtl_compress.cli import app

    factory, base = e2e
    runner = CliRunner(mix_stderr=False)
    model = ["--model", factory, "--adapter", "torchrec"]
    result = runner.invoke(app, [
        "finetune", str(base), *model, "--data", str(synthetic.train), "--valid",
        str(synthetic.valid), "--target-ratio", "0.5", "--epochs", "1", "--batch-size", "512",
        "--out", str(tmp_path / "run"), "-q",
    ])
    assert result.exit_code == 0, result.output + result.stderr
    assert all(t in result.stdout for t in TABLES)
    result = runner.invoke(app, ["pack", str(tmp_path / "run"), "--out", str(tmp_path / "packed"),
                                 "--dtype", "int8", "-q"])
    assert result.exit_code == 0, result.output + result.stderr
    result = runner.invoke(app, [
        "eval", str(synthetic.test), "--checkpoint", str(base), *model,
        "--run", str(tmp_path / "run"), "--packed", str(tmp_path / "packed"),
    ])
    assert result.exit_code == 0, result.output + result.stderr
    auc = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()
           if line.split() and line.split()[0] in ("checkpoint", "fine-tuned", "packed")}
    assert set(auc) == {"checkpoint", "fine-tuned", "packed"}
    assert abs(auc["packed"] - auc["fine-tuned"]) < 5e-3  # int8 values


def test_plan_without_fields_plans_every_table(synthetic, e2e) -> None:
    from typer.testing import CliRunner

    from amtl_compress.cli import app

    factory, base = e2e
    result = CliRunner(mix_stderr=False).invoke(app, [
        "plan", str(base), "--model", factory, "--adapter", "torchrec",
        "--valid", str(synthetic.valid), "--ratios", "0.5", "-q",
    ])
    assert result.exit_code == 0, result.output + result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("ratio"))
    assert set(header.split()[1:]) == TABLES
