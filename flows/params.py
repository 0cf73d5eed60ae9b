"""Which configuration fields each stage reads: its cache-key parameters.

A stage's key covers exactly these fields, so changing ``mask.threshold`` re-runs only
threshold_mask and what follows, changing ``attribution.steps`` re-runs attribution onwards, and
changing ``unlearn.lr`` re-runs unlearning onwards. Fields that do not change results (device,
number of devices, store, results folder, run name, tags, fault injection, gradient checkpointing)
are in no key.
"""

from __future__ import annotations

from typing import Any

from simu_core.benchmarks.info import BENCHMARK_INFO, BenchmarkInfo, data_label
from simu_core.config import SimuConfig
from simu_core.method_names import parse_method, settings_outside_key
from simu_core.preferred import preferred_identity
from simu_core.models.identity import model_fingerprint
from simu_core.stages import knockout_mask_settings, uses_tiny_model


def uses_mask(config: SimuConfig) -> bool:
    """True when the unlearning method trains only critical neurons (needs attribution)."""
    return parse_method(config.unlearn.method).needs_mask


def _data_params(data: dict[str, Any]) -> dict[str, Any]:
    """The data fields that change the prepared benchmark: those its registry row says the loader
    reads (``simu_core.benchmarks.info``), in the config's order.

    ``requests`` is not one of them: prepare_data writes the whole benchmark, each request's
    select_request stage cuts its forget items from it (keyed by those items), so adding a request
    re-keys nothing that ran before it.
    """
    reads = BENCHMARK_INFO[data["benchmark"]].data_fields
    return {key: value for key, value in data.items() if key in reads}


def _fingerprint(reference: str | None, field: str) -> dict[str, Any] | None:
    """A model the user names, keyed by content (folder files or hub commit), not by its name."""
    return model_fingerprint(reference, field) if reference else None


def stage_params(config: SimuConfig) -> dict[str, dict[str, Any]]:
    """Cache-key parameters of every stage: the config fields that change its output, nothing else.

    Models and tokenizers the user names are keyed by content (:func:`model_fingerprint`); a model
    an earlier stage produced is keyed through that stage's input key. ``run.dtype`` (autocast) is
    keyed only where autocast is used: unlearning.
    """
    tree = config.model_dump(mode="json")
    model, run = tree["model"], tree["run"]
    tiny = uses_tiny_model(config)
    # Gradient checkpointing recomputes activations and leaves results unchanged (tests/test_checkpointing.py).
    model["finetune"] = {key: value for key, value in model["finetune"].items() if key != "gradient_checkpointing"}
    tokenizer = _fingerprint(model["tokenizer"], "model.tokenizer")
    # How a produced or given model is loaded and its inputs encoded (attribute, unlearn, evaluate).
    model_identity = {"tokenizer": tokenizer, "dtype": model["dtype"], "trust_remote_code": model["trust_remote_code"],
                      "max_length": model["max_length"]}
    if tiny:
        # The tiny model is built in float32 with the data stage's tokenizer: model.dtype, model.tokenizer
        # and trust_remote_code only matter when it is loaded later.
        training = {"tiny": model["tiny"], "max_length": model["max_length"], "finetune": model["finetune"]}
    else:
        training = {"base": _fingerprint(model["base"], "model.base"), **model_identity, "finetune": model["finetune"]}
    target = {"external": _fingerprint(model["target"], "model.target")} if model["target"] else training
    reference = ({"external": _fingerprint(model["retain_reference"], "model.retain_reference")}
                 if model["retain_reference"] else training)
    evaluation = dict(tree["eval"])
    full_reference = evaluation.pop("reference_full")
    if "mmlu" not in BENCHMARK_INFO[config.data.benchmark].headline:
        evaluation.pop("mmlu_source")  # read only where MMLU is the utility (LUME's final score, WMDP)
    return {
        "prepare_data": {"data": _data_params(tree["data"]), "tiny_tokenizer": tiny,
                         **({"tiny_vocab_size": model["tiny"]["vocab_size"]} if tiny else {})},
        # The forget items it keeps are added by the flow (``items``); the input is prepare_data's output.
        "select_request": {},
        "train_target": target,
        "train_retain_reference": reference,
        "attribute": {"attribution": tree["attribution"], "model": model_identity, "seed": run["seed"]},
        # run.seed draws the random control's neurons; no other rule reads it.
        "threshold_mask": {"mask": tree["mask"], **({"seed": run["seed"]} if tree["mask"]["rule"] == "random" else {})},
        # Its own attribution and threshold on half of the items (no mask input); knockout.seed, not
        # run.seed, splits the items and draws the random sets, so a seed sweep shares one check.
        "knockout": {"knockout": {key: value for key, value in tree["knockout"].items() if key != "enabled"},
                     "attribution": tree["attribution"], "mask": knockout_mask_settings(config),
                     "model": model_identity},
        # checkpoint_every only decides how often progress is saved: resuming is bit-identical; gradient
        # checkpointing recomputes activations with the same results.
        "unlearn": _unlearn_params(tree, model_identity),
        # AltPO's alternates: sampled from the model the run unlearns (an input), with the run's seed.
        "generate_alternates": {"alternates": {key: tree["unlearn"][key] for key in ALTERNATE_FIELDS},
                                "model": model_identity, "seed": run["seed"], "batch_size": tree["eval"]["batch_size"]},
        # The attack measures with the evaluation's template, batch size and generation length (on a
        # corpus benchmark: what its own evaluation reads, as quantization's).
        "relearn": {"relearn": _relearn_settings(tree["relearn"]),
                    "eval": _suite_eval(tree, BENCHMARK_INFO[config.data.benchmark])
                    or {key: tree["eval"][key] for key in ("template", "batch_size", "max_new_tokens")},
                    "model": model_identity, "seed": run["seed"]},
        # The other attacks measure the evaluation's first eval.max_items forget items (and retain items).
        **_attack_params(tree, model_identity, BENCHMARK_INFO[config.data.benchmark]),
        "evaluate": {"eval": evaluation, "model": model_identity},
        # The retain reference: by default only what forget quality and privleak compare.
        "evaluate_reference": {"eval": evaluation, "model": model_identity, "full": full_reference},
    }


def _relearn_settings(relearn: dict[str, Any]) -> dict[str, Any]:
    """``relearn.*`` but ``enabled``; one epoch over the forget set (``forget_epoch``) reads neither
    ``steps`` nor ``fraction``."""
    unread = ("enabled", "steps", "fraction") if relearn["data"] == "forget_epoch" else ("enabled",)
    return {key: value for key, value in relearn.items() if key not in unread}


def _suite_eval(tree: dict[str, Any], info: BenchmarkInfo) -> dict[str, Any] | None:
    """What a corpus benchmark's attack measures read of ``eval`` (its own evaluation fixes prompts and
    generation lengths): the items measured, the batch, and WMDP's MMLU questions; None elsewhere."""
    if info.item_kind != "text":
        return None
    suite = {key: tree["eval"][key] for key in ("batch_size", "max_items")}
    if "mmlu" in info.attack_measures:
        suite["mmlu_source"] = tree["eval"]["mmlu_source"]
    return suite


def _attack_params(tree: dict[str, Any], model_identity: dict[str, Any], info: BenchmarkInfo) -> dict[str, dict[str, Any]]:
    """The keys of the attack stages other than relearning: the settings each reads. On a corpus
    benchmark (MUSE, WMDP) quantization measures with the benchmark's own evaluation, which fixes its
    prompts and generation lengths and reads neither the template nor ``attack.retain_items``; WMDP's
    reads the MMLU questions (``eval.mmlu_source``) when given."""
    evaluation = {key: tree["eval"][key] for key in ("template", "batch_size", "max_new_tokens", "max_items")}
    teacher_forced = {key: value for key, value in evaluation.items() if key != "max_new_tokens"}
    attack = tree["attack"]
    suite = _suite_eval(tree, info)
    if suite:
        quantize = {"quantize": attack["quantize"], "eval": suite, "model": model_identity}
    else:
        quantize = {"quantize": attack["quantize"], "retain_items": attack["retain_items"], "eval": evaluation,
                    "model": model_identity}
    return {
        "attack_quantize": quantize,
        "attack_paraphrase": {"eval": evaluation, "model": model_identity},
        # run.seed splits the forget items into shown and measured and draws the shown ones.
        "attack_in_context": {"in_context": attack["in_context"], "eval": evaluation, "model": model_identity,
                              "seed": tree["run"]["seed"]},
        # No generation: the lens reads teacher-forced probabilities.
        "attack_logit_lens": ({"eval": {key: suite[key] for key in ("batch_size", "max_items")}, "model": model_identity}
                              if suite else
                              {"retain_items": attack["retain_items"], "eval": teacher_forced, "model": model_identity}),
    }


#: Unlearning settings read only when the run stops at a forgetting level (``unlearn.stop_at``).
STOP_FIELDS = ("stop_at", "eval_every", "stop_tolerance", "stop_retain_items", "stop_refine")
#: Evaluation settings the stop checks measure with (which items, template, batching).
STOP_EVAL_FIELDS = ("max_items", "template", "batch_size")
#: AltPO's generation settings (the generate_alternates stage's key; the unlearn stage reads its output).
ALTERNATE_FIELDS = ("altpo_alternates", "altpo_max_new_tokens", "altpo_temperature")
#: File paths the preference losses read: keyed by their content (``preferred``), not their names.
PREFERRED_FILE_FIELDS = ("idk_source", "preferred_source")


def _unlearn_params(tree: dict[str, Any], model_identity: dict[str, Any]) -> dict[str, Any]:
    """The unlearn stage's key: ``unlearn.*`` but ``checkpoint_every`` (resuming is bit-identical) and
    ``gradient_checkpointing`` (same results) and the settings of losses the method does not use
    (``simu_core.method_names.LOSS_SETTINGS``); the stop settings, and the evaluation settings the checks
    use, only with ``stop_at`` (without it they change nothing)."""
    stops = tree["unlearn"]["stop_at"] is not None
    loss = parse_method(tree["unlearn"]["method"]).loss
    excluded = ("checkpoint_every", "gradient_checkpointing", *(() if stops else STOP_FIELDS),
                *settings_outside_key(loss), *PREFERRED_FILE_FIELDS, *ALTERNATE_FIELDS)
    # stop_refine=0 is how runs stopped before the setting existed: left out, their keys still serve.
    excluded += () if tree["unlearn"]["stop_refine"] else ("stop_refine",)
    params = {"unlearn": {key: value for key, value in tree["unlearn"].items() if key not in excluded},
              "model": model_identity, "seed": tree["run"]["seed"], "autocast": tree["run"]["dtype"]}
    preferred = preferred_identity(loss, tree["unlearn"]["idk_source"], tree["unlearn"]["preferred_source"],
                                   tree["data"]["source"])
    if preferred is not None:
        params["preferred"] = preferred
    if stops:
        params["stop_eval"] = {key: tree["eval"][key] for key in STOP_EVAL_FIELDS}
    return params


def run_name(config: SimuConfig) -> str:
    """Readable run name: method, threshold (masked methods), lr and seed, or ``run.name``."""
    if config.run.name:
        return config.run.name
    parts = [data_label(config.data), config.unlearn.method]
    if uses_mask(config):
        parts.append(f"t{config.mask.threshold:g}-{config.mask.variant}-m{config.attribution.steps}")
        if config.mask.score != "forget":
            parts.append(config.mask.score)
        if config.mask.rule != "layer_relative":
            parts.append(config.mask.rule)  # "random": the random-neuron control
        if not config.unlearn.train_attention:
            parts.append("mlp-only")
    parts += [f"lr{config.unlearn.lr:g}", f"s{config.run.seed}"]
    if config.model.finetune.seed:  # another target (and its retain reference)
        parts.append(f"target{config.model.finetune.seed}")
    if config.unlearn.stop_at:
        parts.append(f"stop[{config.unlearn.stop_at}]")
    return "-".join(parts)
