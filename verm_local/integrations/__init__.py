"""Reward functions for RL frameworks, each a thin adapter over `RewardClient` (the
authors' reward per task: render in the sandbox, judge on a verm-local or vLLM server):

- `verm_local.integrations.verl`: an async `compute_score` for verl's reward loop;
- `verm_local.integrations.openrlhf`: a `reward_func` file for OpenRLHF's remote reward
  option (`--remote_rm_url /path/to/openrlhf.py`);
- `verm_local.integrations.trl`: an async reward function for TRL's GRPOTrainer.

The server(s) come from `VERM_LOCAL_REWARD_URL` (one Ray Serve URL, or a comma-separated
list of plain servers) unless a function is given them; a server started with an API key
gets the one in `VERM_LOCAL_API_KEY`."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def client(urls: str | None = None) -> Any:
    """One RewardClient per set of endpoints (its connection pool shared by the calls)."""
    from ..client import RewardClient
    from ..errors import InputError
    from ..settings import settings

    spec = urls or settings().reward_url
    if not spec:
        raise InputError(
            "no reward server: set VERM_LOCAL_REWARD_URL (a `verm-local serve` URL, or a "
            "comma-separated list)"
        )
    endpoints = [u.strip() for u in spec.split(",") if u.strip()]
    return RewardClient(endpoints, api_key=settings().api_key)
