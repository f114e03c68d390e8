"""Budget planning: truncation curves, the recommended ratio, the plot and `amtl-compress plan`."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from amtl_compress.checkpoint import load_model
from amtl_compress.cli import app
from amtl_compress.data import open_data
from amtl_compress.errors import ConfigError, NoMatchingModuleError
from amtl_compress.planning import (
    DEFAULT_GRID,
    Plan,
    check_ratios,
    kept_dims,
    parse_ratios,
    plan,
    plot_svg,
    recommend_ratios,
    truncation_curves,
)
from amtl_compress.training.loop import evaluate

runner = CliRunner(mix_stderr=False)
TABLES = {"user_id": "user_id", "item_id": "item_id", "embeddings.tags": "tags"}
PATHS = ["embeddings.user_id", "embeddings.item_id", "embeddings.tags"]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def fixture_curves(synthetic, baseline):
    """(model, curves at ratios 0.1 and 0.5, the trained model's validation AUC)."""
    model, _ = load_model(baseline)
    data = open_data(synthetic.valid)
    trained = evaluate(model, data.batches(4096))["auc"]
    curves = truncation_curves(model, data, TABLES, [0.5, 0.1], progress=False)
    return model, curves, trained


def test_curves_cover_the_grid_plus_one_and_end_at_the_trained_model(fixture_curves):
    _, curves, trained = fixture_curves
    assert list(curves) == PATHS  # module paths, in the model's order
    for points in curves.values():
        assert [r for r, _ in points] == [0.1, 0.5, 1.0]
        assert points[-1][1] == trained  # exactly: ratio 1.0 is the trained model itself


def test_truncation_costs_auc_on_the_fixture(fixture_curves):
    _, curves, trained = fixture_curves
    # k = 1 of 8 dims changes every table's scores ...
    assert all(points[0][1] != trained for points in curves.values())
    # ... and costs item_id validation AUC (0.6400 vs 0.6417). Not every table loses: on this
    # tiny, over-fitted set the cut user_id table scores 0.0003 above the trained one.
    assert curves["embeddings.item_id"][0][1] < trained - 1e-3


def test_the_model_is_left_exactly_as_it_was(synthetic, baseline):
    model, _ = load_model(baseline)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {name: type(m) for name, m in model.named_modules()}
    truncation_curves(model, synthetic.valid, TABLES, [0.25], progress=False)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert {name: type(m) for name, m in model.named_modules()} == kinds
    assert model.training


class _Toy(nn.Module):
    """One table whose rows all lie on one line: its rank is 1."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict({"id": nn.Embedding(50, 6)})
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            scale = torch.randn(50, 1, generator=gen)
            self.embeddings["id"].weight.copy_(scale * torch.randn(1, 6, generator=gen))
        self.head = nn.Linear(6, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.embeddings["id"](batch["id"])).squeeze(-1)


def test_a_rank_one_table_loses_nothing_at_one_dim(tmp_path):
    # After the rotation onto its principal axes a rank-1 table lives in its first dim, so any
    # k >= 1 keeps it (up to float rounding): the curve is flat.
    ids = torch.arange(200) % 50
    labels = (torch.rand(200, generator=torch.Generator().manual_seed(1)) < 0.5).long()
    path = tmp_path / "toy.parquet"
    pq.write_table(pa.table({"id": ids.numpy(), "label": labels.numpy()}), path)
    curves = truncation_curves(_Toy(), path, {"id": "id"}, [0.1, 0.5], progress=False)
    (_, cut), (_, half), (_, full) = curves["embeddings.id"]
    assert cut == pytest.approx(full, abs=1e-12) and half == pytest.approx(full, abs=1e-12)


def test_progress_bar_goes_to_stderr(synthetic, baseline, capsys):
    model, _ = load_model(baseline)
    truncation_curves(model, synthetic.valid, {"user_id": "user_id"}, [0.5])
    captured = capsys.readouterr()
    assert "plan" in captured.err and captured.out == ""


@pytest.mark.parametrize(
    ("points", "drop", "expected"),
    [
        # the smallest ratio within the drop
        ([(0.1, 0.70), (0.2, 0.775), (0.3, 0.7795), (0.5, 0.7805), (1.0, 0.781)], 0.002, 0.3),
        # a drop exactly at the limit qualifies (0.781 - 0.779 is 0.0020000000000000018)
        ([(0.1, 0.70), (0.3, 0.779), (1.0, 0.781)], 0.002, 0.3),
        # ties: two ratios with the same AUC, the smaller wins; input order does not matter
        ([(1.0, 0.781), (0.4, 0.780), (0.2, 0.780), (0.1, 0.7)], 0.001, 0.2),
        # nothing within the drop: the trained model, 1.0
        ([(0.1, 0.5), (0.5, 0.6), (1.0, 0.8)], 0.01, 1.0),
        # drop 0: only ratios scoring at least the trained model, here above it
        ([(0.1, 0.70), (0.3, 0.79), (1.0, 0.78)], 0.0, 0.3),
        # the smallest qualifying ratio, even when a larger one does not qualify
        ([(0.1, 0.7805), (0.5, 0.70), (1.0, 0.781)], 0.001, 0.1),
    ],
)
def test_recommend_ratios_on_hand_made_curves(points, drop, expected):
    assert recommend_ratios({"t": points}, drop) == {"t": expected}


def test_recommend_ratios_per_table_in_order():
    curves = {
        "b": [(0.2, 0.70), (0.6, 0.779), (1.0, 0.78)],
        "a": [(0.2, 0.779), (0.6, 0.78), (1.0, 0.78)],
    }
    recommended = recommend_ratios(curves, 0.002)
    assert recommended == {"b": 0.6, "a": 0.2} and list(recommended) == ["b", "a"]


def test_kept_dims_and_grids():
    assert [kept_dims(r, 16) for r in (0.01, 0.1, 0.2, 0.5, 1.0)] == [1, 2, 3, 8, 16]
    assert DEFAULT_GRID == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert check_ratios([0.5, 0.1, 0.5]) == [0.1, 0.5, 1.0]
    assert parse_ratios(" 0.25,0.5 ") == [0.25, 0.5, 1.0]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_ratios([]),
         "`ratios` is empty; pass at least one ratio in (0, 1], e.g. `ratios=0.1,0.2,0.5`"),
        (lambda: check_ratios([0.5, 1.5]),
         "`ratios` holds 1.5, outside (0, 1]; each ratio is kept dims / D of a table"),
        (lambda: check_ratios([0.0]),
         "`ratios` holds 0.0, outside (0, 1]; each ratio is kept dims / D of a table"),
        (lambda: check_ratios([math.nan]),
         "`ratios` holds nan, outside (0, 1]; each ratio is kept dims / D of a table"),
        (lambda: parse_ratios("0.1,abc"),
         "`ratios` entry `abc` is not a number; pass comma-separated ratios such as "
         "`ratios=0.1,0.2,0.5`"),
        (lambda: recommend_ratios({"t": [(1.0, 0.8)]}, -0.1),
         "`max_auc_drop` must be >= 0, got -0.1; pass e.g. `max_auc_drop=0.002` "
         "(0.2 AUC points)"),
        (lambda: recommend_ratios({"t": [(1.0, 0.8)]}, math.nan),
         "`max_auc_drop` must be >= 0, got nan; pass e.g. `max_auc_drop=0.002` "
         "(0.2 AUC points)"),
        (lambda: recommend_ratios({}, 0.002),
         "no `curves` given; compute them with `truncation_curves`"),
        (lambda: recommend_ratios({"t": [(0.5, 0.8)]}, 0.002),
         "the curve of `t` has no point at ratio 1.0 (the trained model); include 1.0 in its "
         "ratios"),
    ],
)
def test_bad_inputs_are_one_line_errors(call, message):
    with pytest.raises(ConfigError) as info:
        call()
    assert str(info.value) == message


def test_bad_inputs_of_truncation_curves_and_plan(synthetic, baseline, tmp_path):
    model, _ = load_model(baseline)
    with pytest.raises(ConfigError, match=r"^no `tables` given; name at least one embedding "):
        truncation_curves(model, synthetic.valid, {}, progress=False)
    with pytest.raises(ConfigError, match=r"^`batch_size` must be >= 1, got 0$"):
        truncation_curves(model, synthetic.valid, TABLES, batch_size=0, progress=False)
    with pytest.raises(NoMatchingModuleError) as info:
        truncation_curves(model, synthetic.valid, {"nope": "user_id"}, progress=False)
    assert str(info.value).startswith(
        "target(s) `nope` matched no nn.Embedding/nn.EmbeddingBag module; the model has "
        "`embeddings.user_id`"
    )
    with pytest.raises(ConfigError) as info:
        plan(baseline, synthetic.valid, {"user_id": "user_id"}, plot=tmp_path / "p.png")
    assert str(info.value) == (
        "`plot` must name an .svg file (the plot is SVG, drawn with no plotting library), "
        f"got `{tmp_path / 'p.png'}`"
    )
    with pytest.raises(ConfigError, match=r"^no `fields` given; "):
        plan(baseline, synthetic.valid, {})
    assert not list(tmp_path.iterdir())


def test_plan_returns_the_curves_and_writes_the_plot(synthetic, baseline, tmp_path):
    out = tmp_path / "deep" / "plan.svg"
    result = plan(baseline, synthetic.valid, {"user_id": "user_id", "item_id": "item_id"},
                  ratios=[0.25, 0.5], max_auc_drop=0.001, plot=out, progress=False)
    assert isinstance(result, Plan) and result.plot == out
    assert result.recommended == recommend_ratios(result.curves, 0.001)
    assert result.dims == {"embeddings.user_id": 8, "embeddings.item_id": 8}
    assert all(points[-1] == (1.0, result.baseline_auc) for points in result.curves.values())
    assert out.read_text(encoding="utf-8") == plot_svg(result)
    root = ET.parse(out).getroot()
    assert root.tag == f"{SVG}svg"
    assert len(root.findall(f".//{SVG}polyline")) == 2  # one curve per table
    assert [t.text for t in root.iter(f"{SVG}title")] == list(result.curves)


def test_cli_plan_end_to_end(synthetic, baseline, tmp_path):
    out = tmp_path / "plan.svg"
    result = runner.invoke(app, [
        "plan", str(baseline), "--valid", str(synthetic.valid), "--field", "user_id",
        "--field", "embeddings.item_id=item_id", "--ratios", "0.25,0.5", "--max-auc-drop",
        "0.001", "--plot", str(out), "-q",
    ])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["ratio", "embeddings.user_id", "embeddings.item_id"]
    assert [line.split()[0] for line in lines[3:6]] == ["0.25", "0.50", "1.00"]
    model, _ = load_model(baseline)
    trained = evaluate(model, open_data(synthetic.valid).batches(4096))["auc"]
    assert lines[5].split()[1].rstrip("*") == f"{trained:.4f}"
    recommended = [line for line in lines if line.startswith("finetune with: ")]
    assert len(recommended) == 1
    assert recommended[0].count("--target-ratio embeddings.") == 2
    assert lines[-1] == f"wrote {out}"
    assert ET.parse(out).getroot().tag == f"{SVG}svg"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--ratios", "0.1,1.5"],
         "Error: --ratios holds 1.5, outside (0, 1]; each ratio is kept dims / D of a table"),
        (["--ratios", "0.1,x"],
         "Error: --ratios entry `x` is not a number; pass comma-separated ratios such as "
         "--ratios 0.1,0.2,0.5"),
        (["--max-auc-drop", "-0.01"],
         "Error: --max-auc-drop must be >= 0, got -0.01; pass e.g. --max-auc-drop 0.002 "
         "(0.2 AUC points)"),
        (["--plot", "plan.png"],
         "Error: --plot must name an .svg file (the plot is SVG, drawn with no plotting "
         "library), got `plan.png`"),
    ],
)
def test_cli_errors_are_pinned(synthetic, baseline, args, line):
    result = runner.invoke(app, [
        "plan", str(baseline), "--valid", str(synthetic.valid), "--field", "user_id", "-q",
        *args,
    ])
    assert result.exit_code == 1
    assert result.stderr == line + "\n"
    assert result.stdout == ""


def test_cli_unknown_field_is_one_line(synthetic, baseline):
    result = runner.invoke(app, [
        "plan", str(baseline), "--valid", str(synthetic.valid), "--field", "nope", "-q",
    ])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: target(s) `nope` matched no nn.Embedding")
    assert result.stderr.count("\n") == 1
