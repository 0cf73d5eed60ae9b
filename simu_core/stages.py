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

from simu_core.config import SimuConfig
from simu_core.data import LumeBenchmark, QABenchmark, load_benchmark
from simu_core.finetune import FinetuneResult, encode_frame, finetune
from simu_core.models.loading import load_causal_lm, load_tokenizer, resolve_device
from simu_core.models.tiny import build_tiny_llama, save_model, train_tokenizer
from simu_core.prompting import EncodedExample, encode_completion

BENCHMARK_DIR = "benchmark"
TOKENIZER_DIR = "tokenizer"
MODEL_DIR = "model"


def uses_tiny_model(config: SimuConfig) -> bool:
    """True when the run builds the tiny model from scratch (synthetic benchmark, no base model)."""
    return config.data.benchmark == "synthetic" and config.model.base is None


def prepare_data(config: SimuConfig, out_dir: Path) -> dict[str, Any]:
    """Load or generate the benchmark, write its splits as Parquet (and the tiny tokenizer)."""
    benchmark = load_benchmark(config.data)
    folder = Path(out_dir) / BENCHMARK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(benchmark, LumeBenchmark):
        benchmark.rows.to_parquet(folder / "rows.parquet", index=False)
        benchmark.mia_member.to_parquet(folder / "mia_member.parquet", index=False)
        benchmark.mia_nonmember.to_parquet(folder / "mia_nonmember.parquet", index=False)
    else:
        benchmark.save(folder)
        if uses_tiny_model(config):
            tokenizer = train_tokenizer(benchmark.corpus(), config.model.tiny.vocab_size)
            tokenizer.save_pretrained(Path(out_dir) / TOKENIZER_DIR)
    sizes = benchmark.sizes()
    (Path(out_dir) / "sizes.json").write_text(json.dumps(sizes, indent=2))
    return sizes


def read_benchmark(data_dir: Path) -> QABenchmark | LumeBenchmark:
    """Read what :func:`prepare_data` wrote."""
    folder = Path(data_dir) / BENCHMARK_DIR
    if (folder / "rows.parquet").exists():
        return LumeBenchmark(
            rows=pd.read_parquet(folder / "rows.parquet"),
            mia_member=pd.read_parquet(folder / "mia_member.parquet"),
            mia_nonmember=pd.read_parquet(folder / "mia_nonmember.parquet"),
        )
    return QABenchmark.load(folder)


def training_examples(
    benchmark: QABenchmark | LumeBenchmark, which: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[EncodedExample]:
    """Examples the target (``which='target'``) or retain reference (``'reference'``) trains on."""
    if which not in ("target", "reference"):
        raise ValueError(f"which must be 'target' or 'reference', got {which!r}")
    if isinstance(benchmark, LumeBenchmark):
        rows = benchmark.rows if which == "target" else benchmark.split("retain")
        return [encode_completion(tokenizer, i, o, max_length) for i, o in zip(rows["input"], rows["output"])]
    split = "train_target" if which == "target" else "train_reference"
    return encode_frame(tokenizer, benchmark[split], max_length)


def base_model(config: SimuConfig, data_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model fine-tuning starts from: the tiny model (fresh, seeded) or ``model.base``."""
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
    """Fine-tune the target or the retain reference; save it as a Hugging Face folder."""
    benchmark = read_benchmark(data_dir)
    model, tokenizer = base_model(config, data_dir)
    examples = training_examples(benchmark, which, tokenizer, config.model.max_length)
    result: FinetuneResult = finetune(
        model, tokenizer, examples, config.model.finetune, seed=config.model.finetune.seed, description=f"train {which}",
        progress=progress,
    )
    out_dir = Path(out_dir)
    save_model(model, tokenizer, out_dir / MODEL_DIR)
    result.log.to_parquet(out_dir / "train_log.parquet", index=False)
    stats = {
        "examples": len(examples),
        "steps": len(result.log),
        "wall_seconds": result.wall_seconds,
        "tokens_per_second": result.tokens_per_second,
        "final_loss": float(result.log["loss"].iloc[-1]),
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def load_trained(model_dir: Path, config: SimuConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model folder written by :func:`train_model` (or any HF folder / hub id)."""
    path = Path(model_dir) / MODEL_DIR if (Path(model_dir) / MODEL_DIR).is_dir() else model_dir
    tokenizer = load_tokenizer(config.model.tokenizer or path, config.model.trust_remote_code)
    model = load_causal_lm(path, config.model.dtype, config.run.device, config.model.trust_remote_code)
    model.eval()
    torch.set_grad_enabled(True)
    return model, tokenizer


def evaluate(
    config: SimuConfig,
    data_dir: Path,
    model_dir: Path,
    out_dir: Path,
    reference_items_path: Path | None = None,
) -> dict[str, float]:
    """Evaluate a model folder on the prepared benchmark; write ``items.parquet`` and
    ``metrics.parquet`` into ``out_dir`` and return the headline (split "all") metrics.

    ``reference_items_path``: the retain reference's ``items.parquet`` (TOFU-style benchmarks), for
    forget quality and privleak; without it they are reported as not computed.
    """
    # Imported here: the evaluation package pulls in rouge-score, which training stages do not need.
    from simu_core.evaluation import evaluate_lume, evaluate_qa

    benchmark = read_benchmark(data_dir)
    model, tokenizer = load_trained(model_dir, config)
    if isinstance(benchmark, LumeBenchmark):
        result = evaluate_lume(
            model, tokenizer, benchmark, config.eval, config.eval.mmlu_source, max_length=config.model.max_length
        )
    else:
        reference_items = None
        if reference_items_path is not None:
            if not Path(reference_items_path).is_file():
                raise FileNotFoundError(f"reference items file {str(reference_items_path)!r} does not exist")
            reference_items = pd.read_parquet(reference_items_path)
        result = evaluate_qa(
            model, tokenizer, benchmark, config.eval, reference_items, max_length=config.model.max_length
        )
    result.save(out_dir)
    if result.notes:
        (Path(out_dir) / "notes.txt").write_text("\n".join(result.notes) + "\n")
    return result.headline()
