"""Configuration (installed as ``egm.config``): ``settings.py`` reads every environment variable;
the folders beside it hold files, not code: prompt templates, labeling-config templates and
``env.example``. Their paths are given here, so nobody else works out where the package lies."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
PROMPTS_DIR = CONFIG_DIR / "prompts"
LABELING_DIR = CONFIG_DIR / "labeling"
