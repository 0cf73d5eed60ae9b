"""The one validated configuration of a simu run.

Sections follow the design: ``model``, ``data``, ``attribution``, ``mask``, ``knockout``, ``unlearn``, ``relearn``,
``attack``, ``eval``, ``run``; ``attacks`` lists the attacks run after unlearning. Load with :func:`load_config` (YAML file, then ``--set section.key=value`` overrides).
Every invalid value raises :class:`ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from simu_core.attacks.names import ATTACKS
from simu_core.benchmarks.info import BENCHMARK_INFO, BENCHMARK_NAMES
from simu_core.method_names import LOSSES, OPTIMIZERS, PREFERENCE_LOSSES, SCOPE_SPELLINGS, parse_method, resolve_method
from simu_core.paths import DEFAULT_CONFIG_PATH

TOFU_FORGET_SPLITS = ("forget01", "forget05", "forget10")

#: Settings whose right value depends on the benchmark; a field left unset (None) takes its
#: benchmark's value when the config is validated (the registry's ``defaults``: TOFU and LUME their
#: reference evaluators' values; the built-in benchmark's items are short).
BENCHMARK_DEFAULTS: dict[str, dict[str, float]] = {name: dict(info.defaults) for name, info in BENCHMARK_INFO.items()}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """Shape of the small Llama-architecture model trained from scratch for the built-in benchmark."""

    num_layers: int = Field(4, ge=1, le=64)
    hidden_size: int = Field(128, ge=8, le=16384)
    intermediate_size: int = Field(512, ge=8, le=65536)
    num_heads: int = Field(4, ge=1, le=256)
    vocab_size: int = Field(1024, ge=64, le=262144, description="BPE vocabulary trained on the corpus")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.tiny.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.tiny.num_heads ({self.num_heads})"
            )
        return self


class FinetuneConfig(_Section):
    """Fine-tuning of the target and retain-reference models (answer-only loss, AdamW)."""

    epochs: int = Field(25, ge=1, le=1000)
    lr: float = Field(3e-3, gt=0, le=1.0)
    batch_size: int = Field(16, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=1024)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, description="seed of initialisation and data order (separate from run.seed)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward (less memory, about a "
        "third more compute); results are unchanged, so it is in no cache key",
    )


class ModelConfig(_Section):
    """Which model to unlearn, and how the target / retain reference are obtained."""

    base: str | None = Field(
        None,
        description="HF hub id or local path of a base model to fine-tune; None with the "
        "synthetic benchmark builds the tiny model from scratch",
    )
    target: str | None = Field(
        None, description="an already fine-tuned target (hub id or path): skips train_target"
    )
    retain_reference: str | None = Field(
        None, description="an already trained retain model (hub id or path): skips its training"
    )
    tokenizer: str | None = Field(None, description="tokenizer id/path when it differs from the model")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    max_length: int | None = Field(
        None, ge=16, le=131072, description="None: the benchmark's own (synthetic 128, TOFU 512, LUME 512)"
    )
    tiny: TinyModelConfig = TinyModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()


class DataConfig(_Section):
    """Benchmark selection. ``split`` pairs forget/retain/holdout by name (forget01/05/10)."""

    benchmark: Literal[BENCHMARK_NAMES] = "synthetic"  # type: ignore[valid-type]  # the registry's names
    split: Literal["forget01", "forget05", "forget10"] = "forget10"
    source: str | None = Field(
        None,
        description="local folder (or WMDP: JSON Lines file) of the benchmark's files; None reads the Hugging Face "
        "hub (locuslab/TOFU, the LUME dataset, muse-bench/MUSE-News|Books, cais/wmdp) or generates the synthetic "
        "benchmark",
    )
    retain_authors: int | None = Field(
        None, ge=1, description="keep only the first N retain authors (TOFU/synthetic; small runs)"
    )
    num_authors: int = Field(40, ge=10, le=10000, description="synthetic: fictitious authors in 'full'")
    holdout_authors: int = Field(4, ge=1, le=10000, description="synthetic: never-trained authors (MIA)")
    qa_per_author: int = Field(10, ge=10, le=12, description="synthetic: QA pairs per author")
    general_facts: int = Field(40, ge=4, le=1000, description="synthetic: facts per general set")
    seed: int = Field(0, ge=0, description="synthetic: generator seed")
    requests: int | list[list[str]] | None = Field(
        None,
        description="sequential deletion requests (simu_core.requests): N cuts the forget split into N contiguous "
        "batches in item order; or a list of requests, each a list of item ids ('forget-12') or half-open ranges "
        "('forget-0:10'); request i unlearns from the model request i-1 produced. None: one forget set",
    )

    corpus: Literal["news", "books"] = Field("news", description="MUSE: which corpus (MUSE-News or MUSE-Books)")
    retain_split: str | None = Field(
        None, description="MUSE: the file of the retain corpus the retain reference trains on and unlearning keeps: "
        "None = raw/retain1 (MUSE's), or raw/retain2, privleak/retain2 (texts of the retain corpus; the local "
        "MUSE-News folder has no raw retain corpus)")
    forget_text: Literal["raw", "excerpts"] = Field(
        "raw", description="MUSE: what the target trains on and unlearning forgets: raw = the forget corpus (MUSE's); "
        "excerpts = the forget-corpus passages the evaluation reads (VerbMem prompt + continuation, PrivLeak "
        "members), so that a small model trained on a few texts is measured on what it saw (the CPU preset)")
    subset: Literal["bio", "chem", "cyber"] = Field("bio", description="WMDP: which question set and corpora")
    corpora_source: str | None = Field(
        None, description="WMDP: the forget and retain corpora unlearning reads: a local folder of "
        "<subset>-forget-corpus.jsonl and <subset>-retain-corpus.jsonl, or 'hub' (cais/wmdp-corpora; the bio forget "
        "corpus is not there: WMDP's authors share it on request); None reads no corpus (evaluation only)")
    max_texts: int | None = Field(
        None, ge=1, description="MUSE / WMDP: keep the first N texts of each corpus and of each MUSE evaluation set "
        "(small runs); None keeps all")

    @field_validator("requests", mode="before")
    @classmethod
    def _requests_well_formed(cls, value: Any) -> Any:
        from simu_core.requests import RequestError, check_requests

        try:
            return check_requests(value)
        except RequestError as error:  # the field is named by the error's location already
            raise ValueError(str(error).removeprefix("data.requests: ")) from None

    @model_validator(mode="after")
    def _requests_need_a_qa_benchmark(self) -> "DataConfig":
        if self.requests is not None and not BENCHMARK_INFO[self.benchmark].requests:
            raise ValueError(
                f"data.requests is set with data.benchmark={self.benchmark!r}: sequential deletion requests are for "
                "the TOFU-style benchmarks (synthetic, tofu), whose forget items are 'forget-<row>'"
            )
        return self

    @model_validator(mode="after")
    def _fields_the_benchmark_reads(self) -> "DataConfig":
        # A MUSE or WMDP field set for a benchmark that does not read it would silently do nothing.
        reads = BENCHMARK_INFO[self.benchmark].data_fields
        for name in ("corpus", "retain_split", "forget_text", "subset", "corpora_source", "max_texts"):
            value, default = getattr(self, name), type(self).model_fields[name].default
            if name not in reads and value != default:
                readers = [bench for bench, info in BENCHMARK_INFO.items() if name in info.data_fields]
                raise ValueError(f"data.{name}={value!r} is set with data.benchmark={self.benchmark!r}, which does not "
                                 f"read it (read by: {readers})")
        return self


class AttributionConfig(_Section):
    """Critical-neuron attribution (SIMU step 1)."""

    mode: Literal["fast", "reference"] = "fast"
    steps: int = Field(5, ge=1, le=1000, description="integrated-gradient steps m")
    batch_size: int = Field(8, ge=1, le=4096)
    max_items: int | None = Field(None, ge=1, description="attribute on at most N items per set")


class MaskConfig(_Section):
    """Thresholding of attribution scores into the critical-neuron mask."""

    threshold: float = Field(0.2, gt=0, le=1, description="t: critical when score >= t * layer max")
    rule: Literal["layer_relative", "global_top_fraction", "random"] = Field(
        "layer_relative",
        description="random: the control; per layer as many neurons as the layer-relative rule picks at t "
        "(for the variant), drawn uniformly with run.seed",
    )
    top_fraction: float = Field(0.05, gt=0, le=1, description="global rule: fraction of all neurons")
    score: Literal["forget", "contrastive"] = Field(
        "forget",
        description="what C_f thresholds: the forget-set attribution (the paper) or 'contrastive', the forget "
        "score minus the retain score, each per attributed answer token (needs the retain attribution)",
    )
    variant: Literal["include", "exclude", "only"] = "include"


class KnockoutConfig(_Section):
    """Knockout check of the method (``simu_core.knockout``): attribute and threshold on one half of
    the forget items (and as many retain items) with the run's attribution and mask settings, zero
    that critical set's activations and measure the other half (and as many other retain items);
    compare with random neurons and retain-critical neurons of the same per-layer counts."""

    enabled: bool = True
    random_draws: int = Field(5, ge=1, le=1000, description="random sets averaged (mean and std)")
    max_items: int | None = Field(
        None, ge=1, description="measure on at most N held-out forget and N held-out retain items; None = the "
        "held-out half of the forget items, and as many retain items"
    )
    seed: int = Field(
        0, ge=0, description="seed of the split into attributed and measured items and of the random sets (separate "
        "from run.seed, so the runs of a seed sweep share one check)",
    )
    curve_sizes: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64],
        description="neurons per layer for the top-k-by-score vs random curve; [] = no curve",
    )
    curve_draws: int = Field(2, ge=1, le=100, description="random draws per curve point")
    batch_size: int = Field(32, ge=1, le=4096)

    @field_validator("curve_sizes")
    @classmethod
    def _sizes_positive(cls, value: list[int]) -> list[int]:
        if any(size < 1 for size in value):
            raise ValueError(f"every curve size must be >= 1 neuron per layer, got {value}")
        return sorted(set(value))


class RelearnConfig(_Section):
    """Relearning attack (``simu_core.attacks.relearn``): fine-tune a copy of a model for a few steps on
    half of the forget items (or on retain items), then measure the other half. Run on the
    unlearned model, the target and the retain reference; recovery compares the first with the last."""

    enabled: bool = False
    steps: int = Field(10, ge=1, le=100000, description="optimizer steps of the attack")
    lr: float | None = Field(
        None, gt=0, le=1.0, description="AdamW lr, constant; None: the benchmark's (synthetic 1e-3, TOFU/LUME 1e-5)"
    )
    fraction: float = Field(
        0.5, gt=0, lt=1, description="share of the forget items (by item) the attack trains on; the rest is measured"
    )
    data: Literal["forget_half", "retain_only", "forget_epoch"] = Field(
        "forget_half",
        description="forget_half: train on the forget items not measured (targeted relearning); retain_only: on as "
        "many retain items (benign relearning); forget_epoch: the OpenUnlearning meta-evaluation's protocol, one "
        "epoch over every forget item, measured on the same items (relearn.steps and relearn.fraction not read)",
    )
    batch_size: int = Field(4, ge=1, le=4096)
    eval_every: int = Field(2, ge=1, description="measure the held-out half every N steps (and at 0 and the end)")


class QuantizeAttackConfig(_Section):
    """The quantization attack (``simu_core.attacks.quantize``): weight-only quantization of every
    linear layer, one model per bit width, then the evaluation suite's forget and retain measures."""

    bits: list[int] = Field(default_factory=lambda: [8, 4], description="bit widths, one quantized model each")
    group_size: int | None = Field(
        128, ge=1, description="weights per quantization group along a row, dividing every linear layer's input "
        "features (None: one group per output row); 128 as AWQ and GPTQ use")
    scheme: str = Field(
        "asymmetric", description="asymmetric (a zero point per group: AWQ's round-to-nearest grid), symmetric or "
        "symmetric_no_clipping (simu_core.attacks.quantize has the formulas)")

    @model_validator(mode="after")
    def _offered(self) -> "QuantizeAttackConfig":
        from simu_core.attacks.quantize_settings import check_quantization

        if not self.bits:
            raise ValueError("attack.quantize.bits is empty: name at least one bit width, e.g. [8, 4]")
        for bits in self.bits:
            check_quantization(bits, self.group_size, self.scheme)
        return self


class InContextAttackConfig(_Section):
    """The in-context attack (``simu_core.attacks.in_context``): ``k`` other forget items (question and
    answer) before each measured forget question, in the prompt template's own QA format."""

    k: int = Field(3, ge=0, le=64, description="forget items shown before each measured question")
    fraction: float = Field(
        0.5, gt=0, lt=1, description="share of the forget items (seeded, by item) the shown items are drawn from; "
        "the rest is measured")


class AttackConfig(_Section):
    """Settings of the attacks listed in ``attacks`` (the relearning attack's are ``relearn``)."""

    quantize: QuantizeAttackConfig = QuantizeAttackConfig()
    in_context: InContextAttackConfig = InContextAttackConfig()
    retain_items: int | None = Field(
        40, ge=1, description="retain items (the first N of the retain evaluation set) the quantization attack and "
        "the logit lens also measure; None = as many as the evaluation (eval.max_items)")


class UnlearnConfig(_Section):
    """Unlearning method and its optimisation settings (SIMU step 2 and baselines).

    NPO and SimNPO have their own beta: NPO's ``npo_beta`` scales a log-ratio summed over the answer,
    SimNPO's ``simnpo_beta`` a per-token mean, so they live on different scales. SimNPO's default 4.5
    is open-unlearning's (``configs/trainer/SimNPO.yaml``), chosen so that a ``simnpo`` run is the
    SimNPO baseline of the toolkit whose TOFU evaluator this project reproduces; the SimNPO paper's
    TOFU setting is about 2.5 (``--set unlearn.simnpo_beta=2.5``). At NPO's 0.1
    the per-sequence weight stays in [0.76, 1.0] and SimNPO degenerates into length-normalised
    gradient ascent. ``simnpo_gamma`` is the paper's reward margin gamma, outside beta
    (open-unlearning's ``delta`` is the same margin inside it: gamma = beta * delta; both default 0).
    open-unlearning's SimNPO ``gamma: 0.125`` and ``alpha: 1`` are the forget and retain weights
    here (``forget_weight``, ``retain_weight``).
    """

    method: str = Field(
        "simu",
        description="the method: a loss x an optimizer x a trainable scope (simu_core/method_names.py). The "
        "version-1 names (ga, fo_graddiff, so_graddiff, simu, npo, so_npo, simu_npo, simnpo) and <loss>, so_<loss>, "
        "simu_<loss>, fo_simu_<loss>; unlearn.loss / optimizer / scope replace one part of it",
    )
    loss: str | None = Field(
        None, description="replace the method's loss: " + ", ".join(LOSSES) + " (None keeps the method's; the "
        "config then stores the combination's name in unlearn.method and clears this field)",
    )
    optimizer: str | None = Field(None, description="replace the method's optimizer: adamw or sophia")
    scope: str | None = Field(
        None, description="replace the method's trainable scope: all, simu (attention + critical down-projection "
        "columns), critical (critical columns only), layers (RMU's published layer set; rmu only)",
    )
    lr: float = Field(3e-4, gt=0, le=1.0)
    epochs: int = Field(5, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps")
    batch_size: int = Field(4, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=1024)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)
    forget_weight: float = Field(1.0, ge=0, description="gamma_f")
    retain_weight: float = Field(1.0, ge=0, description="alpha_r")
    retain_loss: Literal["nll", "kl"] = "nll"
    hessian: Literal["gnb", "soul"] = "soul"
    hessian_interval: int = Field(10, ge=1, description="k: gnb Hessian refresh period")
    betas: tuple[float, float] = (0.9, 0.95)
    rho: float = Field(0.04, gt=0)
    hessian_batch_size: int | None = Field(
        None, ge=1, description="bs in rho*bs*h; None = tokens in the batch"
    )
    npo_beta: float = Field(0.1, gt=0, description="NPO's beta (npo, so_npo, simu_npo)")
    simnpo_beta: float = Field(4.5, gt=0, description="SimNPO's beta (simnpo); open-unlearning's default")
    simnpo_gamma: float = Field(0.0, ge=0, description="SimNPO's reward margin gamma (simnpo)")
    train_attention: bool = True
    # The other losses' settings (simu_core/unlearning/losses.py); open-unlearning's defaults, from the
    # configs/trainer/<Method>.yaml named in each description. In the unlearn key only for the loss that reads them.
    dpo_beta: float = Field(0.1, gt=0, description="DPO's beta (dpo, idk_dpo, altpo); open-unlearning DPO.yaml")
    preferred_source: str | None = Field(
        None, description="dpo: a JSON Lines file of preferred answers, {'question', 'answer'} per forget question "
        "(idk_dpo prefers 'I don't know', altpo the target's own alternates)",
    )
    idk_source: str | None = Field(
        None, description="idk_dpo: TOFU's 'I don't know' answers, a local idontknow.jsonl or the folder holding "
        "it; None reads data.source's folder when it has the file, else downloads open-unlearning's copy (hub)",
    )
    altpo_alternates: int = Field(5, ge=1, le=64, description="AltPO: alternate answers sampled per forget question")
    altpo_max_new_tokens: int = Field(
        200, ge=1, le=4096, description="AltPO: new tokens per alternate (AltPO's generate.yaml: 200)")
    altpo_temperature: float = Field(1.0, gt=0, description="AltPO: sampling temperature of the alternates (1.0)")
    undial_beta: float = Field(10.0, gt=0, description="UNDIAL's logit decrease; open-unlearning UNDIAL.yaml")
    wga_beta: float = Field(1.0, ge=0, description="WGA's weight exponent; open-unlearning WGA.yaml")
    satimp_beta1: float = Field(5.0, ge=0, description="SatImp's beta1; open-unlearning SatImp.yaml")
    satimp_beta2: float = Field(1.0, ge=0, description="SatImp's beta2; open-unlearning SatImp.yaml")
    ceu_ignore_first: int = Field(
        1, ge=0, description="CE-U: answer tokens at the start left out of the loss; open-unlearning CEU.yaml")
    pdu_retain_eps: float = Field(0.0, description="PDU: the retain loss's constraint level epsilon")
    pdu_dual_step: float = Field(1.0, ge=0, description="PDU: the dual variable's step size (per optimizer step)")
    rmu_layer: int = Field(7, ge=0, description="RMU: the decoder layer whose output is steered (WMDP's 7 of 32)")
    rmu_steering_coeff: float = Field(
        300.0, gt=0, description="RMU: the control vector's norm c (open-unlearning RMU.yaml 300; WMDP Zephyr-7B 6.5)")
    rmu_alpha: float = Field(
        1000.0, ge=0, description="RMU: its retain term's weight, in place of retain_weight (open-unlearning "
        "RMU.yaml 1000; WMDP Zephyr-7B 1200)")
    stop_at: str | None = Field(
        None,
        description="stop at a forgetting level (simu_core/stopping.py): 'forget_prob<=reference' (the retain "
        "reference's forget probability), 'forget_prob<=0.15', 'forget_quality>=0.05'; checked every eval_every "
        "steps, the first check that reaches it ends the run (epochs / max_steps are the budget). None: run the budget",
    )
    eval_every: int = Field(
        10, ge=1, description="stop_at: measure the forget measure every N optimizer steps (sooner near the level)"
    )
    stop_tolerance: float = Field(
        0.1, gt=0, lt=1, description="stop_at: a stop within this relative distance of the level counts as matched"
    )
    stop_retain_items: int = Field(
        16, ge=1, description="stop_at: retain probability measured on the first N items of the evaluation's retain split"
    )
    stop_refine: int = Field(
        0, ge=0, le=30, description="stop_at: bisect the step after which the level was reached this many times (its "
        "update applied with a fraction of its size) and keep the smallest fraction that reaches the level "
        "(simu_core/stopping.py): the stop lands within 2^-N of a step of the crossing; each halving costs one "
        "check. 0: keep the model of the first check that reaches the level",
    )
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every N steps")
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward (less memory, about a "
        "third more compute); results are unchanged, so it is in no cache key",
    )

    @model_validator(mode="before")
    @classmethod
    def _canonical_method(cls, tree: Any) -> Any:
        """One spelling per method: ``loss`` / ``optimizer`` / ``scope`` are folded into ``method``'s name
        (so ``method=so_graddiff, scope=simu`` is stored, keyed and reported as ``simu``)."""
        if not isinstance(tree, Mapping):
            return tree
        tree = dict(tree)
        loss, optimizer, scope = (tree.pop(field, None) for field in ("loss", "optimizer", "scope"))
        for field, value, known in (("loss", loss, LOSSES), ("optimizer", optimizer, OPTIMIZERS),
                                    ("scope", scope, SCOPE_SPELLINGS)):
            if value is not None and value not in known:
                raise ValueError(f"unknown unlearn.{field} {value!r}; known: {list(known)}")
        if scope == "critical":
            scope = "simu"
            if tree.get("train_attention") is True:
                raise ValueError("unlearn.scope=critical trains the critical columns only; it contradicts "
                                 "unlearn.train_attention=true (use scope=simu)")
            tree["train_attention"] = False
        method = str(tree.get("method", "simu"))
        try:
            parse_method(method)
        except ValueError as error:
            raise ValueError(f"unlearn.method: {error}") from None
        try:
            tree["method"] = resolve_method(method, loss, optimizer, scope).name
        except ValueError as error:
            given = ", ".join(f"unlearn.{field}={value}" for field, value in
                              (("method", method), ("loss", loss), ("optimizer", optimizer), ("scope", scope)) if value)
            raise ValueError(f"{given}: {error}") from None
        return tree

    @field_validator("stop_at")
    @classmethod
    def _stop_at_well_formed(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "none", "null"):
            return None
        from simu_core.stop_rule import parse_stop_at

        return parse_stop_at(value).text()  # one spelling per rule: the same rule, the same key

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        for beta in value:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


class EvalConfig(_Section):
    """Evaluation suite settings."""

    batch_size: int = Field(16, ge=1, le=4096)
    max_new_tokens: int | None = Field(
        None, ge=1, le=4096, description="None: the benchmark's own (synthetic 48, TOFU 200, LUME 256)"
    )
    max_items: int | None = Field(None, ge=1, description="evaluate at most N items per split")
    mmlu_source: str | None = Field(None, description="local MMLU-format dataset (LUME final score)")
    template: Literal["simu", "open_unlearning", "chat"] = Field(
        "simu",
        description="QA prompt template of the TOFU-style evaluation (simu_core/prompting.py): simu = the one "
        "training uses ('Question: {q}\\nAnswer:' + ' {a}', or the tokenizer's chat template when it has one); "
        "open_unlearning = its default 'Question: {q}\\nAnswer: ' tokenized as open-unlearning does; chat = the "
        "tokenizer's chat template as open-unlearning applies it",
    )
    reference_full: bool = Field(
        False,
        description="evaluate the retain reference with the whole suite; by default only what is compared "
        "with it (TOFU-style: forget and holdout scores for forget quality and privleak, no generations; "
        "LUME: nothing, its scores compare with no reference)",
    )


class RunConfig(_Section):
    """Where and how the run executes."""

    seed: int = Field(0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="autocast dtype for forward passes; state stays float32"
    )
    devices: int = Field(
        1, ge=1, le=4096, description="devices the fine-tuning and unlearning stages shard the model over (FSDP, "
        "launched with torchrun on this machine; run.device's kind: GPUs, or CPU processes with gloo)",
    )
    store: str = Field(".simu/store", description="fsspec URL of the artifact store")
    results: str = Field("results", description="results folder (Parquet)")
    name: str | None = Field(None, description="run name; default built from method and threshold")
    tags: list[str] = Field(default_factory=list)
    fail_at_unlearn_step: int | None = Field(
        None, ge=1, description="fault injection for tests: raise inside unlearn at this step"
    )


class SimuConfig(_Section):
    """The whole configuration of one pipeline run."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    attribution: AttributionConfig = AttributionConfig()
    mask: MaskConfig = MaskConfig()
    knockout: KnockoutConfig = KnockoutConfig()
    unlearn: UnlearnConfig = UnlearnConfig()
    relearn: RelearnConfig = RelearnConfig()
    attacks: list[str] = Field(
        default_factory=list, description=f"attacks run after unlearning on the unlearned model, the target and the "
        f"retain reference: any of {list(ATTACKS)} (relearn is relearn.enabled=true)")
    attack: AttackConfig = AttackConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="before")
    @classmethod
    def _relearn_is_an_attack(cls, tree: Any) -> Any:
        """``relearn.enabled`` and ``relearn`` in ``attacks`` are one setting: either turns both on."""
        if not isinstance(tree, Mapping):
            return tree
        attacks = tree.get("attacks")
        if attacks is None:
            attacks = []
        if isinstance(attacks, str):  # --set attacks=quantize
            attacks = [attacks]
        if not isinstance(attacks, list):
            return tree  # the field's own validation names the bad value
        unknown = [name for name in attacks if name not in ATTACKS]
        if unknown:
            raise ValueError(f"attacks: unknown attack(s) {unknown}; known: {list(ATTACKS)}")
        relearn = tree.get("relearn")
        enabled = (relearn.get("enabled") if isinstance(relearn, Mapping) else getattr(relearn, "enabled", False))
        tree = dict(tree)
        if enabled and "relearn" not in attacks:
            attacks = [*attacks, "relearn"]
        if "relearn" in attacks and not enabled:
            if isinstance(relearn, BaseModel):
                tree["relearn"] = relearn.model_copy(update={"enabled": True})
            else:
                tree["relearn"] = {**(relearn or {}), "enabled": True}
        # One spelling: the report's order, each once.
        tree["attacks"] = [name for name in ATTACKS if name in attacks]
        return tree

    @model_validator(mode="before")
    @classmethod
    def _benchmark_defaults(cls, tree: Any) -> Any:
        """Fill unset benchmark-dependent fields (:data:`BENCHMARK_DEFAULTS`) with the benchmark's values."""
        if not isinstance(tree, Mapping):
            return tree
        data = tree.get("data")
        benchmark = (data.get("benchmark") if isinstance(data, Mapping) else getattr(data, "benchmark", None)) or "synthetic"
        if benchmark not in BENCHMARK_DEFAULTS:
            return tree  # the field's own validation names the bad value
        tree = dict(tree)
        for dotted, value in BENCHMARK_DEFAULTS[benchmark].items():
            section, name = dotted.split(".")
            fields = tree.get(section)
            if fields is None:
                fields = {}
            if isinstance(fields, Mapping) and fields.get(name) is None:
                tree[section] = {**fields, name: value}
            elif isinstance(fields, BaseModel) and getattr(fields, name) is None:
                tree[section] = fields.model_copy(update={name: value})
        return tree

    @model_validator(mode="after")
    def _model_source_fits_benchmark(self) -> "SimuConfig":
        model, info = self.model, BENCHMARK_INFO[self.data.benchmark]
        if not info.tiny_model and not (model.base or model.target):
            raise ValueError(
                f"model.base or model.target is required for data.benchmark={self.data.benchmark!r} (the tiny model "
                f"is built only for {[name for name, row in BENCHMARK_INFO.items() if row.tiny_model]}; "
                f"{info.title} needs a real one)"
            )
        quantize = self.attack.quantize
        if "quantize" in self.attacks and quantize.group_size and self.builds_tiny_model():
            tiny = self.model.tiny
            sizes = {"model.tiny.hidden_size": tiny.hidden_size, "model.tiny.intermediate_size": tiny.intermediate_size}
            bad = {name: size for name, size in sizes.items() if size % quantize.group_size}
            if bad:
                raise ValueError(
                    f"attack.quantize.group_size={quantize.group_size} does not divide the input features of every "
                    f"linear layer of the tiny model ({bad}); choose a divisor, or null for one group per row")
        refused = [name for name in self.attacks if name not in info.attacks]
        if refused:
            offered = f"the attacks offered on {info.short}: {list(info.attacks)}" if info.attacks else \
                f"no attack is offered on {info.short}"
            relearn = " (relearn.enabled=true adds relearn)" if "relearn" in refused else ""
            raise ValueError(
                f"attacks={refused}{relearn} with data.benchmark={self.data.benchmark!r}: {offered}; "
                f"{info.attacks_refused}"
            )
        if "relearn" in self.attacks and info.item_kind == "text" and self.relearn.data == "forget_half":
            raise ValueError(
                f"relearn.data='forget_half' with data.benchmark={self.data.benchmark!r}: {info.short}'s measured items "
                "(its evaluation's) are not forget items that can be held out; set relearn.data=forget_epoch (one "
                "epoch over the forget windows) or retain_only (relearn.steps steps on retain windows)"
            )
        if self.relearn.enabled and self.run.devices > 1:
            raise ValueError(
                f"relearn.enabled=true with run.devices={self.run.devices}: the relearning attack runs in one process "
                "on one device (it is not sharded with FSDP); set run.devices=1 or relearn.enabled=false"
            )
        others = [name for name in self.attacks if name != "relearn"]
        if others and self.run.devices > 1:
            raise ValueError(
                f"attacks={others} with run.devices={self.run.devices}: the attacks run in one process on one device "
                "(they are not sharded with FSDP); set run.devices=1 or attacks=[]"
            )
        # A target without a retain reference is valid (``simu eval``); the pipeline, which reports
        # forget quality, refuses it in check_pipeline_models.
        if self.run.devices > 1 and self.unlearn.checkpoint_every:
            raise ValueError(
                f"unlearn.checkpoint_every={self.unlearn.checkpoint_every} with run.devices={self.run.devices}: "
                "periodic checkpoints are written by one-process runs only (set unlearn.checkpoint_every=0)"
            )
        return self

    @model_validator(mode="after")
    def _requests_without_relearning(self) -> "SimuConfig":
        if self.data.requests is not None and self.attacks:
            raise ValueError(
                f"data.requests with attacks={self.attacks}: the attacks run after a single unlearning, not per "
                "deletion request (set attacks=[] and relearn.enabled=false, or leave data.requests unset)"
            )
        if self.data.requests is not None and self.eval.max_items is not None:
            from simu_core.requests import request_count

            count = request_count(self.data.requests)
            if self.eval.max_items < count:
                # The union's evaluation takes the requests in turn (requests.union_order): it needs one item each.
                raise ValueError(
                    f"eval.max_items={self.eval.max_items} with {count} deletion requests (data.requests): each request "
                    f"is evaluated on the forget items of every request so far, at least one of every request; set "
                    f"eval.max_items >= {count} (or leave it unset)"
                )
        return self

    def builds_tiny_model(self) -> bool:
        """Whether the run trains the tiny model from scratch (a benchmark the registry marks ``tiny_model``,
        no model.base or model.target)."""
        return BENCHMARK_INFO[self.data.benchmark].tiny_model and not (self.model.base or self.model.target)

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of this config (stable across processes)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def flat(self) -> dict[str, Any]:
        """The config as one flat dict ``{"section.key": value}`` (for results tables)."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<config>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not a field of this section)"
        got = item.get("input")
        shown = f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else ""
        lines.append(f"{field}: {message}{shown}")
    return "invalid config: " + "; ".join(lines)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value read as YAML: numbers, booleans, lists, null)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    path = [part for part in dotted.strip().split(".") if part]
    if len(path) < 2 and path != ["attacks"]:  # ``attacks`` is the one top-level field that is not a section
        raise ConfigError(f"override {assignment!r}: the key must name a section and a field, e.g. mask.threshold "
                          "(or be attacks=[...])")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of a raw config dict with ``section.key=value`` overrides applied."""
    tree = json.loads(json.dumps(tree))
    for assignment in overrides:
        path, value = parse_override(assignment)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def config_from_dict(tree: Mapping[str, Any]) -> SimuConfig:
    """Validate a raw dict into a :class:`SimuConfig` (raises :class:`ConfigError`)."""
    try:
        return SimuConfig.model_validate(dict(tree))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a raw dict (clear error when missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    return tree


def check_pipeline_models(config: SimuConfig) -> None:
    """The pipeline's (``simu run``, ``simu ablate``) rules: a given target on a QA benchmark needs a
    retain reference (given, or trained from ``model.base``) for forget quality; LUME cannot stop at a
    forgetting level (``unlearn.stop_at``) nor take a preference loss; dpo needs its preferred answers. Raises
    :class:`ConfigError`; ``simu eval`` evaluates a model without one."""
    model, benchmark = config.model, config.data.benchmark
    info = BENCHMARK_INFO[benchmark]
    method = parse_method(config.unlearn.method)
    loss = method.loss
    if loss in PREFERENCE_LOSSES and not info.preference_losses:
        items = {"completion": "document continuations", "text": "corpus passages with no question or answer"}
        raise ConfigError(
            f"invalid config: unlearn.method={config.unlearn.method!r} (the {loss} loss) with data.benchmark="
            f"{benchmark!r}: a preference loss pairs each forget question's answer with a preferred answer; "
            f"{info.short}'s forget items are {items.get(info.item_kind, info.item_kind)}. Use a loss without "
            "preferred answers (e.g. npo, rmu, undial)"
        )
    if loss == "dpo" and config.unlearn.preferred_source is None:
        raise ConfigError(
            "invalid config: the dpo loss needs unlearn.preferred_source, a JSON Lines file with a preferred answer "
            "{'question', 'answer'} per forget question (idk_dpo prefers 'I don't know', altpo the target's own "
            "alternates)"
        )
    if method.optimizer == "adamw" and method.needs_mask and config.run.devices > 1:
        raise ConfigError(
            f"invalid config: unlearn.method={config.unlearn.method!r} (AdamW on SIMU's scope) with run.devices="
            f"{config.run.devices}: column-masked AdamW trains one process's whole tensors only; use the Sophia "
            f"optimizer (simu_{loss}) or run.devices=1"
        )
    if config.unlearn.stop_refine and config.unlearn.stop_at is None:
        raise ConfigError(
            f"invalid config: unlearn.stop_refine={config.unlearn.stop_refine} without unlearn.stop_at: it refines "
            "where a run stops at a forgetting level; set unlearn.stop_at (e.g. forget_prob<=reference) or "
            "unlearn.stop_refine=0"
        )
    if config.unlearn.stop_refine and config.run.devices > 1:
        raise ConfigError(
            f"invalid config: unlearn.stop_refine={config.unlearn.stop_refine} with run.devices={config.run.devices}: "
            "the refinement keeps a copy of the trainable parameters of one process; use run.devices=1 or "
            "unlearn.stop_refine=0"
        )
    if config.unlearn.stop_at is not None:
        # Here, not when the config loads: `simu eval` of a LUME model with the default config unlearns nothing.
        from simu_core.stop_rule import parse_stop_at

        rule = parse_stop_at(config.unlearn.stop_at)
        if rule.measure not in info.stop_measures:
            offered = (f"its stop measures are {list(info.stop_measures)}" if info.stop_measures
                       else f"{info.short} has no stop measure, nor a retain reference by default")
            raise ConfigError(
                f"invalid config: unlearn.stop_at={config.unlearn.stop_at!r} with data.benchmark={benchmark!r}: "
                f"{rule.measure} is not one of this benchmark's forget measures; {offered}. Set unlearn.stop_at=null "
                "(the default config stops at the retain reference's forget probability) or one of its measures"
            )
        if rule.level is None and rule.measure not in info.reference_levels:
            raise ConfigError(
                f"invalid config: unlearn.stop_at={config.unlearn.stop_at!r} with data.benchmark={benchmark!r}: "
                f"{info.title} has no retain reference whose {rule.measure} gives the level; give a number"
            )
    if benchmark == "wmdp" and not model.target:
        raise ConfigError(
            "invalid config: data.benchmark='wmdp' unlearns a given model (model.target, e.g. "
            "HuggingFaceH4/zephyr-7b-beta as in the WMDP paper): it fine-tunes no target from model.base"
        )
    if benchmark == "wmdp" and config.data.corpora_source is None:
        raise ConfigError(
            "invalid config: data.benchmark='wmdp' with data.corpora_source=null: unlearning reads WMDP's forget and "
            "retain corpora; set data.corpora_source to a local folder of <subset>-forget-corpus.jsonl and "
            "<subset>-retain-corpus.jsonl, or to 'hub' (cais/wmdp-corpora; `simu eval` needs no corpus)"
        )
    if model.target and not (model.retain_reference or model.base) and info.retain_reference:
        raise ConfigError(
            "invalid config: model.target is set: also set model.retain_reference (or model.base to train one) "
            "so that forget quality has its reference (`simu eval --model` evaluates a model without one)"
        )


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SimuConfig:
    """Load a config: the built-in default (or ``path``), then ``--set`` overrides, validated."""
    tree = read_config_file(path or DEFAULT_CONFIG_PATH)
    return config_from_dict(apply_overrides(tree, overrides))
