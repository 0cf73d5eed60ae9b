"""Issue 16: the matched table of stopped runs with its evidence, trajectories, spread over targets
and paired differences; and the report defects (per-target levels, settings that cannot change the
unlearned model, benchmark-dependent defaults of old rows, retain probability per request)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from simu_core import reporting

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def _finish(rows: list[dict]) -> pd.DataFrame:
    """Runs-table bookkeeping columns around hand-made rows."""
    table = pd.DataFrame(rows)
    count = len(table)
    return table.assign(status="completed", kind="run",
                        time=[T0 + pd.Timedelta(seconds=index) for index in range(count)],
                        config_hash=[f"h{index}" for index in range(count)],
                        run_id=table["run_id"] if "run_id" in table.columns else [f"r{index}" for index in range(count)])


def _write_reference(results, run_id: str, forget_prob: float) -> None:
    folder = results / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"benchmark": "synthetic", "split": "all", "metric": "forget_prob", "value": forget_prob,
                   "model": "reference"},
                  {"benchmark": "synthetic", "split": "all", "metric": "forget_prob", "value": 0.95, "model": "target"}]
                 ).to_parquet(folder / "metrics.parquet")


# ----------------------------------------------------------------------------------------------
# Defect a: the forget-probability level is per target and per benchmark/split


def _two_target_grid(results, column: str, values: tuple, levels: tuple[float, float]) -> pd.DataFrame:
    """One method over lrs 1e-4..1e-2, the same curve for both values of ``column`` (targets or
    splits), whose retain references sit at different levels."""
    rows = []
    for value, level in zip(values, levels):
        for lr, forget_prob, utility in ((1e-4, 1.0, 0.9), (1e-3, 0.1, 0.8), (1e-2, 0.001, 0.4)):
            run_id = f"{column[-5:]}{value}-{lr:g}"
            rows.append({"run_id": run_id, "config.unlearn.method": "simu", "config.run.seed": 0,
                         "config.mask.threshold": 0.2, "config.unlearn.lr": lr, column: value, "forget_prob": forget_prob,
                         "model_utility": utility, "retain_prob": utility, "forget_quality": 0.5})
            _write_reference(results, run_id, level)
    table = _finish(rows)
    table.to_parquet(results / "runs.parquet")
    return table


def test_matched_forget_prob_level_is_each_targets_own_reference(tmp_path):
    from flows.report import write_report

    results = tmp_path / "results"
    _two_target_grid(results, "config.model.finetune.seed", (0, 1), (0.1, 0.01))
    written = write_report(results)
    table = pd.read_csv(results / "report" / "matched_forget_prob.csv").set_index("curve")
    # Target 0 reaches its level 0.1 on the grid at lr 1e-3 (utility 0.8); target 1 reaches 0.01
    # half way (in log10) between 1e-3 and 1e-2 (utility 0.6). The pooled level 0.055 would read
    # both at 0.748, as two curves split by the target seed.
    assert list(table.index) == ["simu"]
    assert table.loc["simu", "seeds_reached"] == 2 and table.loc["simu", "targets"] == 2
    assert table.loc["simu", "model_utility_mean"] == pytest.approx(0.7)
    assert table.loc["simu", "model_utility_std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert table.loc["simu", "level_min"] == pytest.approx(0.01) and table.loc["simu", "level_max"] == pytest.approx(0.1)
    assert "2 targets x 1 seed = 2 readings" in written["markdown"]


def test_matched_forget_prob_level_is_per_split(tmp_path):
    from flows.report import write_report

    results = tmp_path / "results"
    _two_target_grid(results, "config.data.split", ("forget01", "forget10"), (0.1, 0.01))
    write_report(results)
    table = pd.read_csv(results / "report" / "matched_forget_prob.csv").set_index("curve")
    assert table.loc["simu split=forget01", "model_utility_mean"] == pytest.approx(0.8)
    assert table.loc["simu split=forget10", "model_utility_mean"] == pytest.approx(0.6)


def test_knockout_tables_keep_every_target(tmp_path):
    results = tmp_path / "results"
    rows = []
    for target, drop in ((0, 1.5), (1, 2.5)):
        run_id = f"t{target}"
        rows.append({"run_id": run_id, "config.unlearn.method": "simu", "config.run.seed": 0,
                     "config.model.finetune.seed": target, "config.mask.threshold": 0.2, "config.mask.rule": "layer_relative",
                     "config.data.split": "forget10", "model_utility": 0.6})
        folder = results / "runs" / run_id
        folder.mkdir(parents=True)
        pd.DataFrame([{"kind": "critical", "neurons": 40, "forget_drop": drop, "forget_drop_std": 0.0,
                       "retain_drop": 0.1, "retain_drop_std": 0.0, "selectivity": drop / 0.1,
                       "forget_drop_over_random": 3.0}]).to_parquet(folder / "knockout_summary.parquet")
    runs = _finish(rows)
    tables = reporting.knockout_tables(results, runs)
    assert sorted(tables["forget_drop"]) == [1.5, 2.5]
    assert tables["model.finetune.seed"].tolist() == [0, 1]


# ----------------------------------------------------------------------------------------------
# Defect b: settings that cannot change the unlearned model name no setting and no curve


def test_settings_that_cannot_change_the_unlearned_model_split_nothing():
    from simu_core.matched import curve_columns

    rows = []
    no_effect = {"config.relearn.lr": (1e-3, 1e-4), "config.relearn.data": ("forget_half", "retain_only"),
                 "config.knockout.random_draws": (5, 10), "config.unlearn.gradient_checkpointing": (False, True),
                 "config.unlearn.checkpoint_every": (0, 10), "config.run.devices": (1, 2),
                 "config.eval.reference_full": (False, True)}
    for method in ("simu", "so_graddiff"):
        for index in range(2):
            rows.append({"config.unlearn.method": method, "config.run.seed": index, "config.unlearn.lr": 1e-3,
                         **{column: values[index] for column, values in no_effect.items()},
                         "model_utility": 0.6 + 0.1 * index, "metric.relearn_recovery": 1.0 + index})
    runs = _finish(rows)
    assert reporting.setting_columns(runs) == ["config.unlearn.method"]
    assert curve_columns(runs, list(no_effect) + ["config.unlearn.method"]) == ["config.unlearn.method"]
    table = reporting.comparison_table(runs)
    assert table["seeds"].tolist() == [2, 2]
    assert table["model_utility_mean"].tolist() == pytest.approx([0.65, 0.65])
    # The relearning table is grouped by the attack's own settings too: relearn.data splits it.
    relearn = reporting.relearn_table(runs)
    assert len(relearn) == 4 and set(relearn["relearn.data"]) == {"forget_half", "retain_only"}


# ----------------------------------------------------------------------------------------------
# Defect c: old rows get the defaults of their own benchmark


def test_old_rows_get_their_own_benchmarks_defaults():
    runs = pd.DataFrame({"config.data.benchmark": ["tofu", "synthetic", "tofu", "lume"],
                         "config.relearn.lr": [np.nan, np.nan, 1e-5, np.nan],
                         "config.model.max_length": [np.nan, np.nan, 512.0, np.nan]})
    filled = reporting.fill_new_config_fields(runs)
    assert filled["config.relearn.lr"].tolist() == [1e-5, 1e-3, 1e-5, 1e-5]
    assert filled["config.model.max_length"].tolist() == [512.0, 128.0, 512.0, 512.0]


# ----------------------------------------------------------------------------------------------
# Defect d: the requests table holds retain probability


def test_request_table_has_retain_prob():
    rows = pd.DataFrame([{"config.unlearn.method": "simu", "config.run.seed": seed, "request.index": 1,
                          "request.items": 10, "model_utility": 0.7, "forget_quality": 0.9, "forget_prob": 0.5,
                          "retain_prob": 0.9 + 0.02 * seed} for seed in range(2)])
    table = reporting.request_table(rows)
    assert table.loc[0, "retain_prob_mean"] == pytest.approx(0.91)
    assert "retain_prob" in reporting.table_markdown(table).splitlines()[0]


# ----------------------------------------------------------------------------------------------
# The matched table of runs that stopped at the level, its evidence, trajectories, paired differences

LEVELS = {0: 0.1, 1: 0.05}  # each target's own retain reference
READINGS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (target, seed)
# (method, lr) -> per reading: (status, value as a multiple of the level, model utility, retain prob)
STOPPED = {
    ("simu", 1e-4): [("matched", 0.97, 0.70, 0.80), ("matched", 0.97, 0.72, 0.75),
                     ("matched", 0.97, 0.66, 0.80), ("matched", 0.97, 0.68, 0.75)],
    # More utility, but one reading overshot: not an lr *at* the level.
    ("simu", 1e-3): [("matched", 0.97, 0.75, 0.8), ("matched", 0.97, 0.75, 0.8),
                     ("matched", 0.97, 0.75, 0.8), ("overshot", 0.2, 0.50, 0.5)],
    ("so_graddiff", 1e-4): [("not_reached", 3.0, 0.90, 0.9), ("matched", 0.97, 0.70, 0.8),
                            ("matched", 1.15, 0.70, 0.8), ("matched", 0.97, 0.70, 0.8)],
    ("so_graddiff", 1e-3): [("matched", 0.97, 0.68, 0.75), ("matched", 0.97, 0.69, 0.80),
                            ("matched", 0.97, 0.65, 0.75), ("matched", 0.97, 0.66, 0.80)],
}


def _stopped_folder(results) -> pd.DataFrame:
    """Runs that stopped at forget_prob<=reference (two targets x two seeds per method and lr, with
    their trajectories), next to an old-style fixed-budget lr grid without stop columns."""
    rows = []
    for (method, lr), readings in STOPPED.items():
        for (target, seed), (status, multiple, utility, retain) in zip(READINGS, readings):
            run_id = f"{method}-{lr:g}-t{target}-s{seed}"
            level = LEVELS[target]
            value = multiple * level
            rows.append({"run_id": run_id, "config.unlearn.method": method, "config.unlearn.lr": lr,
                         "config.model.finetune.seed": target, "config.run.seed": seed, "config.mask.threshold": 0.2,
                         "config.unlearn.stop_at": "forget_prob<=reference", "config.unlearn.eval_every": 5,
                         "config.unlearn.stop_tolerance": 0.1, "config.unlearn.stop_retain_items": 40,
                         "stop.measure": "forget_prob", "stop.level": level, "stop.level_source": "reference",
                         "stop.status": status, "stop.matched": status == "matched", "stop.step": 10,
                         "stop.budget_steps": 50, "stop.value": value, "stop.previous_step": 5,
                         # so_graddiff at 1e-3 stopped half-way through step 10 (unlearn.stop_refine)
                         "stop.fraction": 0.5 if (method, lr) == ("so_graddiff", 1e-3) else 1.0,
                         "stop.previous_value": 0.3, "stop.checks": 3, "stop.check_seconds": 0.5,
                         "forget_prob": value, "forget_quality": 0.3 if method == "simu" else 0.2,
                         "model_utility": utility, "retain_prob": retain})
            folder = results / "runs" / run_id
            folder.mkdir(parents=True)
            pd.DataFrame({"step": [0, 5, 10], "forget_prob": [0.9, 0.3, value], "forget_quality": [1e-5, 1e-3, 0.3],
                          "forget_truth_ratio": [0.4, 0.5, 0.6], "retain_prob": [0.95, 0.9, retain],
                          "lr": [lr] * 3, "seconds": [0.0, 1.0, 2.0], "reached": [False, False, True]}
                         ).to_parquet(folder / "trajectory.parquet")
            _write_reference(results, run_id, level)
    for lr, forget_prob, utility in ((1e-4, 0.5, 0.9), (1e-3, 0.01, 0.5)):  # a fixed-budget grid, older rows
        run_id = f"ga-{lr:g}"
        rows.append({"run_id": run_id, "config.unlearn.method": "ga", "config.unlearn.lr": lr,
                     "config.run.seed": 0, "config.mask.threshold": 0.2, "forget_prob": forget_prob,
                     "forget_quality": 0.01, "model_utility": utility, "retain_prob": utility})
        _write_reference(results, run_id, 0.1)
    table = _finish(rows)
    table.to_parquet(results / "runs.parquet")
    return table


def test_stopped_runs_table_shows_every_readings_forget_value_and_the_best_lr(tmp_path, monkeypatch):
    from flows.report import write_report

    results = tmp_path / "results"
    _stopped_folder(results)
    figures = []
    save = reporting._save
    monkeypatch.setattr(reporting, "_save", lambda figure, path: figures.append(figure) or save(figure, path))
    written = write_report(results)
    out = results / "report"
    table = pd.read_csv(out / "matched_stopped_forget_prob.csv").set_index(["curve", "lr"])
    simu = table.loc[("simu", 1e-3)]
    assert (simu["readings"], simu["matched"], bool(simu["all_matched"])) == (4, 3, False)
    assert simu["model_utility_mean"] == pytest.approx(0.75) and simu["model_utility_std"] == pytest.approx(0.0)
    # The measured forget value of every reading, the overshot one included (0.2 x 0.05).
    assert simu["value_min"] == pytest.approx(0.01) and simu["value_max"] == pytest.approx(0.097)
    assert simu["value_mean"] == pytest.approx(np.mean([0.097, 0.097, 0.0485, 0.01]))
    assert simu["forget_quality_mean"] == pytest.approx(0.3)  # the other measure, over the matched readings
    assert simu["spread"] == "2 targets x 2 seeds = 4 readings"
    assert (simu["step_mean"], simu["refined"]) == (10, 0)
    refined = table.loc[("so_graddiff", 1e-3)]
    assert (refined["step_mean"], refined["refined"]) == (9.5, 4)  # steps of training: 9 and half of the 10th
    assert "| 10 (4 refined) |" in (out / "report.md").read_text()
    so = table.loc[("so_graddiff", 1e-4)]
    # not_reached, and one "matched" run 15 % from its level: outside the report's 10 %.
    assert so["matched"] == 2 and so["model_utility_mean"] == pytest.approx(0.70)
    assert so["not_matched"] == "1 not reached, 1 outside tolerance"
    best = pd.read_csv(out / "matched_stopped_forget_prob_best.csv").set_index("curve")
    assert best.loc["simu", "lr"] == pytest.approx(1e-4)  # 1e-3 has more utility but a reading missed
    assert best.loc["simu", "model_utility_mean"] == pytest.approx(0.69)
    assert best.loc["so_graddiff", "lr"] == pytest.approx(1e-3)
    markdown = written["markdown"]
    assert "not matched (run status: overshot)" in markdown and "outside tolerance: 15 % from the level" in markdown
    assert "| simu | 0.001 | 3/4 | 0.750 ± 0.000 |" in markdown
    # Paired at the best lrs on (target, seed): simu - so_graddiff = 0.02, 0.03, 0.01, 0.02.
    paired = pd.read_csv(out / "paired_differences.csv")
    stopped = paired[paired["where"].str.startswith("stopped")].iloc[0]
    assert (stopped["curve_a"], stopped["curve_b"], stopped["pairs"]) == ("simu", "so_graddiff", 4)
    assert stopped["model_utility_diff_mean"] == pytest.approx(0.02)
    assert stopped["model_utility_diff_std"] == pytest.approx(np.std([0.02, 0.03, 0.01, 0.02], ddof=1))
    assert bool(stopped["model_utility_beyond_std"]) and bool(stopped["model_utility_beyond_2se"])
    assert stopped["retain_prob_diff_mean"] == pytest.approx(0.0, abs=1e-12)
    assert not stopped["retain_prob_beyond_std"] and not stopped["retain_prob_beyond_2se"]
    assert "| stopped, forget_prob<=reference, best lr by model_utility | simu | so_graddiff | 4 (2 targets x 2 seeds " \
        "= 4 readings) |" in markdown
    # The old-style fixed-budget rows still get the interpolated reading, with its bracket.
    interpolated = pd.read_csv(out / "matched_forget_prob.csv").set_index("curve")
    assert interpolated.loc["ga", "bracket"] == "lr 0.0001–0.001: 0.5 → 0.01"
    assert interpolated.loc["ga", "wide_brackets"] == 1 and "wide bracket" in interpolated.loc["ga", "note"]
    # Trajectories: one line per stopped run, coloured per method, and the two targets' levels.
    assert "trajectories" in written["plots"]
    figure = next(figure for figure in figures if "Stopped at" in figure.axes[0].get_title())
    axis = figure.axes[0]
    assert len(axis.lines) == 16 + 2
    assert axis.get_legend_handles_labels()[1] == ["simu", "so_graddiff", "level"]
    assert sorted(line.get_xdata()[0] for line in axis.lines if line.get_linestyle() == "--") == [0.05, 0.1]


def test_report_best_by_picks_each_methods_lr_by_another_utility(tmp_path):
    """simu report --best-by: where model utility sits at its floor, the best lr can be read on retain
    probability instead; the choice, the table's wording and the paired differences follow it."""
    from flows.report import write_report

    results = tmp_path / "results"
    _stopped_folder(results)
    runs = pd.read_parquet(results / "runs.parquet")
    # simu at 1e-3 with every reading matched: more model utility than at 1e-4 (0.7125 vs 0.69), less
    # retain probability (0.675 vs 0.775).
    row = runs["run_id"] == "simu-0.001-t1-s1"
    for column, value in (("stop.status", "matched"), ("stop.matched", True), ("stop.value", 0.97 * LEVELS[1]),
                          ("forget_prob", 0.97 * LEVELS[1]), ("model_utility", 0.6), ("retain_prob", 0.3)):
        runs.loc[row, column] = value
    runs.to_parquet(results / "runs.parquet")
    write_report(results, tmp_path / "by-utility")
    best = pd.read_csv(tmp_path / "by-utility" / "matched_stopped_forget_prob_best.csv").set_index("curve")
    assert best.loc["simu", "lr"] == pytest.approx(1e-3)
    written = write_report(results, tmp_path / "by-retain", best_by="retain_prob")
    best = pd.read_csv(tmp_path / "by-retain" / "matched_stopped_forget_prob_best.csv").set_index("curve")
    assert best.loc["simu", "lr"] == pytest.approx(1e-4) and best.loc["so_graddiff", "lr"] == pytest.approx(1e-3)
    assert "the lr with the highest mean retain prob among" in written["markdown"]
    assert "| stopped, forget_prob<=reference, best lr by retain_prob | simu | so_graddiff |" in written["markdown"]
    with pytest.raises(ValueError, match=r"--best-by 'forget_rouge'.*\['model_utility', 'retain_prob'\]"):
        write_report(results, tmp_path / "bad", best_by="forget_rouge")


def test_report_tolerance_decides_which_stopped_readings_match(tmp_path):
    from flows.cli import main

    results = tmp_path / "results"
    _stopped_folder(results)
    assert main(["report", "--results", str(results), "--tolerance", "0.2"]) == 0
    table = pd.read_csv(results / "report" / "matched_stopped_forget_prob.csv").set_index(["curve", "lr"])
    assert table.loc[("so_graddiff", 1e-4), "matched"] == 3  # the run 15 % from its level now counts
    with pytest.raises(SystemExit):
        main(["report", "--results", str(results), "--tolerance", "1.5"])


def test_crossing_reports_its_bracket_and_flags_wide_ones():
    from simu_core.matched import Level, crossing

    def curve(values):
        return pd.DataFrame({"config.unlearn.lr": [1e-4, 1e-3, 1e-2], "forget_prob": values,
                             "model_utility": [0.9, 0.8, 0.4]})

    level = Level("forget_prob", 0.01, below=True, source="test")
    narrow = crossing(curve([1.0, 0.012, 0.008]), level, ["model_utility"])
    assert (narrow["lr_low"], narrow["lr_high"]) == (1e-3, 1e-2)
    assert (narrow["value_low"], narrow["value_high"]) == (0.012, 0.008) and not narrow["wide_bracket"]
    wide = crossing(curve([1.0, 0.1, 0.001]), level, ["model_utility"])
    assert (wide["value_low"], wide["value_high"]) == (0.1, 0.001) and wide["wide_bracket"]
    first = crossing(curve([0.005, 0.001, 0.0001]), level, ["model_utility"])
    assert first["at_smallest_lr"] and math.isnan(first["lr_low"]) and first["value_high"] == 0.005


def test_comparison_table_counts_targets_and_seeds():
    rows = [{"config.unlearn.method": method, "config.model.finetune.seed": target, "config.run.seed": seed,
             "model_utility": 0.6 + 0.1 * target + 0.01 * seed}
            for method in ("simu", "ga") for target in range(2) for seed in range(3)]
    runs = _finish(rows)
    table = reporting.comparison_table(runs).set_index("unlearn.method")
    assert table.loc["simu", ["targets", "seeds", "readings"]].tolist() == [2, 3, 6]
    assert table.loc["simu", "model_utility_mean"] == pytest.approx(0.66)
    assert "| unlearn.method | targets | seeds | readings | model_utility |" in reporting.table_markdown(table.reset_index())
    assert "2 targets x 3 seeds = 6 readings" in reporting.spread_note(runs)
    # Without the column (tables written before it): one target, the table as before.
    old = runs[runs["config.model.finetune.seed"] == 0].drop(columns="config.model.finetune.seed")
    assert list(reporting.comparison_table(old).columns[:2]) == ["unlearn.method", "seeds"]


def test_paired_differences_pair_on_target_seed_and_data():
    from simu_core.matched import paired_differences

    readings = pd.DataFrame([
        {"curve": curve, "curve_order": order, "target": target, "seed": seed, "data": "split=forget10",
         "model_utility": utility}
        for curve, order, utilities in (("a", 0, [0.5, 0.6, 0.7]), ("b", 1, [0.4, 0.6, 0.5]))
        for (target, seed), utility in zip(((0, 0), (0, 1), (1, 0)), utilities)
    ] + [{"curve": "b", "curve_order": 1, "target": 5, "seed": 0, "data": "split=forget10", "model_utility": 0.1}])
    table = paired_differences(readings, ["model_utility"])
    row = table.iloc[0]
    assert row["pairs"] == 3  # the unpaired reading of b (target 5) is left out
    assert row["model_utility_diff_mean"] == pytest.approx(0.1)
    assert row["model_utility_diff_std"] == pytest.approx(0.1)
    assert row["model_utility_diff_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert not row["model_utility_beyond_std"] and not row["model_utility_beyond_2se"]


def test_best_lr_falls_back_to_the_most_matched_lr_and_says_so():
    from simu_core.matched import best_lrs

    def table(rows):
        return pd.DataFrame([{"stop_at": "forget_prob<=reference", "curve": "simu", "lr": lr, "matched": matched,
                              "readings": 9, "all_matched": matched == 9, "model_utility_mean": utility}
                             for lr, matched, utility in rows])

    full = best_lrs(table([(1e-4, 9, 0.60), (2e-4, 9, 0.65), (3e-4, 8, 0.70)])).iloc[0]
    assert full["lr"] == 2e-4 and full["note"].startswith("best of 2 lr with every reading matched")
    fallback = best_lrs(table([(1e-4, 6, 0.70), (2e-4, 8, 0.60), (3e-4, 8, 0.65), (4e-4, 5, 0.90)])).iloc[0]
    assert fallback["lr"] == 3e-4  # most matched (8/9), then the higher utility; 5/9 is under two thirds
    assert "the lr with the most matched readings (8/9)" in fallback["note"]
    none = best_lrs(table([(1e-4, 5, 0.70), (2e-4, 0, float("nan"))])).iloc[0]
    assert np.isnan(none["lr"]) and none["note"].startswith("no lr has every reading matched (lr 0.0001: 5/9")


def test_request_table_spreads_over_targets_and_counts_the_matched_readings():
    rows = pd.DataFrame([{"config.unlearn.method": "simu", "config.run.seed": seed, "config.model.finetune.seed": target,
                          "request.index": 1, "request.items": 10, "model_utility": 0.7, "forget_quality": 0.9,
                          "forget_prob": 0.1 + 0.01 * target, "retain_prob": 0.9, "stop.matched": matched,
                          "stop.step": step, "stop.level": 0.2}
                         for (target, seed, matched, step) in ((0, 0, True, 10), (0, 1, False, 20), (1, 0, True, 30))])
    table = reporting.request_table(rows)
    row = table.iloc[0]
    assert (row["targets"], row["seeds"], row["readings"]) == (2, 2, 3)
    assert row["matched"] == "2/3" and row["mean step"] == 20 and row["level"] == "0.200"
    assert row["forget_prob_mean"] == pytest.approx((0.1 + 0.1 + 0.11) / 3)
    header = reporting.table_markdown(table).splitlines()[0]
    assert "matched" in header and "readings" in header


def test_request_item_table_follows_each_requests_items(tmp_path):
    # One run of 2 requests: request 1 = items a, b; request 2 = item c. After request 2 the union is evaluated.
    folder = tmp_path / "runs" / "run-1"
    evaluations = {1: {"a": 0.4, "b": 0.2}, 2: {"a": 0.1, "b": 0.3, "c": 0.05}}
    for index, own in ((1, ["a", "b"]), (2, ["c"])):
        (folder / f"request{index}").mkdir(parents=True)
        pd.DataFrame({"item_id": own}).to_parquet(folder / f"request{index}" / "request_items.parquet")
        probs = evaluations[index]
        items = pd.DataFrame({"item_id": list(probs), "split": "forget", "model": "unlearned",
                              "probability": list(probs.values())})
        reference = items.assign(model="reference", probability=0.9)  # other models' rows are not read
        pd.concat([items, reference]).to_parquet(folder / f"request{index}" / "items.parquet")
    rows = pd.DataFrame([{"run_id": "run-1", "config.unlearn.method": "simu", "request.index": index}
                         for index in (1, 2)])
    table = reporting.request_item_table(tmp_path, rows)
    assert table["after request"].tolist() == [1, 2]
    assert table["request 1 items"].tolist() == pytest.approx([0.3, 0.2])
    assert pd.isna(table.loc[0, "request 2 items"]) and table.loc[1, "request 2 items"] == pytest.approx(0.05)
    markdown = reporting.request_item_markdown(table)
    header = [cell.strip() for cell in markdown.splitlines()[0].split("|")]
    first = [cell.strip() for cell in markdown.splitlines()[2].split("|")]
    assert first[header.index("request 2 items")] == ""  # request 2's items before request 2: blank
    assert first[header.index("request 1 items")] == "0.300"
    # A run folder written before request_items.parquet existed is left out, not mislabelled.
    (folder / "request2" / "request_items.parquet").unlink()
    assert reporting.request_item_table(tmp_path, rows).empty


def test_request_paired_differences_pair_readings_on_target_and_seed():
    rows = []
    for target, seed, utility_a, utility_b in ((0, 0, 0.70, 0.60), (0, 1, 0.72, 0.64), (1, 0, 0.66, 0.60)):
        for method, utility in (("simu", utility_a), ("so_graddiff", utility_b)):
            rows.append({"config.unlearn.method": method, "config.run.seed": seed, "config.model.finetune.seed": target,
                         "request.index": 2, "request.items": 20, "model_utility": utility,
                         "retain_prob": 0.8, "forget_prob": 0.15, "run_id": f"{method}-{target}-{seed}"})
    table = reporting.request_paired(pd.DataFrame(rows))
    row = table.iloc[0]
    assert (row["where"], row["curve_a"], row["curve_b"], row["pairs"]) == ("after request 2", "simu", "so_graddiff", 3)
    differences = [0.10, 0.08, 0.06]
    assert row["model_utility_diff_mean"] == pytest.approx(np.mean(differences))
    assert row["model_utility_diff_std"] == pytest.approx(np.std(differences, ddof=1))
    assert row["forget_prob_diff_mean"] == pytest.approx(0.0) and bool(row["model_utility_beyond_2se"])


def test_a_loss_setting_splits_curves_only_among_runs_of_a_loss_that_reads_it():
    runs = pd.DataFrame({"config.unlearn.method": ["so_dpo", "so_dpo", "so_npo", "so_npo"],
                         "config.unlearn.preferred_source": ["a.jsonl", "a.jsonl", None, None],
                         "config.unlearn.lr": [1e-4, 2e-4, 1e-4, 2e-4]})
    assert reporting.setting_columns(runs) == ["config.unlearn.method", "config.unlearn.lr"]
    runs.loc[1, "config.unlearn.preferred_source"] = "b.jsonl"  # two DPO files: two DPO curves
    assert "config.unlearn.preferred_source" in reporting.setting_columns(runs)
