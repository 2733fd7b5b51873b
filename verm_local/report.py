"""Human-readable rendering of a Judgement for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .constants import SEVERITY_NAMES
from .schema import Judgement


def print_judgement(result: Judgement, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{result.task} discrepancies (image 2 vs image 1)", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("category")
    table.add_column("severity")
    table.add_column("location")
    table.add_column("description", overflow="fold")
    for i, e in enumerate(result.errors, 1):
        table.add_row(str(i), e.category, f"{e.severity} {SEVERITY_NAMES[e.severity]}",
                      Text(e.location), Text(e.description))
    if result.errors:
        console.print(table)
    else:
        console.print("no discrepancies found")
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    console.print(f"counts: {counts}")
    console.print(f"total severity {result.total_severity}  ->  score {result.score:.3f}",
                  style="bold")
    t, m = result.timings, result.model
    console.print(
        f"model {m.path} ({m.quant}, vision {m.vision}); load {t.load_s:.2f} s, "
        f"vision {t.vision_s:.2f} s, prefill {t.prefill_s:.2f} s "
        f"({t.prompt_tokens} tokens), decode {t.decode_s:.2f} s ({t.completion_tokens} tokens)",
        style="dim", markup=False, highlight=False,
    )
