"""Calibration conversations in the judge's own domain: (ground truth, prediction) image
pairs of charts, tables and vector-style graphics, the task prompt, and an answer that
lists the injected differences. Either drawn here (deterministic for a seed, Pillow only)
or read from a directory in VC-RewardBench's layout (a .jsonl of id, category,
gt_img_path, pred_img_path, human_errors)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from verm_local.constants import CATEGORIES, TASKS
from verm_local.errors import InputError
from verm_local.images import load_image
from verm_local.prompts import default_prompt
from verm_local.tasks import profile

Conversation = list[dict[str, Any]]
SIZE = (384, 288)  # sides multiples of 32: 12x9 visual tokens
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def _chart(rng: random.Random, values: list[int], colour: str, title: str) -> Image.Image:
    img = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(img)
    d.text((SIZE[0] // 2 - 40, 8), title, fill="black")
    base, step = SIZE[1] - 30, (SIZE[0] - 60) // max(1, len(values))
    for i, v in enumerate(values):
        x = 40 + i * step
        d.rectangle([x, base - v * 20, x + step - 12, base], fill=colour)
        d.text((x + 4, base + 6), f"Q{i + 1}", fill="black")
    d.line([30, base, SIZE[0] - 10, base], fill="black")
    d.line([30, 30, 30, base], fill="black")
    return img


def _table(rows: list[list[str]]) -> Image.Image:
    img = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(img)
    cw, rh = (SIZE[0] - 20) // len(rows[0]), 28
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            box = [10 + c * cw, 10 + r * rh, 10 + (c + 1) * cw, 10 + (r + 1) * rh]
            d.rectangle(box, outline="black", fill="#eeeeee" if r == 0 else "white")
            d.text((box[0] + 6, box[1] + 8), cell, fill="black")
    return img


def _shapes(shapes: list[tuple[str, tuple[int, int, int, int], str]]) -> Image.Image:
    img = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(img)
    for kind, box, colour in shapes:
        if kind == "ellipse":
            d.ellipse(box, fill=colour, outline="black")
        elif kind == "rect":
            d.rectangle(box, fill=colour, outline="black")
        else:
            x0, y0, x1, y1 = box
            d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour, outline="black")
    return img


def _error(category: str, severity: int, location: str, description: str) -> dict[str, Any]:
    return {
        "category": category,
        "severity": severity,
        "location": location,
        "description": description,
    }


def synthetic_pair(task: str, rng: random.Random) -> tuple[Image.Image, Image.Image, list]:
    """One (gt, pred, injected errors) example for a task; sometimes with no error."""
    errors: list[dict[str, Any]] = []
    inject = rng.random() > 0.2
    if task == "chart":
        values = [rng.randint(1, 10) for _ in range(rng.randint(3, 6))]
        colour = rng.choice(PALETTE)
        gt = _chart(rng, values, colour, "Revenue")
        pv, pc, pt = list(values), colour, "Revenue"
        if inject:
            i = rng.randrange(len(pv))
            pv[i] = max(1, pv[i] + rng.choice([-3, -2, 2, 3]))
            errors.append(_error("data_error", 2, f"bar Q{i + 1}", f"{values[i]} became {pv[i]}"))
            if rng.random() < 0.5:
                pc = rng.choice([c for c in PALETTE if c != colour])
                errors.append(_error("style_error", 1, "all bars", "bar colour differs"))
            if rng.random() < 0.3:
                pt = "Revenu"
                errors.append(_error("text_error", 1, "title", "typo in the title"))
        return gt, _chart(rng, pv, pc, pt), errors
    if task == "table":
        cols = rng.randint(3, 4)
        rows = [[f"H{c}" for c in range(cols)]] + [
            [str(rng.randint(10, 999)) for _ in range(cols)] for _ in range(rng.randint(3, 6))
        ]
        pred = [list(r) for r in rows]
        if inject:
            r, c = rng.randrange(1, len(rows)), rng.randrange(cols)
            pred[r][c] = str(int(pred[r][c]) + rng.randint(1, 9))
            errors.append(_error("numeric_error", 2, f"row {r} col {c}", "value changed"))
            if rng.random() < 0.4 and len(rows) > 2:
                pred[1], pred[2] = pred[2], pred[1]
                errors.append(_error("layout_error", 2, "rows 1-2", "rows swapped"))
        return _table(rows), _table(pred), errors
    shapes = [
        (
            rng.choice(["ellipse", "rect", "triangle"]),
            (
                x := rng.randint(10, 250),
                y := rng.randint(10, 170),
                x + rng.randint(40, 120),
                y + rng.randint(40, 100),
            ),
            rng.choice(PALETTE),
        )
        for _ in range(rng.randint(2, 5))
    ]
    pred = list(shapes)
    if inject:
        i = rng.randrange(len(pred))
        if rng.random() < 0.5:
            del pred[i]
            errors.append(_error("structure_error", 3, f"shape {i + 1}", "shape missing"))
        else:
            kind, box, _ = pred[i]
            pred[i] = (kind, box, rng.choice(PALETTE))
            errors.append(_error("style_error", 1, f"shape {i + 1}", "fill colour differs"))
    return _shapes(shapes), _shapes(pred), errors


def answer_json(task: str, errors: list[dict[str, Any]]) -> str:
    counts = {f"{c}_count": sum(e["category"] == c for e in errors) for c in CATEGORIES[task]}
    return json.dumps({**counts, "errors": errors})


def conversation(
    task: str, gt: Image.Image, pred: Image.Image, errors: list[dict[str, Any]] | None
) -> Conversation:
    """[user: gt image, pred image, prompt] (+ assistant: the answer, when known)."""
    conv: Conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": gt},
                {"type": "image", "image": pred},
                {"type": "text", "text": default_prompt(profile(task))},
            ],
        }
    ]
    if errors is not None:
        conv.append(
            {"role": "assistant", "content": [{"type": "text", "text": answer_json(task, errors)}]}
        )
    return conv


def synthetic_conversations(
    n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS
) -> list[Conversation]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        gt, pred, errors = synthetic_pair(task, rng)
        out.append(conversation(task, gt, pred, errors))
    return out


def directory_conversations(directory: str | Path, n: int) -> list[Conversation]:
    """Up to n conversations from a VC-RewardBench-layout directory."""
    directory = Path(directory)
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise InputError(f"{directory}: no .jsonl file (VC-RewardBench layout) in it")
    out: list[Conversation] = []
    for line in files[0].read_text(encoding="utf-8").splitlines():
        if len(out) >= n:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task = row["category"]
            gt_path, pred_path = row["gt_img_path"], row["pred_img_path"]
        except (ValueError, KeyError) as exc:
            raise InputError(f"{files[0]}: bad row ({exc})") from None
        if task not in TASKS:
            continue
        gt = load_image(directory / gt_path, image_tokens=256).image
        pred = load_image(directory / pred_path, image_tokens=256).image
        errors = [
            dict(e, category=e.get("category", e.get("type")))
            for e in row.get("human_errors", [])
            if e.get("category", e.get("type")) in CATEGORIES[task]
        ]
        errors = [
            _error(
                e["category"],
                int(e.get("severity", 1)),
                str(e.get("location", "")),
                str(e.get("description", "")),
            )
            for e in errors
        ]
        out.append(conversation(task, gt, pred, errors))
    if not out:
        raise InputError(f"{files[0]}: no usable chart/table/svg rows")
    return out
