"""Visual-ERM's rewards, per task, as the authors' RL computes them
(InternLM/Visual-ERM `rl_scripts/reward_func/`). Pure.

chart, svg ("render base"): a prediction with no code, a failed render or an all-white
render gets `render_fail` (0.0); otherwise `base` (1.0) + clip(1 - S / scale, 0, 1), S the
summed severity; an answer unreadable after its tries counts as S = `parse_fail_severity`
(25). table ("negative severity"): reward = -S, and `fail` (-4) for an unreadable answer
or any failure. `rm_reward` = clip(1 - S / scale, 0, 1) is the judge's term alone (what
verm-local called `score` before the recipes), kept as a field.

Every constant is a setting (`verm_local.settings`: VERM_LOCAL_REWARD_SCALE,
VERM_LOCAL_PARSE_FAIL_SEVERITY, VERM_LOCAL_RENDER_FAIL_REWARD, VERM_LOCAL_TABLE_FAIL_REWARD)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from .constants import REWARD_SCALE


@dataclass(frozen=True)
class RewardRecipe:
    kind: Literal["render_base", "negative_severity"]
    scale: float = REWARD_SCALE  # S divisor of the clipped term
    base: float = 1.0  # render_base: what a successful render is worth by itself
    parse_fail_severity: float = 25.0  # render_base: S of an unreadable answer
    render_fail: float = 0.0  # render_base: no code, failed or all-white render
    fail: float = -4.0  # negative_severity: unreadable answer or any failure

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"reward scale must be positive, got {self.scale}")

    def rm_reward(self, total_severity: float) -> float:
        """The judge's clipped term: clip(1 - S / scale, 0, 1)."""
        return min(1.0, max(0.0, 1.0 - total_severity / self.scale))

    def reward(self, total_severity: float) -> float:
        """The reward of a rendered prediction the judge read, S its summed severity."""
        if self.kind == "negative_severity":
            return -float(total_severity)
        return self.base + self.rm_reward(total_severity)

    def unreadable(self) -> float:
        """The reward when the judge's answer could not be read (after its tries)."""
        if self.kind == "negative_severity":
            return self.fail
        return self.base + self.rm_reward(self.parse_fail_severity)

    def unrendered(self) -> float:
        """The reward of a prediction without code, or whose render failed or is blank."""
        return self.fail if self.kind == "negative_severity" else self.render_fail


RENDER_BASE = RewardRecipe("render_base")
NEGATIVE_SEVERITY = RewardRecipe("negative_severity")


def with_settings(recipe: RewardRecipe, scale: float | None = None) -> RewardRecipe:
    """The recipe with the constants the environment (or `scale`) overrides."""
    from .settings import settings

    s = settings()
    changes = {
        "scale": scale if scale is not None else s.reward_scale,
        "parse_fail_severity": s.parse_fail_severity,
        "render_fail": s.render_fail_reward,
        "fail": s.table_fail_reward,
    }
    return replace(recipe, **{k: float(v) for k, v in changes.items() if v is not None})


def reward(total_severity: int, scale: float | None = None) -> float:
    """The clipped term clip(1 - S / scale, 0, 1) (the scale from the environment unless
    given); `RewardRecipe.reward` is the per-task reward."""
    return with_settings(RENDER_BASE, scale).rm_reward(total_severity)
