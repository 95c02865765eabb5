"""Where the shipped configs live: every command composes from this one folder."""

from pathlib import Path

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
