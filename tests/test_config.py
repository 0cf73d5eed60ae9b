"""Configuration: YAML default, --set overrides, validation messages that name the field."""

from __future__ import annotations

import pytest

from simu_core.config import ConfigError, SimuConfig, apply_overrides, check_pipeline_models, load_config


def test_default_yaml_loads_and_matches_sections():
    config = load_config()
    assert isinstance(config, SimuConfig)
    assert config.data.benchmark == "synthetic"
    assert set(config.model_dump()) == {"model", "data", "attribution", "mask", "knockout", "unlearn", "relearn", "attacks", "attack", "eval", "run"}


def test_overrides_are_typed_and_applied():
    config = load_config(overrides=["mask.threshold=0.35", "unlearn.method=so_graddiff", "run.tags=[a, b]"])
    assert config.mask.threshold == 0.35
    assert config.unlearn.method == "so_graddiff"
    assert config.run.tags == ["a", "b"]


@pytest.mark.parametrize(
    "override, field",
    [
        ("mask.threshold=0", "mask.threshold"),
        ("mask.threshold=1.5", "mask.threshold"),
        ("unlearn.lr=-1e-5", "unlearn.lr"),
        ("attribution.steps=0", "attribution.steps"),
        ("data.split=forget07", "data.split"),
        ("data.benchmark=wikitext", "data.benchmark"),
        ("unlearn.method=magic", "unlearn.method"),
        ("unlearn.hessian=adam", "unlearn.hessian"),
        ("unlearn.betas=[0.9, 1.0]", "unlearn.betas"),
        ("mask.colour=red", "mask.colour"),
        ("model.tiny.num_heads=3", "model.tiny"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert field in str(error.value)


def test_real_benchmark_requires_a_model():
    with pytest.raises(ConfigError, match="model.base or model.target"):
        load_config(overrides=["data.benchmark=lume"])
    # A target without a retain reference: a valid config (``simu eval``), refused by the pipeline.
    given_target = load_config(overrides=["data.benchmark=tofu", "model.target=org/tofu-target"])
    with pytest.raises(ConfigError, match="model.retain_reference"):
        check_pipeline_models(given_target)
    assert load_config(overrides=["data.benchmark=tofu"]).model.base is None  # tiny model trained on TOFU


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["threshold"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mask: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_hash_is_stable_and_sensitive():
    first = load_config().config_hash()
    assert first == load_config().config_hash()
    assert first != load_config(overrides=["mask.threshold=0.3"]).config_hash()
    assert apply_overrides({}, ["a.b=1"]) == {"a": {"b": 1}}


@pytest.mark.parametrize(
    "overrides, max_length, max_new_tokens",
    [
        ([], 128, 48),  # the built-in benchmark's short items
        (["data.benchmark=tofu"], 512, 200),  # TOFU's reference evaluator
        (["data.benchmark=lume", "model.base=org/model"], 512, 256),
        (["data.benchmark=tofu", "model.max_length=256"], 256, 200),  # set explicitly: kept
        (["data.benchmark=tofu", "eval.max_new_tokens=64"], 512, 64),
        (["model.max_length=96", "eval.max_new_tokens=8"], 96, 8),
    ],
)
def test_benchmark_dependent_defaults_follow_the_benchmark(overrides, max_length, max_new_tokens):
    config = load_config(overrides=overrides)
    assert (config.model.max_length, config.eval.max_new_tokens) == (max_length, max_new_tokens)
    # Resolved once: the dumped config round-trips to the same values.
    again = SimuConfig.model_validate(config.model_dump(mode="json"))
    assert (again.model.max_length, again.eval.max_new_tokens) == (max_length, max_new_tokens)


def test_benchmark_defaults_match_the_evaluators_and_bad_values_name_the_field():
    from simu_core.config import BENCHMARK_DEFAULTS
    from simu_core.evaluation import LUME_MAX_NEW_TOKENS, TOFU_MAX_NEW_TOKENS

    assert BENCHMARK_DEFAULTS["tofu"]["eval.max_new_tokens"] == TOFU_MAX_NEW_TOKENS
    assert BENCHMARK_DEFAULTS["lume"]["eval.max_new_tokens"] == LUME_MAX_NEW_TOKENS
    assert set(BENCHMARK_DEFAULTS) == set(SimuConfig.model_fields["data"].annotation.model_fields["benchmark"]
                                          .annotation.__args__)
    with pytest.raises(ConfigError, match="model.max_length"):
        load_config(overrides=["data.benchmark=tofu", "model.max_length=4"])
    with pytest.raises(ConfigError, match="data.benchmark"):
        load_config(overrides=["data.benchmark=mmlu"])
