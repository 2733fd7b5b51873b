"""OpenRLHF: a `reward_func` file for the remote reward option.

    --remote_rm_url $(python -c "import verm_local.integrations.openrlhf as m; print(m.__file__)")
    --label_key label      # each sample's label: {"gt": "path/to/gt.png", "task": "chart"}

OpenRLHF passes the full texts (`queries`), the prompts and the labels; the response is
the query after its prompt. Rewards come back as a tensor when torch is there."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import client


def _label(label: Any) -> dict[str, Any]:
    if isinstance(label, dict):
        return label
    try:
        data = json.loads(label)
    except (TypeError, ValueError):
        data = {"gt": label}
    return data if isinstance(data, dict) else {"gt": data}


def reward_func(queries: list[str], prompts: list[str], labels: list[Any], **kwargs: Any) -> Any:
    """One reward per sample: the authors' reward of its response for its label's task
    and ground truth."""
    rc = client(kwargs.get("reward_url"))

    def one(args: tuple[str, str, Any]) -> float:
        query, prompt, label = args
        info = _label(label)
        response = query[len(prompt) :] if query.startswith(prompt) else query
        task = info.get("task", "chart")
        return rc.compute_score(task, response, info["gt"], {"task": task})

    with ThreadPoolExecutor(max(1, min(16, len(queries)))) as pool:
        rewards = list(pool.map(one, zip(queries, prompts, labels)))
    try:
        import torch
    except ImportError:
        return rewards
    return torch.tensor(rewards, dtype=torch.float32)
