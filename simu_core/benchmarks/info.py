"""What each benchmark is, as data: pure Python, imported by the config.

Item kinds (what a forget or retain item is, and what the losses act on):

- ``qa``: a question and its answer (TOFU, the built-in benchmark); the losses act on the answer tokens;
- ``completion``: a raw prefix and its continuation (LUME); the losses act on the continuation;
- ``text``: a passage of a corpus with no answer (MUSE's news or books chunks, WMDP's corpora), cut
  into windows of ``model.max_length`` tokens; the losses act on every token of a window. A preference
  loss needs a preferred *answer* to a *question*, which a passage has not: it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

Row = TypeVar("Row")

ITEM_KINDS = ("qa", "completion", "text")


@dataclass(frozen=True)
class BenchmarkInfo:
    """One benchmark's row of the registry (see the module docstring for item kinds)."""

    name: str
    title: str
    #: The name a message uses ("LUME has no paraphrased questions").
    short: str
    item_kind: str
    #: Headline measures in report order (the evaluation's split "all"): the runs table's columns.
    headline: tuple[str, ...]
    #: What a run's printout and summary show, in order.
    summary: tuple[str, ...]
    #: Forget measures ``unlearn.stop_at`` can stop on, each with the direction unlearning moves it.
    stop_measures: dict[str, str]
    #: Measures whose ``reference`` level is the retain reference's own value.
    reference_levels: tuple[str, ...]
    #: Benchmark-dependent settings (a field left unset takes this value when the config is validated).
    defaults: dict[str, float]
    #: The ``data.*`` fields the loader reads: the prepare_data stage's key, nothing else.
    data_fields: tuple[str, ...]
    #: Whether the tiny model can be trained from scratch on it (no model.base / model.target).
    tiny_model: bool
    #: Whether the run trains (or takes) and evaluates a retain reference by default.
    retain_reference: bool
    #: Whether the retain reference's evaluation may be the light one (only what the comparison reads).
    light_reference: bool = False
    requests: bool = False
    #: The attacks (``simu_core.attacks.names.ATTACKS``) that apply to it; ``attacks`` is refused otherwise.
    attacks: tuple[str, ...] = ()
    #: What an attack measures before and after, in order; the first is the headline (the runs table's
    #: ``attack_*`` figures, the report's recovery). All grow with what the model knows.
    attack_measures: tuple[str, ...] = ()
    #: Why each attack it lacks does not apply (for the config's message).
    attacks_refused: str = ""
    preference_losses: bool = False
    #: What a matched comparison keeps (the first is what each method's best lr maximises).
    utility: tuple[str, ...] = ()
    #: Per stop measure, the other forget measure shown next to a matched reading.
    other_measure: dict[str, str] = field(default_factory=dict)
    #: Data sources the loader reads from the hub when ``data.source`` is unset (for messages).
    hub: tuple[str, ...] = field(default_factory=tuple)


_QA_HEADLINE = ("forget_quality", "model_utility", "forget_prob", "forget_rouge", "forget_truth_ratio",
                "extraction_strength", "exact_memorization", "privleak", "mia_loss_auc", "mia_zlib_auc",
                "mia_min_k_auc", "mia_min_k_plus_plus_auc")
_QA_STOPS = {"forget_prob": "<=", "forget_quality": ">="}
_QA_UTILITY = ("model_utility", "retain_prob")
_QA_OTHER = {"forget_prob": "forget_quality", "forget_quality": "forget_prob"}
_QA_ATTACKS = ("quantize", "paraphrase", "in_context", "logit_lens", "relearn")
_QA_ATTACK_MEASURES = ("forget_prob", "forget_rouge", "forget_truth_ratio", "retain_prob", "retain_rouge")
_MUSE_ATTACKS_REFUSED = (
    "paraphrase needs paraphrased questions; in_context and logit_lens are built on the TOFU suite's QA prompt and "
    "teacher-forced answer probability, and MUSE's VerbMem and KnowMem are greedy generations, which no single "
    "layer's logits give (few-shot prompts are not built)")
_WMDP_ATTACKS_REFUSED = (
    "paraphrase needs paraphrased questions; in_context (k-shot prompts, the harness's num_fewshot) is not built "
    "for WMDP")
_QA_SUMMARY = ("forget_prob", "retain_prob", "forget_rouge", "retain_rouge", "forget_truth_ratio", "forget_quality",
               "model_utility", "privleak")

BENCHMARK_INFO: dict[str, BenchmarkInfo] = {
    "synthetic": BenchmarkInfo(
        name="synthetic", title="the built-in benchmark (fictitious authors, TOFU's shape)",
        short="the built-in benchmark", item_kind="qa",
        headline=_QA_HEADLINE, summary=_QA_SUMMARY, stop_measures=_QA_STOPS, reference_levels=("forget_prob",),
        utility=_QA_UTILITY, other_measure=_QA_OTHER,
        defaults={"model.max_length": 128, "eval.max_new_tokens": 48, "relearn.lr": 1e-3},
        data_fields=("benchmark", "split", "retain_authors", "num_authors", "holdout_authors", "qa_per_author",
                     "general_facts", "seed"),
        tiny_model=True, retain_reference=True, light_reference=True, requests=True, attacks=_QA_ATTACKS,
        attack_measures=_QA_ATTACK_MEASURES, preference_losses=True),
    "tofu": BenchmarkInfo(
        name="tofu", title="TOFU (Maini et al. 2024)", short="TOFU", item_kind="qa",
        headline=_QA_HEADLINE, summary=_QA_SUMMARY, stop_measures=_QA_STOPS, reference_levels=("forget_prob",),
        utility=_QA_UTILITY, other_measure=_QA_OTHER,
        defaults={"model.max_length": 512, "eval.max_new_tokens": 200, "relearn.lr": 1e-5},
        data_fields=("benchmark", "split", "source", "retain_authors"),
        tiny_model=True, retain_reference=True, light_reference=True, requests=True, attacks=_QA_ATTACKS,
        attack_measures=_QA_ATTACK_MEASURES, preference_losses=True, hub=("locuslab/TOFU",)),
    "lume": BenchmarkInfo(
        name="lume", title="LUME (SemEval-2025 Task 4)", short="LUME", item_kind="completion",
        headline=("final_score", "task_aggregate", "mia_score", "mia_auc", "mmlu"),
        summary=("final_score", "task_aggregate", "mia_score", "mia_auc", "mmlu"), stop_measures={},
        utility=("mmlu",),
        reference_levels=(),
        defaults={"model.max_length": 512, "eval.max_new_tokens": 256, "relearn.lr": 1e-5},
        data_fields=("benchmark", "source"),
        tiny_model=False, retain_reference=False,
        attacks_refused="the attacks are not built for LUME's completion tasks (its scorer reads whole generations "
        "of each task, not a forget measure per item)",
        hub=("llmunlearningsemeval2025organization/semeval25-unlearning-dataset-public",)),
    "muse": BenchmarkInfo(
        name="muse", title="MUSE (Shi et al. 2024)", short="MUSE", item_kind="text",
        headline=("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "privleak_auc"),
        summary=("verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "privleak_auc"),
        stop_measures={"verbmem_forget": "<=", "knowmem_forget": "<="},
        reference_levels=("verbmem_forget", "knowmem_forget"), utility=("knowmem_retain",),
        other_measure={"verbmem_forget": "knowmem_forget", "knowmem_forget": "verbmem_forget"},
        # 2048: the window MUSE's unlearning code trains on; its evaluation truncates nothing and its
        # generation lengths (VerbMem 128, KnowMem 32 tokens) live in simu_core.evaluation.muse.
        defaults={"model.max_length": 2048, "eval.max_new_tokens": 128, "relearn.lr": 1e-5},
        data_fields=("benchmark", "corpus", "source", "retain_split", "forget_text", "max_texts"),
        tiny_model=True, retain_reference=True, hub=("muse-bench/MUSE-News", "muse-bench/MUSE-Books"),
        # Quantization on MUSE is Zhang et al. (ICLR 2025)'s setting: VerbMem and KnowMem before and after;
        # relearning trains on the forget (or retain) windows (simu_core.attacks.relearn).
        attacks=("quantize", "relearn"), attack_measures=("verbmem_forget", "knowmem_forget", "knowmem_retain"),
        attacks_refused=_MUSE_ATTACKS_REFUSED),
    "wmdp": BenchmarkInfo(
        name="wmdp", title="WMDP (Li et al. 2024)", short="WMDP", item_kind="text",
        headline=("wmdp_accuracy", "mmlu"), summary=("wmdp_accuracy", "mmlu"), stop_measures={"wmdp_accuracy": "<="},
        reference_levels=(), utility=("mmlu",),
        defaults={"model.max_length": 512, "eval.max_new_tokens": 1, "relearn.lr": 1e-5},
        data_fields=("benchmark", "subset", "source", "corpora_source", "max_texts"),
        tiny_model=False, retain_reference=False, hub=("cais/wmdp", "cais/wmdp-corpora"),
        # MMLU is measured too when eval.mmlu_source is given (quantization can change utility).
        # The logit lens reads accuracy at every layer (simu_core.attacks.logit_lens).
        attacks=("quantize", "logit_lens", "relearn"), attack_measures=("wmdp_accuracy", "mmlu"),
        attacks_refused=_WMDP_ATTACKS_REFUSED),
}

BENCHMARK_NAMES = tuple(BENCHMARK_INFO)


def data_label(data) -> str:
    """The part of a run's name that says which data it reads: ``<benchmark>-<split>`` (TOFU, the
    built-in benchmark), ``muse-<corpus>``, ``wmdp-<subset>``, ``lume``. ``data``: a DataConfig."""
    if data.benchmark == "muse":
        return f"muse-{data.corpus}"
    if data.benchmark == "wmdp":
        return f"wmdp-{data.subset}"
    if "split" in BENCHMARK_INFO[data.benchmark].data_fields:
        return f"{data.benchmark}-{data.split}"
    return data.benchmark


def benchmark_info(name: str) -> BenchmarkInfo:
    """The registry row of ``name``; a ValueError names the known benchmarks."""
    if name not in BENCHMARK_INFO:
        raise ValueError(f"data.benchmark: unknown benchmark {name!r}; known: {list(BENCHMARK_NAMES)}")
    return BENCHMARK_INFO[name]


def role_table(table: dict[str, Row], role: str) -> dict[str, Row]:
    """A role table of the registry (loaders, encoders, suites), refused unless it has exactly one row
    per benchmark of :data:`BENCHMARK_INFO`."""
    missing, unknown = sorted(set(BENCHMARK_INFO) - set(table)), sorted(set(table) - set(BENCHMARK_INFO))
    if missing or unknown:
        raise ValueError(f"the {role} table must have one row per benchmark: missing {missing}, unknown {unknown}")
    return table


def table_row(table: dict[str, Row], name: str) -> Row:
    """The row of benchmark ``name`` in a role table; a ValueError names the known benchmarks."""
    benchmark_info(name)
    return table[name]
