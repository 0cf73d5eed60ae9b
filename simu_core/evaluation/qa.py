"""The TOFU evaluation suite (also used for the built-in synthetic benchmark).

Splits: ``forget``, ``retain_eval`` (TOFU retain_perturbed), ``real_authors``, ``world_facts``
(probability, ROUGE, truth ratio) and ``holdout`` (MIA non-members). Definitions follow
``shared/reference/metrics.md`` through :mod:`simu_core.metrics`; metric names are listed in
:mod:`simu_core.evaluation.results`.

Forget quality and privleak compare with a retain-reference model: pass that model's per-item
table (``EvaluationResult.items`` of the same suite on the same items, e.g. read back from its
``items.parquet``). Without it both are reported as not computed.

As open-unlearning's evaluator: the token-level statistics (Min-K%, Min-K%++, extraction strength,
exact memorisation) leave out the last labelled token, the appended EOS (its
``tokenwise_logprobs``: "-1 to ignore eos prediction"); LOSS and ZLib use every labelled token;
ZLib compresses the decoded label tokens (``decode(labels, skip_special_tokens=True)``), not the
answer text. ``EvalConfig.template`` picks the prompt template (:mod:`simu_core.prompting`).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from simu_core.config import EvalConfig
from simu_core.data.schema import QABenchmark
from simu_core.evaluation.generation import generate_greedy
from simu_core.evaluation.results import HEADLINE_SPLIT, EvaluationResult, MetricTable
from simu_core.evaluation.scoring import ScoredExamples, score_examples
from simu_core.metrics import mia, tofu
from simu_core.metrics.rouge import rouge_l_recall_batch
from simu_core.prompting import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    EncodedExample,
    encode_qa,
    pad_token_id,
    prompt_ids,
)

TOFU_MAX_NEW_TOKENS = 200
QA_SPLITS = ("forget", "retain_eval", "real_authors", "world_facts", "holdout")
# Prefix of each split in the headline names (open-unlearning's naming: retain_/ra_/wf_).
SPLIT_PREFIX = {"forget": "forget", "retain_eval": "retain", "real_authors": "ra", "world_facts": "wf"}
# Truth ratio "right" answer: the paraphrase on forget/retain, the answer on the option sets.
PARAPHRASE_SPLITS = ("forget", "retain_eval")
OPTION_SPLITS = ("real_authors", "world_facts")
GENERATION_SPLITS = ("forget", "retain_eval", "real_authors", "world_facts")
# Per-token statistics feed MIA (forget vs holdout) and extraction strength (forget).
TOKEN_STAT_SPLITS = ("forget", "holdout")
MIA_STATISTICS = ("loss", "zlib", "min_k", "min_k_plus_plus")
#: The light suite of a retain reference: the splits whose truth ratios and MIA statistics forget
#: quality and privleak compare with it; no generations.
LIGHT_SPLITS = ("forget", "holdout")
LIGHT_NOTE = (
    "light evaluation (a retain reference): only the forget and holdout splits were scored, without "
    "generations, as forget quality and privleak need; ROUGE, model utility and the retain, real-authors and "
    "world-facts metrics were not computed (eval.reference_full=true computes them)"
)

ITEM_COLUMNS = (
    "item_id", "split", "question", "answer", "num_tokens", "nll", "probability", "probability_normalised",
    "nll_paraphrased", "nll_perturbed", "truth_ratio", "generation", "rouge", "mia_loss", "mia_zlib",
    "mia_min_k", "mia_min_k_plus_plus", "extraction_strength", "exact_memorization",
)


def _required_columns(split: str) -> list[str]:
    columns = ["item_id", "question", "answer"]
    if split in PARAPHRASE_SPLITS:
        columns.append("paraphrased_answer")
    if split != "holdout":
        columns.append("perturbed_answer")
    return columns


def _check_text_column(frame: pd.DataFrame, split: str, column: str) -> None:
    for row, value in enumerate(frame[column]):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"split {split!r}, row {row}: {column} must be a non-empty string, got {value!r}")


def evaluation_splits(benchmark: QABenchmark, max_items: int | None = None) -> dict[str, pd.DataFrame]:
    """The evaluation splits (first ``max_items`` rows of each), validated: clear errors for a
    missing or empty split, a missing column or an empty perturbed-answer list."""
    splits = {}
    for split in QA_SPLITS:
        if split not in benchmark.splits:
            raise ValueError(f"benchmark {benchmark.name!r} lacks evaluation split {split!r}")
        frame = benchmark.splits[split]
        if len(frame) == 0:
            raise ValueError(f"benchmark {benchmark.name!r}: evaluation split {split!r} is empty")
        missing = [column for column in _required_columns(split) if column not in frame.columns]
        if missing:
            raise ValueError(f"benchmark {benchmark.name!r}, split {split!r} lacks columns {missing}")
        frame = frame.iloc[:max_items].reset_index(drop=True) if max_items else frame.reset_index(drop=True)
        for column in ("question", "answer", "paraphrased_answer"):
            if column in _required_columns(split):
                _check_text_column(frame, split, column)
        if "perturbed_answer" in _required_columns(split):
            for row, options in enumerate(frame["perturbed_answer"]):
                if options is None or isinstance(options, str) or len(options) == 0:
                    raise ValueError(
                        f"split {split!r}, row {row}: perturbed_answer must be a non-empty list of strings, "
                        f"got {options!r}"
                    )
        splits[split] = frame
    return splits


class ScoringRequests:
    """The flattened scoring workload: every variant of every item, with where it belongs.

    ``keys[i] = (split, row, variant, option)``, variant ``answer`` | ``para`` | ``pert``.
    """

    def __init__(self) -> None:
        self.examples: list[EncodedExample] = []
        self.token_stats: list[bool] = []
        self.keys: list[tuple[str, int, str, int]] = []

    def add(self, example: EncodedExample, split: str, row: int, variant: str, option: int = 0, stats: bool = False):
        self.examples.append(example)
        self.token_stats.append(stats)
        self.keys.append((split, row, variant, option))


def scoring_requests(
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, pd.DataFrame],
    max_length: int = 512,
    template: str = DEFAULT_TEMPLATE,
) -> ScoringRequests:
    """Answers, paraphrases and perturbed answers of every split, flattened for one batched pass."""
    requests = ScoringRequests()

    def encode(question: str, answer: str) -> EncodedExample:
        return encode_qa(tokenizer, question, answer, max_length, template=template)

    for split, frame in splits.items():
        stats = split in TOKEN_STAT_SPLITS
        for row, item in enumerate(frame.itertuples(index=False)):
            requests.add(encode(item.question, item.answer), split, row, "answer", stats=stats)
            if split in PARAPHRASE_SPLITS:
                requests.add(encode(item.question, item.paraphrased_answer), split, row, "para")
            if split != "holdout":
                for option, wrong in enumerate(item.perturbed_answer):
                    requests.add(encode(item.question, str(wrong)), split, row, "pert", option)
    return requests


def generation_prompts(
    tokenizer: PreTrainedTokenizerBase, splits: dict[str, pd.DataFrame], template: str = DEFAULT_TEMPLATE
) -> tuple[list[tuple[str, int]], list[list[int]]]:
    """``(split, row)`` keys and prompt ids of every item that gets a greedy generation."""
    keys = [(split, row) for split in GENERATION_SPLITS if split in splits for row in range(len(splits[split]))]
    return keys, [prompt_ids(tokenizer, splits[split]["question"].iloc[row], template) for split, row in keys]


def label_text(tokenizer: PreTrainedTokenizerBase, example: EncodedExample) -> str:
    """The decoded labelled tokens, special tokens skipped: the text open-unlearning's ZLib compresses."""
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX], skip_special_tokens=True)


def _nonnegative(values: np.ndarray) -> np.ndarray:
    # A mean of -log_softmax is >= 0 mathematically; float rounding may leave -1e-8.
    return np.maximum(values, 0.0)


def evaluate_qa(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: QABenchmark,
    config: EvalConfig,
    reference_items: pd.DataFrame | None = None,
    *,
    max_length: int = 512,
    share_prompts: bool = True,
    light: bool = False,
) -> EvaluationResult:
    """Run the TOFU suite on ``model``; forget quality and privleak against ``reference_items``
    (the retain reference's per-item table) when given, otherwise reported as not computed.

    ``share_prompts`` scores each question's prompt once for all its answer variants (see
    :func:`~simu_core.evaluation.scoring.score_examples`); False runs every variant in full.
    ``light`` (for a retain reference) scores only :data:`LIGHT_SPLITS` and generates nothing: the
    items other models' forget quality and privleak need, with the metrics that come free with
    them (forget probability and truth-ratio score, MIA AUCs, extraction strength); the rest is
    absent, with ``model_utility_computed = 0`` and a note.
    """
    splits = evaluation_splits(benchmark, config.max_items)
    if light:
        splits = {split: splits[split] for split in LIGHT_SPLITS}
    items = score_items(model, tokenizer, splits, config, max_length=max_length, share_prompts=share_prompts,
                        generate=not light)
    metrics, notes = _aggregate(benchmark.name, items, reference_items)
    if light:
        notes.insert(0, LIGHT_NOTE)
    return EvaluationResult(items=items, metrics=metrics, notes=notes)


def score_items(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, pd.DataFrame],
    config: EvalConfig,
    *,
    max_length: int = 512,
    share_prompts: bool = True,
    generate: bool = True,
) -> pd.DataFrame:
    """The per-item table (:data:`ITEM_COLUMNS`) of ``model`` on validated evaluation ``splits``
    (any subset of :data:`QA_SPLITS`, as :func:`evaluation_splits` returns them): one batched
    scoring pass, plus greedy generations and ROUGE when ``generate``."""
    pad_id = pad_token_id(tokenizer)
    requests = scoring_requests(tokenizer, splits, max_length, config.template)
    scored = score_examples(
        model, requests.examples, pad_id, config.batch_size, requests.token_stats, share_prompts=share_prompts
    )
    where = {key: position for position, key in enumerate(requests.keys)}
    zlib_texts = {
        key: label_text(tokenizer, requests.examples[position])
        for key, position in where.items()
        if key[0] in TOKEN_STAT_SPLITS and key[2] == "answer"
    }

    generations: dict[tuple[str, int], str] = {}
    if generate:
        generation_keys, prompts = generation_prompts(tokenizer, splits, config.template)
        max_new_tokens = config.max_new_tokens or TOFU_MAX_NEW_TOKENS
        generations = dict(
            zip(generation_keys, generate_greedy(model, tokenizer, prompts, max_new_tokens, config.batch_size))
        )

    frames = [
        _split_items(split, frame, scored, where, generations, zlib_texts) for split, frame in splits.items()
    ]
    return pd.concat(frames, ignore_index=True)[list(ITEM_COLUMNS)]


def answer_probabilities(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    config: EvalConfig,
    *,
    max_length: int = 512,
) -> np.ndarray:
    """Per item of ``frame`` (question, answer), the answer probability exp(-mean answer-token NLL),
    scored as :func:`score_items` scores the ``probability`` column, without the other variants."""
    examples = [encode_qa(tokenizer, question, answer, max_length, template=config.template)
                for question, answer in zip(frame["question"], frame["answer"])]
    scored = score_examples(model, examples, pad_token_id(tokenizer), config.batch_size, [False] * len(examples))
    return tofu.probability_from_nll(_nonnegative(scored.nll))


def forget_answer_scores(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    config: EvalConfig,
    *,
    max_length: int = 512,
) -> pd.DataFrame:
    """Per forget item of ``frame``: ``probability`` and ``truth_ratio`` as :func:`score_items` computes
    them on the forget split (same requests, prompts shared), without the MIA token statistics and
    generations it also makes: what forget quality needs, at a fraction of the cost."""
    requests = scoring_requests(tokenizer, {"forget": frame}, max_length, config.template)
    scored = score_examples(model, requests.examples, pad_token_id(tokenizer), config.batch_size, False,
                            share_prompts=True)
    where = {key: position for position, key in enumerate(requests.keys)}
    count = len(frame)
    nll = _nonnegative(scored.nll[[where[("forget", row, "answer", 0)] for row in range(count)]])
    paraphrased = _nonnegative(scored.nll[[where[("forget", row, "para", 0)] for row in range(count)]])
    perturbed = [_nonnegative(scored.nll[[where[("forget", row, "pert", option)] for option in range(len(options))]])
                 for row, options in enumerate(frame["perturbed_answer"])]
    return pd.DataFrame({"item_id": frame["item_id"].astype(str).to_numpy(),
                         "probability": tofu.probability_from_nll(nll),
                         "truth_ratio": tofu.truth_ratio(paraphrased, perturbed)})


def _split_items(
    split: str,
    frame: pd.DataFrame,
    scored: ScoredExamples,
    where: dict[tuple, int],
    generations: dict[tuple[str, int], str],
    zlib_texts: dict[tuple, str],
) -> pd.DataFrame:
    count = len(frame)
    nan = np.full(count, np.nan)
    answer_at = [where[(split, row, "answer", 0)] for row in range(count)]
    nll = _nonnegative(scored.nll[answer_at])
    out = pd.DataFrame(
        {
            "item_id": frame["item_id"].astype(str).to_numpy(),
            "split": split,
            "question": frame["question"].to_numpy(),
            "answer": frame["answer"].to_numpy(),
            "num_tokens": scored.num_tokens[answer_at],
            "nll": nll,
            "probability": tofu.probability_from_nll(nll),
        }
    )
    out["probability_normalised"] = nan
    out["nll_paraphrased"] = nan
    out["nll_perturbed"] = None
    out["truth_ratio"] = nan
    if split != "holdout":
        perturbed = [
            _nonnegative(scored.nll[[where[(split, row, "pert", option)] for option in range(len(options))]])
            for row, options in enumerate(frame["perturbed_answer"])
        ]
        out["nll_perturbed"] = [values.tolist() for values in perturbed]
        if split in PARAPHRASE_SPLITS:
            right = _nonnegative(scored.nll[[where[(split, row, "para", 0)] for row in range(count)]])
            out["nll_paraphrased"] = right
        else:
            right = nll
            out["probability_normalised"] = tofu.normalised_probability(nll, perturbed)
        out["truth_ratio"] = tofu.truth_ratio(right, perturbed)
    if split in GENERATION_SPLITS and (split, 0) in generations:
        texts = [generations[(split, row)] for row in range(count)]
        out["generation"] = texts
        out["rouge"] = rouge_l_recall_batch(texts, list(frame["answer"]))
    else:
        out["generation"] = None
        out["rouge"] = nan
    for column in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "extraction_strength",
                   "exact_memorization"):
        out[column] = nan
    if split in TOKEN_STAT_SPLITS:
        stats = {name: [] for name in ("mia_zlib", "mia_min_k", "mia_min_k_plus_plus")}
        for row, position in enumerate(answer_at):
            text = zlib_texts[(split, row, "answer", 0)]
            # An answer whose only labelled token is special decodes to "" (open-unlearning compresses it too).
            stats["mia_zlib"].append(
                mia.zlib_statistic(nll[row], text) if text else float(nll[row]) / len(zlib.compress(b""))
            )
            # The last labelled token (the EOS) is left out, as open-unlearning does.
            logprobs = np.minimum(scored.token_logprobs[position][:-1], 0.0)
            if logprobs.size == 0:  # open-unlearning scores an item without tokens 0
                stats["mia_min_k"].append(0.0)
                stats["mia_min_k_plus_plus"].append(0.0)
                continue
            stats["mia_min_k"].append(mia.min_k_statistic(logprobs))
            stats["mia_min_k_plus_plus"].append(
                mia.min_k_plus_plus_statistic(logprobs, scored.vocab_mean[position][:-1], scored.vocab_std[position][:-1])
            )
        out["mia_loss"] = nll
        for column, values in stats.items():
            out[column] = values
        if split == "forget":
            matches = [scored.argmax_match[position][:-1] for position in answer_at]
            # Without tokens open-unlearning scores extraction strength 0 and leaves exact
            # memorisation out of the mean (None; NaN here, which the mean skips).
            out["extraction_strength"] = [tofu.extraction_strength(m) if m.size else 0.0 for m in matches]
            out["exact_memorization"] = [tofu.exact_memorization(m) if m.size else np.nan for m in matches]
    return out


def _split(items: pd.DataFrame, split: str) -> pd.DataFrame:
    return items[items["split"] == split]


def mia_aucs(items: pd.DataFrame) -> dict[str, float]:
    """AUC of each MIA statistic, forget (members, label 0) vs holdout (non-members, label 1)."""
    forget, holdout = _split(items, "forget"), _split(items, "holdout")
    if forget.empty or holdout.empty:
        raise ValueError("MIA needs per-item statistics of both the forget and the holdout split")
    return {
        name: mia.auc(forget[f"mia_{name}"].to_numpy(), holdout[f"mia_{name}"].to_numpy())
        for name in MIA_STATISTICS
    }


def _check_reference(reference_items: pd.DataFrame, items: pd.DataFrame) -> None:
    missing = [column for column in ("item_id", "split", "truth_ratio", "mia_min_k") if column not in reference_items]
    if missing:
        raise ValueError(f"reference_items lacks columns {missing}: pass the retain reference's items table")
    for split in TOKEN_STAT_SPLITS:
        ours = set(_split(items, split)["item_id"])
        theirs = set(_split(reference_items, split)["item_id"])
        if not theirs:
            raise ValueError(f"reference_items holds no {split!r} rows")
        if ours != theirs:
            raise ValueError(
                f"reference_items cover different {split!r} items ({len(theirs)} vs {len(ours)} here, "
                f"{len(ours ^ theirs)} differ): evaluate both models with the same data and eval.max_items"
            )


def _aggregate(
    benchmark: str, items: pd.DataFrame, reference_items: pd.DataFrame | None
) -> tuple[pd.DataFrame, list[str]]:
    table = MetricTable(benchmark)
    notes: list[str] = []
    headline: dict[str, float] = {}
    for split in QA_SPLITS:
        rows = _split(items, split)
        if rows.empty:
            continue  # not scored (the light suite of a retain reference)
        table.add(split, "num_items", len(rows))
        probability = rows["probability_normalised" if split in OPTION_SPLITS else "probability"]
        values = {"probability": float(probability.mean())}
        if split in GENERATION_SPLITS and rows["generation"].notna().all():
            values["rouge"] = float(rows["rouge"].mean())
        if split == "forget":
            values["truth_ratio_score"] = tofu.truth_ratio_score_forget(rows["truth_ratio"].to_numpy())
        elif split != "holdout":
            values["truth_ratio_score"] = tofu.truth_ratio_score_true_better(rows["truth_ratio"].to_numpy())
        for metric, value in values.items():
            table.add(split, metric, value)
        if split in SPLIT_PREFIX:
            prefix = SPLIT_PREFIX[split]
            headline[f"{prefix}_prob"] = values["probability"]
            if "rouge" in values:
                headline[f"{prefix}_rouge"] = values["rouge"]
            headline[f"{prefix}_truth_ratio"] = values["truth_ratio_score"]
    forget = _split(items, "forget")
    headline["extraction_strength"] = float(forget["extraction_strength"].mean())
    headline["exact_memorization"] = float(forget["exact_memorization"].mean())
    utility_computed = all(name in headline for name in tofu.MODEL_UTILITY_COMPONENTS)
    if utility_computed:
        headline["model_utility"] = tofu.model_utility({name: headline[name] for name in tofu.MODEL_UTILITY_COMPONENTS})
    aucs = mia_aucs(items)
    for name, value in aucs.items():
        headline[f"mia_{name}_auc"] = value

    computed = {"model_utility": utility_computed, "forget_quality": False, "privleak": False}
    if reference_items is None:
        notes.append("forget_quality and privleak not computed: no retain-reference items were given")
    else:
        _check_reference(reference_items, items)
        headline["forget_quality"] = tofu.forget_quality(
            forget["truth_ratio"].to_numpy(), _split(reference_items, "forget")["truth_ratio"].to_numpy()
        )
        computed["forget_quality"] = True
        reference_auc = mia.auc(
            _split(reference_items, "forget")["mia_min_k"].to_numpy(),
            _split(reference_items, "holdout")["mia_min_k"].to_numpy(),
        )
        if math.isclose(reference_auc, 1.0):
            notes.append("privleak not computed: the retain reference's Min-K% AUC is 1 (privleak undefined)")
        else:
            headline["privleak"] = tofu.privleak(aucs["min_k"], reference_auc)
            computed["privleak"] = True
    for metric, value in headline.items():
        table.add(HEADLINE_SPLIT, metric, value)
    for metric, done in computed.items():
        table.add(HEADLINE_SPLIT, f"{metric}_computed", 1.0 if done else 0.0)
    return table.frame(), notes
