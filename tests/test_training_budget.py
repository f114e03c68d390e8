"""The budget in a training loop (training/budget.py, finetune): gradual schedule, per-table
targets, "auto", the no-epoch-met outcome, and the public hook in a hand-written loop."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import amtl_compress
import amtl_compress.training.finetune as finetune_mod
import amtl_compress.training.targets as targets_mod
from amtl_compress import planning
from amtl_compress.checkpoint import load_model
from amtl_compress.cli import app
from amtl_compress.core.amtl import AMTL, AMTLConfig
from amtl_compress.core.budget import apply_budget_
from amtl_compress.data import count_frequencies, open_data
from amtl_compress.errors import ConfigError
from amtl_compress.surgery.attach import amtl_layers, attach_amtl_
from amtl_compress.training.budget import (
    AMTLBudget,
    resolve_targets,
    scheduled_ratio,
    warmup_steps,
)
from amtl_compress.training.config import FinetuneConfig, parse_target_ratio
from amtl_compress.training.finetune import BUDGET_TOLERANCE, finetune
from amtl_compress.training.loop import bce_step, evaluate
from amtl_compress.training.result import BudgetWarning

FIELDS = {"user_id": "user_id", "item_id": "item_id"}
PATHS = ["embeddings.user_id", "embeddings.item_id"]


def _config(**kw) -> FinetuneConfig:
    base = dict(fields=FIELDS, epochs=3, batch_size=512, target_ratio=0.4, save_every=100)
    base.update(kw)
    return FinetuneConfig(**base)


def _attached(synthetic, baseline) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = load_model(baseline)
    counts = {
        "user_id": count_frequencies(synthetic.train, "user_id", 400),
        "item_id": count_frequencies(synthetic.train, "item_id", 200),
    }
    attach_amtl_(model, counts, AMTLConfig())
    return model


# ---- schedule ---------------------------------------------------------------------------------


def test_schedule_starts_at_one_and_reaches_the_target_after_the_warmup() -> None:
    assert warmup_steps(0.25, 100) == 25
    assert warmup_steps(0.0, None) == 0
    assert warmup_steps(0.001, 10) == 1  # any warmup > 0 spares step 0
    assert scheduled_ratio(0.4, 0, 25) == 1.0
    assert scheduled_ratio(0.4, 10, 20) == pytest.approx(0.7)  # linear
    assert scheduled_ratio(0.4, 25, 25) == 0.4
    assert scheduled_ratio(0.4, 80, 25) == 0.4
    assert scheduled_ratio(0.4, 0, 0) == 0.4  # no warmup: R from step 0
    ratios = [scheduled_ratio(0.3, s, 10) for s in range(12)]
    assert all(a >= b for a, b in zip(ratios, ratios[1:], strict=False))


def test_warmup_errors() -> None:
    with pytest.raises(ConfigError, match=r"^a budget warmup needs the run's length; pass "
                       r"`total_steps` \(optimiser steps in all\)$"):
        warmup_steps(0.5, None)
    with pytest.raises(ConfigError, match=r"`warmup` must be in \[0, 1\]"):
        warmup_steps(1.5, 10)
    with pytest.raises(ConfigError, match=r"`budget_warmup` must be in \[0, 1\]"):
        FinetuneConfig(fields=FIELDS, target_ratio=0.4, budget_warmup=-0.1)


# ---- apply_budget_ and targets ----------------------------------------------------------------


def test_apply_budget_takes_one_ratio_per_table() -> None:
    counts = (1000 / torch.arange(1, 301, dtype=torch.float64)).long()
    layers = {"a": AMTL(counts, 16), "b": AMTL(counts.flip(0), 8)}
    realized = apply_budget_(layers, {"a": 0.25, "b": 0.5})
    assert realized["a"] == pytest.approx(0.25, abs=0.02)
    assert realized["b"] == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ConfigError, match=r"^no target ratio for table `b`; give `target_ratio` "
                       r"an entry for every layer, keyed by module path$"):
        apply_budget_(layers, {"a": 0.25})


def test_targets_are_keyed_like_fields() -> None:
    assert resolve_targets(0.4, PATHS) == {p: 0.4 for p in PATHS}
    assert resolve_targets({"item_id": 0.3}, PATHS) == {"embeddings.item_id": 0.3}
    assert resolve_targets({r"embeddings\..*": 0.5}, PATHS) == {p: 0.5 for p in PATHS}
    with pytest.raises(ConfigError, match=r"^`target_ratio` names `nope`, which matches none of "
                       r"the compressed tables \(`embeddings.user_id`, `embeddings.item_id`\); "
                       r"key it like `fields`$"):
        resolve_targets({"nope": 0.3}, PATHS)
    with pytest.raises(ConfigError, match="two ratios"):
        resolve_targets({"item_id": 0.3, r"embeddings\..*": 0.5}, PATHS)


def test_config_target_ratio_forms() -> None:
    for good in (None, 0.4, 1, "auto", {"item_id": 0.3}):
        cfg = FinetuneConfig(fields=FIELDS, target_ratio=good)
        assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (0.0, 1.5, "half", {}, {"item_id": 2.0}, {"item_id": "x"}, True):
        with pytest.raises(ConfigError, match="`target_ratio`"):
            FinetuneConfig(fields=FIELDS, target_ratio=bad)
    with pytest.raises(ConfigError, match="`max_auc_drop` must be a number >= 0"):
        FinetuneConfig(fields=FIELDS, target_ratio="auto", max_auc_drop=-1.0)
    assert parse_target_ratio([]) is None
    assert parse_target_ratio(["0.4"]) == 0.4
    assert parse_target_ratio(["auto"]) == "auto"
    assert parse_target_ratio(["user_id=0.5", "item_id=0.3"]) == {"user_id": 0.5, "item_id": 0.3}
    with pytest.raises(ConfigError, match=r"^bad `target_ratio` `0.4` among several; give each "
                       r"as `TABLE=R`"):
        parse_target_ratio(["user_id=0.5", "0.4"])
    with pytest.raises(ConfigError, match=r"^bad `target_ratio` `lots`; use a number"):
        parse_target_ratio(["lots"])


def test_cli_defaults_are_the_config_defaults() -> None:
    import click
    import typer

    command = typer.main.get_command(app).commands["finetune"]
    defaults = {p.name: p.default for p in command.params if isinstance(p, click.Option)}
    assert defaults["budget_warmup"] == FinetuneConfig.budget_warmup
    assert defaults["max_auc_drop"] == FinetuneConfig.max_auc_drop


# ---- the warm start is kept -------------------------------------------------------------------


def test_warm_start_auc_is_kept_after_attach_and_first_step(synthetic, baseline) -> None:
    """With a warmup, step 0 keeps every value (ratio 1), so validation AUC right after attach
    is the trained model's; after the first step the ratio has moved by only (1 - R) / warmup."""
    valid = open_data(synthetic.valid)
    trained, _ = load_model(baseline)
    before = evaluate(trained, valid.batches(512))["auc"]
    model = _attached(synthetic, baseline)
    total = 3 * open_data(synthetic.train).num_batches(512)
    budget = AMTLBudget(model, 0.4, total_steps=total, warmup=0.25)
    assert budget.warmup_steps == round(0.25 * total) and budget.warming_up
    assert budget.realized == {p: 1.0 for p in PATHS}
    assert all(float(layer.price) == 0.0 for layer in amtl_layers(model).values())
    assert evaluate(model, valid.batches(512))["auc"] == pytest.approx(before, abs=1e-6)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    features, labels = next(iter(open_data(synthetic.train).batches(512, shuffle=True, seed=0)))
    bce_step(model, optimizer, features, labels, budget.penalty)
    stepped = evaluate(model, valid.batches(512))["auc"]  # the first step, nothing cut yet
    realized = budget.step()
    expected = 1 - 0.6 / budget.warmup_steps
    assert all(abs(r - expected) <= BUDGET_TOLERANCE for r in realized.values())
    # The first cut costs (almost) nothing: the AUC is the stepped model's.
    assert evaluate(model, valid.batches(512))["auc"] == pytest.approx(stepped, abs=1e-3)

    # Without a warmup the budget cuts at step 0: what the warmup avoids.
    cut = _attached(synthetic, baseline)
    AMTLBudget(cut, 0.4)
    assert all(layer.realized_ratio() < 0.42 for layer in amtl_layers(cut).values())


def test_finetune_starts_with_nothing_cut(synthetic, baseline, tmp_path, monkeypatch) -> None:
    """finetune uses the same hook: with a warmup, at its first step every table keeps ratio 1
    and the model scores the trained model's validation AUC."""
    real_step = finetune_mod.bce_step
    seen: dict = {}

    def first_step(model, *args, **kwargs):
        if not seen:
            seen["ratios"] = {p: a.realized_ratio() for p, a in amtl_layers(model).items()}
            seen["auc"] = evaluate(model, open_data(synthetic.valid).batches(512))["auc"]
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(finetune_mod, "bce_step", first_step)
    result = finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run",
                      _config(budget_warmup=0.25), progress=False)
    assert seen["ratios"] == {p: 1.0 for p in PATHS}
    assert seen["auc"] == pytest.approx(result.metrics["before"]["auc"], abs=1e-6)
    assert result.metrics["budget_met"] is True and result.metrics["budget_missed"] == {}
    for table in result.metrics["tables"].values():
        assert abs(table["memory_ratio"] - 0.4) <= BUDGET_TOLERANCE


# ---- per-table targets, auto ------------------------------------------------------------------


def test_per_table_targets_land_on_their_own_ratio(synthetic, baseline, tmp_path) -> None:
    result = finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run",
                      _config(target_ratio={"user_id": 0.3, "item_id": 0.6}), progress=False)
    want = {"embeddings.user_id": 0.3, "embeddings.item_id": 0.6}
    assert result.metrics["target_ratios"] == want
    for path, r in want.items():
        assert abs(result.metrics["tables"][path]["memory_ratio"] - r) <= BUDGET_TOLERANCE
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["target_ratios"] == want
    assert config["finetune"]["target_ratio"] == {"user_id": 0.3, "item_id": 0.6}


def test_unknown_target_key_fails_before_any_work(synthetic, baseline, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^`target_ratio` names `nope`, which matches none of "
                       r"the compressed tables \(`embeddings.user_id`, `embeddings.item_id`\); "
                       r"key it like `fields`$"):
        finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run",
                 _config(target_ratio={"item_id": 0.3, "nope": 0.5}), progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.resume").exists()


def test_auto_asks_the_truncation_plan(synthetic, baseline, tmp_path, monkeypatch) -> None:
    """"auto" calls planning.truncation_curves on the trained model and the validation data,
    then recommend_ratios (stand-ins here, to pin what is passed and what is done with it)."""
    calls: dict = {}

    def truncation_curves(model, valid_data, tables, ratios, batch_size=0, label="", progress=True,
                          call=None):
        calls["tables"], calls["ratios"] = dict(tables), list(ratios)
        calls["call"] = call
        calls["attached"] = bool(amtl_layers(model))
        return {p: [(r, 0.7) for r in ratios] for p in tables}

    def recommend_ratios(curves, max_auc_drop):
        calls["max_auc_drop"] = max_auc_drop
        return {"embeddings.user_id": 0.3, "embeddings.item_id": 0.5}

    monkeypatch.setattr(planning, "truncation_curves", truncation_curves)
    monkeypatch.setattr(planning, "recommend_ratios", recommend_ratios)
    result = finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run",
                      _config(target_ratio="auto", max_auc_drop=0.01), progress=False)
    assert calls["tables"] == {"embeddings.user_id": "user_id", "embeddings.item_id": "item_id"}
    assert calls["ratios"][-1] == 1.0 and min(calls["ratios"]) >= 1 / 8
    assert calls["max_auc_drop"] == 0.01 and calls["attached"] is False
    assert calls["call"].is_plain  # the reference DLRM: model(features), logits
    want = {"embeddings.user_id": 0.3, "embeddings.item_id": 0.5}
    assert result.metrics["target_ratios"] == want
    for path, r in want.items():
        assert abs(result.metrics["tables"][path]["memory_ratio"] - r) <= BUDGET_TOLERANCE


def test_auto_targets_are_the_plans_recommendation(synthetic, baseline, tmp_path) -> None:
    """Without stand-ins: the resolved targets are what the plan recommends for the trained
    model, computed here independently with the public planning API."""
    tables = {"embeddings.user_id": "user_id", "embeddings.item_id": "item_id"}
    grid = [r for r in targets_mod.AUTO_RATIO_GRID if r >= 1 / 8]
    model, _ = load_model(baseline)
    curves = planning.truncation_curves(model, open_data(synthetic.valid), tables, grid,
                                        batch_size=512, progress=False)
    want = {p: max(r, 1 / 8) for p, r in planning.recommend_ratios(curves, 0.01).items()}
    result = finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run",
                      _config(target_ratio="auto", max_auc_drop=0.01), progress=False)
    assert result.metrics["target_ratios"] == want


# ---- no epoch met the budget ------------------------------------------------------------------


def test_no_epoch_met_the_budget_warns_and_records_it(
    synthetic, baseline, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(finetune_mod, "BUDGET_TOLERANCE", -1.0)  # no epoch can meet it
    with pytest.warns(BudgetWarning, match=r"^no epoch met the memory budget; kept epoch \d: "
                      r"`embeddings.user_id` kept 0\.\d{3} for a target of 0\.400 "):
        result = finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run",
                          _config(epochs=2), progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["budget_met"] is False
    assert metrics["best_epoch"] in (0, 1, 2)  # the run is still written, from the best epoch
    (kept,) = [e["ratios"] for e in metrics["epochs"] if e["epoch"] == metrics["best_epoch"]]
    assert metrics["budget_missed"] == {
        p: {"target": 0.4, "realized": kept[p]} for p in PATHS
    }


def test_an_epoch_inside_the_warmup_does_not_meet_the_budget(
    synthetic, baseline, tmp_path
) -> None:
    result = finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run",
                      _config(epochs=2, budget_warmup=1.0), progress=False)
    start, first, second = result.metrics["epochs"]
    assert result.metrics["budget_warmup_steps"] == second["step"]
    assert first["meets_budget"] is False  # ends inside the warmup, whatever its ratios
    # Epoch 0, the model cut to R before any step, is scored at R, so it can meet the budget.
    assert start["epoch"] == 0 and start["meets_budget"] is True
    assert second["meets_budget"] is True
    best = max((start, second), key=lambda e: e["auc"])
    assert result.metrics["best_epoch"] == best["epoch"]
    warning = BudgetWarning({}, 1, during_warmup=True)
    assert str(warning) == (
        "no epoch met the memory budget; kept epoch 1: the budget was still warming up at its "
        "end - train for more epochs, lower `budget_warmup` or raise `target_ratio`"
    )


def test_cli_says_which_tables_missed(synthetic, baseline, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(finetune_mod, "BUDGET_TOLERANCE", -1.0)
    runner = CliRunner(mix_stderr=False)
    result = runner.invoke(app, [
        "finetune", str(baseline), "--data", str(synthetic.train), "--valid",
        str(synthetic.valid), "--field", "user_id", "--field", "item_id", "--out",
        str(tmp_path / "run"), "--target-ratio", "user_id=0.4", "--target-ratio", "item_id=0.5",
        "--epochs", "1", "--batch-size", "512", "-q",
    ])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(lines) == 1 and "no epoch met the memory budget" in lines[0]
    assert "raise --target-ratio" in lines[0] and "--budget-warmup" in lines[0]
    assert result.stdout.count("missed by") == 2


# ---- the public hook in a hand-written loop ---------------------------------------------------


def test_the_hook_compresses_a_hand_written_loop(synthetic, baseline) -> None:
    assert amtl_compress.AMTLBudget is AMTLBudget
    model = _attached(synthetic, baseline)
    data = open_data(synthetic.train)
    epochs = 3
    budget = amtl_compress.AMTLBudget(model, {"user_id": 0.3, "item_id": 0.5},
                                      total_steps=epochs * data.num_batches(512), warmup=0.25)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(epochs):
        for features, labels in data.batches(512, shuffle=True, seed=epoch):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(features).reshape(-1), labels.float()
            ) + budget.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            realized = budget.step()
    assert not budget.warming_up
    assert realized["embeddings.user_id"] == pytest.approx(0.3, abs=BUDGET_TOLERANCE)
    assert realized["embeddings.item_id"] == pytest.approx(0.5, abs=BUDGET_TOLERANCE)
    _, lengths = amtl_compress.detach_amtl(model)
    assert float(lengths["embeddings.user_id"].double().mean()) / 8 == pytest.approx(
        realized["embeddings.user_id"]
    )


def test_the_hook_refuses_a_model_without_amtl(baseline) -> None:
    model, _ = load_model(baseline)
    with pytest.raises(ConfigError, match=r"^the model has no AMTL layers; call `attach_amtl_` "
                       r"before creating the budget$"):
        AMTLBudget(model, 0.4)


def test_the_cut_model_is_kept_when_no_fine_tuned_epoch_beats_it(
    synthetic, baseline, tmp_path
) -> None:
    # lr 0.5 wrecks every fine-tuned epoch: the run falls back on epoch 0, the trained model
    # cut to the budget by the starting lengths, which meets the budget.
    result = finetune(baseline, synthetic.train, synthetic.valid, tmp_path / "run",
                      _config(epochs=2, lr=0.5), progress=False)
    start, *trained = result.metrics["epochs"]
    assert (start["epoch"], start["step"], start["meets_budget"]) == (0, 0, True)
    assert all(e["auc"] < start["auc"] for e in trained)
    assert result.metrics["best_epoch"] == 0 and result.metrics["budget_met"] is True
    assert result.metrics["after"]["auc"] == pytest.approx(start["auc"], abs=1e-6)
    assert result.metrics["budget_summary"].startswith(
        "budget met by the kept epoch 0 (the trained model cut to the budget before any step")
    for path, table in result.metrics["tables"].items():
        assert table["memory_ratio"] == pytest.approx(start["ratios"][path])
