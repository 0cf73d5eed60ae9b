"""The reporting task: results as Parquet (runs table, per-run tables) and Prefect artifacts.

Uncached on purpose: artifacts created inside a task that comes back from cache are not created
again, and every run must append its own row to ``runs.parquet``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from filelock import FileLock
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from simu_core.config import SimuConfig, config_from_dict
from tasks.caching import EXTERNAL, open_store

HEADLINE = ("forget_quality", "model_utility", "forget_rouge", "forget_prob", "forget_truth_ratio", "privleak",
            "retain_rouge", "retain_prob")
RUNS_TABLE = "runs.parquet"


def run_columns(benchmark: str) -> tuple[str, ...]:
    """The runs table's metric columns of a row: the TOFU suite's (every row has them, so tables of
    several benchmarks share a schema), then the benchmark's own headline (its registry row); any
    other metric goes to a ``metric.<name>`` column."""
    from simu_core.benchmarks.info import BENCHMARK_INFO

    return tuple(dict.fromkeys((*HEADLINE, *BENCHMARK_INFO[benchmark].headline)))


def _summary(store, ref: dict | None) -> dict[str, Any]:
    if not ref or ref["stage"] == EXTERNAL:
        return {}
    return store.manifest(ref).get("metadata", {}).get("summary") or {}


def _table(store, ref: dict | None, name: str) -> pd.DataFrame | None:
    if not ref or ref["stage"] == EXTERNAL:
        return None
    if name not in store.manifest(ref).get("files", {}):
        return None
    return store.read_parquet(ref, name)


def _write_parquet_atomic(frame: pd.DataFrame, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    frame.to_parquet(temporary, index=False)
    os.replace(temporary, path)


def append_run_row(results: Path, row: dict[str, Any] | list[dict[str, Any]]) -> pd.DataFrame:
    """Append one row (or several, in one rewrite) to ``<results>/runs.parquet`` (locked, atomic replace)."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / RUNS_TABLE
    with FileLock(str(path) + ".lock"):
        new = pd.DataFrame(row if isinstance(row, list) else [row])
        if path.exists():
            table = pd.concat([pd.read_parquet(path), new], ignore_index=True)
        else:
            table = new
        _write_parquet_atomic(table, path)
    return table


def run_row(config: SimuConfig, run_id: str, status: str, metrics: dict, states: dict, seconds: dict, error: str = "",
            kind: str = "run", run_name: str | None = None) -> dict:
    """One row of the runs table: identity, kind ('run': pipeline, 'eval': ``simu eval``), status
    ('completed', 'failed', 'interrupted'), flattened config, headline metrics, timings."""
    row: dict[str, Any] = {
        "run_id": run_id,
        "run_name": (flow_run.name or "") if run_name is None else run_name,
        "time": pd.Timestamp.now(tz="UTC"),
        "kind": kind,
        "status": status,
        "error": error,
        "config_hash": config.config_hash(),
    }
    for key, value in config.flat().items():
        # data.requests is an int or a list: stored as JSON text either way (one type per column).
        as_json = isinstance(value, (list, dict)) or (key == "data.requests" and value is not None)
        row[f"config.{key}"] = json.dumps(value) if as_json else value
    for name in run_columns(config.data.benchmark):
        value = metrics.get(name)
        row[name] = float(value) if value is not None else None
    for extra, value in metrics.items():
        if extra not in row and isinstance(value, (int, float)) and not isinstance(value, bool):
            row[f"metric.{extra}"] = float(value)
    for label, value in seconds.items():
        row[f"seconds.{label}"] = value
        row[f"state.{label}"] = states.get(label, "")
    return row


def stop_columns(unlearning: dict[str, Any]) -> dict[str, Any]:
    """The unlearn stage's ``stop_*`` figures (``unlearn.stop_at``) as ``stop.*`` columns of the runs
    table; nothing for a run without a stop level."""
    return {f"stop.{key.removeprefix('stop_')}": value for key, value in unlearning.items() if key.startswith("stop_")}


def current_run_id() -> str:
    """The Prefect flow run id, or a fresh id outside a flow."""
    return str(flow_run.id or uuid.uuid4())


RELEARN_REFS = {"unlearned": "relearn", "target": "relearn_target", "reference": "relearn_reference"}


def _attacked_models(refs: dict[str, dict | None]) -> list[str]:
    """The models every attack ran on: the unlearned model, the target and, where the run has one, the
    retain reference (WMDP's runs have none)."""
    from simu_core.attacks.robustness import MODELS

    return [model for model in MODELS if model != "reference" or refs.get("reference") is not None]


def _relearn_results(store, refs: dict[str, dict | None], run_dir: Path) -> dict[str, float]:
    """The three relearning curves stacked (``relearn_curve.parquet``, column ``model``) and the
    recovery per step (``relearn_recovery.parquet``) into the run folder; returns the headline
    figures (empty when the attack did not run)."""
    models = _attacked_models(refs)
    curves = [_table(store, refs.get(RELEARN_REFS[model]), "relearn_curve.parquet") for model in models]
    if any(curve is None for curve in curves):
        return {}
    from simu_core.attacks.relearn import recovery_headline, recovery_table

    stacked = pd.concat([curve.assign(model=model) for model, curve in zip(models, curves)], ignore_index=True)
    _write_parquet_atomic(stacked, run_dir / "relearn_curve.parquet")
    _write_parquet_atomic(recovery_table(stacked), run_dir / "relearn_recovery.parquet")
    return recovery_headline(stacked)


def _attack_results(store, refs: dict[str, dict | None], run_dir: Path, attacks: list[str]) -> tuple[dict[str, float], pd.DataFrame | None]:
    """Every attack's table on the three models stacked (``attacks.parquet``, column ``model``), the
    robustness table (``robustness.parquet``: recovery, regained, OpenUnlearning R and Q) and each
    attack's per-item values (``attack_items_<attack>.parquet``) into the run folder; returns the headline
    figures and the robustness table (empty / None when no attack ran)."""
    from simu_core.attacks.names import attack_label
    from simu_core.attacks.robustness import headline_figures, robustness_table

    models = _attacked_models(refs)
    tables: dict[str, list[pd.DataFrame]] = {model: [] for model in models}
    for attack in attacks:
        items = []
        for model in models:
            ref = refs.get(attack_label(attack, model))
            table = _table(store, ref, "attack.parquet")
            if table is None:
                return {}, None
            tables[model].append(table)
            part = _table(store, ref, "attack_items.parquet")
            if part is not None:
                items.append(part.assign(model=model))
        if items:
            _write_parquet_atomic(pd.concat(items, ignore_index=True), run_dir / f"attack_items_{attack}.parquet")
    if not attacks:
        return {}, None
    stacked = {model: pd.concat(frames, ignore_index=True) for model, frames in tables.items()}
    _write_parquet_atomic(pd.concat([table.assign(model=model) for model, table in stacked.items()], ignore_index=True),
                          run_dir / "attacks.parquet")
    robustness = robustness_table(stacked, reference="reference" in models)
    _write_parquet_atomic(robustness, run_dir / "robustness.parquet")
    lens = [_table(store, refs.get(attack_label("logit_lens", model)), "logit_lens_items.parquet") for model in models]
    if "logit_lens" in attacks and all(frame is not None for frame in lens):
        _write_parquet_atomic(pd.concat([frame.assign(model=model) for model, frame in zip(models, lens)],
                                        ignore_index=True), run_dir / "logit_lens_items.parquet")
    return headline_figures(robustness), robustness


def _write_tables(store, refs: dict[str, dict | None], folder: Path) -> None:
    """Copy a run's tables into ``folder``: metrics and items of the evaluations (column ``model``),
    attribution, mask, unlearning log, knockout."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics_frames, item_frames = [], []
    for model_name, ref_name in (("unlearned", "evaluate"), ("target", "evaluate_target"), ("reference", "evaluate_reference")):
        for frames, file in ((metrics_frames, "metrics.parquet"), (item_frames, "items.parquet")):
            table = _table(store, refs.get(ref_name), file)
            if table is not None:
                frames.append(table.assign(model=model_name))
    if metrics_frames:
        _write_parquet_atomic(pd.concat(metrics_frames, ignore_index=True), folder / "metrics.parquet")
    if item_frames:
        _write_parquet_atomic(pd.concat(item_frames, ignore_index=True), folder / "items.parquet")
    copies = (("mask", "scores.parquet", "attribution.parquet"), ("mask", "mask.parquet", "mask.parquet"),
              ("mask", "dual_analysis.parquet", "dual_analysis.parquet"),
              ("mask", "threshold_jaccard.parquet", "threshold_jaccard.parquet"),
              ("unlearned", "train_log.parquet", "train_log.parquet"),
              ("unlearned", "trajectory.parquet", "trajectory.parquet"),
              ("knockout", "knockout.parquet", "knockout.parquet"),
              ("knockout", "knockout_summary.parquet", "knockout_summary.parquet"),
              ("knockout", "knockout_curve.parquet", "knockout_curve.parquet"),
              ("knockout", "knockout_items.parquet", "knockout_items.parquet"),
              ("knockout", "knockout_mask.parquet", "knockout_mask.parquet"))
    for ref_name, source, target_name in copies:
        table = _table(store, refs.get(ref_name), source)
        if table is not None:
            _write_parquet_atomic(table, folder / target_name)


def _open_run(config: dict) -> tuple[SimuConfig, Any, str, Path, Path]:
    """The run's config, store, id, results folder and run folder (created)."""
    cfg = config_from_dict(config)
    run_id = current_run_id()
    results = Path(cfg.run.results).resolve()
    run_dir = results / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, open_store(cfg.run.store), run_id, results, run_dir


@task(name="report", cache_policy=NO_CACHE)
def report(config: dict, refs: dict[str, dict | None], states: dict[str, str], seconds: dict[str, float],
           headline_ref: str = "evaluate", kind: str = "run") -> dict[str, Any]:
    """Write the run's results and create its Prefect artifacts; return the headline summary.

    ``headline_ref`` names the evaluation whose metrics go into the runs-table row (``evaluate``:
    the unlearned model; ``simu eval`` reports ``evaluate_target``, the model it was given).
    """
    started = time.perf_counter()
    cfg, store, run_id, results, run_dir = _open_run(config)

    _write_tables(store, refs, run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    relearn = _relearn_results(store, refs, run_dir)
    attacked, robustness = _attack_results(store, refs, run_dir, cfg.attacks)

    headline = _summary(store, refs.get(headline_ref))
    seconds = {**seconds, "report": round(time.perf_counter() - started, 3)}
    knockout = _summary(store, refs.get("knockout"))
    knockout_table = _table(store, refs.get("knockout"), "knockout_summary.parquet")
    # The knockout figures land in the runs table as metric.knockout_* columns.
    # ... the relearning attack's as metric.relearn_*, every attack's as metric.attack_*.
    unlearning = _summary(store, refs.get("unlearned"))
    row = run_row(cfg, run_id, "completed", {**headline, **knockout, **relearn, **attacked}, states, seconds, kind=kind)
    append_run_row(results, {**row, **stop_columns(unlearning)})

    reference = _summary(store, refs.get("evaluate_reference"))
    target = _summary(store, refs.get("evaluate_target"))
    columns = ({"target": target, "unlearned": headline, "retain reference": reference} if kind == "run"
               else {"model": headline, "reference": reference})
    lines = [f"# {flow_run.name or run_id}", "", "| metric | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    table_rows = []
    from simu_core.benchmarks.info import BENCHMARK_INFO

    for name in BENCHMARK_INFO[cfg.data.benchmark].summary:
        values = [summary.get(name) for summary in columns.values()]
        if all(value is None for value in values):
            continue
        lines.append("| " + name + " | " + " | ".join("-" if v is None else f"{v:.4g}" for v in values) + " |")
        table_rows.append({"metric": name, **{column.replace(" ", "_"): value for column, value in zip(columns, values)}})
    if "stop_status" in unlearning:
        from simu_core.stopping import format_outcome

        lines += ["", "## Stop at a forgetting level", "", format_outcome(unlearning)]
    if knockout_table is not None:
        from simu_core.knockout import format_summary

        lines += ["", "## Knockout check (target, nothing trained; neurons chosen on half of the forget items, "
                  "measured on the other half)", "", "```", *format_summary(knockout_table), "```"]
    if relearn:
        from simu_core.attacks.relearn import format_recovery

        lines += ["", "## Relearning attack", "", "```", *format_recovery(relearn), "```"]
    if robustness is not None:
        from simu_core.attacks.robustness import format_robustness

        lines += ["", "## Attacks (robustness)", "", "```", *format_robustness(robustness), "```"]
    stage_lines = [f"- {label}: {states.get(label, '')}, {value:.1f} s" for label, value in seconds.items()]
    lines += ["", "## Stages", *stage_lines, "", f"Results: `{run_dir}`"]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown=markdown, key="simu-run-summary", description="headline metrics")
    create_table_artifact(table=table_rows, key="simu-run-metrics", description="headline metrics")
    create_link_artifact(link=run_dir.as_uri(), link_text=str(run_dir), key="simu-run-results")
    return {"run_id": run_id, "benchmark": cfg.data.benchmark, "results": str(results), "run_dir": str(run_dir),
            "metrics": headline,
            "target_metrics": target, "reference_metrics": reference, "states": states, "seconds": seconds,
            "dataset_sizes": _summary(store, refs.get("data")),
            "training": {name: _summary(store, refs.get(name)) for name in ("target", "reference")},
            "unlearning": unlearning,
            "knockout": knockout_table.to_dict(orient="records") if knockout_table is not None else None,
            "relearn": relearn or None,
            "attacks": attacked or None,
            "robustness": robustness.to_dict(orient="records") if robustness is not None else None,
            "markdown": markdown}


#: The curve the CLI and the run summary show per request (besides the request and the items so far).
REQUEST_ITEMS_FILE = "request_items.parquet"  # per request folder: its own forget item ids
REQUEST_CURVE = ("forget_quality", "model_utility", "forget_prob")


@task(name="report_requests", cache_policy=NO_CACHE)
def report_requests(config: dict, refs: dict[str, dict | None], requests: list[dict[str, Any]],
                    states: dict[str, str], seconds: dict[str, float]) -> dict[str, Any]:
    """A sequential run's results: per request, its tables under ``<run_dir>/request<i>/`` and one
    runs-table row (kind ``request``; ``request.index``, ``request.count``, ``request.items`` = forget
    items seen so far) with its headline metrics; Prefect artifacts; the summary with the curve.

    ``refs``: the shared stages (data, target, reference); ``requests``: per request (in order) its
    ``index``, ``items``, ``own_items`` (its own forget item ids, written to ``request_items.parquet``) and
    ``refs`` (as :func:`report` takes them, plus ``start``: the model it
    unlearned from).
    """
    started = time.perf_counter()
    cfg, store, run_id, results, run_dir = _open_run(config)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    seconds = {**seconds, "report": round(time.perf_counter() - started, 3)}
    curve, rows = [], []
    for request in requests:
        request_refs = request["refs"]
        folder = run_dir / f"request{request['index']}"
        _write_tables(store, request_refs, folder)
        # The request's own items, so a report can follow each request's items after later requests.
        _write_parquet_atomic(pd.DataFrame({"item_id": request["own_items"]}), folder / REQUEST_ITEMS_FILE)
        headline = _summary(store, request_refs.get("evaluate"))
        row = run_row(cfg, run_id, "completed", {**headline, **_summary(store, request_refs.get("knockout"))}, states,
                      seconds, kind="request")
        row.update(stop_columns(_summary(store, request_refs.get("unlearned"))))
        row.update({"request.index": request["index"], "request.count": len(requests),
                    "request.items": request["items"]})
        rows.append(row)
        curve.append({"request": request["index"], "items": request["items"],
                      **{name: headline.get(name) for name in REQUEST_CURVE},
                      "model": request_refs["unlearned"], "start": request_refs["start"]})
    append_run_row(results, rows)  # every request's row in one rewrite of the table

    last = requests[-1]["refs"]
    headline, reference = _summary(store, last.get("evaluate")), _summary(store, last.get("evaluate_reference"))
    lines = [f"# {flow_run.name or run_id}: {len(requests)} deletion requests", "",
             "Each request unlearns its items from the model the one before produced; forget measures on every "
             "request so far.", "", "| request | items so far | " + " | ".join(REQUEST_CURVE) + " |",
             "|---" * (len(REQUEST_CURVE) + 2) + "|"]
    for point in curve:
        values = ("-" if point[name] is None else f"{point[name]:.4g}" for name in REQUEST_CURVE)
        lines.append("| " + " | ".join([str(point["request"]), str(point["items"]), *values]) + " |")
    stage_lines = [f"- {label}: {states.get(label, '')}, {value:.1f} s" for label, value in seconds.items()]
    lines += ["", "## Stages", *stage_lines, "", f"Results: `{run_dir}`"]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown=markdown, key="simu-run-summary", description="deletion requests")
    create_table_artifact(table=[{key: point[key] for key in ("request", "items", *REQUEST_CURVE)} for point in curve],
                          key="simu-request-curve", description="metrics after each deletion request")
    create_link_artifact(link=run_dir.as_uri(), link_text=str(run_dir), key="simu-run-results")
    return {"run_id": run_id, "benchmark": cfg.data.benchmark, "results": str(results), "run_dir": str(run_dir),
            "metrics": headline,
            "target_metrics": {}, "reference_metrics": reference, "states": states, "seconds": seconds,
            "dataset_sizes": _summary(store, refs.get("data")),
            "training": {name: _summary(store, refs.get(name)) for name in ("target", "reference")},
            "unlearning": _summary(store, last.get("unlearned")), "knockout": None, "requests": curve,
            "markdown": markdown}
