"""The pipeline's stages as plain functions over local folders (no Prefect here).

Each stage reads its inputs from folders written by earlier stages and writes its outputs into
``out_dir``; ``tasks/`` wraps them with the content-addressed store and Prefect caching, and a
notebook can call them directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from simu_core.benchmarks.info import benchmark_info
from simu_core.config import SimuConfig
from simu_core.data import QABenchmark
from simu_core.finetune import FinetuneResult, encode_frame, finetune
from simu_core.models.loading import load_causal_lm, load_tokenizer, resolve_device
from simu_core.models.tiny import build_tiny_llama, save_model, train_tokenizer
from simu_core.preferred import PREFERENCE_LOSSES, preferred_pairs
from simu_core.prompting import EncodedExample, encode_qa

BENCHMARK_DIR = "benchmark"
TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"


def uses_tiny_model(config: SimuConfig) -> bool:
    """True when the run trains the tiny model from scratch (a benchmark the registry marks
    ``tiny_model`` and no model given)."""
    return config.builds_tiny_model()


def prepare_data(config: SimuConfig, out_dir: Path) -> dict[str, Any]:
    """Load or generate the benchmark (its registry loader), write its prepared folder (and the tiny
    tokenizer, trained on every text of the benchmark).

    The synthetic benchmark is generated with ``data.seed``; the others are read as they are."""
    from simu_core.benchmarks.loaders import benchmark_loader

    loader = benchmark_loader(config.data.benchmark)
    benchmark = loader.load(config.data)
    folder = Path(out_dir) / BENCHMARK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    loader.save(benchmark, folder)
    if uses_tiny_model(config):
        tokenizer = train_tokenizer(benchmark.corpus(), config.model.tiny.vocab_size)
        tokenizer.save_pretrained(Path(out_dir) / TOKENIZER_DIR)
    sizes = benchmark.sizes()
    (Path(out_dir) / "sizes.json").write_text(json.dumps(sizes, indent=2))
    return sizes


def read_benchmark(data_dir: Path) -> Any:
    """Read what :func:`prepare_data` wrote (which benchmark: told by the files there)."""
    from simu_core.benchmarks.loaders import read_prepared

    return read_prepared(Path(data_dir) / BENCHMARK_DIR)


def _items(config: SimuConfig, benchmark: Any, which: str, tokenizer: PreTrainedTokenizerBase
           ) -> tuple[list[EncodedExample], list[str]]:
    """The benchmark's encoded forget or retain items and their ids (its registry encoder)."""
    from simu_core.benchmarks.items import benchmark_encoder

    return benchmark_encoder(config.data.benchmark).items(benchmark, which, tokenizer, config.model.max_length)


def select_request(data_dir: Path, out_dir: Path, item_ids: list[str]) -> dict[str, Any]:
    """One deletion request's data (``data.requests``): what :func:`prepare_data` wrote, with the
    forget split cut to ``item_ids`` (in that order), in the same layout, so every later stage
    reads it as it reads prepared data."""
    import shutil

    from simu_core.requests import restrict_forget

    benchmark = read_benchmark(data_dir)
    if not isinstance(benchmark, QABenchmark):
        raise ValueError("sequential deletion requests need a TOFU-style benchmark (forget items 'forget-<row>')")
    selected = restrict_forget(benchmark, item_ids)
    selected.save(Path(out_dir) / BENCHMARK_DIR)
    if (Path(data_dir) / TOKENIZER_DIR).is_dir():
        shutil.copytree(Path(data_dir) / TOKENIZER_DIR, Path(out_dir) / TOKENIZER_DIR)
    sizes = selected.sizes()
    (Path(out_dir) / "sizes.json").write_text(json.dumps(sizes, indent=2))
    return sizes


def training_examples(config: SimuConfig, benchmark: Any, which: str, tokenizer: PreTrainedTokenizerBase,
                      max_length: int) -> list[EncodedExample]:
    """Examples the target (``which='target'``) or retain reference (``'reference'``) trains on (the
    benchmark's registry encoder: TOFU-style ``train_target`` / ``train_reference``, LUME's rows,
    MUSE's forget + retain corpus windows)."""
    from simu_core.benchmarks.items import benchmark_encoder

    return benchmark_encoder(config.data.benchmark).training(benchmark, which, tokenizer, max_length)


def base_model(config: SimuConfig, data_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model fine-tuning starts from: the tiny model (fresh, initialised with
    ``model.finetune.seed``) or ``model.base``."""
    if uses_tiny_model(config):
        tokenizer = load_tokenizer(Path(data_dir) / TOKENIZER_DIR)
        model = build_tiny_llama(config.model.tiny, tokenizer, config.model.max_length, config.model.finetune.seed)
        return model.to(resolve_device(config.run.device)), tokenizer
    if config.model.base is None:
        raise ValueError("model.base is required to fine-tune on a non-synthetic benchmark")
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.base, config.model.trust_remote_code)
    model = load_causal_lm(config.model.base, config.model.dtype, config.run.device, config.model.trust_remote_code)
    return model, tokenizer


def train_model(config: SimuConfig, data_dir: Path, out_dir: Path, which: str, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the target or the retain reference; save it as a Hugging Face folder.

    Seeded with ``model.finetune.seed`` (the tiny model's initialisation, the data order, dropout),
    never ``run.seed``: a seed sweep unlearns one target.

    ``run.devices > 1``: sharded with FSDP over that many processes, which torchrun starts on this
    machine (:func:`simu_core.distributed.launch_stage`); each runs this function, and process 0
    writes the outputs (:mod:`simu_core.distributed`).
    """
    if which not in ("target", "reference"):
        raise ValueError(f"which must be 'target' or 'reference', got {which!r}")
    from simu_core.distributed import current_context, full_state_dict, launch_stage

    distributed = current_context()
    if config.run.devices > 1 and distributed is None:
        return launch_stage(config, "train", Path(data_dir), Path(out_dir), which=which)
    if distributed is not None:  # each process builds or loads on CPU; FSDP moves its shards to its device
        config = config.model_copy(update={"run": config.run.model_copy(update={"device": "cpu"})})
    benchmark = read_benchmark(data_dir)
    model, tokenizer = base_model(config, data_dir)
    examples = training_examples(config, benchmark, which, tokenizer, config.model.max_length)
    result: FinetuneResult = finetune(
        model, tokenizer, examples, config.model.finetune, seed=config.model.finetune.seed, description=f"train {which}",
        progress=progress, distributed=distributed,
    )
    out_dir = Path(out_dir)
    if distributed is not None:
        weights = full_state_dict(model)  # every process takes part; process 0 gets them
        if not distributed.is_main:
            return {"examples": len(examples), "steps": len(result.log)}
        save_model(model, tokenizer, out_dir / MODEL_DIR, state_dict=weights)
    else:
        save_model(model, tokenizer, out_dir / MODEL_DIR)
    result.log.to_parquet(out_dir / "train_log.parquet", index=False)
    stats = {
        "examples": len(examples),
        "steps": len(result.log),
        "wall_seconds": result.wall_seconds,
        "tokens_per_second": result.tokens_per_second,
        "final_loss": float(result.log["loss"].iloc[-1]),
        "devices": distributed.world if distributed is not None else 1,
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _model_path(model_dir: Path | str) -> Path | str:
    """The Hugging Face folder of a stage's model output (``<dir>/model``), or ``model_dir`` itself."""
    return Path(model_dir) / MODEL_DIR if (Path(model_dir) / MODEL_DIR).is_dir() else model_dir


def load_trained(model_dir: Path, config: SimuConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model folder written by :func:`train_model` (or any HF folder / hub id)."""
    path = _model_path(model_dir)
    tokenizer = load_tokenizer(config.model.tokenizer or path, config.model.trust_remote_code)
    model = load_causal_lm(path, config.model.dtype, config.run.device, config.model.trust_remote_code)
    model.eval()
    return model, tokenizer


def evaluate(
    config: SimuConfig,
    data_dir: Path,
    model_dir: Path,
    out_dir: Path,
    reference_items_path: Path | None = None,
    light: bool = False,
) -> dict[str, float]:
    """Evaluate a model folder on the prepared benchmark; write ``items.parquet`` and
    ``metrics.parquet`` into ``out_dir`` and return the headline (split "all") metrics.

    The suite is the benchmark's registry suite (:mod:`simu_core.benchmarks.suites`).
    ``reference_items_path``: the retain reference's ``items.parquet`` (TOFU-style benchmarks and
    MUSE), for forget quality and privleak; without it
    they are reported as not computed. ``light``: the retain reference's own evaluation, only what
    those two compare (TOFU-style benchmarks; see :func:`~simu_core.evaluation.evaluate_qa`); MUSE
    has no light suite (its reference is evaluated in full); LUME and WMDP compare with no reference:
    light is refused.
    """
    from simu_core.benchmarks.suites import benchmark_suite

    info = benchmark_info(config.data.benchmark)
    if light and not info.light_reference:
        light = False  # no light suite: the reference's comparison reads its whole evaluation (MUSE)
        if not info.retain_reference:
            raise ValueError(f"a light evaluation compares with nothing on {info.title}: evaluate its full suite "
                             "(eval.reference_full=true) or none")
    benchmark = read_benchmark(data_dir)
    model, tokenizer = load_trained(model_dir, config)
    reference_items = None
    if reference_items_path is not None:
        if not Path(reference_items_path).is_file():
            raise FileNotFoundError(f"reference items file {str(reference_items_path)!r} does not exist")
        reference_items = pd.read_parquet(reference_items_path)
    result = benchmark_suite(config.data.benchmark).evaluate(model, tokenizer, benchmark, config, reference_items, light,
                                                             uses_tiny_model(config))
    result.save(out_dir)
    if result.notes:
        (Path(out_dir) / "notes.txt").write_text("\n".join(result.notes) + "\n")
    return result.headline()


def unlearn(
    config: SimuConfig,
    data_dir: Path,
    target_dir: Path,
    mask_dir: Path | None,
    out_dir: Path,
    reference_dir: Path | None = None,
    progress_callback: Any = None,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    reference_items_path: Path | None = None,
    alternates_dir: Path | None = None,
) -> dict[str, Any]:
    """Unlearn the target with ``config.unlearn.method``; write ``<out_dir>/model/`` (HF folder with
    the tokenizer, safetensors) and ``<out_dir>/train_log.parquet``; return summary figures.

    With ``unlearn.stop_at`` (``simu_core.stopping``) the forget measure is checked every
    ``unlearn.eval_every`` steps on the forget items the evaluation measures, and the run stops at
    the first check that reaches the level: the model saved is that check's; every check goes to
    ``<out_dir>/trajectory.parquet`` and the outcome (``stop_*``) into the summary.
    ``reference_items_path``: the retain reference's ``items.parquet``, needed by a ``reference``
    level and by forget quality. The preference losses (``simu_core.preferred``) pair each forget item
    with a preferred answer; ``alternates_dir``: the :func:`generate_alternates` stage's output (altpo).

    ``mask_dir``: folder holding ``mask.parquet`` (read only by SIMU-scope methods). Forget set =
    the benchmark's ``forget`` split, retain set = its ``retain`` split (LUME: input/output rows).
    ``reference_dir``: the frozen reference of NPO and the KL retain loss; None (the default and what
    NPO prescribes) uses the target as it is before unlearning. ``progress_callback(step, total,
    row)`` is called after every optimizer step. ``checkpoint_dir``: root of the periodic
    checkpoints (every ``unlearn.checkpoint_every`` steps) with one subfolder per run (settings, input
    folders, mask), so a root shared by many runs is safe and a rerun of the same run resumes; the
    run's subfolder is deleted once it has finished. None uses ``<out_dir>/checkpoints``. Nothing is
    written to ``out_dir/model`` unless training finished (a non-finite loss raises before that).
    """
    # Imported here so the other stages do not load the unlearning engine.
    import hashlib
    import shutil

    from simu_core.masking import NeuronMask
    from simu_core.prompting import pad_token_id
    from simu_core.unlearning import build_objective, build_trainer, get_method

    settings = config.unlearn
    spec = get_method(settings.method)  # an unknown method fails before anything is loaded
    mask = None
    if spec.needs_mask:
        if mask_dir is None:
            raise ValueError(f"method {spec.name!r} needs a critical-neuron mask: pass mask_dir")
        mask_path = Path(mask_dir) / "mask.parquet"
        if not mask_path.is_file():
            raise FileNotFoundError(f"mask file {str(mask_path)!r} does not exist")
        mask = NeuronMask.load(mask_path)
        # Before any weight is loaded: a mask made for another model names both shapes.
        from simu_core.planning import check_mask_shape, neurons_per_layer

        check_mask_shape(mask, neurons_per_layer(_model_path(target_dir), config.model.trust_remote_code),
                         f"mask {str(mask_path)!r}")
    from simu_core.distributed import current_context, launch_stage

    distributed = current_context()
    if config.run.devices > 1 and distributed is None:
        # Sharded: torchrun starts run.devices processes that each run this function (below).
        summary = launch_stage(config, "unlearn", Path(data_dir), Path(out_dir), target_dir=Path(target_dir),
                               mask_dir=Path(mask_dir) if mask_dir else None,
                               reference_dir=Path(reference_dir) if reference_dir else None,
                               reference_items=Path(reference_items_path) if reference_items_path else None,
                               alternates_dir=Path(alternates_dir) if alternates_dir else None)
        if progress_callback is not None:
            progress_callback(summary["steps"], summary["steps"], {})
        return summary
    if distributed is not None:  # each process loads on CPU; FSDP moves its shards to its device
        config = config.model_copy(update={"run": config.run.model_copy(update={"device": "cpu"})})
    benchmark = read_benchmark(data_dir)
    model, tokenizer = load_trained(target_dir, config)
    max_length = config.model.max_length
    preferred = None
    if benchmark_info(config.data.benchmark).item_kind != "qa":
        forget, _ = _items(config, benchmark, "forget", tokenizer)
        retain, _ = _items(config, benchmark, "retain", tokenizer)
    else:
        forget_rows = benchmark["forget"]
        if spec.loss in PREFERENCE_LOSSES:
            alternates = pd.read_parquet(Path(alternates_dir) / ALTERNATES_FILE) if alternates_dir else None
            forget_rows, answers = preferred_pairs(
                spec.loss, forget_rows, seed=config.run.seed, configured_idk=settings.idk_source,
                preferred_source=settings.preferred_source, data_source=config.data.source, alternates=alternates)
            preferred = [encode_qa(tokenizer, q, a, max_length) for q, a in zip(forget_rows["question"], answers)]
        forget = encode_frame(tokenizer, forget_rows, max_length)
        retain = encode_frame(tokenizer, benchmark["retain"], max_length)
    reference = None
    if reference_dir is not None and build_objective(settings, spec).needs_reference:
        reference, _ = load_trained(reference_dir, config)
    monitor = None
    if settings.stop_at is not None:
        monitor = _forget_monitor(config, benchmark, model, tokenizer, reference_items_path)
    out_dir = Path(out_dir)
    trainer = build_trainer(
        model, forget, retain, settings,
        pad_token_id=pad_token_id(tokenizer),
        mask=mask,
        reference=reference,
        seed=config.run.seed,
        autocast_dtype=torch.bfloat16 if config.run.dtype == "bfloat16" else None,
        progress=progress,
        progress_callback=progress_callback,
        fail_at_step=config.run.fail_at_unlearn_step,
        distributed=distributed,
        monitor=monitor,
        preferred_examples=preferred,
    )
    # One subfolder per run: a checkpoint root shared by many runs (a sweep, a rerun with another lr)
    # resumes only the run that wrote it. The run is its settings plus its input folders (content-
    # addressed in the store) and its mask.
    identity = [trainer.fingerprint(), str(Path(data_dir).resolve()), str(Path(target_dir).resolve()),
                str(Path(reference_dir).resolve()) if reference_dir else "", repr(mask.neurons) if mask else ""]
    run_key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:20]
    checkpoint_root = out_dir / "checkpoints" if checkpoint_dir is None else Path(checkpoint_dir)
    trainer.checkpoint_dir = checkpoint_root / run_key if distributed is None else None
    result = trainer.train()
    if distributed is not None:
        from simu_core.distributed import full_state_dict

        weights = full_state_dict(model)  # every process takes part; process 0 gets them
        if not distributed.is_main:
            return {"method": spec.name, "steps": result.steps}
        save_model(model, tokenizer, out_dir / MODEL_DIR, state_dict=weights)
    else:
        save_model(model, tokenizer, out_dir / MODEL_DIR)
    result.log.to_parquet(out_dir / "train_log.parquet", index=False)
    log = result.log
    if monitor is not None:
        monitor.trajectory().to_parquet(out_dir / TRAJECTORY_FILE, index=False)

    def first_last(column: str, position: int) -> float | None:  # None: nothing trained (at_start)
        return float(log[column].iloc[position]) if len(log) else None

    total_params = sum(p.numel() for p in model.parameters())
    summary = {
        "method": spec.name,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "wall_seconds": result.wall_seconds,
        "forget_items": len(forget),
        "retain_items": len(retain),
        "mask_neurons": mask.total() if mask is not None else None,
        "trainable_coordinates": result.trainable_coordinates,
        "trainable_fraction": result.trainable_coordinates / max(1, total_params),
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "devices": distributed.world if distributed is not None else 1,
        "forget_loss_first": first_last("forget_loss", 0),
        "forget_loss_last": first_last("forget_loss", -1),
        "retain_loss_first": first_last("retain_loss", 0),
        "retain_loss_last": first_last("retain_loss", -1),
        **(monitor.outcome(trainer.total_steps) if monitor is not None else {}),
    }
    # NaN (no retain term, no win rate) becomes null: the summary travels as strict JSON.
    summary = {key: None if isinstance(value, float) and value != value else value for key, value in summary.items()}
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2))
    # The finished model supersedes this run's checkpoints.
    if trainer.checkpoint_dir is not None:
        shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
    if checkpoint_dir is None:
        shutil.rmtree(checkpoint_root, ignore_errors=True)
    return summary


TRAJECTORY_FILE = "trajectory.parquet"
ALTERNATES_FILE = "alternates.parquet"


def generate_alternates(config: SimuConfig, data_dir: Path, target_dir: Path, out_dir: Path) -> dict[str, Any]:
    """AltPO's alternates (``simu_core.alternates``): ``unlearn.altpo_alternates`` sampled answers per
    forget item from the model in ``target_dir``, written to ``<out_dir>/alternates.parquet``."""
    import time

    from simu_core.alternates import generate_alternates as sample_alternates

    info = benchmark_info(config.data.benchmark)
    if info.item_kind != "qa":
        raise ValueError(f"AltPO's alternates are answers to forget questions; {info.title}'s forget items are not "
                         "QA pairs")
    benchmark = read_benchmark(data_dir)
    model, tokenizer = load_trained(target_dir, config)
    settings = config.unlearn
    started = time.perf_counter()
    alternates = sample_alternates(
        model, tokenizer, benchmark["forget"], samples=settings.altpo_alternates,
        max_new_tokens=settings.altpo_max_new_tokens, temperature=settings.altpo_temperature, seed=config.run.seed,
        max_length=config.model.max_length, batch_size=config.eval.batch_size)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    alternates.to_parquet(Path(out_dir) / ALTERNATES_FILE, index=False)
    text = alternates["alternate"].str.strip()
    return {
        "alternates": len(alternates),
        "forget_items": int(alternates["item_id"].nunique()),
        "empty": int((text == "").sum()),
        "equal_to_answer": int((text == alternates["answer"].str.strip()).sum()),
        "mean_words": float(text.str.split().str.len().mean()),
        "wall_seconds": time.perf_counter() - started,
    }


def _forget_monitor(config: SimuConfig, benchmark: Any, model: PreTrainedModel,
                    tokenizer: PreTrainedTokenizerBase, reference_items_path: Path | None) -> Any:
    """The checks of ``unlearn.stop_at``: the evaluation's forget items (``eval.max_items``, as the
    evaluate stage takes them) and the first ``unlearn.stop_retain_items`` of its retain split; on
    MUSE and WMDP the suite's own measures (:class:`~simu_core.benchmarks.suites.StopChecks`)."""
    from simu_core.evaluation.qa import evaluation_splits
    from simu_core.stopping import ForgetMonitor, parse_stop_at

    settings = config.unlearn
    rule = parse_stop_at(settings.stop_at)
    reference_items = None
    if rule.uses_reference:
        if reference_items_path is None or not Path(reference_items_path).is_file():
            raise FileNotFoundError(
                f"unlearn.stop_at={settings.stop_at!r} needs the retain reference's evaluation (items.parquet); "
                f"got {str(reference_items_path)!r}"
            )
        reference_items = pd.read_parquet(reference_items_path)
    from simu_core.benchmarks.suites import benchmark_suite

    suite = benchmark_suite(config.data.benchmark)
    if suite.stop_checks is not None:  # the benchmark's own forget measure (MUSE, WMDP)
        from simu_core.stopping import SuiteMonitor

        checks = suite.stop_checks(benchmark, config, tokenizer, uses_tiny_model(config), rule.measure)
        level = checks.reference_level(reference_items) if rule.level is None else None
        return SuiteMonitor(model, rule, checks.measure, checks.measures, eval_every=settings.eval_every,
                            tolerance=settings.stop_tolerance, reference_level=level)
    splits = evaluation_splits(benchmark, config.eval.max_items)
    retain = splits["retain_eval"].iloc[: settings.stop_retain_items].reset_index(drop=True)
    return ForgetMonitor(model, tokenizer, splits["forget"], retain, rule, config.eval, eval_every=settings.eval_every,
                         tolerance=settings.stop_tolerance, max_length=config.model.max_length,
                         reference_items=reference_items)


# ----------------------------------------------------------------------------------------------
# SIMU step 1: attribution and thresholding (issue 3)

ATTRIBUTION_SETS = ("forget", "retain")
SCORES_FILE = "scores.parquet"
MASK_FILE = "mask.parquet"
DUAL_ANALYSIS_FILE = "dual_analysis.parquet"
THRESHOLD_JACCARD_FILE = "threshold_jaccard.parquet"
ANALYSIS_THRESHOLDS = (0.1, 0.2, 0.3, 0.5)


def _attribution_items(
    config: SimuConfig, benchmark: Any, tokenizer: PreTrainedTokenizerBase, which: str
) -> tuple[list[EncodedExample], list[str]]:
    """The encoded items attributed for ``which`` ('forget' or 'retain') and their item ids.

    Forget: the benchmark's forget items (its registry entry's: QA question + ``answer``; LUME
    input/output rows; MUSE and WMDP corpus windows). Retain: the retain items, restricted to
    ``attribution.max_items`` items when set, else to as many items as the forget set; both sets,
    when restricted, are a sample without replacement drawn with ``run.seed`` (numpy default_rng),
    kept in the split's order, so reruns attribute exactly the same items.
    """
    import numpy as np

    if which not in ATTRIBUTION_SETS:
        raise ValueError(f"which must be one of {list(ATTRIBUTION_SETS)}, got {which!r}")
    forget, forget_ids = _items(config, benchmark, "forget", tokenizer)
    limit = config.attribution.max_items
    if which == "forget":
        examples, ids, count = forget, forget_ids, len(forget) if limit is None else min(limit, len(forget))
    else:
        examples, ids = _items(config, benchmark, "retain", tokenizer)
        count = min(limit if limit is not None else len(forget), len(examples))
    if count < len(examples):
        chosen = np.sort(np.random.default_rng(config.run.seed).choice(len(examples), size=count, replace=False))
        examples, ids = [examples[i] for i in chosen], [ids[i] for i in chosen]
    return examples, ids


def attribute(
    config: SimuConfig, data_dir: Path, target_dir: Path, out_dir: Path, which: str = "forget", progress: bool = True
) -> dict[str, Any]:
    """Attribution scores of every MLP neuron on the forget or retain set (see :func:`_attribution_items`).

    Writes ``<out_dir>/scores.parquet``: columns ``(layer, neuron, score)``; the metadata (which
    set, mode, m, item and answer-token counts, model and data identity, wall time) is JSON in the
    Parquet schema metadata (``simu_core.attribution.read_scores`` returns it). Returns that
    metadata. Does not depend on the threshold.
    """
    from simu_core.attribution import attribute_neurons, data_identity, model_identity, write_scores
    from simu_core.prompting import pad_token_id

    if which not in ATTRIBUTION_SETS:
        raise ValueError(f"which must be one of {list(ATTRIBUTION_SETS)}, got {which!r}")
    benchmark = read_benchmark(data_dir)
    model, tokenizer = load_trained(target_dir, config)
    examples, item_ids = _attribution_items(config, benchmark, tokenizer, which)
    settings = config.attribution
    result = attribute_neurons(
        model, examples, pad_token_id(tokenizer), mode=settings.mode, steps=settings.steps,
        batch_size=settings.batch_size, progress=progress,
    )
    metadata = {
        "which": which,
        **result.describe(),
        "batch_size": settings.batch_size,
        "model": model_identity(model),
        "data": {
            "benchmark": getattr(benchmark, "name", config.data.benchmark),
            "split": getattr(benchmark, "forget_split", which),
            **data_identity(examples, item_ids),
        },
    }
    table = pd.concat(
        [
            pd.DataFrame({"layer": layer, "neuron": range(len(scores)), "score": scores})
            for layer, scores in enumerate(result.scores)
        ],
        ignore_index=True,
    ).astype({"layer": "int32", "neuron": "int32", "score": "float64"})
    write_scores(table, Path(out_dir) / SCORES_FILE, metadata)
    return metadata


def threshold_mask(
    config: SimuConfig, forget_scores_dir: Path, retain_scores_dir: Path | None, out_dir: Path
) -> dict[str, Any]:
    """Threshold the scores into the critical-neuron mask and run the dual-neuron analysis.

    Reads the ``scores.parquet`` that :func:`attribute` wrote for each set (``retain_scores_dir``
    may be None for the ``include`` variant; C_r and dual neurons are then empty). Applies
    ``config.mask`` (rule, threshold, top_fraction, variant; the ``random`` rule draws its neurons
    with ``run.seed``, no other rule reads a seed). Writes into ``out_dir``:
    ``mask.parquet`` (layer, neuron, critical_forget, critical_retain, dual, in_mask);
    ``dual_analysis.parquet`` (per threshold and layer; layer-relative rule at t in
    {0.1, 0.2, 0.3, 0.5} plus the configured t); ``threshold_jaccard.parquet`` (Jaccard of the
    masks between those thresholds); ``scores.parquet`` (layer, neuron, forget_score,
    retain_score) with both sets' metadata. Returns the mask counts.
    """
    from simu_core.attribution import attribution_table, read_scores, scores_from_table, write_scores
    import numpy as np

    from simu_core.thresholding import contrastive_scores, dual_neuron_analysis, select_mask, threshold_jaccard

    forget_table, forget_meta = read_scores(Path(forget_scores_dir) / SCORES_FILE)
    forget = scores_from_table(forget_table, "score")
    retain, retain_meta = None, None
    if retain_scores_dir is not None:
        retain_table, retain_meta = read_scores(Path(retain_scores_dir) / SCORES_FILE)
        retain = scores_from_table(retain_table, "score")
        same_model = forget_meta.get("model", {}).get("down_proj_sha256") == retain_meta.get("model", {}).get("down_proj_sha256")
        if [len(layer) for layer in forget] != [len(layer) for layer in retain] or not same_model:
            raise ValueError(
                f"forget scores ({forget_scores_dir}) and retain scores ({retain_scores_dir}) come from different models"
            )
    settings = config.mask
    selection_scores = forget
    if settings.score == "contrastive":
        if retain is None:
            raise ValueError("mask.score='contrastive' needs the retain-set attribution scores")
        selection_scores = contrastive_scores(forget, int(forget_meta["num_samples"]), retain,
                                              int(retain_meta["num_samples"]))
    selection = select_mask(
        selection_scores, retain, threshold=settings.threshold, variant=settings.variant, rule=settings.rule,
        top_fraction=settings.top_fraction, seed=config.run.seed,
    )
    if selection.critical_forget.total() == 0:
        raise ValueError(
            f"mask.threshold={settings.threshold} ({settings.rule}) selects no critical forget neuron: no attribution "
            "score is positive; there is nothing for SIMU to train in the MLP"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    selection.table().to_parquet(out_dir / MASK_FILE, index=False)
    thresholds = sorted(set(ANALYSIS_THRESHOLDS) | {settings.threshold})
    # The analysis variant must be computable: exclude/only need the retain set.
    variant = settings.variant if retain is not None else "include"
    dual_neuron_analysis(selection_scores, retain, thresholds, variant).to_parquet(out_dir / DUAL_ANALYSIS_FILE, index=False)
    threshold_jaccard(selection_scores, retain, thresholds, variant).to_parquet(out_dir / THRESHOLD_JACCARD_FILE, index=False)
    scores_table = attribution_table(forget, retain)
    # What C_f was thresholded on (the forget score, or the contrastive one): the knockout curve ranks by it.
    scores_table["selection_score"] = np.concatenate(selection_scores) if settings.score == "contrastive" \
        else scores_table["forget_score"].to_numpy()
    write_scores(scores_table, out_dir / SCORES_FILE, {"forget": forget_meta, "retain": retain_meta})
    counts = {
        "rule": settings.rule,
        "threshold": settings.threshold,
        "top_fraction": settings.top_fraction,
        "score": settings.score,
        "variant": settings.variant,
        **selection.counts(),
    }
    (out_dir / "counts.json").write_text(json.dumps(counts, indent=2))
    return counts


# ----------------------------------------------------------------------------------------------
# Knockout check of the mask (issue 10)

KNOCKOUT_FILES = ("knockout.parquet", "knockout_summary.parquet", "knockout_curve.parquet", "knockout_items.parquet",
                  "knockout_mask.parquet")


def knockout_mask_settings(config: SimuConfig) -> dict[str, Any]:
    """The mask settings the knockout's critical set depends on: the ``random`` rule's critical sets
    are the layer-relative ones (the random draw is not what the check measures), and each rule reads
    only its own parameter (t, or the global fraction)."""
    mask = config.mask
    rule = "layer_relative" if mask.rule == "random" else mask.rule
    parameter = {"top_fraction": mask.top_fraction} if rule == "global_top_fraction" else {"threshold": mask.threshold}
    return {"rule": rule, **parameter, "score": mask.score, "variant": mask.variant}


def knockout(config: SimuConfig, data_dir: Path, target_dir: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Knockout check of the method on the target, on held-out items (nothing trained; see
    :mod:`simu_core.knockout`).

    The forget and retain items are split by :func:`simu_core.knockout.holdout_split` (seeded with
    ``knockout.seed``, not ``run.seed``: the check does not depend on the unlearning's seed). The
    critical set is attributed (``attribution.*``) and thresholded (:func:`knockout_mask_settings`)
    on the attributed part; the knockout measures the other part, the same number of forget and
    retain items. Writes ``knockout.parquet`` (one row per set and draw, the intact model first),
    ``knockout_summary.parquet`` (per set kind), ``knockout_curve.parquet`` (top-k by selection
    score vs random, per k), ``knockout_items.parquet`` (item_id, split, role 'attributed' |
    'measured') and ``knockout_mask.parquet`` (the attributed half's mask table with its
    forget_score, retain_score and selection_score columns); returns the headline figures plus item
    counts, ``forward_passes`` and wall times.
    """
    import math
    import time

    import numpy as np

    from simu_core.attribution import attribute_neurons
    from simu_core.knockout import holdout_split, knockout_check
    from simu_core.prompting import pad_token_id
    from simu_core.thresholding import apply_variant, contrastive_scores, select_mask

    started = time.perf_counter()
    settings, mask_settings = config.knockout, knockout_mask_settings(config)
    benchmark = read_benchmark(data_dir)
    model, tokenizer = load_trained(target_dir, config)
    pad = pad_token_id(tokenizer)
    encoded = {split: _items(config, benchmark, split, tokenizer) for split in ("forget", "retain")}
    rows = holdout_split(len(encoded["forget"][0]), len(encoded["retain"][0]), settings.seed,
                         attribute_limit=config.attribution.max_items, measure_limit=settings.max_items)
    parts = {}
    for split, (examples, ids) in encoded.items():
        for role in ("attributed", "measured"):
            chosen = getattr(rows, f"{split}_{role}")
            parts[(split, role)] = ([examples[i] for i in chosen], [ids[i] for i in chosen])
    attribution, attributing = config.attribution, time.perf_counter()
    scores = {split: attribute_neurons(model, parts[(split, "attributed")][0], pad, mode=attribution.mode,
                                       steps=attribution.steps, batch_size=attribution.batch_size, progress=progress)
              for split in ("forget", "retain")}
    attributed_seconds = time.perf_counter() - attributing
    selection_scores = scores["forget"].scores
    if mask_settings["score"] == "contrastive":
        selection_scores = contrastive_scores(scores["forget"], scores["forget"].num_samples, scores["retain"],
                                              scores["retain"].num_samples)
    selection = select_mask(selection_scores, scores["retain"], threshold=config.mask.threshold,
                            variant=mask_settings["variant"], rule=mask_settings["rule"],
                            top_fraction=config.mask.top_fraction)
    critical = apply_variant(selection.critical_forget, selection.critical_retain, mask_settings["variant"])
    if critical.total() == 0:
        raise ValueError(
            f"knockout: the critical set of mask.variant={config.mask.variant!r} ({mask_settings}) on the attributed "
            "half of the forget items is empty; nothing to knock out (lower the threshold or use variant 'include')"
        )
    forget, retain = parts[("forget", "measured")][0], parts[("retain", "measured")][0]
    result = knockout_check(
        model, forget, retain, pad, critical, retain_scores=scores["retain"].scores, forget_scores=selection_scores,
        random_draws=settings.random_draws, curve_sizes=settings.curve_sizes, curve_draws=settings.curve_draws,
        seed=settings.seed, batch_size=settings.batch_size,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.sets.to_parquet(out_dir / KNOCKOUT_FILES[0], index=False)
    result.summary.to_parquet(out_dir / KNOCKOUT_FILES[1], index=False)
    result.curve.to_parquet(out_dir / KNOCKOUT_FILES[2], index=False)
    pd.DataFrame([{"item_id": item, "split": split, "role": role}
                  for (split, role), (_, ids) in parts.items() for item in ids]).to_parquet(
        out_dir / KNOCKOUT_FILES[3], index=False)
    selection.table().assign(forget_score=np.concatenate(scores["forget"].scores),
                             retain_score=np.concatenate(scores["retain"].scores),
                             selection_score=np.concatenate(selection_scores)).to_parquet(
        out_dir / KNOCKOUT_FILES[4], index=False)
    summary = {**result.headline(), "knockout_forward_passes": result.forward_passes,
               "knockout_forget_items": len(forget), "knockout_retain_items": len(retain),
               "knockout_attributed_forget_items": len(parts[("forget", "attributed")][0]),
               "knockout_attributed_retain_items": len(parts[("retain", "attributed")][0]),
               "knockout_attribution_seconds": attributed_seconds,
               "knockout_wall_seconds": time.perf_counter() - started}
    # inf (a set that spares the retain items) travels as null in strict JSON; the Parquet keeps it.
    summary = {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in summary.items()}
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------------------------
# Attacks (simu_core.attacks): one stage per attack, run on one model each; every stage writes
# attack.parquet (attack, setting, measure, before, after) for the report's robustness table.

ATTACK_TABLE = "attack.parquet"
ATTACK_ITEMS = "attack_items.parquet"
RELEARN_FILES = ("relearn_curve.parquet", "relearn_items.parquet")


def _attack_inputs(config: SimuConfig, data_dir: Path, model_dir: Path, attack: str):
    """The benchmark and the model (with its tokenizer) an attack reads; an attack the benchmark's
    registry row does not offer (``attacks``) refused."""
    info = benchmark_info(config.data.benchmark)
    if attack not in info.attacks:
        raise ValueError(f"the {attack} attack is not offered on {info.short} (offered: {list(info.attacks)})")
    benchmark = read_benchmark(data_dir)
    model, tokenizer = load_trained(model_dir, config)
    return benchmark, model, tokenizer


def _write_attack(result: Any, out_dir: Path, started: float) -> dict[str, Any]:
    """Write an :class:`~simu_core.attacks.measures.AttackOutcome` into ``out_dir``: its table, its
    per-item values, its own files and ``stats.json`` (the summary, returned)."""
    import time

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.table.to_parquet(out_dir / ATTACK_TABLE, index=False)
    if not result.items.empty:
        result.items.to_parquet(out_dir / ATTACK_ITEMS, index=False)
    for name, frame in result.files.items():
        frame.to_parquet(out_dir / name, index=False)
    summary = {**result.summary, "wall_seconds": time.perf_counter() - started}
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2))
    return summary


def _attack_stage(attack: str, module: Any, config: SimuConfig, data_dir: Path, model_dir: Path,
                  out_dir: Path) -> dict[str, Any]:
    """``module.run`` on the model in ``model_dir``, its outcome written into ``out_dir``. Each attack's
    stage function imports its own module, so that each stage's code version covers only its attack."""
    import time

    started = time.perf_counter()
    benchmark, model, tokenizer = _attack_inputs(config, data_dir, model_dir, attack)
    return _write_attack(module.run(model, tokenizer, benchmark, config), out_dir, started)


def attack_quantize(config: SimuConfig, data_dir: Path, model_dir: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Quantization attack on one model (:mod:`simu_core.attacks.quantize`): forget and retain measures of
    the model and of its weight-only quantized copies (``attack.quantize``)."""
    from simu_core.attacks import quantize

    return _attack_stage("quantize", quantize, config, data_dir, model_dir, out_dir)


def attack_paraphrase(config: SimuConfig, data_dir: Path, model_dir: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Paraphrase attack on one model (:mod:`simu_core.attacks.paraphrase`): forget measures with the
    original and with the paraphrased questions."""
    from simu_core.attacks import paraphrase

    return _attack_stage("paraphrase", paraphrase, config, data_dir, model_dir, out_dir)


def attack_in_context(config: SimuConfig, data_dir: Path, model_dir: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """In-context attack on one model (:mod:`simu_core.attacks.in_context`; ``run.seed`` splits the items
    and draws the shown ones): forget measures without and with ``k`` forget items in the prompt."""
    from simu_core.attacks import in_context

    return _attack_stage("in_context", in_context, config, data_dir, model_dir, out_dir)


def attack_logit_lens(config: SimuConfig, data_dir: Path, model_dir: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Logit-lens attack on one model (:mod:`simu_core.attacks.logit_lens`): the answer probability read
    from every layer, against the model's output."""
    from simu_core.attacks import logit_lens

    return _attack_stage("logit_lens", logit_lens, config, data_dir, model_dir, out_dir)


def relearn(config: SimuConfig, data_dir: Path, model_dir: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Relearning attack on one model (:mod:`simu_core.attacks.relearn`; nothing is saved but figures).

    ``run.seed`` splits the items, orders the batches and seeds torch's global generators
    (dropout). Writes ``relearn_curve.parquet`` (step, forget_prob, forget_rouge,
    forget_truth_ratio, loss, seconds; on MUSE and WMDP the benchmark's attack measures),
    ``relearn_items.parquet`` (item_id, role 'train' | 'measured': on MUSE and WMDP the windows
    trained on and the evaluation items measured) and ``attack.parquet`` (step 0 against the last
    step); returns the measures before and after the attack, the item counts and the wall time.
    """
    import time

    from simu_core.attacks.relearn import attack_items, attack_table, curve_measures, relearn_curve

    started = time.perf_counter()
    benchmark, model, tokenizer = _attack_inputs(config, data_dir, model_dir, "relearn")
    settings = config.relearn
    if benchmark_info(config.data.benchmark).item_kind == "text":
        # A corpus benchmark relearns on its own windows and measures its own measures (relearn.py).
        from simu_core.benchmarks.attack_measures import attack_measure

        examples, train_ids = _items(config, benchmark, "forget" if settings.data == "forget_epoch" else "retain",
                                     tokenizer)
        measure = attack_measure(benchmark, config, tokenizer)
        figures_items: list[pd.DataFrame] = []

        def measured_figures(measured_model) -> dict[str, float]:
            items, figures = measure(measured_model)
            figures_items[:] = [items]
            return figures

        curve = relearn_curve(model, tokenizer, pd.DataFrame(), pd.DataFrame(), settings, config.eval, lr=settings.lr,
                              max_length=config.model.max_length, seed=config.run.seed, progress=progress,
                              examples=examples, measure=measured_figures)
        measured_ids = [str(item) for item in figures_items[0]["item_id"]]
    else:
        train, measured = attack_items(benchmark, settings, config.run.seed)
        curve = relearn_curve(model, tokenizer, train, measured, settings, config.eval, lr=settings.lr,
                              max_length=config.model.max_length, seed=config.run.seed, progress=progress)
        train_ids, measured_ids = list(train["item_id"]), list(measured["item_id"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve.to_parquet(out_dir / RELEARN_FILES[0], index=False)
    pd.DataFrame({"item_id": [*train_ids, *measured_ids],
                  "role": ["train"] * len(train_ids) + ["measured"] * len(measured_ids)}).to_parquet(
        out_dir / RELEARN_FILES[1], index=False)
    attack_table(curve).to_parquet(out_dir / ATTACK_TABLE, index=False)
    first, last = curve.iloc[0], curve.iloc[-1]
    measures = curve_measures(curve)
    summary = {"relearn_data": settings.data, "relearn_train_items": len(train_ids),
               "relearn_measured_items": len(measured_ids), "relearn_steps": int(last["step"]),
               **{f"{name}_before": float(first[name]) for name in measures},
               **{f"{name}_after": float(last[name]) for name in measures},
               "relearn_wall_seconds": time.perf_counter() - started}
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=2))
    return summary
