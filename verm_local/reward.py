"""Visual-ERM's reward: rm_reward = clip(1 - S / scale, 0, 1), S the total severity."""

from __future__ import annotations

import os

from .constants import MIN_REWARD, REWARD_SCALE


def reward_scale(override: float | None = None) -> float:
    """The constant S is divided by: an explicit value, else VERM_LOCAL_REWARD_SCALE, else 50."""
    if override is not None:
        value = float(override)
    else:
        value = float(os.environ.get("VERM_LOCAL_REWARD_SCALE", REWARD_SCALE))
    if value <= 0:
        raise ValueError(f"reward scale must be positive, got {value}")
    return value


def reward(total_severity: int, scale: float | None = None) -> float:
    """Clipped reward for a total severity."""
    s = reward_scale(scale)
    return min(1.0, max(MIN_REWARD, 1.0 - total_severity / s))
