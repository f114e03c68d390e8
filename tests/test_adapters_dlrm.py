"""facebookresearch/dlrm's DLRM_Net, unmodified, through `adapter="dlrm"`: its batches, its
probabilities, its sparse tables, its checkpoint file, --field templates, and the whole
finetune -> pack -> load_packed path (tests/dlrm_net.py holds the model with DLRM_Net's
interface)."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dlrm_net import (
    DIM,
    ROWS,
    DLRM_Net,
    build_dlrm_net,
    make_dlrm_data,
    save_like_dlrm,
    train_like_dlrm,
)
from torch import nn
from typer.testing import CliRunner

import amtl_compress
from amtl_compress.checkpoint import load_model, load_state_dict
from amtl_compress.cli import app
from amtl_compress.data import open_data
from amtl_compress.errors import CheckpointError, ConfigError, DataError
from amtl_compress.lookup.load import load_packed_model
from amtl_compress.models.adapters import (
    ModelAdapter,
    adapter_names,
    detect_adapter,
    get_adapter,
    register_adapter,
)
from amtl_compress.models.adapters.call import (
    ModelCall,
    check_model_call,
    first_batch,
    recorded_output,
)
from amtl_compress.models.adapters.dlrm import dlrm_inputs
from amtl_compress.models.dlrm import DLRM, DLRMConfig
from amtl_compress.surgery.targets import field_column, find_embedding_modules, target_matches
from amtl_compress.training.config import FinetuneConfig, parse_field
from amtl_compress.training.finetune import finetune
from amtl_compress.training.loop import evaluate
from tests.reliability_helpers import interrupt_at_step

FACTORY = "dlrm_net:build_dlrm_net"


@pytest.fixture(scope="module")
def dlrm_task(tmp_path_factory):
    """(data paths, a dlrm_s_pytorch-style .pt of a DLRM_Net trained with sparse SGD)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dlrm")
    paths = make_dlrm_data(root, num_rows=5000, seed=1)
    torch.manual_seed(0)
    model = build_dlrm_net()
    optimizer = train_like_dlrm(model, paths["train"], epochs=2, batch_size=256)
    save_like_dlrm(model, optimizer, root / "dlrm.pt")
    return paths, root / "dlrm.pt"


def _trained(dlrm_task) -> DLRM_Net:
    model = build_dlrm_net()
    model.load_state_dict(load_state_dict(dlrm_task[1])[0])
    return model.eval()


# ---- the registry -------------------------------------------------------------------------------


def test_registry_detection_and_lookup() -> None:
    assert {"features", "dlrm", "torchrec"} <= set(adapter_names())
    assert isinstance(get_adapter("dlrm"), ModelAdapter)
    assert detect_adapter(build_dlrm_net()) == "dlrm"
    assert detect_adapter(DLRM(DLRMConfig(categorical={"a": 3, "b": 4}))) == "features"
    fake = type("DLRM", (nn.Module,), {"__module__": "torchrec.models.dlrm"})()
    assert detect_adapter(fake) == "torchrec"  # by class module; torchrec is not imported
    with pytest.raises(ConfigError, match=r"`adapter='nope'` is unknown: use one of"):
        get_adapter("nope")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torchrec") is not None, reason="torchrec installed"
)
def test_torchrec_adapter_without_torchrec_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"needs the package `torchrec`.*pip install"):
        get_adapter("torchrec")


def test_register_adapter_checks_the_interface() -> None:
    class Custom:
        name = "custom-test"

        def forward(self, model, features):
            return model(features["x"])

        def default_fields(self, model, columns):
            return {}

    assert register_adapter(Custom()) is get_adapter("custom-test")
    with pytest.raises(ConfigError, match="needs a `name` string"):
        register_adapter(object())  # type: ignore[arg-type]


# ---- batches -> (dense_x, lS_o, lS_i) ---------------------------------------------------------


def test_dlrm_inputs_bags_categorical_and_multi_hot_columns() -> None:
    features = {
        "dense_1": torch.tensor([3.0, 4.0]), "dense_0": torch.tensor([1.0, 2.0]),
        "cat_1": torch.tensor([[0, 5, -1], [-1, -1, -1]]),  # id 0 real, the second bag empty
        "cat_0": torch.tensor([7, 0]), "other": torch.tensor([9, 9]),
    }
    dense_x, offsets, indices = dlrm_inputs(features, num_tables=2)
    assert torch.equal(dense_x, torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
    assert [o.tolist() for o in offsets] == [[0, 1], [0, 2]]
    assert [i.tolist() for i in indices] == [[7, 0], [0, 5]]
    with pytest.raises(ConfigError, match=r"2 tables in `emb_l` but the data has 3 `cat_\*`"):
        dlrm_inputs({**features, "cat_2": torch.tensor([1, 1])}, num_tables=2)
    with pytest.raises(ConfigError, match=r"`cat_1` is missing \(found `cat_2`\)"):
        dlrm_inputs({"dense_0": features["dense_0"], "cat_0": features["cat_0"],
                     "cat_2": features["cat_0"]})
    with pytest.raises(ConfigError, match=r"needs columns `dense_0`"):
        dlrm_inputs({"cat_0": features["cat_0"]})


def test_multi_hot_lists_keep_id_zero_with_list_padding(tmp_path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({
        "tags": pa.array([[0, 3], [], [2]], type=pa.list_(pa.int64())), "label": [0, 1, 0],
    }), path)
    with pytest.raises(DataError, match="list id 0 is reserved for padding"):
        open_data(path)
    data = open_data(path, list_padding=-1)
    assert data.column("tags").tolist() == [[0, 3], [-1, -1], [2, -1]]
    data.validate_ids("tags", 4)
    with pytest.raises(DataError, match="list_padding=5"):
        open_data(path, list_padding=5)
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pq.read_table(path), folder / "a.parquet")
    streamed = open_data(folder, list_padding=-1)
    features, _ = next(iter(streamed.batches(3)))
    assert features["tags"].tolist() == [[0, 3], [-1, -1], [2, -1]]


# ---- what the model returns ---------------------------------------------------------------------


class _Functional(nn.Module):
    """Probabilities through torch.sigmoid (no Sigmoid module), or raw logits, or bad shapes."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(10, 2)

    def forward(self, batch):
        z = self.emb(batch["a"]).sum(1) * 3
        if self.kind == "probs":
            return torch.sigmoid(z)
        if self.kind == "pair":
            return torch.stack([z, z], dim=1)
        if self.kind == "int":
            return batch["a"]
        return z


def test_output_is_decided_and_said(dlrm_task) -> None:
    model, features = _trained(dlrm_task), _valid_batch(dlrm_task)
    call, note = check_model_call(model, get_adapter("dlrm"), features)
    assert call.output == "probs" and "its last module is a Sigmoid" in note
    assert model.training is False
    torch.manual_seed(0)
    batch = {"a": torch.randint(0, 10, (64,))}
    call, note = check_model_call(_Functional("probs"), get_adapter("features"), batch)
    assert call.output == "probs" and "all lie in [0, 1]" in note
    call, note = check_model_call(_Functional("logits"), get_adapter("features"), batch)
    assert call.output == "logits" and call.is_plain and "leave [0, 1]" in note
    call, _ = check_model_call(model, get_adapter("dlrm"), features, "logits")
    assert call.output == "logits"  # asked for: obeyed
    with pytest.raises(ConfigError, match=r"`output='probs'` but the model returned values in"):
        check_model_call(_Functional("logits"), get_adapter("features"), batch, "probs")
    with pytest.raises(ConfigError, match=r"returned shape \(64, 2\) for a batch of 64 rows"):
        check_model_call(_Functional("pair"), get_adapter("features"), batch)
    with pytest.raises(ConfigError, match=r"returned a torch.int64 tensor"):
        check_model_call(_Functional("int"), get_adapter("features"), batch)
    with pytest.raises(ConfigError, match=r"`output='maybe'` is unknown"):
        check_model_call(model, get_adapter("dlrm"), features, "maybe")
    assert recorded_output(None, {"kind": "dlrm"})[0] == "logits"
    assert recorded_output("auto", {"kind": "factory", "output": "probs"})[0] == "probs"


def test_dlrm_net_through_the_batch_dict_is_one_line_naming_the_contract(dlrm_task) -> None:
    with pytest.raises(ConfigError) as info:
        check_model_call(_trained(dlrm_task), get_adapter("features"), _valid_batch(dlrm_task))
    message = str(info.value)
    assert "\n" not in message
    assert "raised TypeError: " in message and "lS_o" in message
    assert 'adapter="dlrm"' in message and "docs/data.md" in message


def test_probabilities_are_scored_as_probabilities(dlrm_task) -> None:
    model = _trained(dlrm_task)
    data = open_data(dlrm_task[0]["valid"], list_padding=-1)
    call = ModelCall(get_adapter("dlrm"), "probs")
    scores = evaluate(model, data.batches(512), call=call)
    probs, labels = [], []
    with torch.no_grad():
        for features, y in data.batches(512):
            probs.append(model(*dlrm_inputs(features)).reshape(-1))
            labels.append(y)
    truth = float(nn.functional.binary_cross_entropy(torch.cat(probs), torch.cat(labels)))
    assert scores["logloss"] == pytest.approx(truth, abs=1e-5)
    wrong = evaluate(model, data.batches(512), call=ModelCall(get_adapter("dlrm"), "logits"))
    assert wrong["logloss"] > truth + 0.02  # what reading them as logits used to report
    assert scores["auc"] == pytest.approx(wrong["auc"], abs=1e-9)  # AUC: any monotone map


# ---- --field templates ---------------------------------------------------------------------------


def test_field_templates_expand_over_matching_modules() -> None:
    model = build_dlrm_net()
    assert parse_field("emb_l.{i}=cat_{i}") == ("emb_l.{i}", "cat_{i}")
    with pytest.raises(ConfigError, match=r"uses `\{j\}`"):
        parse_field("emb_l.{i}=cat_{j}")
    matched = find_embedding_modules(model, ["emb_l.{i}"])
    assert list(matched) == [f"emb_l.{k}" for k in range(len(ROWS))]
    assert [field_column("emb_l.{i}", "cat_{i}", p) for p in matched] == [
        f"cat_{k}" for k in range(len(ROWS))
    ]
    assert target_matches("emb_l.{i}", "outer.emb_l.3")  # a suffix, as plain targets
    assert not target_matches("emb_l.{i}", "emb_l.3.inner")
    assert target_matches("t{a}.{a}", "t1.1") and not target_matches("t{a}.{a}", "t1.2")


# ---- dlrm_s_pytorch checkpoints ------------------------------------------------------------------


def test_dlrm_checkpoint_loads_its_state_dict(dlrm_task) -> None:
    state, meta = load_state_dict(dlrm_task[1])
    assert meta == {} and set(state) == set(build_dlrm_net().state_dict())
    model, spec = load_model(dlrm_task[1], FACTORY)
    assert spec == {"kind": "factory", "factory": FACTORY}
    assert all(table.sparse for table in model.emb_l)  # dlrm's tables: sparse=True


def test_numpy_1_scalars_load_too(tmp_path) -> None:
    """A file written under numpy 1.x names `numpy.core.multiarray.scalar` (legacy format here, so
    that the pickle's bytes can be edited without a zip checksum)."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}, "test_acc": np.float64(0.75)}, buffer,
               _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    assert data.count(b"numpy._core.multiarray") == 1
    path = tmp_path / "numpy1.pt"
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    state, _ = load_state_dict(path)
    assert torch.equal(state["w"], torch.ones(2))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_still_refused(tmp_path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": build_dlrm_net().state_dict(), "test_acc": np.float64(0.7),
                "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused to unpickle .*`(posix|nt)\.system`"):
        load_state_dict(path)
    assert not marker.exists()
    arrays = tmp_path / "array.pt"  # only numpy scalars are let through, not arrays
    torch.save({"state_dict": {"w": torch.ones(2)}, "hist": np.arange(3)}, arrays)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_state_dict(arrays)


# ---- finetune -> pack -> load_packed -------------------------------------------------------------


def test_finetune_pack_load_packed_on_dlrm_net(dlrm_task, tmp_path) -> None:
    paths, checkpoint = dlrm_task
    run, packed = tmp_path / "run", tmp_path / "packed"
    runner = CliRunner(mix_stderr=False)
    result = runner.invoke(app, [
        "finetune", str(checkpoint), "--model", FACTORY, "--adapter", "dlrm",
        "--data", str(paths["train"]), "--valid", str(paths["valid"]),
        "--field", "emb_l.{i}=cat_{i}", "--target-ratio", "0.4", "--out", str(run),
        "--epochs", "1", "--batch-size", "512", "-q",
    ])
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model output read as probabilities (its last module is a Sigmoid)")
    assert "--output logits" in lines[0]
    assert lines[-1].startswith("budget ")  # the verdict comes last
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == {"kind": "factory", "factory": FACTORY, "adapter": "dlrm",
                               "output": "probs"}
    assert config["tables"] == {f"emb_l.{k}": f"cat_{k}" for k in range(len(ROWS))}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model_output"]["output"] == "probs"
    assert lines[-1] == metrics["budget_summary"].replace("`target_ratio`", "--target-ratio")
    # "before" is the trained model's own BCE on the validation data, not a logit reading.
    model = _trained(dlrm_task)
    data = open_data(paths["valid"], list_padding=-1)
    truth = evaluate(model, data.batches(512), call=ModelCall(get_adapter("dlrm"), "probs"))
    assert metrics["before"]["logloss"] == pytest.approx(truth["logloss"], abs=1e-6)
    assert math.isfinite(metrics["after"]["logloss"])

    result = runner.invoke(app, ["pack", str(run), "--out", str(packed), "-q"])
    assert result.exit_code == 0, result.output + result.stderr
    # Serving: the user's own class, built as they build it, tables swapped for packed ones.
    serving = DLRM_Net(DIM, ROWS, (4, 16, DIM), (DIM + 10, 16, 1), sigmoid_top=1)
    amtl_compress.load_packed(serving, packed)
    fine_tuned, spec = load_model(run / "model.safetensors")
    assert spec["adapter"] == "dlrm" and spec["output"] == "probs"
    features, _ = next(iter(open_data(paths["test"], list_padding=-1).batches(256)))
    with torch.no_grad():
        got = serving(*dlrm_inputs(features))  # calls E(indices, offsets, per_sample_weights=None)
        want = fine_tuned(*dlrm_inputs(features))
    assert got.shape == (256, 1) and torch.equal(got, want)
    with torch.no_grad():
        rebuilt = load_packed_model(packed)(*dlrm_inputs(features))  # from the manifest's spec
    assert torch.equal(rebuilt, want)

    # eval reads adapter and output from the run and the packed manifest: no flags needed.
    result = runner.invoke(app, ["eval", str(paths["test"]), "--run", str(run),
                                 "--packed", str(packed)])
    assert result.exit_code == 0, result.output + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:]}
    assert rows["fine-tuned"][1:3] == rows["packed"][1:3]


def test_finetune_defaults_to_every_table_and_detects_the_adapter(dlrm_task, tmp_path) -> None:
    paths, checkpoint = dlrm_task
    result = finetune(checkpoint, paths["train"], paths["valid"], tmp_path / "run",
                      FinetuneConfig(epochs=1, batch_size=512), model_factory=FACTORY,
                      progress=False)
    assert set(result.lengths) == {f"emb_l.{k}" for k in range(len(ROWS))}
    assert result.metrics["model_output"]["adapter"] == "dlrm"
    assert result.metrics["budget_summary"] is None  # no budget, no verdict


def test_dlrm_net_with_the_wrong_adapter_is_one_error_line(dlrm_task, tmp_path) -> None:
    paths, checkpoint = dlrm_task
    result = CliRunner(mix_stderr=False).invoke(app, [
        "finetune", str(checkpoint), "--model", FACTORY, "--adapter", "features",
        "--data", str(paths["train"]), "--valid", str(paths["valid"]),
        "--field", "emb_l.0=cat_0", "--out", str(tmp_path / "run"), "-q",
    ])
    assert result.exit_code == 1  # the data first: its multi-hot lists hold id 0
    assert result.stderr.count("\n") == 1 and "list id 0 is reserved" in result.stderr
    assert "--adapter dlrm" in result.stderr and "Traceback" not in result.stderr
    single_hot = tmp_path / "single"
    single_hot.mkdir()
    for name in ("train", "valid"):
        table = pq.read_table(paths[name]).drop_columns(["cat_3"])
        pq.write_table(table, single_hot / f"{name}.parquet")
    result = CliRunner(mix_stderr=False).invoke(app, [
        "finetune", str(checkpoint), "--model", FACTORY, "--adapter", "features",
        "--data", str(single_hot / "train.parquet"), "--valid", str(single_hot / "valid.parquet"),
        "--field", "emb_l.0=cat_0", "--out", str(tmp_path / "run"), "-q",
    ])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: calling the model")
    assert "--adapter dlrm" in result.stderr and "Traceback" not in result.stderr


def _valid_batch(dlrm_task) -> dict[str, torch.Tensor]:
    return first_batch(open_data(dlrm_task[0]["valid"], list_padding=-1).batches(256))


def test_plan_runs_dlrm_net_with_a_template(dlrm_task) -> None:
    paths, checkpoint = dlrm_task
    result = CliRunner(mix_stderr=False).invoke(app, [
        "plan", str(checkpoint), "--model", FACTORY, "--valid", str(paths["valid"]),
        "--field", "emb_l.{i}=cat_{i}", "--ratios", "0.5", "-q",
    ])
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model output read as probabilities")
    assert lines[2].split() == ["ratio", *[f"emb_l.{k}" for k in range(len(ROWS))]]


def test_plan_without_fields_plans_the_adapters_tables(dlrm_task) -> None:
    """No --field: `plan` takes the adapter's default tables (every emb_l.K=cat_K), as
    `finetune` does."""
    paths, checkpoint = dlrm_task
    result = CliRunner(mix_stderr=False).invoke(app, [
        "plan", str(checkpoint), "--model", FACTORY, "--adapter", "dlrm",
        "--valid", str(paths["valid"]), "--ratios", "0.5", "-q",
    ])
    assert result.exit_code == 0, result.output + result.stderr
    assert result.stdout.splitlines()[2].split() == [
        "ratio", *[f"emb_l.{k}" for k in range(len(ROWS))]]


def test_resume_with_another_output_reading_is_refused(dlrm_task, tmp_path, monkeypatch) -> None:
    """The adapter and the output reading are part of the run: an interrupted run read as
    probabilities does not resume as logits (that would continue on another loss)."""
    paths, checkpoint = dlrm_task
    out = tmp_path / "run"

    def run(*extra: str):
        return CliRunner(mix_stderr=False).invoke(app, [
            "finetune", str(checkpoint), "--model", FACTORY, "--adapter", "dlrm",
            "--data", str(paths["train"]), "--valid", str(paths["valid"]),
            "--field", "emb_l.{i}=cat_{i}", "--target-ratio", "0.4", "--out", str(out),
            "--epochs", "1", "--batch-size", "512", "--save-every", "3", "-q", *extra,
        ])

    restore = interrupt_at_step(monkeypatch, 5)  # after the save at step 3
    assert run().exit_code == 130
    restore()
    result = run("--output", "logits")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: `{tmp_path / 'run.resume'}` holds an interrupted run with a different "
        "configuration; rerun with the same options, or pass --no-resume to start over\n"
    )
    assert run().exit_code == 0  # the same options resume
