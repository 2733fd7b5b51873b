"""Benchmark data in VC-RewardBench's layout: synthetic labelled pairs made offline (the
one generator of image pairs with known errors: the benchmarks, `bench serve`'s load and
the GPTQ calibration sets draw from it), and the items of any directory, file or hub
dataset in that layout (read by `rows.read_rows`).

Layout: `<dir>/VC-RewardBench.jsonl`, one row per pair:
    {"id", "category": "chart"|"table"|"svg", "gt_img_path", "pred_img_path",
     "human_errors": [{"type", "severity", "location", "description"}]}
with image paths relative to the directory. Synthetic pairs draw one spec twice: the
prediction is the spec with known errors injected (type and severity recorded as they
are injected), several per pair, some pairs with none. Deterministic for a seed."""

from __future__ import annotations

import copy
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from verm_local.constants import TASKS
from verm_local.errors import InputError
from verm_local.rows import ROWS_FILE

log = logging.getLogger(__name__)

SIZE_PX = (384, 288)  # multiples of 32: 12 x 9 visual tokens
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf"]
WORDS = ["Revenue", "Costs", "Users", "Orders", "Growth", "Margin", "Visits", "Returns"]
NAMES = ["Alpha", "Beta", "Gamma", "Delta", "Omega", "Sigma", "Kappa", "Theta"]


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word + "x"
    i = rng.randrange(1, len(word) - 1)
    return (
        word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        if word[i] != word[i + 1]
        else word[:i] + "x" + word[i + 1 :]
    )


def _err(error_type: str, severity: int, location: str, description: str) -> dict[str, Any]:
    """A label as VC-RewardBench writes one (keyed `type`)."""
    return {
        "type": error_type,
        "severity": severity,
        "location": location,
        "description": description,
    }


# ---------------------------------------------------------------- charts (matplotlib)


def chart_spec(rng: random.Random) -> dict[str, Any]:
    n = rng.randint(4, 6)
    series = [
        {"name": name, "values": [rng.randint(2, 20) for _ in range(n)], "colour": c}
        for name, c in zip(rng.sample(NAMES, 2), rng.sample(COLOURS, 2))
    ]
    return {
        "kind": rng.choice(["bar", "line"]),
        "title": f"{rng.choice(WORDS)} by quarter",
        "labels": [f"Q{i + 1}" for i in range(n)],
        "series": series,
        "legend": True,
    }


def _chart_errors(spec: dict, rng: random.Random) -> dict[str, Callable[[], dict]]:
    # Edits touch the first series; a removal takes the last, so no label points at
    # something another injection removed.
    def value():
        s = spec["series"][0]
        i = rng.randrange(len(s["values"]))
        old = s["values"][i]
        s["values"][i] = old + rng.choice([-1, 1]) * max(3, old // 2)
        return _err(
            "data_error",
            2,
            f"{s['name']} at {spec['labels'][i]}",
            f"value {old} became {s['values'][i]}",
        )

    def colour():
        s = spec["series"][0]
        old = s["colour"]
        s["colour"] = rng.choice(
            [c for c in COLOURS if c not in [x["colour"] for x in spec["series"]]]
        )
        return _err("style_error", 1, f"{s['name']} series", f"colour {old} became {s['colour']}")

    def title():
        old = spec["title"]
        spec["title"] = _typo(old.split()[0], rng) + " " + " ".join(old.split()[1:])
        return _err("text_error", 1, "title", f"'{old}' became '{spec['title']}'")

    def legend():
        spec["legend"] = False
        return _err("structure_error", 2, "legend", "the legend is missing")

    def series():
        gone = spec["series"].pop()
        return _err("structure_error", 3, f"{gone['name']} series", "a whole series is missing")

    return {"value": value, "colour": colour, "title": title, "legend": legend, "series": series}


def _figure(size: tuple[int, int]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(size[0] / 64, size[1] / 64), dpi=64)


def _png(fig: Any) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, dpi=64, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_chart(spec: dict, size: tuple[int, int] = SIZE_PX) -> bytes:
    fig, ax = _figure(size)
    x = list(range(len(spec["labels"])))
    width = 0.8 / max(1, len(spec["series"]))
    for k, s in enumerate(spec["series"]):
        if spec["kind"] == "bar":
            ax.bar(
                [i + k * width for i in x], s["values"], width, color=s["colour"], label=s["name"]
            )
        else:
            ax.plot(x, s["values"], color=s["colour"], marker="o", label=s["name"])
    ax.set_xticks(x, spec["labels"])
    ax.set_title(spec["title"])
    if spec["legend"]:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------- tables (matplotlib)


def table_spec(rng: random.Random) -> dict[str, Any]:
    rows = [
        [name, str(rng.randint(10, 999)), f"{rng.uniform(0, 99):.1f}"]
        for name in rng.sample(NAMES, 4)
    ]
    return {"header": ["Name", rng.choice(WORDS), "Share %"], "rows": rows}


def _table_errors(spec: dict, rng: random.Random) -> dict[str, Callable[[], dict]]:
    def number():  # column 1: a column removal takes the last one
        r, c = rng.randrange(len(spec["rows"]) - 1), 1  # the last row is the typo's
        old = spec["rows"][r][c]
        new = str(int(old) + rng.randint(1, 9) * 10)
        spec["rows"][r][c] = new
        return _err(
            "numeric_error",
            2,
            f"row {spec['rows'][r][0]}, column {spec['header'][c]}",
            f"{old} became {new}",
        )

    def typo():
        r = len(spec["rows"]) - 1
        old = spec["rows"][r][0]
        spec["rows"][r][0] = _typo(old, rng)
        return _err(
            "text_error", 1, f"row {old}, column Name", f"'{old}' became '{spec['rows'][r][0]}'"
        )

    def swap():
        a, b = rng.sample(range(len(spec["rows"])), 2)
        ra, rb = spec["rows"][a][0], spec["rows"][b][0]
        spec["rows"][a], spec["rows"][b] = spec["rows"][b], spec["rows"][a]
        return _err("layout_error", 2, f"rows {ra} and {rb}", "the two rows are swapped")

    def column():
        gone = spec["header"].pop()
        for row in spec["rows"]:
            row.pop()
        return _err("layout_error", 3, f"column {gone}", "a whole column is missing")

    return {"number": number, "typo": typo, "swap": swap, "column": column}


def render_table(spec: dict, size: tuple[int, int] = SIZE_PX) -> bytes:
    fig, ax = _figure(size)
    ax.axis("off")
    table = ax.table(
        cellText=spec["rows"], colLabels=spec["header"], loc="center", cellLoc="center"
    )
    table.scale(1, 1.6)
    return _png(fig)


# ---------------------------------------------------------------- SVG (cairosvg)


def svg_spec(rng: random.Random) -> dict[str, Any]:
    shapes = []
    for i, kind in enumerate(rng.sample(["circle", "rect", "triangle", "ellipse"], 3)):
        shapes.append(
            {
                "kind": kind,
                "x": 50 + i * 110,
                "y": rng.randint(70, 150),
                "w": rng.randint(50, 80),
                "h": rng.randint(50, 80),
                "fill": rng.choice(COLOURS),
            }
        )
    return {"shapes": shapes, "label": rng.choice(WORDS)}


def _svg_errors(spec: dict, rng: random.Random) -> dict[str, Callable[[], dict]]:
    # Edits touch the first two shapes; a removal takes the last.
    def missing():
        gone = spec["shapes"].pop()
        return _err("shape_error", 3, f"{gone['kind']} at x={gone['x']}", "the shape is missing")

    def distort():
        s = rng.choice(spec["shapes"][:2])
        s["w"] = int(s["w"] * 1.8)
        return _err(
            "shape_error", 2, f"{s['kind']} at x={s['x']}", "the shape is distorted (width x1.8)"
        )

    def fill():
        s = rng.choice(spec["shapes"][:2])
        old = s["fill"]
        s["fill"] = rng.choice([c for c in COLOURS if c != old])
        return _err(
            "style_error", 1, f"{s['kind']} at x={s['x']}", f"fill {old} became {s['fill']}"
        )

    def text():
        old = spec["label"]
        spec["label"] = _typo(old, rng)
        return _err("text_symbol_error", 2, "label at the top", f"'{old}' became '{spec['label']}'")

    def move():
        s = rng.choice(spec["shapes"][:2])
        old = s["y"]
        s["y"] = old + 90 if old < 150 else old - 90
        return _err(
            "structure_error", 2, f"{s['kind']} at x={s['x']}", f"moved from y={old} to y={s['y']}"
        )

    return {"missing": missing, "distort": distort, "fill": fill, "text": text, "move": move}


def svg_text(spec: dict, size: tuple[int, int] = SIZE_PX) -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size[0]}" height="{size[1]}" '
        f'viewBox="0 0 {SIZE_PX[0]} {SIZE_PX[1]}"><rect width="100%" height="100%" '
        'fill="white"/>',
        f'<text x="150" y="36" font-size="24" font-family="sans-serif">{spec["label"]}</text>',
    ]
    for s in spec["shapes"]:
        x, y, w, h, f = s["x"], s["y"], s["w"], s["h"], s["fill"]
        if s["kind"] == "circle":
            parts.append(f'<circle cx="{x}" cy="{y}" r="{w // 2}" fill="{f}" stroke="black"/>')
        elif s["kind"] == "ellipse":
            parts.append(
                f'<ellipse cx="{x}" cy="{y}" rx="{w // 2}" ry="{h // 3}" fill="{f}" '
                'stroke="black"/>'
            )
        elif s["kind"] == "rect":
            parts.append(
                f'<rect x="{x - w // 2}" y="{y - h // 2}" width="{w}" height="{h}" '
                f'fill="{f}" stroke="black"/>'
            )
        else:
            pts = f"{x},{y - h // 2} {x - w // 2},{y + h // 2} {x + w // 2},{y + h // 2}"
            parts.append(f'<polygon points="{pts}" fill="{f}" stroke="black"/>')
    parts.append("</svg>")
    return "".join(parts)


def render_svg(spec: dict, size: tuple[int, int] = SIZE_PX) -> bytes:
    import cairosvg

    return cairosvg.svg2png(bytestring=svg_text(spec, size).encode())


GENERATORS = {
    "chart": (chart_spec, _chart_errors, render_chart),
    "table": (table_spec, _table_errors, render_table),
    "svg": (svg_spec, _svg_errors, render_svg),
}


def make_pair(task: str, rng: random.Random, n_errors: int) -> tuple[dict, dict, list[dict]]:
    """(ground-truth spec, prediction spec, the injected errors)."""
    make_spec, errors_for, _ = GENERATORS[task]
    gt = make_spec(rng)
    pred = copy.deepcopy(gt)
    return gt, pred, inject(task, pred, rng, n_errors)


def inject(task: str, spec: dict, rng: random.Random, n_errors: int) -> list[dict]:
    """Inject up to `n_errors` distinct known errors into `spec`; their labels."""
    injectors = GENERATORS[task][1](spec, rng)
    kinds = rng.sample(sorted(injectors), min(n_errors, len(injectors)))
    # A structural removal last, so earlier edits never target what is gone.
    kinds.sort(key=lambda k: k in ("series", "column", "missing"))
    return [injectors[k]() for k in kinds]


def pair_images(
    task: str, rng: random.Random, n_errors: int, size: tuple[int, int] = SIZE_PX
) -> tuple[bytes, bytes, list[dict]]:
    """One labelled pair: the ground truth and the prediction as PNG bytes, the labels."""
    gt, pred, errors = make_pair(task, rng, n_errors)
    render = GENERATORS[task][2]
    return render(gt, size), render(pred, size), errors


def prediction_group(
    task: str, rng: random.Random, n: int, size: tuple[int, int] = SIZE_PX
) -> tuple[bytes, list[bytes]]:
    """One ground truth and `n` predictions of it, each with its own injected error (an
    RL step's rollouts against one reference), as PNG bytes."""
    make_spec, _, render = GENERATORS[task]
    gt = make_spec(rng)
    preds = []
    for _ in range(n):
        pred = copy.deepcopy(gt)
        inject(task, pred, rng, 1 + rng.randrange(2))
        preds.append(render(pred, size))
    return render(gt, size), preds


def synthetic(
    out_dir: str | Path,
    n: int = 12,
    seed: int = 0,
    tasks: tuple[str, ...] = TASKS,
    quiet: bool = False,
) -> Path:
    """Write `n` labelled pairs (round-robin over tasks) and VC-RewardBench.jsonl; return
    the rows file."""
    for t in tasks:
        if t not in TASKS:
            raise InputError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        n_errors = 0 if i % 4 == 3 else rng.randint(1, 3)
        gt, pred, errors = pair_images(task, rng, n_errors)
        item_id = f"{task}_{i:04d}"
        for data, side in ((gt, "gt"), (pred, "pred")):
            (out / "images" / f"{item_id}_{side}.png").write_bytes(data)
        rows.append(
            {
                "id": item_id,
                "idx": i,
                "category": task,
                "gt_img_path": f"images/{item_id}_gt.png",
                "pred_img_path": f"images/{item_id}_pred.png",
                "human_errors": errors,
                "source": "synthetic",
                "seed": seed,
            }
        )
        if not quiet:
            log.info("[%d/%d] %s: %d injected errors", i + 1, n, item_id, len(errors))
    path = out / ROWS_FILE
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------- loading


@dataclass(frozen=True)
class Item:
    """A labelled pair: `human_errors` as the row gives them (the authors' scoring reads
    them as they are), `row` the whole row."""

    id: str
    task: str
    gt: Path
    pred: Path
    human_errors: list[dict[str, Any]]
    row: dict[str, Any] = field(default_factory=dict, compare=False)


def load_items(source: str | Path, limit: int | None = None) -> list[Item]:
    """Items of a VC-RewardBench-layout directory or rows file, or of a hub dataset id
    (`rows.read_rows`)."""
    from verm_local.rows import read_rows

    return [
        Item(str(r.id), r.task.name, r.gt, r.pred, r.human_errors, r.data)
        for r in read_rows(source, limit=limit)
    ]


def data_digest(items: list[Item]) -> str:
    """sha256 over ids, labels and image bytes: what the reference cache is keyed on."""
    import hashlib

    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.task, it.human_errors], sort_keys=True).encode())
        for p in (it.gt, it.pred):
            h.update(p.read_bytes() if p.is_file() else b"missing")
    return h.hexdigest()
