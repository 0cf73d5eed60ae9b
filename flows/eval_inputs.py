"""``simu eval``'s inputs, checked before Prefect is imported: its config and the model folders."""

from __future__ import annotations

from pathlib import Path

from simu_core.config import ConfigError, SimuConfig, load_config


def eval_config(model: str, reference: str | None = None, overrides: list[str] | None = None,
                config_path: str | None = None) -> SimuConfig:
    """The config of an evaluation: ``model.target`` = the model, ``model.retain_reference`` = the reference."""
    if not model or not str(model).strip():
        raise ConfigError("--model: give a model folder or a Hugging Face hub id")
    given = [f"model.target={model}"] + ([f"model.retain_reference={reference}"] if reference else [])
    for override in overrides or []:
        if override.split("=", 1)[0].strip() in ("model.target", "model.retain_reference"):
            raise ConfigError(f"{override!r}: give the model with --model and the reference with --reference")
    # A retain reference named by the config file is used when --reference is not given.
    return load_config(config_path, [*(overrides or []), *given])


def check_model_folders(config: SimuConfig) -> None:
    """A local model folder must exist and hold a Hugging Face model (``config.json``, or
    ``model/config.json`` as ``simu``'s training stages write): a clear error naming the option
    before any stage, not a loader's traceback. Hub ids are checked when they are loaded."""
    for option, reference in (("--model", config.model.target), ("--reference", config.model.retain_reference)):
        if not reference:
            continue
        folder = Path(reference).expanduser()
        if reference.startswith(("/", ".", "~")) and not folder.exists():
            raise ConfigError(f"{option}: folder {reference!r} does not exist")
        if folder.is_file():
            raise ConfigError(f"{option}: {reference!r} is a file; give a model folder or a hub id")
        if folder.is_dir() and not any((folder / sub / "config.json").is_file() for sub in (".", "model")):
            raise ConfigError(f"{option}: folder {reference!r} holds no Hugging Face model (no config.json)")


def eval_run_name(config: SimuConfig) -> str:
    """``eval-<data>-<model folder or hub name>`` (``<data>``: :func:`~simu_core.benchmarks.info.data_label`),
    or ``run.name``."""
    if config.run.name:
        return config.run.name
    path = Path(str(config.model.target).rstrip("/"))
    model = path.name or str(config.model.target)
    if len(model) > 32 and all(char in "0123456789abcdef" for char in model):
        model = f"{path.parent.name}-{model[:8]}"  # a store entry, e.g. unlearn/<key>/
    from simu_core.benchmarks.info import data_label

    return "-".join(["eval", data_label(config.data), model])
