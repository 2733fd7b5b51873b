"""TRL: an async reward function for GRPOTrainer.

    from verm_local.integrations.trl import visual_erm_reward
    trainer = GRPOTrainer(..., reward_funcs=[visual_erm_reward])

The dataset carries the ground truth in a `gt_image` column (a path) and the task in
`task` (chart, svg or table); TRL passes dataset columns to reward functions by name."""

from __future__ import annotations

import asyncio
from typing import Any

from . import client


def _text(completion: Any) -> str:
    """A completion as text: a string, or a conversation's last assistant message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    return str(completion or "")


async def visual_erm_reward(
    prompts: list[Any],
    completions: list[Any],
    gt_image: list[str] | None = None,
    task: list[str] | None = None,
    **kwargs: Any,
) -> list[float]:
    """The authors' reward of each completion against its row's ground truth."""
    if gt_image is None:
        raise ValueError("visual_erm_reward needs a gt_image column in the dataset")
    rc = client(kwargs.get("reward_url"))
    tasks = task or ["chart"] * len(completions)
    calls = [
        asyncio.to_thread(rc.compute_score, t, _text(c), gt, {"task": t})
        for c, gt, t in zip(completions, gt_image, tasks)
    ]
    return list(await asyncio.gather(*calls))
