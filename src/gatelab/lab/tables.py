"""Formatting helpers shared by the lab's reports (compare, cache, kv rows): strict-JSON values,
mean ± std over seeds, table cells, markdown tables and rich tables. A leaf module: it imports nothing of gatelab."""

from __future__ import annotations

import math
from collections.abc import Sequence


def finite(value) -> float | None:
    """``value`` as a float, or None when missing or not finite (JSON has no NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def to_json_safe(obj):
    """Recursively replace NaN / inf floats by None and tuples by lists, so results.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def mean_std(values: Sequence[float | None]) -> dict:
    """{"mean", "std" (sample std, 0 for one value), "n"} over the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def format_cell(stats: dict | None, fmt: str) -> str:
    """ "1.234", "1.234 ± 0.010" over several seeds, "-" when missing."""
    if not stats or stats.get("mean") is None:
        return "-"
    text = format(stats["mean"], fmt)
    if stats.get("n", 1) > 1:
        text += " ± " + format(stats["std"], fmt.lstrip("+"))
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(title: str, header: list[str], rows: list[list[str]], left: int = 1):
    """A rich Table of ``rows`` under ``header``, its first ``left`` columns left-aligned and the rest right.
    Cells are escaped: rich would take a variant's options ("[gate=headwise]") for markup and drop them."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*map(escape, row))
    return table
