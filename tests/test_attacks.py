"""The attack suite (simu_core.attacks): settings, each attack where the answer is known, the
robustness formulas by hand, and the pipeline's stages and report."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simu_core.config import ConfigError, load_config

# ----------------------------------------------------------------------------------------------
# Settings


def test_attacks_list_and_relearn_enabled_are_one_setting():
    assert load_config(overrides=["attacks=[relearn]"]).relearn.enabled
    config = load_config(overrides=["relearn.enabled=true", "attacks=[logit_lens, quantize]"])
    assert config.attacks == ["quantize", "logit_lens", "relearn"]  # the report's order, relearn added
    assert load_config().attacks == [] and not load_config().relearn.enabled
    assert load_config(overrides=["attacks=paraphrase"]).attacks == ["paraphrase"]


@pytest.mark.parametrize("overrides, message", [
    (["attacks=[quantise]"], r"attacks: unknown attack\(s\) \['quantise'\]; known: \['quantize', 'paraphrase'"),
    (["attack.quantize.bits=[3]"], r"attack.quantize.bits"),
    (["attack.quantize.scheme=nf4x"], r"attack.quantize.scheme"),
    (["attacks=[quantize]", "model.tiny.hidden_size=96", "model.tiny.num_heads=4"],
     r"attack.quantize.group_size=128 does not divide .*'model.tiny.hidden_size': 96"),
    (["attacks=[logit_lens]", "data.benchmark=lume", "model.target=some/model"],
     r"attacks=\['logit_lens'\] with data.benchmark='lume': no attack is offered on LUME"),
    (["attacks=[quantize,logit_lens]", "data.benchmark=muse"],
     r"attacks=\['logit_lens'\] with data.benchmark='muse': the attacks offered on MUSE: \['quantize', 'relearn'\]; "
     r"paraphrase needs paraphrased questions"),
    (["relearn.enabled=true", "data.benchmark=wmdp", "model.target=some/model"],
     r"relearn.data='forget_half' with data.benchmark='wmdp': WMDP's measured items .* set relearn.data=forget_epoch"),
    (["attacks=[quantize]", "run.devices=2"], r"attacks=\['quantize'\] with run.devices=2"),
    (["attacks=[paraphrase]", "data.requests=[[forget-0:4]]"], r"data.requests with attacks=\['paraphrase'\]"),
])
def test_bad_attack_settings_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_attack_settings_are_in_their_own_stages_key_only():
    from flows.params import stage_params

    base = stage_params(load_config(overrides=["attacks=[quantize, paraphrase, in_context, logit_lens]"]))
    changed = {
        "attack.quantize.bits=[4]": {"attack_quantize"},
        "attack.in_context.k=2": {"attack_in_context"},
        "attack.retain_items=10": {"attack_quantize", "attack_logit_lens"},
        "run.seed=3": {"attack_in_context", "relearn", "attribute", "unlearn", "generate_alternates"},
        "eval.max_new_tokens=8": {"attack_quantize", "attack_paraphrase", "attack_in_context", "relearn", "evaluate",
                                  "evaluate_reference"},
    }
    for override, stages in changed.items():
        other = stage_params(load_config(overrides=["attacks=[quantize, paraphrase, in_context, logit_lens]", override]))
        differ = {stage for stage in base if base[stage] != other[stage]}
        assert differ >= stages and not {s for s in differ if s.startswith("attack_")} - stages, override
    # The attacks list itself and the knockout settings key no attack; the relearning protocol drops the
    # fields it does not read.
    assert stage_params(load_config()) ["attack_quantize"] == base["attack_quantize"]
    epoch = stage_params(load_config(overrides=["relearn.data=forget_epoch"]))["relearn"]
    assert epoch == stage_params(load_config(overrides=["relearn.data=forget_epoch", "relearn.steps=50",
                                                        "relearn.fraction=0.3"]))["relearn"]


@pytest.mark.parametrize("benchmark", ["muse", "wmdp"])
def test_quantization_on_a_corpus_benchmark_is_keyed_by_what_its_evaluation_reads(benchmark, tmp_path):
    """MUSE's and WMDP's evaluations fix their prompts and generation lengths: the template,
    eval.max_new_tokens and attack.retain_items change nothing there and are not in the key; the
    items measured, the batch, the bits are; WMDP's MMLU questions only on WMDP."""
    from flows.params import stage_params

    (tmp_path / "config.json").write_text("{}")  # a model folder is keyed by its files
    common = [f"data.benchmark={benchmark}", "attacks=[quantize]"] + (
        [f"model.target={tmp_path}"] if benchmark == "wmdp" else [])

    def key(*overrides: str) -> dict:
        return stage_params(load_config(overrides=[*common, *overrides]))["attack_quantize"]

    base = key()
    for unread in ("eval.max_new_tokens=8", "attack.retain_items=10", "eval.template=open_unlearning"):
        assert key(unread) == base, unread
    for read in ("eval.max_items=3", "eval.batch_size=2", "attack.quantize.bits=[8]", "model.max_length=256"):
        assert key(read) != base, read
    assert (key("eval.mmlu_source=/mmlu") != base) == (benchmark == "wmdp")
    if benchmark == "wmdp":  # the lens reads accuracy only: no MMLU, no template
        def lens(*overrides: str) -> dict:
            return stage_params(load_config(overrides=[*common, "attacks=[logit_lens]", *overrides]))["attack_logit_lens"]

        for unread in ("eval.template=open_unlearning", "attack.retain_items=10", "eval.mmlu_source=/mmlu"):
            assert lens(unread) == lens(), unread
        assert lens("eval.max_items=3") != lens() and lens("eval.batch_size=2") != lens()


# ----------------------------------------------------------------------------------------------
# Paraphrased questions in the data


def test_the_built_in_benchmark_has_a_paraphrased_question_per_item_and_the_same_values():
    from simu_core.data import load_benchmark

    benchmark = load_benchmark(load_config().data)
    assert benchmark.has_paraphrased_questions()
    forget = benchmark["forget"]
    assert (forget["paraphrased_question"] != forget["question"]).all()
    assert "paraphrased_question" in benchmark["retain_eval"].columns
    # Every other value is what the generator wrote before the paraphrased questions existed (digest taken
    # from commit 7d7620f): the paraphrases draw nothing from its random state.
    import hashlib
    import json

    digest = hashlib.sha256()
    for split in ("train_target", "train_reference", "forget", "retain_eval"):
        frame = benchmark[split].drop(columns=["paraphrased_question"], errors="ignore")
        digest.update(json.dumps(frame.astype(str).values.tolist()).encode())
    assert digest.hexdigest() == "b6375e760c31929ddc931e03ef9889f3e151a7cf818690b2678a34b146b4e1d0"
    # Not in the tokenizer's corpus: the tiny model's tokenizer (and so every target) is unchanged.
    assert not any(text in benchmark.corpus() for text in forget["paraphrased_question"])


def test_tofu_keeps_its_paraphrased_questions():
    from conftest import TOFU_DIR, require_dir
    from simu_core.data.tofu import load_tofu

    benchmark = load_tofu("forget01", require_dir(TOFU_DIR), retain_authors=2)
    assert benchmark.has_paraphrased_questions()
    assert benchmark["forget"]["paraphrased_question"].iloc[0].startswith("Can you tell me the complete name")


def test_paraphrase_is_refused_on_a_benchmark_without_paraphrased_questions(trained_small):
    from simu_core.attacks.paraphrase import check_paraphrases
    from simu_core.stages import read_benchmark

    benchmark = read_benchmark(trained_small["data"])
    check_paraphrases(benchmark)
    benchmark.splits["forget"] = benchmark["forget"].drop(columns="paraphrased_question")
    with pytest.raises(ValueError, match="has no paraphrased question for every forget item"):
        check_paraphrases(benchmark)


# ----------------------------------------------------------------------------------------------
# Each attack on a small trained model


def _model(trained_small, which="target"):
    from simu_core.stages import load_trained, read_benchmark

    config = trained_small["config"]
    model, tokenizer = load_trained(trained_small[which], config)
    return config, read_benchmark(trained_small["data"]), model, tokenizer


def test_paraphrase_measures_the_paraphrased_questions(trained_small, one_torch_thread):
    from simu_core.attacks import paraphrase
    from simu_core.attacks.measures import score, summarise

    config, benchmark, model, tokenizer = _model(trained_small)
    config = config.model_copy(update={"eval": config.eval.model_copy(update={"max_items": 5, "max_new_tokens": 8})})
    result = paraphrase.run(model, tokenizer, benchmark, config)
    table = result.table.set_index("measure")
    forget = benchmark["forget"].iloc[:5]
    by_hand = summarise(score(model, tokenizer, {"forget": forget.assign(question=forget["paraphrased_question"])},
                              config.eval, config.model.max_length))
    plain = summarise(score(model, tokenizer, {"forget": forget}, config.eval, config.model.max_length))
    for name in ("forget_prob", "forget_rouge", "forget_truth_ratio"):
        assert table.loc[name, "after"] == pytest.approx(by_hand[name]) and table.loc[name, "before"] == pytest.approx(plain[name])
    assert table.loc["forget_prob", "after"] != table.loc["forget_prob", "before"]
    assert set(result.items["phase"]) == {"before", "after"} and len(result.items) == 10


def test_in_context_with_k_0_is_the_plain_evaluation_and_k_items_are_shown(trained_small, one_torch_thread):
    from simu_core.attacks import in_context
    from simu_core.evaluation import evaluate_qa

    config, benchmark, model, tokenizer = _model(trained_small)
    eval_config = config.eval.model_copy(update={"max_new_tokens": 8})
    zero = config.model_copy(update={"eval": eval_config, "attack": config.attack.model_copy(update={
        "in_context": config.attack.in_context.model_copy(update={"k": 0})})})
    result = in_context.run(model, tokenizer, benchmark, zero)
    table = result.table.set_index("measure")
    assert (table["before"] == table["after"]).all()
    # ... and equal to the evaluation suite on the measured items.
    measured_ids = result.files["in_context_items.parquet"].query("role == 'measured'")["item_id"]
    measured = benchmark["forget"].set_index("item_id").loc[list(measured_ids)].reset_index()
    suite = evaluate_qa(model, tokenizer, _only_forget(benchmark, measured), eval_config,
                        max_length=config.model.max_length).headline()
    for name in ("forget_prob", "forget_rouge", "forget_truth_ratio"):
        assert table.loc[name, "after"] == pytest.approx(suite[name], rel=1e-6), name
    # k = 2: two pool items before each question, in the QA format, never a measured item.
    shown = in_context.shown_questions(measured, benchmark["forget"].iloc[:3], 2, seed=0)
    assert all(text.count("\nAnswer: ") == 2 and text.endswith(question)
               for text, question in zip(shown, measured["question"]))
    assert in_context.in_context_question([("q1", "a1")], "q") == "q1\nAnswer: a1\n\nQuestion: q"


def _only_forget(benchmark, forget):
    from simu_core.data.schema import QABenchmark

    splits = dict(benchmark.splits)
    splits["forget"] = forget
    return QABenchmark(name=benchmark.name, forget_split=benchmark.forget_split, splits=splits)


def test_in_context_k_larger_than_the_items_it_can_show_is_refused():
    from simu_core.attacks.in_context import check_sizes, split_items

    pool, measured = split_items(10, 0.5, seed=0)
    assert len(pool) == 5 and len(measured) == 5 and not set(pool) & set(measured)
    check_sizes(5, 0.5, 10)
    with pytest.raises(ValueError, match=r"attack.in_context.k=6 is larger than the 5 forget items that can be shown"):
        check_sizes(6, 0.5, 10)


def test_relearn_forget_epoch_trains_every_forget_item_once(trained_small, one_torch_thread):
    from simu_core.attacks.relearn import attack_items, attack_steps, relearn_curve
    from simu_core.config import RelearnConfig

    config, benchmark, model, tokenizer = _model(trained_small, "reference")
    settings = RelearnConfig(data="forget_epoch", batch_size=4, eval_every=100)
    train, measured = attack_items(benchmark, settings, seed=0)
    assert len(train) == len(measured) == len(benchmark["forget"])
    assert attack_steps(settings, 10) == 3  # 4 + 4 + 2
    eval_config = config.eval.model_copy(update={"max_new_tokens": 4})
    curve = relearn_curve(model, tokenizer, train.iloc[:6], measured.iloc[:6], settings, eval_config, lr=3e-3,
                          max_length=config.model.max_length, seed=0, progress=False)
    assert curve["step"].tolist() == [0, 2]  # 6 items in batches of 4: 2 steps
    assert curve["forget_prob"].iloc[-1] > curve["forget_prob"].iloc[0]


# ----------------------------------------------------------------------------------------------
# The figures, by hand


def _tables():
    def table(values):
        return pd.DataFrame([{"attack": attack, "setting": setting, "measure": "forget_prob", "before": b, "after": a}
                             for (attack, setting), (b, a) in values.items()])

    unlearned = table({("quantize", "bits=8"): (0.10, 0.11), ("quantize", "bits=4"): (0.10, 0.40),
                       ("relearn", "steps=10"): (0.10, 0.50)})
    target = table({("quantize", "bits=8"): (0.90, 0.90), ("quantize", "bits=4"): (0.90, 0.80),
                    ("relearn", "steps=10"): (0.90, 0.95)})
    reference = table({("quantize", "bits=8"): (0.08, 0.08), ("quantize", "bits=4"): (0.08, 0.10),
                       ("relearn", "steps=10"): (0.08, 0.20)})
    return {"unlearned": unlearned, "target": target, "reference": reference}


def test_recovery_regained_and_the_openunlearning_formulas_by_hand():
    from simu_core.attacks.robustness import headline_figures, robustness_table

    table = robustness_table(_tables()).set_index(["attack", "setting"])
    four = table.loc[("quantize", "bits=4")]
    assert four["recovery"] == pytest.approx(0.40 / 0.10)
    assert four["regained"] == pytest.approx((0.40 - 0.10) / (0.90 - 0.10))
    assert four["ou_quantization_q"] == pytest.approx(0.10 / 0.40)  # min(m_unl^b / m_unl^a, 1)
    assert table.loc[("quantize", "bits=8"), "ou_quantization_q"] == pytest.approx(0.10 / 0.11)
    relearn = table.loc[("relearn", "steps=10")]
    assert relearn["ou_relearning_r"] == pytest.approx((0.20 - 0.08) / (0.50 - 0.10))  # Eq. R
    assert np.isnan(relearn["ou_quantization_q"]) and np.isnan(four["ou_relearning_r"])
    figures = headline_figures(robustness_table(_tables()))
    assert figures["attack_quantize_recovery"] == pytest.approx(4.0)  # the fewest bits
    assert figures["attack_quantize_8bit_recovery"] == pytest.approx(0.11 / 0.08)
    r, q = 0.12 / 0.40, 0.25
    assert figures["attack_robustness"] == pytest.approx(2 * r * q / (r + q))
    # Clipped at 1: an unlearned model that gains less than the reference is fully robust.
    tables = _tables()
    tables["unlearned"].loc[2, "after"] = 0.11
    assert robustness_table(tables).set_index("attack").loc["relearn", "ou_relearning_r"] == 1.0


def test_robustness_needs_the_three_models_with_the_same_rows():
    from simu_core.attacks.robustness import robustness_table

    tables = _tables()
    with pytest.raises(ValueError, match=r"missing \['reference'\]"):
        robustness_table({key: tables[key] for key in ("unlearned", "target")})
    tables["target"] = tables["target"].iloc[:2]
    with pytest.raises(ValueError, match="different settings or measures"):
        robustness_table(tables)


def test_without_a_retain_reference_recovery_is_nan_and_regained_and_q_remain():
    """WMDP has no retain reference: recovery and R are undefined, regained and Q are not; the headline
    reads the table's own measure, and the report shows regained where no reading has a recovery."""
    from simu_core.attacks.robustness import format_robustness, headline_figures, headline_measure, robustness_table
    from simu_core.reporting import robustness_markdown

    tables = {name: table.assign(measure="wmdp_accuracy") for name, table in _tables().items() if name != "reference"}
    table = robustness_table(tables, reference=False).set_index(["attack", "setting"])
    four = table.loc[("quantize", "bits=4")]
    assert np.isnan(four["recovery"]) and np.isnan(four["reference_after"])
    assert four["regained"] == pytest.approx((0.40 - 0.10) / (0.90 - 0.10))
    assert four["ou_quantization_q"] == pytest.approx(0.10 / 0.40)
    assert np.isnan(table.loc[("relearn", "steps=10"), "ou_relearning_r"])
    assert headline_measure(table.reset_index()) == "wmdp_accuracy"
    figures = headline_figures(table.reset_index())
    assert figures["attack_quantize_regained"] == pytest.approx(0.375) and np.isnan(figures["attack_quantize_recovery"])
    assert any(line.startswith("wmdp_accuracy   quantize     bits=4") for line in format_robustness(table.reset_index()))
    readings = pd.DataFrame([{"curve": "rmu", "curve_order": 0, "target": 0, "seed": seed, "data": "d",
                              **{f"metric.{name}": value for name, value in figures.items()}} for seed in (0, 1)])
    from simu_core.reporting import robustness_table as report_table

    markdown = robustness_markdown(report_table(readings))
    assert "regained: quantize 4bit" in markdown and "recovery:" not in markdown


# ----------------------------------------------------------------------------------------------
# In the pipeline


@pytest.fixture(scope="module")
def attack_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    return [f"run.store={root / 'store'}", f"run.results={root / 'results'}", "knockout.enabled=false",
            "unlearn.method=so_graddiff", "attacks=[quantize, paraphrase, in_context, logit_lens, relearn]",
            "relearn.steps=2", "relearn.eval_every=2", "eval.max_new_tokens=8", "attack.retain_items=6",
            "attack.in_context.k=2", "attack.quantize.group_size=32"], root


def test_every_attack_in_the_pipeline_writes_its_tables_and_shares_the_reference_attacks(prefect_api, attack_workspace):
    from test_pipeline import PIPELINE_OVERRIDES

    from flows.pipeline import simu_pipeline
    from simu_core.attacks.names import ATTACKS, attack_label

    paths, root = attack_workspace
    first = simu_pipeline(overrides=PIPELINE_OVERRIDES + paths)
    for attack in ATTACKS:
        for model in ("unlearned", "target", "reference"):
            assert first["states"][attack_label(attack, model)] == "Completed", (attack, model)
    run_dir = Path(first["run_dir"])
    robustness = pd.read_parquet(run_dir / "robustness.parquet")
    assert set(robustness["attack"]) == set(ATTACKS)
    assert {"bits=8", "bits=4", "paraphrased", "k=2", "max", "steps=2"} <= set(robustness["setting"])
    lens = robustness[(robustness["attack"] == "logit_lens") & (robustness["measure"] == "forget_prob")]
    last = lens[lens["setting"] == "layer=1"].iloc[0]  # 2 layers: the lens at the last is the model's own output
    assert last["unlearned_after"] == pytest.approx(last["unlearned_before"], rel=1e-5)
    # The best layer is a measure of its own, with no recovery (a layer index is no probability).
    best = robustness[(robustness["attack"] == "logit_lens") & (robustness["measure"] == "forget_best_layer")].iloc[0]
    assert best["unlearned_before"] == 1.0 and best["unlearned_after"] in (0.0, 1.0) and np.isnan(best["recovery"])
    runs = pd.read_parquet(root / "results" / "runs.parquet")
    row = runs.iloc[-1]
    for attack in ATTACKS:
        assert np.isfinite(row[f"metric.attack_{attack}_unlearned_after"]), attack
    assert row["metric.attack_quantize_recovery"] == pytest.approx(row["metric.attack_quantize_4bit_recovery"])
    assert "## Attacks (robustness)" in first["markdown"]
    for name in ("attacks.parquet", "attack_items_quantize.parquet", "logit_lens_items.parquet"):
        assert (run_dir / name).exists(), name

    other = simu_pipeline(overrides=PIPELINE_OVERRIDES + paths + ["unlearn.lr=1e-3"])
    for attack in ATTACKS:
        assert other["states"][attack_label(attack, "unlearned")] == "Completed"
        assert other["states"][attack_label(attack, "target")] == "Cached", attack
        assert other["states"][attack_label(attack, "reference")] == "Cached", attack

    from flows.report import write_report

    written = write_report(root / "results")
    assert "## Attacks: removed or hidden?" in written["markdown"]
    assert "recovery: quantize 4bit" in written["markdown"] and "HM(R, Q)" in written["markdown"]
    assert any(name.startswith("robustness") for name in written["plots"])


def test_an_in_context_k_too_large_is_refused_before_any_training(prefect_api, tmp_path):
    from test_pipeline import PIPELINE_OVERRIDES

    from flows.pipeline import simu_pipeline

    paths = [f"run.store={tmp_path / 'store'}", f"run.results={tmp_path / 'results'}", "attacks=[in_context]",
             "attack.in_context.k=9"]
    with pytest.raises(ValueError, match=r"attack.in_context.k=9 is larger than the 5 forget items that can be shown"):
        simu_pipeline(overrides=PIPELINE_OVERRIDES + paths)
    runs = pd.read_parquet(tmp_path / "results" / "runs.parquet")
    states = {column: runs[column].iloc[-1] for column in runs if column.startswith("state.")}
    assert states == {"state.prepare_data": "Completed"}


def test_report_reads_the_attacks_of_matched_readings_at_each_curves_best_lr(tmp_path):
    """Stopped runs: the robustness table averages the matched readings at each curve's best lr only
    (simu at 1e-4, so_graddiff at 1e-3: the stopped tables' choice), and pairs them on target and seed."""
    from test_report_matched import _stopped_folder

    from flows.report import write_report

    results = tmp_path / "results"
    runs = _stopped_folder(results)
    stopped = runs["stop.status"].notna()
    # Recovery 2.0 for simu at its best lr, 1.5 + seed / 10 for so_graddiff at its own; other lrs 9.0 (must not show).
    best = {"simu": 1e-4, "so_graddiff": 1e-3}
    recovery = [
        (2.0 if method == "simu" else 1.5 + seed / 10) if lr == best.get(method) else 9.0
        for method, lr, seed in zip(runs["config.unlearn.method"], runs["config.unlearn.lr"], runs["config.run.seed"])]
    runs["metric.attack_relearn_recovery"] = np.where(stopped, recovery, np.nan)
    runs["metric.attack_quantize_recovery"] = np.where(stopped, 1.0, np.nan)
    runs["metric.attack_quantize_4bit_recovery"] = runs["metric.attack_quantize_recovery"]
    runs.to_parquet(results / "runs.parquet")
    markdown = write_report(results)["markdown"]
    table = pd.read_csv(results / "report" / "robustness_stopped_at_forget_prob__reference.csv").set_index("curve")
    assert table.loc["simu", "relearn_recovery_mean"] == pytest.approx(2.0) and table.loc["simu", "readings"] == 4
    assert table.loc["so_graddiff", "relearn_recovery_mean"] == pytest.approx(1.55)
    assert "| simu | 4 (2 targets x 2 seeds = 4 readings) |" in markdown
    # Paired on (target, seed): simu − so_graddiff = 0.5 and 0.4 per seed.
    assert "| stopped at forget_prob<=reference | simu | so_graddiff | 4 (2 targets x 2 seeds = 4 readings) |" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| stopped at forget_prob<=reference | simu |"))
    assert "0.450 ± 0.058" in row


def test_report_reads_each_relearn_data_on_its_own_never_pooled(tmp_path):
    """The same stopped models attacked with relearn.data=forget_half and retain_only: two tables, each
    averaging its own readings, and pairs only within one attack setting (4 pairs each, not 8 crossed)."""
    from test_report_matched import _stopped_folder

    from flows.report import write_report

    results = tmp_path / "results"
    runs = _stopped_folder(results)
    runs = runs[runs["stop.status"].notna()]
    halves = []
    for data, base in (("forget_half", 2.0), ("retain_only", 5.0)):
        half = runs.copy()
        half["config.relearn.data"] = data
        for run_id in runs["run_id"]:  # each attacked copy with its run folder (trajectory, reference)
            shutil.copytree(results / "runs" / str(run_id), results / "runs" / f"{run_id}-{data}")
        half["run_id"] = half["run_id"].astype(str) + "-" + data
        half["config_hash"] = half["run_id"]
        # simu: base; so_graddiff: base - 0.5 - seed / 10 (so simu − so_graddiff = 0.5 + seed / 10 in both).
        half["metric.attack_relearn_recovery"] = [
            base if method == "simu" else base - 0.5 - seed / 10
            for method, seed in zip(half["config.unlearn.method"], half["config.run.seed"])]
        halves.append(half)
    pd.concat(halves, ignore_index=True).to_parquet(results / "runs.parquet")
    markdown = write_report(results)["markdown"]
    for data, base in (("forget_half", 2.0), ("retain_only", 5.0)):
        where = f"stopped at forget_prob<=reference, relearn.data={data}"
        assert f"### {where}, matched readings at each curve's best lr" in markdown
        slug = "".join(character if character.isalnum() else "_" for character in where)
        table = pd.read_csv(results / "report" / f"robustness_{slug}.csv").set_index("curve")
        assert table.loc["simu", "relearn_recovery_mean"] == pytest.approx(base)
        assert table.loc["simu", "readings"] == 4
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {where} | simu | so_graddiff |"))
        assert "| 4 (2 targets x 2 seeds = 4 readings) |" in row and "0.550 ± 0.058" in row
