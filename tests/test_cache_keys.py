"""Cache keys see every input and nothing else (issue 11, defect 4).

The table-driven test changes one config field at a time and checks, for every stage that
``stage_params`` returns, that its key changes exactly when the stage's output depends on that
field. Every config field must be classified in the table: a new field fails here until it is.
"""

from __future__ import annotations

import fnmatch
import shutil
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from flows.params import stage_params
from simu_core.config import SimuConfig, config_from_dict, flatten, load_config
from simu_core.method_names import LEGACY_METHODS, LOSS_SETTINGS

ATTACKS = {"attack_quantize", "attack_paraphrase", "attack_in_context", "attack_logit_lens"}
ALL_MODEL_USERS = {"attribute", "unlearn", "evaluate", "evaluate_reference", "knockout", "relearn",
                   "generate_alternates", *ATTACKS}
TRAININGS = {"train_target", "train_retain_reference"}

# (field pattern, stages whose output the field changes); the first matching row wins.
# Rows for fields that do not depend on where the models come from.
COMMON_ROWS = [
    ("data.source", set()),  # the synthetic benchmark is generated, not read
    ("data.requests", set()),  # the flow passes each request's items to select_request (its own key)
    ("data.*", {"prepare_data"}),
    # The knockout attributes and thresholds on half of the items itself, with the run's settings.
    ("attribution.*", {"attribute", "knockout"}),
    ("mask.top_fraction", {"threshold_mask"}),  # the default layer-relative rule: the knockout does not read it
    ("mask.*", {"threshold_mask", "knockout"}),
    ("knockout.enabled", set()),
    ("knockout.*", {"knockout"}),
    ("unlearn.checkpoint_every", set()),  # resuming is bit-identical: only how often progress is saved
    ("unlearn.gradient_checkpointing", set()),  # recomputes activations: same results (test_checkpointing.py)
    # AltPO's alternates are sampled by their own stage (the unlearn stage reads its output, an input).
    ("unlearn.altpo_*", {"generate_alternates"}),
    # Settings of losses the default method (simu: GradDiff) does not read (each loss's own: the test below).
    *[(f"unlearn.{field}", set()) for fields in LOSS_SETTINGS.values() for field in fields],
    # The default stops at a level (unlearn.stop_at), so its settings key unlearning (without one: the test below).
    ("unlearn.*", {"unlearn"}),
    ("eval.mmlu_source", set()),  # LUME only
    ("relearn.enabled", set()),
    ("relearn.*", {"relearn"}),
    ("attacks", set()),  # which attacks run, not what one computes
    ("attack.quantize.*", {"attack_quantize"}),
    ("attack.in_context.*", {"attack_in_context"}),
    ("attack.retain_items", {"attack_quantize", "attack_logit_lens"}),
    ("eval.reference_full", {"evaluate_reference"}),
    # The relearning attack measures with the evaluation's prompt template, batches and generation length.
    # Unlearning's stop checks measure with the evaluation's items, template and batches (the default stops).
    # The other attacks measure the evaluation's forget items (eval.max_items); the logit lens generates nothing.
    ("eval.template", {"evaluate", "evaluate_reference", "relearn", "unlearn", *ATTACKS}),
    ("eval.batch_size", {"evaluate", "evaluate_reference", "relearn", "unlearn", "generate_alternates", *ATTACKS}),
    ("eval.max_items", {"evaluate", "evaluate_reference", "unlearn", *ATTACKS}),
    ("eval.max_new_tokens", {"evaluate", "evaluate_reference", "relearn", *ATTACKS - {"attack_logit_lens"}}),
    ("eval.*", {"evaluate", "evaluate_reference"}),
    ("run.seed", {"attribute", "unlearn", "relearn", "generate_alternates", "attack_in_context"}),  # the knockout has knockout.seed: a seed sweep shares it
    ("run.dtype", {"unlearn"}),  # autocast: only the unlearning trainer uses it
    ("run.*", set()),  # device, devices (FSDP: same result within rounding), store, results, name, tags, fault injection
]
# The built-in default: the tiny model is trained from scratch with the data stage's tokenizer.
TINY_ROWS = [
    ("data.benchmark", {"prepare_data"} | TRAININGS | ALL_MODEL_USERS),  # with it, its max_length etc.
    ("model.base", {"prepare_data"} | TRAININGS),
    ("model.target", {"prepare_data"} | TRAININGS),  # set with a retain reference (required)
    ("model.retain_reference", {"train_retain_reference"}),
    ("model.max_length", TRAININGS | ALL_MODEL_USERS),
    ("model.tiny.vocab_size", {"prepare_data"} | TRAININGS),
    ("model.tiny.*", TRAININGS),
    ("model.finetune.gradient_checkpointing", set()),  # same results (test_checkpointing.py)
    ("model.finetune.*", TRAININGS),
    ("model.*", ALL_MODEL_USERS),  # tokenizer, dtype, trust_remote_code: how the models are loaded
]
# Target and retain reference given as local folders: nothing is trained.
EXTERNAL_ROWS = [
    ("data.benchmark", {"prepare_data"} | ALL_MODEL_USERS),
    ("model.target", {"train_target"}),
    ("model.retain_reference", {"train_retain_reference"}),
    ("model.base", set()),
    ("model.tiny.*", set()),
    ("model.finetune.*", set()),
    ("model.*", ALL_MODEL_USERS),  # tokenizer, dtype, trust_remote_code, max_length
]


def write_model_folder(folder: Path, weights: bytes = b"\0" * 64) -> Path:
    """A stand-in for a Hugging Face model folder (only its files are fingerprinted here)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-keys")
    return {name: write_model_folder(root / name, weights=name.encode() * 8) for name in ("a", "b", "c", "d")}


def expected_stages(rows, field: str) -> set[str]:
    for pattern, stages in rows:
        if fnmatch.fnmatchcase(field, pattern):
            return stages
    raise AssertionError(f"config field {field!r} is in no row of the cache-key table: add it with the stages "
                         "whose output it changes")


def _annotation(field: str):
    node: type[BaseModel] = SimuConfig
    *sections, name = field.split(".")
    for section in sections:
        node = node.model_fields[section].annotation
    return node.model_fields[name].annotation


def _candidates(field: str, value, folders) -> list:
    """Alternative values for a field, in order of preference (the first valid one is used)."""
    if field in ("model.base", "model.target", "model.retain_reference", "model.tokenizer", "data.source",
                 "eval.mmlu_source"):
        return [str(folders["c"])] if value != str(folders["c"]) else [str(folders["d"])]
    if field == "unlearn.stop_at":
        return ["forget_prob<=0.2"] if value is None else [None]
    if field == "unlearn.method":
        return [name for name in LEGACY_METHODS if name != value]
    if field in ("unlearn.loss", "unlearn.optimizer", "unlearn.scope"):  # folded into unlearn.method
        return {"unlearn.loss": ["npo"], "unlearn.optimizer": ["adamw"], "unlearn.scope": ["all"]}[field]
    if field == "attack.quantize.scheme":
        return [scheme for scheme in ("symmetric", "asymmetric") if scheme != value]
    if field == "attack.quantize.group_size":
        return [64] if value != 64 else [None]
    if field == "attacks":
        return [["quantize"]] if value != ["quantize"] else [[]]
    annotation = _annotation(field)
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return [choice for choice in typing.get_args(annotation) if choice != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, list):
        if field == "unlearn.betas":
            return [[0.8, 0.9]]
        if value and all(isinstance(item, (int, float)) for item in value):
            return [value[:-1], [*value, value[-1] * 2]]
        return [["other"]] if not value or value[0] != "other" else [[]]
    if value is None:
        kind = args[0] if args else str
        if typing.get_origin(kind) is typing.Literal:
            return list(typing.get_args(kind))
        return {int: [2, 3], float: [0.5], str: ["other"]}.get(kind, [])
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2]
    if isinstance(value, float):
        return [value * 0.5, value + 0.01, 0.5, 0.25]
    if isinstance(value, str):
        return [value + "-other"]
    return []


def _changed(base: dict, field: str, value) -> dict:
    tree = {section: dict(fields) if isinstance(fields, dict) else fields for section, fields in base.items()}
    *sections, name = field.split(".")
    node = tree
    for section in sections:
        node[section] = dict(node[section])
        node = node[section]
    node[name] = value
    return tree


def _vary(base: dict, field: str, folders, companions: dict[str, str]) -> SimuConfig:
    """The config ``base`` (a raw tree) with ``field`` changed to a valid other value (plus its
    companion field)."""
    value = flatten(base)[field]
    for candidate in _candidates(field, value, folders):
        if candidate == value:
            continue
        tree = _changed(base, field, candidate)
        if field in companions:
            tree = _changed(tree, companions[field], str(folders["b"]))
        try:
            return config_from_dict(tree)
        except ValueError:
            continue
    raise AssertionError(f"no valid alternative value for {field!r} (value {value!r}): extend _candidates")


def _raw_tree(config: SimuConfig) -> dict:
    # Benchmark defaults are filled when validated: vary from the raw tree with them unset, so that
    # changing data.benchmark brings the other benchmark's defaults, as it does from the YAML file.
    tree = config.model_dump(mode="json")
    tree["model"]["max_length"] = None
    tree["eval"]["max_new_tokens"] = None
    return tree


SCENARIOS = {
    "tiny": (lambda folders: [], TINY_ROWS, {"model.target": "model.retain_reference"}),
    "external": (lambda folders: [f"model.target={folders['a']}", f"model.retain_reference={folders['b']}"],
                 EXTERNAL_ROWS, {}),
}
STAGES = sorted(stage_params(load_config()))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_stage_key_changes_exactly_with_its_inputs(stage, scenario, folders):
    overrides, model_rows, companions = SCENARIOS[scenario]
    base = load_config(overrides=overrides(folders))
    rows = model_rows + COMMON_ROWS
    reference = stage_params(base)
    assert set(reference) == set(STAGES)
    wrong = []
    for field in sorted(base.flat()):
        if field in OTHER_BENCHMARK_FIELDS:  # refused with this benchmark: test_data_key_per_benchmark
            continue
        expected = stage in expected_stages(rows, field)
        tree = _raw_tree(base) if field == "data.benchmark" else base.model_dump(mode="json")
        varied = _vary(tree, field, folders, companions)
        changed = stage_params(varied)[stage] != reference[stage]
        if changed != expected:
            wrong.append(f"{field}: key {'changes' if changed else 'unchanged'}, expected "
                         f"{'a change' if expected else 'no change'}")
    assert not wrong, f"stage {stage!r} ({scenario}):\n" + "\n".join(wrong)


#: Data fields only MUSE or WMDP read; the config refuses them with another benchmark (test_config).
OTHER_BENCHMARK_FIELDS = ("data.corpus", "data.retain_split", "data.forget_text", "data.subset", "data.corpora_source",
                          "data.max_texts")
#: Per benchmark: a valid value for each data field, and the fields it must ignore.
DATA_KEY_CASES = {
    "muse": ({"corpus": "books", "retain_split": "privleak/retain2", "forget_text": "excerpts", "max_texts": 3,
              "source": "/elsewhere"}, ("split", "retain_authors", "num_authors", "seed")),
    "wmdp": ({"subset": "cyber", "corpora_source": "/corpora", "max_texts": 3, "source": "/questions.jsonl"},
             ("split", "retain_authors", "num_authors", "seed")),
    "lume": ({"source": "/elsewhere"}, ("split", "retain_authors", "num_authors", "seed")),
}


@pytest.mark.parametrize("benchmark", sorted(DATA_KEY_CASES))
def test_data_key_per_benchmark(benchmark, folders):
    """prepare_data's key holds exactly the data fields the benchmark's registry row says its loader reads."""
    from simu_core.benchmarks.info import BENCHMARK_INFO

    values, ignored = DATA_KEY_CASES[benchmark]
    base = [f"data.benchmark={benchmark}", f"model.target={folders['a']}", f"model.retain_reference={folders['b']}"]
    reference = stage_params(load_config(overrides=base))["prepare_data"]
    assert set(values) == set(BENCHMARK_INFO[benchmark].data_fields) - {"benchmark"}
    for field, value in values.items():
        key = stage_params(load_config(overrides=[*base, f"data.{field}={value}"]))["prepare_data"]
        assert key != reference, field
    for field in ignored:
        value = {"split": "forget01", "retain_authors": 5, "num_authors": 20, "seed": 3}[field]
        key = stage_params(load_config(overrides=[*base, f"data.{field}={value}"]))["prepare_data"]
        assert key == reference, field


def test_prepare_data_key_sees_whether_the_tiny_tokenizer_is_written(folders):
    with_target = load_config(overrides=[f"model.target={folders['a']}", f"model.retain_reference={folders['b']}"])
    without = load_config(overrides=[f"model.retain_reference={folders['b']}"])
    assert stage_params(with_target)["prepare_data"] != stage_params(without)["prepare_data"]


def test_external_folder_is_keyed_by_content(tmp_path):
    from tasks.caching import external_model_ref

    folder = write_model_folder(tmp_path / "target", weights=b"\1" * 4096)
    overrides = [f"model.target={folder}", f"model.retain_reference={folder}"]
    first = stage_params(load_config(overrides=overrides))["train_target"]
    # Retrained in place: same names, same sizes, other weights.
    (folder / "model.safetensors").write_bytes(b"\2" * 4096)
    retrained = stage_params(load_config(overrides=overrides))["train_target"]
    assert retrained != first
    ref_first = external_model_ref(str(folder), first["external"])
    ref_retrained = external_model_ref(str(folder), retrained["external"])
    assert ref_first["key"] != ref_retrained["key"] and ref_first["uri"] == ref_retrained["uri"]
    # The same files under another path are the same model.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    moved = stage_params(load_config(overrides=[f"model.target={copy}", f"model.retain_reference={folder}"]))
    assert moved["train_target"] == retrained


def test_large_weight_files_are_sampled_and_still_change_the_key(tmp_path, monkeypatch):
    from simu_core.models import identity

    monkeypatch.setattr(identity, "SMALL_FILE_BYTES", 1024)
    folder = write_model_folder(tmp_path / "big", weights=bytes(range(256)) * 4096)  # 1 MiB: sampled
    first = identity.folder_fingerprint(folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a sample (the middle of the file)
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert identity.folder_fingerprint(folder) != first


def test_hub_id_is_keyed_by_its_resolved_commit(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    commits = iter(["1" * 40, "1" * 40, "2" * 40])
    asked = []

    def model_info(self, repo_id, revision=None, **_):
        asked.append((repo_id, revision))
        return types.SimpleNamespace(sha=next(commits))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    overrides = ["model.target=org/fine-tuned", f"model.retain_reference={write_model_folder(tmp_path / 'r')}"]
    first, same, new_revision = (stage_params(load_config(overrides=overrides))["train_target"] for _ in range(3))
    assert first == same != new_revision
    assert first["external"] == {"kind": "hub", "id": "org/fine-tuned", "commit": "1" * 40}
    assert asked[0] == ("org/fine-tuned", "main")


def test_hub_id_offline_uses_the_cached_commit_or_names_the_field(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    overrides = ["model.target=org/fine-tuned", f"model.retain_reference={write_model_folder(tmp_path / 'r')}"]
    with pytest.raises(ValueError, match=r"model\.target: cannot resolve hub id 'org/fine-tuned'"):
        stage_params(load_config(overrides=overrides))
    ref = tmp_path / "hub" / "models--org--fine-tuned" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("3" * 40 + "\n")
    assert stage_params(load_config(overrides=overrides))["train_target"]["external"]["commit"] == "3" * 40


def test_missing_model_folder_names_the_field(tmp_path):
    config = load_config(overrides=[f"model.retain_reference={tmp_path / 'absent'}"])
    with pytest.raises(ValueError, match=r"model\.retain_reference: model folder .* does not exist"):
        stage_params(config)


@pytest.fixture()
def core_copy(tmp_path, monkeypatch):
    """versions.py reading a throwaway copy of simu_core (and data/), so files can be edited."""
    from simu_core.paths import PROJECT_ROOT
    from tasks import versions

    root = tmp_path / "repo"
    shutil.copytree(PROJECT_ROOT / "simu_core", root / "simu_core", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT_ROOT / "data" / "synthetic", root / "data" / "synthetic")
    monkeypatch.setattr(versions, "_CORE", root / "simu_core")
    for cached in (versions._import_closure, versions.stage_code_version):
        cached.cache_clear()
    yield root / "simu_core"
    for cached in (versions._import_closure, versions.stage_code_version):
        cached.cache_clear()


# Per edited file: the stages whose code version must change (every other stage keeps its own).
CODE_EDITS = {
    # encode_frame; relearn: a corpus benchmark relearns on its encoded windows.
    "finetune.py": {"train_target", "train_retain_reference", "attribute", "unlearn", "knockout", "relearn"},
    "data/lume.py": {"prepare_data", "select_request", "train_target", "train_retain_reference", "attribute",
                     "knockout", "unlearn", "evaluate", "evaluate_reference", "relearn", "generate_alternates",
                     *ATTACKS},
    "attribution.py": {"attribute", "threshold_mask", "knockout"},  # knockout reads scores_from_table
    "unlearning/losses.py": {"unlearn"},
    # unlearn: stop_at's checks; generate_alternates: through the evaluation package (its sampling).
    "evaluation/qa.py": {"evaluate", "evaluate_reference", "relearn", "unlearn", "generate_alternates", *ATTACKS},
    # Each attack's module keys its own stage; what they all measure with keys them all; the robustness
    # formulas are the report's (no stage).
    "attacks/quantize.py": {"attack_quantize"},
    "attacks/in_context.py": {"attack_in_context"},
    "attacks/logit_lens.py": {"attack_logit_lens"},
    "attacks/measures.py": {*ATTACKS, "relearn"},
    "attacks/robustness.py": set(),
    # What quantization and relearning measure on each benchmark (not evaluation's or unlearning's code).
    "benchmarks/attack_measures.py": {"attack_quantize", "relearn"},
    "alternates.py": {"generate_alternates"},
    "preferred.py": {"unlearn"},
    "../data/synthetic/templates.yaml": {"prepare_data"},
}


@pytest.mark.parametrize("edited", sorted(CODE_EDITS))
def test_code_version_follows_the_code_a_stage_runs(core_copy, edited):
    from tasks import versions

    stages = sorted(versions.STAGE_MODULES)
    before = {stage: versions.stage_code_version(stage) for stage in stages}
    with (core_copy / edited).open("a") as handle:
        handle.write("\n# edited\n")
    versions.stage_code_version.cache_clear()
    versions._import_closure.cache_clear()
    changed = {stage for stage in stages if versions.stage_code_version(stage) != before[stage]}
    assert changed == CODE_EDITS[edited] & set(stages)


def test_loss_settings_key_the_unlearn_stage_only_for_their_loss(tmp_path):
    # Each loss's own settings change the unlearn key of a method with that loss and no other method's.
    idk = tmp_path / "idk.txt"
    idk.write_text("I don't know.\n")
    preferred = tmp_path / "preferred.jsonl"
    preferred.write_text('{"question": "q", "answer": "a"}\n')
    files = [f"unlearn.idk_source={idk}", f"unlearn.preferred_source={preferred}"]
    for loss, fields in LOSS_SETTINGS.items():
        for field in fields:
            if field in ("idk_source", "preferred_source"):
                continue  # keyed by content: the test below
            base = load_config(overrides=[f"unlearn.loss={loss}", "unlearn.rmu_layer=2", *files])
            value = getattr(base.unlearn, field)
            other = value + 1 if isinstance(value, int) else (value * 0.5 if value else 0.5)
            key = stage_params(base)["unlearn"]
            varied = stage_params(load_config(overrides=[f"unlearn.loss={loss}", "unlearn.rmu_layer=2", *files,
                                                         f"unlearn.{field}={other}"]))["unlearn"]
            assert (varied != key) == (field not in ("altpo_alternates", "altpo_max_new_tokens", "altpo_temperature")), \
                (loss, field)
            simu = [stage_params(load_config(overrides=[*files, *extra]))["unlearn"]
                    for extra in ([], [f"unlearn.{field}={other}"])]
            assert simu[0] == simu[1], (loss, field)


def test_preferred_answer_files_are_keyed_by_content(tmp_path):
    first, moved = tmp_path / "idk.txt", tmp_path / "elsewhere.txt"
    first.write_text("I don't know.\n")
    moved.write_text("I don't know.\n")
    keys = [stage_params(load_config(overrides=["unlearn.loss=idk_dpo", f"unlearn.idk_source={path}"]))["unlearn"]
            for path in (first, moved)]
    assert keys[0] == keys[1]  # the same answers under another name
    first.write_text("I have no idea.\n")
    assert stage_params(load_config(overrides=["unlearn.loss=idk_dpo", f"unlearn.idk_source={first}"]))[
        "unlearn"] != keys[0]
    preferred = tmp_path / "preferred.jsonl"
    preferred.write_text('{"question": "q", "answer": "a"}\n')
    before = stage_params(load_config(overrides=["unlearn.loss=dpo", f"unlearn.preferred_source={preferred}"]))
    preferred.write_text('{"question": "q", "answer": "b"}\n')
    after = stage_params(load_config(overrides=["unlearn.loss=dpo", f"unlearn.preferred_source={preferred}"]))
    assert before["unlearn"] != after["unlearn"]


def test_version_1_methods_keep_their_unlearn_keys():
    # Recorded with the code before losses x optimizers x scopes (commit 5d099bb): the key parameters of the
    # eight version-1 methods, with and without a stop level, are unchanged, so their cache entries still serve.
    import json

    recorded = json.loads((Path(__file__).parent / "data" / "unlearn_keys_v1.json").read_text())
    for name, params in recorded.items():
        method, stop = name.split("/")
        config = load_config(overrides=[f"unlearn.method={method}", f"unlearn.stop_at={stop}"])
        assert json.loads(json.dumps(stage_params(config)["unlearn"], sort_keys=True)) == params, name


def test_the_knockout_key_ignores_what_cannot_change_its_critical_set():
    # The random rule's critical sets are the layer-relative ones and run.seed draws only the trained mask.
    knockout = [stage_params(load_config(overrides=overrides))["knockout"] for overrides in (
        [], ["mask.rule=random"], ["mask.rule=random", "run.seed=1"], ["run.seed=1"])]
    assert all(params == knockout[0] for params in knockout)
    assert stage_params(load_config(overrides=["mask.rule=random", "mask.threshold=0.3"]))["knockout"] != knockout[0]
    # The global rule reads its fraction, not t.
    global_rule = stage_params(load_config(overrides=["mask.rule=global_top_fraction"]))["knockout"]
    assert stage_params(load_config(overrides=["mask.rule=global_top_fraction", "mask.threshold=0.3"]))[
        "knockout"] == global_rule != knockout[0]
    assert stage_params(load_config(overrides=["mask.rule=global_top_fraction", "mask.top_fraction=0.1"]))[
        "knockout"] != global_rule


def test_every_keyed_stage_has_a_code_version():
    from tasks.versions import stage_code_version

    for stage in stage_params(load_config()):
        assert len(stage_code_version(stage)) == 16


def test_hub_lookup_failure_falls_back_to_the_cache(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    from simu_core.models.identity import model_fingerprint

    def unreachable(self, repo_id, revision=None, **_):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ValueError, match=r"model\.base: .*hub lookup failed \(ConnectionError: no route to host\)"):
        model_fingerprint("org/base", "model.base")
    ref = tmp_path / "hub" / "models--org--base" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("4" * 40)
    assert model_fingerprint("org/base", "model.base")["commit"] == "4" * 40


def test_the_stop_settings_key_unlearning_only_when_it_stops():
    """unlearn.stop_at, its settings and the evaluation settings its checks use are in the unlearn key
    with a stop level, in no key without one; other stages never see them."""
    def keys(*overrides: str) -> dict:
        return stage_params(load_config(overrides=["unlearn.stop_at=null", *overrides]))

    base = keys()
    stopped = keys("unlearn.stop_at=forget_prob<=reference")
    assert stopped["unlearn"] != base["unlearn"]
    assert {stage: params for stage, params in stopped.items() if stage != "unlearn"} == \
        {stage: params for stage, params in base.items() if stage != "unlearn"}
    for field in ("unlearn.eval_every=3", "unlearn.stop_tolerance=0.2", "unlearn.stop_retain_items=8",
                  "unlearn.stop_refine=6", "eval.max_items=10", "eval.template=open_unlearning", "eval.batch_size=4"):
        assert keys(field)["unlearn"] == base["unlearn"], field  # no stop level: nothing to read them
        assert keys("unlearn.stop_at=forget_prob<=reference", field)["unlearn"] != stopped["unlearn"], field
    assert keys("unlearn.stop_at=forget_prob<=0.2")["unlearn"] != stopped["unlearn"]
    assert keys("unlearn.stop_at=forget_prob <= reference")["unlearn"] == stopped["unlearn"]  # one spelling
    # Settings the checks never read stay out of the key.
    assert keys("unlearn.stop_at=forget_prob<=reference", "eval.max_new_tokens=7")["unlearn"] == stopped["unlearn"]
