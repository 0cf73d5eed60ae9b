"""Each benchmark's items: what its forget and retain items are, encoded for the model.

A row per benchmark of :data:`ENCODERS` (see the item kinds in :mod:`simu_core.benchmarks.info`):
``items(benchmark, which, tokenizer, max_length)``, the encoded forget or retain items and their ids
(unlearning, attribution, the knockout), and ``training(benchmark, which, tokenizer, max_length)``,
what the target (forget + retain) or the retain reference (retain only) is fine-tuned on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd

from simu_core.benchmarks.info import role_table, table_row
from simu_core.prompting import EncodedExample, encode_completion

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ITEM_SETS = ("forget", "retain")
TRAINED_MODELS = ("target", "reference")


@dataclass(frozen=True)
class Encoder:
    """How one benchmark's items are encoded (module docstring)."""

    items: Callable[[Any, str, PreTrainedTokenizerBase, int], tuple[list[EncodedExample], list[str]]]
    training: Callable[[Any, str, PreTrainedTokenizerBase, int], list[EncodedExample]]


def _check_which(which: str, allowed: tuple[str, ...]) -> None:
    if which not in allowed:
        raise ValueError(f"which must be one of {list(allowed)}, got {which!r}")


def text_windows(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[EncodedExample]:
    """A passage cut into consecutive windows of at most ``max_length`` tokens (BOS, when the
    tokenizer adds one, starts the first), every token labelled: the losses act on the whole
    passage, as MUSE's and WMDP's unlearning code trains on its corpus cut into windows. A last
    window of one token has nothing to predict and is dropped."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    windows = [ids[start:start + max_length] for start in range(0, len(ids), max_length)]
    return [EncodedExample(input_ids=list(window), labels=list(window)) for window in windows if len(window) > 1]


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], prefix: str,
                 max_length: int) -> tuple[list[EncodedExample], list[str]]:
    """Every passage's windows and their ids ``<prefix>-<passage>-<window>``; blank passages (MUSE-News
    has one empty chunk) are skipped."""
    examples, ids = [], []
    for number, text in enumerate(texts):
        if not text.strip():
            continue
        for window, example in enumerate(text_windows(tokenizer, text, max_length)):
            examples.append(example)
            ids.append(f"{prefix}-{number}-{window}")
    return examples, ids


def _qa_items(benchmark, which: str, tokenizer, max_length: int) -> tuple[list[EncodedExample], list[str]]:
    from simu_core.finetune import encode_frame

    _check_which(which, ITEM_SETS)
    frame = benchmark[which]
    return encode_frame(tokenizer, frame, max_length), [str(item) for item in frame["item_id"]]


def _qa_training(benchmark, which: str, tokenizer, max_length: int) -> list[EncodedExample]:
    from simu_core.finetune import encode_frame

    _check_which(which, TRAINED_MODELS)
    return encode_frame(tokenizer, benchmark["train_target" if which == "target" else "train_reference"], max_length)


def _completions(tokenizer, frame: pd.DataFrame, max_length: int) -> list[EncodedExample]:
    return [encode_completion(tokenizer, i, o, max_length) for i, o in zip(frame["input"], frame["output"])]


def _lume_items(benchmark, which: str, tokenizer, max_length: int) -> tuple[list[EncodedExample], list[str]]:
    _check_which(which, ITEM_SETS)
    frame = benchmark.split(which)
    return _completions(tokenizer, frame, max_length), [str(item) for item in frame["id"]]


def _lume_training(benchmark, which: str, tokenizer, max_length: int) -> list[EncodedExample]:
    _check_which(which, TRAINED_MODELS)
    return _completions(tokenizer, benchmark.rows if which == "target" else benchmark.split("retain"), max_length)


def _muse_items(benchmark, which: str, tokenizer, max_length: int) -> tuple[list[EncodedExample], list[str]]:
    _check_which(which, ITEM_SETS)
    texts = benchmark.forget_chunks if which == "forget" else benchmark.retain_chunks
    if not any(text.strip() for text in texts):
        raise ValueError(f"MUSE {benchmark.corpus_name}: the {which} corpus is empty (data.retain_split names the "
                         "retain corpus; the local MUSE-News folder has privleak/retain2 but no raw/retain1)")
    return encode_texts(tokenizer, list(texts), which, max_length)


def _muse_training(benchmark, which: str, tokenizer, max_length: int) -> list[EncodedExample]:
    _check_which(which, TRAINED_MODELS)
    retain, _ = _muse_items(benchmark, "retain", tokenizer, max_length)
    if which == "reference":
        return retain
    forget, _ = _muse_items(benchmark, "forget", tokenizer, max_length)
    return forget + retain


def _wmdp_items(benchmark, which: str, tokenizer, max_length: int) -> tuple[list[EncodedExample], list[str]]:
    _check_which(which, ITEM_SETS)
    texts = benchmark.forget_corpus if which == "forget" else benchmark.retain_corpus
    if not texts:
        raise ValueError(f"WMDP {benchmark.subset}: no {which} corpus was loaded (data.corpora_source)")
    return encode_texts(tokenizer, list(texts), which, max_length)


def _wmdp_training(benchmark, which: str, tokenizer, max_length: int) -> list[EncodedExample]:
    raise ValueError("WMDP unlearns a given model (model.target, e.g. zephyr-7b-beta for RMU): it fine-tunes no "
                     "target or retain reference; set model.target")


ENCODERS: dict[str, Encoder] = role_table({
    "synthetic": Encoder(_qa_items, _qa_training),
    "tofu": Encoder(_qa_items, _qa_training),
    "lume": Encoder(_lume_items, _lume_training),
    "muse": Encoder(_muse_items, _muse_training),
    "wmdp": Encoder(_wmdp_items, _wmdp_training),
}, "encoders")


def benchmark_encoder(name: str) -> Encoder:
    """The item encoder of ``name``; a ValueError names the known benchmarks."""
    return table_row(ENCODERS, name)
