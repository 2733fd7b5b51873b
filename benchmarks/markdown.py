"""Markdown tables of the benchmark reports."""

from __future__ import annotations


def table_head(*columns: str) -> list[str]:
    """A Markdown table's header row and its separator, one cell per column."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
