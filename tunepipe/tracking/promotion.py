"""The promotion decision, as a pure function of metrics: no MLflow, no files, easy to test.

A new model becomes champion only when every gate passes AND it is strictly better than the current champion on
`compare_metric` (or there is no champion yet). A gate or compare metric that is missing or NaN fails: a model
whose evaluation could not produce the number is never promoted by accident.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tunepipe.tracking.flatten import numeric_metrics


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    gate_results: list[dict[str, Any]] = field(default_factory=list)


def _gate(gate: Any) -> tuple[str, float | None, float | None]:
    if isinstance(gate, Mapping):
        return gate["metric"], gate.get("min"), gate.get("max")
    return gate.metric, gate.min, gate.max


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6g}"


def _usable(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def decide_promotion(metrics: Mapping[str, Any], gates: Iterable[Any], champion_metrics: Mapping[str, Any] | None,
                     compare_metric: str, higher_is_better: bool = True, *,
                     champion_version: int | str | None = None, missing: Mapping[str, str] | None = None) -> Decision:
    """Promote iff every gate passes AND (there is no champion OR strictly better than it on compare_metric).

    `metrics` and `champion_metrics` may be nested ({"final": {"reward_accuracy": 0.8}}) or flat
    ({"final.reward_accuracy": 0.8}); `champion_metrics=None` means there is no champion. A gate or compare metric
    that is missing or NaN fails; `missing` says why a metric is known to be absent (metric -> reason, e.g. "no
    held-out data for dpo ..."), which the reasons then give instead of "missing"."""
    flat = numeric_metrics(metrics)
    why = dict(missing or {})

    def shown(name: str, value: float | None) -> str:
        return why[name] if value is None and name in why else _fmt(value)

    reasons: list[str] = []
    results: list[dict[str, Any]] = []
    for gate in gates:
        name, low, high = _gate(gate)
        value = flat.get(name)
        passed = _usable(value) and (low is None or value >= low) and (high is None or value <= high)
        bounds = " and ".join(part for part in (f">= {low:g}" if low is not None else "",
                                                f"<= {high:g}" if high is not None else "") if part) or "present"
        results.append({"metric": name, "value": value, "min": low, "max": high, "passed": bool(passed)})
        reasons.append(f"gate {name} {bounds}: {shown(name, value)} {'passed' if passed else 'FAILED'}")
    gates_ok = all(r["passed"] for r in results)

    value = flat.get(compare_metric)
    champ_name = f"champion v{champion_version}" if champion_version is not None else "champion"
    if not _usable(value):
        reasons.append(f"{compare_metric} is {shown(compare_metric, value)} in the new model's metrics: cannot compare")
        better = False
    elif champion_metrics is None:
        reasons.append(f"no champion yet ({compare_metric} {_fmt(value)})")
        better = True
    else:
        champ = numeric_metrics(champion_metrics).get(compare_metric)
        if not _usable(champ):
            reasons.append(f"{champ_name} has no {compare_metric}: cannot compare (promote manually)")
            better = False
        else:
            better = value > champ if higher_is_better else value < champ
            op = ">" if value > champ else "<" if value < champ else "=="
            verdict = "better" if better else "not better"
            reasons.append(f"{compare_metric} {_fmt(value)} {op} {champ_name} {_fmt(champ)} "
                           f"({'higher' if higher_is_better else 'lower'} is better: {verdict})")
    return Decision(promote=gates_ok and better, reasons=reasons, gate_results=results)
