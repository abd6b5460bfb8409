"""The YAML configs shipped with ConceptSmith, found through ``importlib.resources``.

In a checkout they are the files under ``configs/``; in an installed wheel they are package data of
``conceptsmith.configs``. Either way ``configs/bench/shapes-smoke.yaml`` names the same file.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["configs_root", "shipped_config"]


def configs_root() -> Path:
    """The folder holding ``bench/``, ``erase/``, ``customize/`` and ``models/``."""
    return Path(str(files("conceptsmith.configs")))


def shipped_config(ref: str | Path) -> Path:
    """A shipped config by its checkout path (``configs/erase/uce.yaml``) or relative to the configs root
    (``erase/uce.yaml``); the path may not exist (callers report what they tried)."""
    parts = Path(ref).parts
    if parts and parts[0] == "configs":
        parts = parts[1:]
    return configs_root().joinpath(*parts)
