"""Recompute every aggregate of the published open-unlearning TOFU logs from their per-item values.

Data: ``../shared/data/reference-evals/open-unlearning/`` (Llama-2-7b-chat on TOFU forget10: the model
fine-tuned on ``full`` and the model trained on ``retain90``). Skipped when the folder is absent.

Tolerances:
- pure float64 arithmetic on stored values (means, hmean, KS p-value, AUC, ROUGE, truth ratios from
  ``avg_loss``): rel 1e-12 (exact up to summation order);
- anything recomputed from ``avg_loss`` through ``exp`` and compared with a stored *probability*:
  rel 5e-7, because open-unlearning computed ``prob = exp(-avg_loss)`` in float32 on the GPU
  (observed max 1.2e-7);
- means stored for MIA statistics other than LOSS/ZLib: rel 1e-6 (aggregated in float32; observed 8e-8);
- privleak: rel 1e-9 (open-unlearning divides by ``r + 1e-10``; see tofu.privleak).

Findings that the tests pin down explicitly (rather than xfail):
- ``eps``: open-unlearning's truth ratio is ``exp(-mean nll_wrong) / (exp(-nll_right) + 1e-10)``;
  with ``eps=OPEN_UNLEARNING_EPS`` we reproduce every stored ratio exactly, with the metrics.md
  formula (eps=0) the relative difference equals ``1e-10 / P(right)`` (up to 1.7e-5 on world facts).
- ZLib: the stored statistic is *mean* NLL / zlib length (metrics.md says "sum NLL").
- retain90 privleak (22.67) was computed without retain-model logs, i.e. against open-unlearning's
  default reference AUC of 0.5, not against itself (which would give 0).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simu_core.metrics import mia, rouge, tofu
from simu_core.metrics.tofu import MODEL_UTILITY_COMPONENTS, OPEN_UNLEARNING_EPS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REF_DIR = SHARED_DATA / "reference-evals"
OU_DIR = REF_DIR / "open-unlearning"
TOFU_DIR = SHARED_DATA / "tofu"

MODELS = {
    "full": "Llama-2-7b-chat-hf_full_evals_forget10",
    "retain90": "Llama-2-7b-chat-hf_retain90",
}

pytestmark = pytest.mark.skipif(
    not all((OU_DIR / f"{stem}_TOFU_EVAL.json").is_file() for stem in MODELS.values()),
    reason=f"reference evals not found under {OU_DIR}",
)

EXACT = 1e-12  # float64 arithmetic on stored values
FLOAT32_PROB = 5e-7  # exp(-avg_loss) vs probabilities stored from float32 GPU computation
FLOAT32_MEAN = 1e-6  # means of MIA statistics aggregated in float32

# truth-ratio metrics: (right-answer probability log, perturbed-answers log, aggregator)
TRUTH_RATIOS = {
    "forget_truth_ratio": ("forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "forget"),
    "retain_Truth_Ratio": ("retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob", "true_better"),
    "ra_Truth_Ratio": ("ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "true_better"),
    "wf_Truth_Ratio": ("wf_Q_A_Prob", "wf_Q_A_PERT_Prob", "true_better"),
}
NORMALISED = {
    "ra_Q_A_Prob_normalised": ("ra_Q_A_Prob", "ra_Q_A_PERT_Prob"),
    "wf_Q_A_Prob_normalised": ("wf_Q_A_Prob", "wf_Q_A_PERT_Prob"),
}
MU_SOURCES = {
    "retain_prob": "retain_Q_A_Prob",
    "retain_rouge": "retain_Q_A_ROUGE",
    "retain_truth_ratio": "retain_Truth_Ratio",
    "ra_prob": "ra_Q_A_Prob_normalised",
    "ra_rouge": "ra_Q_A_ROUGE",
    "ra_truth_ratio": "ra_Truth_Ratio",
    "wf_prob": "wf_Q_A_Prob_normalised",
    "wf_rouge": "wf_Q_A_ROUGE",
    "wf_truth_ratio": "wf_Truth_Ratio",
}


@lru_cache(maxsize=None)
def load_eval(model: str) -> dict[str, Any]:
    with open(OU_DIR / f"{MODELS[model]}_TOFU_EVAL.json", encoding="utf-8") as fh:
        return json.load(fh)


@lru_cache(maxsize=None)
def load_summary(model: str) -> dict[str, Any]:
    with open(OU_DIR / f"{MODELS[model]}_TOFU_SUMMARY.json", encoding="utf-8") as fh:
        return json.load(fh)


def per_item(entry: dict[str, Any], field: str) -> list[Any]:
    """Per-item ``field`` of a metric entry, ordered by integer item index."""
    vbi = entry["value_by_index"]
    return [vbi[k][field] for k in sorted(vbi, key=int)]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def truth_ratios(model: str, key: str, *, eps: float = OPEN_UNLEARNING_EPS) -> np.ndarray:
    right, wrong, _ = TRUTH_RATIOS[key]
    d = load_eval(model)
    return tofu.truth_ratio(per_item(d[right], "avg_loss"), per_item(d[wrong], "avg_loss"), eps=eps)


@lru_cache(maxsize=None)
def recompute_aggregates(model: str) -> dict[str, tuple[float, float]]:
    """Recompute every aggregate in the EVAL log: key -> (recomputed value, relative tolerance)."""
    d = load_eval(model)
    out: dict[str, tuple[float, float]] = {}
    for key, entry in d.items():
        if key.endswith("_ROUGE"):
            gens, golds = per_item(entry, "generation"), per_item(entry, "ground_truth")
            out[key] = (rouge.mean_rouge_l_recall(gens, golds), EXACT)
        elif key.endswith("_PERT_Prob"):
            nll = np.asarray(per_item(entry, "avg_loss"), dtype=float)
            out[key] = (tofu.mean_probability(nll.ravel()), FLOAT32_PROB)
        elif key in NORMALISED:
            right, wrong = NORMALISED[key]
            val = tofu.mean_normalised_probability(
                per_item(d[right], "avg_loss"), per_item(d[wrong], "avg_loss"), eps=OPEN_UNLEARNING_EPS
            )
            out[key] = (val, FLOAT32_PROB)
        elif key.endswith("_Prob"):
            out[key] = (tofu.mean_probability(per_item(entry, "avg_loss")), FLOAT32_PROB)
        elif key in TRUTH_RATIOS:
            ratios = truth_ratios(model, key)
            agg = TRUTH_RATIOS[key][2]
            score = (
                tofu.truth_ratio_score_forget(ratios)
                if agg == "forget"
                else tofu.truth_ratio_score_true_better(ratios)
            )
            # forget: open-unlearning uses min(R, 1/(R + 1e-10)), a 1e-10-relative difference
            out[key] = (score, 1e-9 if agg == "forget" else EXACT)
        elif key in ("extraction_strength", "exact_memorization"):
            out[key] = (float(np.mean(per_item(entry, "score"))), EXACT)
        elif key.startswith("mia_"):
            forget, holdout = per_item(entry["forget"], "score"), per_item(entry["holdout"], "score")
            out[key] = (mia.auc(forget, holdout), EXACT)
        elif key == "forget_quality":
            out[key] = (
                tofu.forget_quality(truth_ratios("full", "forget_truth_ratio"), truth_ratios("retain90", "forget_truth_ratio")),
                EXACT,
            )
        elif key == "model_utility":
            continue  # from the recomputed components, below
        elif key == "privleak":
            auc_model = mia.auc(per_item(d["mia_min_k"]["forget"], "score"), per_item(d["mia_min_k"]["holdout"], "score"))
            if model == "full":
                r = load_eval("retain90")["mia_min_k"]
                auc_ref = mia.auc(per_item(r["forget"], "score"), per_item(r["holdout"], "score"))
            else:
                auc_ref = 0.5  # open-unlearning default ref AUC when no retain logs are given
            out[key] = (tofu.privleak(auc_model, auc_ref), 1e-9)
        else:  # pragma: no cover - a new key in the logs must be handled explicitly
            raise AssertionError(f"no recomputation for {key!r}")
    if "model_utility" in d:
        # Model Utility from the *recomputed* components (not the stored ones)
        comps = {name: out[src][0] for name, src in MU_SOURCES.items()}
        out["model_utility"] = (tofu.model_utility(comps), FLOAT32_PROB)
    return out


# ----------------------------------------------------------------------------- every aggregate


@pytest.mark.parametrize("model", list(MODELS))
def test_every_eval_aggregate_is_recomputed(model):
    d = load_eval(model)
    recomputed = recompute_aggregates(model)
    assert set(recomputed) == set(d)  # nothing skipped
    failures = []
    for key, (value, tol) in sorted(recomputed.items()):
        stored = d[key]["agg_value"]
        if stored is None:  # retain90 has no forget_quality (no reference model for itself)
            assert key == "forget_quality" and model == "retain90"
            continue
        if _rel(value, stored) > tol:
            failures.append(f"{key}: recomputed {value!r} vs stored {stored!r} (rel {_rel(value, stored):.2e} > {tol})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("model", list(MODELS))
def test_every_summary_value_is_recomputed(model):
    summary = load_summary(model)
    recomputed = recompute_aggregates(model)
    assert set(summary) <= set(recomputed)
    for key, stored in summary.items():
        value, tol = recomputed[key]
        assert value == pytest.approx(stored, rel=tol), key


# ----------------------------------------------------------------------------- headline numbers


def test_forget_quality_full_vs_retain90():
    fq = tofu.forget_quality(truth_ratios("full", "forget_truth_ratio"), truth_ratios("retain90", "forget_truth_ratio"))
    assert fq == pytest.approx(4.346199600129006e-25, rel=EXACT)
    # same p-value from the stored per-item ratios and from the metrics.md formula (eps=0):
    stored_full = per_item(load_eval("full")["forget_truth_ratio"], "score")
    stored_ret = per_item(load_eval("retain90")["forget_truth_ratio"], "score")
    assert tofu.forget_quality(stored_full, stored_ret) == pytest.approx(4.346199600129006e-25, rel=EXACT)
    fq0 = tofu.forget_quality(
        truth_ratios("full", "forget_truth_ratio", eps=0.0), truth_ratios("retain90", "forget_truth_ratio", eps=0.0)
    )
    assert fq0 == pytest.approx(4.346199600129006e-25, rel=EXACT)
    # the retain model against itself scores 1.0
    assert tofu.forget_quality(stored_ret, stored_ret) == 1.0


@pytest.mark.parametrize(("model", "expected"), [("full", 0.6275553508047139), ("retain90", 0.6130190411998432)])
def test_model_utility_from_stored_components(model, expected):
    d = load_eval(model)
    comps = {name: d[src]["agg_value"] for name, src in MU_SOURCES.items()}
    assert set(comps) == set(MODEL_UTILITY_COMPONENTS)
    assert tofu.model_utility(comps) == pytest.approx(expected, rel=EXACT)


def test_privleak_values():
    full, ret = load_eval("full"), load_eval("retain90")
    # s = 1 - 0.99915, r = 1 - 0.38666875: (0.00085 - 0.61333125) / 0.61333125 * 100 = -99.8614...
    assert tofu.privleak(full["mia_min_k"]["auc"], ret["mia_min_k"]["auc"]) == pytest.approx(
        full["privleak"]["agg_value"], rel=1e-9
    )
    # retain90's own log: (0.61333125 - 0.5) / 0.5 * 100 = 22.66625 (reference AUC 0.5, not itself)
    assert tofu.privleak(ret["mia_min_k"]["auc"], 0.5) == pytest.approx(ret["privleak"]["agg_value"], rel=1e-9)
    assert tofu.privleak(ret["mia_min_k"]["auc"], ret["mia_min_k"]["auc"]) == 0.0


# ----------------------------------------------------------------------------- per-item values


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("key", list(TRUTH_RATIOS))
def test_per_item_truth_ratios(model, key):
    stored = np.asarray(per_item(load_eval(model)[key], "score"))
    # open-unlearning's formula (eps = 1e-10) reproduces the stored ratios (float64 arithmetic)
    np.testing.assert_allclose(truth_ratios(model, key), stored, rtol=EXACT, atol=0)
    # metrics.md's exp(nll_right - mean nll_wrong) differs by exactly the eps term: R0 = R * (1 + eps / P(right))
    right = TRUTH_RATIOS[key][0]
    p_right = np.exp(-np.asarray(per_item(load_eval(model)[right], "avg_loss")))
    np.testing.assert_allclose(truth_ratios(model, key, eps=0.0), stored * (1 + OPEN_UNLEARNING_EPS / p_right), rtol=1e-9)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("key", list(NORMALISED))
def test_per_item_normalised_probability(model, key):
    d = load_eval(model)
    right, wrong = NORMALISED[key]
    stored = np.asarray(per_item(d[key], "prob"))
    # from the stored probabilities (what open-unlearning divided): exact formula check
    p_right = np.asarray(per_item(d[right], "prob"))
    p_wrong = np.asarray(per_item(d[wrong], "prob"))
    out = tofu.normalised_probability(-np.log(p_right), -np.log(p_wrong), eps=OPEN_UNLEARNING_EPS)
    np.testing.assert_allclose(out, stored, rtol=1e-12)
    # from the NLLs: float32 rounding of the stored probabilities only
    out = tofu.normalised_probability(per_item(d[right], "avg_loss"), per_item(d[wrong], "avg_loss"), eps=OPEN_UNLEARNING_EPS)
    np.testing.assert_allclose(out, stored, rtol=FLOAT32_PROB)


@pytest.mark.parametrize("model", list(MODELS))
def test_per_item_probabilities(model):
    d = load_eval(model)
    for key in ("forget_Q_A_Prob", "forget_Q_A_PARA_Prob", "retain_Q_A_Prob", "ra_Q_A_Prob", "wf_Q_A_Prob"):
        np.testing.assert_allclose(
            tofu.probability_from_nll(per_item(d[key], "avg_loss")),
            per_item(d[key], "prob"),
            rtol=FLOAT32_PROB,
            err_msg=key,
        )


@pytest.mark.parametrize("model", list(MODELS))
def test_per_item_rouge(model):
    d = load_eval(model)
    for key in ("forget_Q_A_ROUGE", "retain_Q_A_ROUGE", "ra_Q_A_ROUGE", "wf_Q_A_ROUGE"):
        for i, item in d[key]["value_by_index"].items():
            got = rouge.rouge_scores(item["generation"], item["ground_truth"])
            for field in ("rougeL_recall", "rouge1_recall", "rougeL_f1"):
                assert got[field] == pytest.approx(item[field], rel=EXACT, abs=1e-15), (key, i, field)


@pytest.mark.parametrize("model", list(MODELS))
def test_mia_auc_convention(model):
    d = load_eval(model)
    for key in (k for k in d if k.startswith("mia_")):
        forget, holdout = per_item(d[key]["forget"], "score"), per_item(d[key]["holdout"], "score")
        assert mia.auc(forget, holdout) == pytest.approx(d[key]["auc"], rel=EXACT)
        # the opposite labelling (forget = 1) would give 1 - AUC, which is not what is stored
        assert mia.auc(holdout, forget) == pytest.approx(1 - d[key]["auc"], rel=EXACT)
        # stored per-split means of the statistics
        assert float(np.mean(forget)) == pytest.approx(d[key]["forget"]["agg_value"], rel=FLOAT32_MEAN)
        assert float(np.mean(holdout)) == pytest.approx(d[key]["holdout"]["agg_value"], rel=FLOAT32_MEAN)


@pytest.mark.parametrize("model", list(MODELS))
def test_loss_statistic_is_mean_answer_nll(model):
    d = load_eval(model)
    loss = per_item(d["mia_loss"]["forget"], "score")
    # the LOSS statistic on the forget set is exactly forget_Q_A_Prob's mean token NLL
    assert loss == per_item(d["forget_Q_A_Prob"], "avg_loss")
    # loss_statistic of a single mean value is that value
    assert mia.loss_statistic([loss[0]]) == loss[0]


@pytest.mark.skipif(
    not (TOFU_DIR / "forget10.json").is_file() or not (TOFU_DIR / "holdout10.json").is_file(),
    reason="TOFU forget10/holdout10 files not found",
)
@pytest.mark.parametrize("model", list(MODELS))
def test_zlib_statistic_is_mean_nll_over_compressed_answer(model):
    """ZLib = mean NLL / len(zlib.compress(answer)): exact for every answer not starting with a quote.

    For answers starting with '"' the stored statistic implies a compressed length 1-2 bytes shorter
    than the raw answer's: open-unlearning compresses the *detokenised label text*, which for these
    answers differs from the dataset string (Llama tokenizer round trip). The statistic itself is
    unchanged; a summed NLL (metrics.md wording) would be off by a factor T (tokens), not 1-2 bytes.
    """
    d = load_eval(model)
    for split, fname in (("forget", "forget10.json"), ("holdout", "holdout10.json")):
        with open(TOFU_DIR / fname, encoding="utf-8") as fh:
            answers = [json.loads(line)["answer"] for line in fh if line.strip()]
        loss = per_item(d["mia_loss"][split], "score")
        stored = per_item(d["mia_zlib"][split], "score")
        assert len(answers) == len(loss) == len(stored) == 400
        n_exact = 0
        for i, (ans, nll, z) in enumerate(zip(answers, loss, stored)):
            if ans.startswith('"'):
                implied_len = nll / z
                assert implied_len == pytest.approx(round(implied_len), abs=1e-6), (split, i)
                assert 0 <= mia.zlib_length(ans) - round(implied_len) <= 2, (split, i)
            else:
                assert mia.zlib_statistic(nll, ans) == pytest.approx(z, rel=EXACT), (split, i)
                n_exact += 1
        assert n_exact >= 350, split
