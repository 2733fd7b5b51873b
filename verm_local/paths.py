"""Where verm-local keeps things: the model store (VERM_LOCAL_HOME) and a cache for
build inputs such as the llama.cpp sources (VERM_LOCAL_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home_dir() -> Path:
    """The model store: VERM_LOCAL_HOME, else the platform's user cache dir."""
    env = os.environ.get("VERM_LOCAL_HOME")
    return Path(env) if env else Path(platformdirs.user_cache_dir("verm-local")) / "models"


def cache_dir() -> Path:
    """Cache for build inputs (llama.cpp sdist parts): VERM_LOCAL_CACHE, else the user cache."""
    env = os.environ.get("VERM_LOCAL_CACHE")
    return Path(env) if env else Path(platformdirs.user_cache_dir("verm-local"))
