"""Calibration conversations in the judge's own domain, as the model was trained on them:
per task its message layout (system message, `<image>` lines, the prompt: the training
prompt when pulled, else the built-in one), its image preparation, and an answer in the
trained format (`answer.trained_answer`) that lists the pair's differences. The pairs are
either drawn (the benchmarks' generator of labelled pairs, `benchmarks/data.py`,
deterministic for a seed) or read from a directory in VC-RewardBench's layout."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from verm_local.answer import trained_answer
from verm_local.constants import TASKS
from verm_local.errors import InputError
from verm_local.images import prepare_image
from verm_local.prompts import resolve_prompt
from verm_local.tasks import TaskProfile, profile

Conversation = list[dict[str, Any]]
IMAGE_TOKENS = 256  # per image: calibration needs the judge's domain, not full resolution


def conversation(
    p: TaskProfile, gt: bytes | Path, pred: bytes | Path, errors: list[dict] | None
) -> Conversation:
    """[system], user: [gt image, pred image, prompt] in the task's layout (+ assistant:
    the answer in the trained format, when the errors are known)."""
    images = [
        prepare_image(gt, p.gt, image_tokens=IMAGE_TOKENS).image,
        prepare_image(pred, p.pred, image_tokens=IMAGE_TOKENS).image,
    ]
    conv: Conversation = []
    if p.system is not None:
        conv.append({"role": "system", "content": [{"type": "text", "text": p.system}]})
    text = p.text_prefix + resolve_prompt(p, warn=False).text
    conv.append(
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images[0]},
                {"type": "image", "image": images[1]},
                {"type": "text", "text": text},
            ],
        }
    )
    if errors is not None:
        known = [e for e in errors if (e.get("type") or e.get("category")) in p.categories]
        answer = json.dumps(trained_answer(p, known), ensure_ascii=False)
        conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return conv


def synthetic_conversations(
    n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS
) -> list[Conversation]:
    """`n` drawn pairs, round-robin over the tasks, with up to three injected errors."""
    from verm_local.benchmarks.data import pair_images

    rng = random.Random(seed)
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        gt, pred, errors = pair_images(task, rng, rng.randint(0, 3))
        out.append(conversation(profile(task), gt, pred, errors))
    return out


def directory_conversations(directory: str | Path, n: int) -> list[Conversation]:
    """Up to n conversations from a VC-RewardBench-layout directory (its labels as the
    answers)."""
    from verm_local.benchmarks.data import load_items

    items = load_items(directory, limit=n)
    if not items:
        raise InputError(f"{directory}: no rows")
    return [conversation(profile(it.task), it.gt, it.pred, it.human_errors) for it in items[:n]]
