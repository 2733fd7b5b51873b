"""verl: an async `compute_score` for verl's reward loop.

    VERL=$(python -c "import verm_local.integrations.verl as m; print(m.__file__)")
    custom_reward_function.path=$VERL custom_reward_function.name=compute_score

`data_source` (chart2code, icon2svg, table...) or `extra_info["task"]` names the task;
`ground_truth` (or `extra_info["gt_img_path"]`) is the ground-truth image."""

from __future__ import annotations

import asyncio
from typing import Any

from . import client


async def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """The authors' reward for one rollout (render in the sandbox, judge, recipe)."""
    rc = client(kwargs.get("reward_url"))
    return await asyncio.to_thread(
        rc.compute_score, data_source, solution_str, ground_truth, extra_info
    )
