"""The data health report: what went in, what was dropped and why, what truncation did to the supervision.

LLaMA-Factory drops rows with a log warning each and truncates silently; users only notice when the loss looks
wrong. Here every run writes these numbers (JSON for machines, a short table for people).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunepipe.data.converters import DROP_REASONS
from tunepipe.data.processors import Health

EXTRA_REASONS = {
    "overlength": "longer than cutoff_len with overlength: drop",
    "not_a_kto_example": "no desirable/undesirable response (kto_tag missing)",
    "non_string_content": "a message content is not a string (skipped with skip_bad_rows)",
    "bad_tools_json": "tools is not valid JSON (skipped with skip_bad_rows)",
    "bad_function_json": "a function call is not valid JSON (skipped with skip_bad_rows)",
}


def describe(reason: str) -> str:
    return DROP_REASONS.get(reason) or EXTRA_REASONS.get(reason) or reason.replace("_", " ")


def histogram(lengths: list[int], cutoff_len: int, bins: int = 8) -> list[dict[str, int]]:
    """Token-length histogram with equal-width bins up to cutoff_len and one bin for everything above."""
    if not lengths:
        return []
    width = max(1, -(-cutoff_len // bins))
    edges = [i * width for i in range(bins)] + [cutoff_len]
    counts = [0] * (bins + 1)
    for length in lengths:
        counts[min(length // width, bins - 1) if length <= cutoff_len else bins] += 1
    rows = [{"from": edges[i] + (1 if i else 0), "to": edges[i + 1] if i < bins - 1 else cutoff_len,
             "count": counts[i]} for i in range(bins)]
    if counts[bins]:
        rows.append({"from": cutoff_len + 1, "to": max(lengths), "count": counts[bins]})
    used = [i for i, row in enumerate(rows) if row["count"]]
    return rows[used[0] : used[-1] + 1]  # no empty bins before the shortest or after the longest example


def report(stage: str, datasets: list[str], health: Health, cutoff_len: int, notes: list[str] | None = None,
           eval_health: Health | None = None) -> dict[str, Any]:
    lengths = sorted(health.lengths)
    data = {
        "stage": stage,
        "datasets": datasets,
        "cutoff_len": cutoff_len,
        **health.to_dict(),
        "dropped_reasons": {reason: describe(reason) for reason in health.dropped},
        "length": {
            "min": lengths[0] if lengths else 0,
            "median": lengths[len(lengths) // 2] if lengths else 0,
            "p95": lengths[int(len(lengths) * 0.95)] if lengths else 0,
            "max": lengths[-1] if lengths else 0,
            "histogram": histogram(lengths, cutoff_len),
        },
        "notes": notes or [],
    }
    if eval_health is not None:
        data["eval"] = eval_health.to_dict()
    return data


def format_table(data: dict[str, Any]) -> str:
    """A few lines a person can read at a glance."""
    lines = [f"{data['stage']} data: {', '.join(data['datasets'])} (cutoff_len {data['cutoff_len']})",
             f"  rows in        {data['rows_in']:>8}",
             f"  examples out   {data['examples_out']:>8}"]
    for reason, count in sorted(data["dropped"].items(), key=lambda item: -item[1]):
        lines.append(f"  dropped        {count:>8}  {reason}: {describe(reason)}")
    lines += [f"  truncated      {data['truncated']:>8}  (lost their final token: {data['lost_eos']})",
              f"  zero-label     {data['zero_label']:>8}  (nothing left to learn after truncation)",
              f"  tokens         {data['tokens']:>8}  (trained on: {data['label_tokens']})"]
    length = data["length"]
    lines.append(f"  length         min {length['min']}  median {length['median']}  p95 {length['p95']}  "
                 f"max {length['max']}")
    peak = max((row["count"] for row in length["histogram"]), default=0)
    for row in length["histogram"]:
        bar = "#" * (round(30 * row["count"] / peak) if peak else 0)
        lines.append(f"    {row['from']:>6}-{row['to']:<6} {row['count']:>7} {bar}")
    lines += [f"  note: {note}" for note in data.get("notes", [])]
    return "\n".join(lines)


def write(path: str | Path, data: dict[str, Any]) -> None:
    from tunepipe.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
