"""Where verm-local keeps things: the model store (VERM_LOCAL_HOME) and a cache for build
inputs, crash logs and the like (VERM_LOCAL_CACHE)."""

from __future__ import annotations

from pathlib import Path

import platformdirs

from .constants import MANIFEST_NAME
from .settings import settings


def home_dir() -> Path:
    """The model store: VERM_LOCAL_HOME, else the platform's user cache dir."""
    return settings().home or Path(platformdirs.user_cache_dir("verm-local")) / "models"


def cache_dir() -> Path:
    """Cache for build inputs (llama.cpp sdist parts) and logs: VERM_LOCAL_CACHE, else the
    user cache."""
    return settings().cache or Path(platformdirs.user_cache_dir("verm-local"))


def variant_dir(name: str, home: Path | None = None) -> Path:
    """Where variant `name` lives in the store (whether or not it is there)."""
    return (home or home_dir()) / name


def installed(name: str, home: Path | None = None) -> Path | None:
    """The directory of variant `name` if the store holds it (its manifest is there)."""
    path = variant_dir(name, home)
    return path if (path / MANIFEST_NAME).is_file() else None
