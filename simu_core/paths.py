"""Locations of the files the project ships (``data/``) and of the shared benchmark copies."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = PROJECT_ROOT / "data"
DEFAULT_CONFIG_PATH = DATA_DIR / "configs" / "default.yaml"
SYNTHETIC_DATA_DIR = DATA_DIR / "synthetic"
# Real TOFU / LUME copies kept beside the checkout (read-only; never copied into the repository).
SHARED_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
