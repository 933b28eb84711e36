"""The promotion decision, as a pure function of metrics: no MLflow, no files, easy to test.

A new model becomes champion only when every gate passes AND it is strictly better than the current champion on
`compare_metric` (or there is no champion yet). A gate or compare metric that is missing or NaN fails: a model
whose evaluation could not produce the number is never promoted by accident.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
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


def _field(gate: Any, name: str) -> Any:
    return gate.get(name) if isinstance(gate, Mapping) else getattr(gate, name, None)


def _baseline_gate(gate: Any, flat: Mapping[str, float]) -> tuple[dict[str, Any], str]:
    """A no-regression gate: `metric` against another key of the same metrics (`baseline`, e.g. sft.pref_accuracy):
    pass iff metric >= baseline - max_drop (higher is better) and/or metric <= baseline * max_ratio (lower is
    better). A missing or NaN value on either side fails."""
    name, baseline = _field(gate, "metric"), _field(gate, "baseline")
    drop, ratio = _field(gate, "max_drop"), _field(gate, "max_ratio")
    value, base = flat.get(name), flat.get(baseline)
    passed = _usable(value) and _usable(base)
    bounds = []
    if drop is not None:
        bounds.append(f">= {baseline} - {drop:g}")
        passed = passed and value >= base - drop
    if ratio is not None:
        bounds.append(f"<= {ratio:g} x {baseline}")
        passed = passed and value <= base * ratio
    result = {"metric": name, "value": value, "baseline": baseline, "baseline_value": base, "max_drop": drop,
              "max_ratio": ratio, "passed": bool(passed)}
    label = _field(gate, "name")
    reason = (f"gate {label + ': ' if label else ''}{name} {' and '.join(bounds) or 'vs ' + baseline}: {_fmt(value)}"
              f" vs {_fmt(base)} {'passed' if passed else 'FAILED'}")
    return result, reason


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6g}"


def _usable(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def check_gates(metrics: Mapping[str, Any], gates: Iterable[Any], *,
                missing: Mapping[str, str] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """([{"metric", "value", ..., "passed"}], one reason line per gate) for nested or flat `metrics`.

    A gate is a bound (`min` / `max` on a metric) or a no-regression check against another metric of the same model
    set (`baseline` with `max_drop` and/or `max_ratio`, e.g. dpo.pref_accuracy vs sft.pref_accuracy). `missing`
    says why a metric is known to be absent (metric -> reason, e.g. "no held-out data for dpo ..."), which the
    reasons then give instead of "missing"."""
    flat = numeric_metrics(metrics)
    why = dict(missing or {})

    def shown(name: str, value: float | None) -> str:
        return why[name] if value is None and name in why else _fmt(value)

    reasons: list[str] = []
    results: list[dict[str, Any]] = []
    for gate in gates:
        if _field(gate, "baseline") is not None:
            result, reason = _baseline_gate(gate, flat)
            results.append(result)
            reasons.append(reason)
            continue
        name, low, high = _gate(gate)
        value = flat.get(name)
        passed = _usable(value) and (low is None or value >= low) and (high is None or value <= high)
        bounds = " and ".join(part for part in (f">= {low:g}" if low is not None else "",
                                                f"<= {high:g}" if high is not None else "") if part) or "present"
        results.append({"metric": name, "value": value, "min": low, "max": high, "passed": bool(passed)})
        reasons.append(f"gate {name} {bounds}: {shown(name, value)} {'passed' if passed else 'FAILED'}")
    return results, reasons


def decide_promotion(metrics: Mapping[str, Any], gates: Iterable[Any], champion_metrics: Mapping[str, Any] | None,
                     compare_metric: str, higher_is_better: bool = True, *,
                     champion_version: int | str | None = None, missing: Mapping[str, str] | None = None) -> Decision:
    """Promote iff every gate passes (`check_gates`) AND (there is no champion OR strictly better than it on
    compare_metric).

    `metrics` and `champion_metrics` may be nested ({"final": {"reward_accuracy": 0.8}}) or flat
    ({"final.reward_accuracy": 0.8}); `champion_metrics=None` means there is no champion. A gate or compare metric
    that is missing or NaN fails; `missing` explains absent metrics (see check_gates)."""
    flat = numeric_metrics(metrics)
    why = dict(missing or {})

    def shown(name: str, value: float | None) -> str:
        return why[name] if value is None and name in why else _fmt(value)

    results, reasons = check_gates(flat, gates, missing=missing)
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


def no_regression_gates(skills: Sequence[Any], enabled: Sequence[str], vs: Sequence[str] = ("previous", "own",
                                                                                             "base")) -> list[dict]:
    """Expand `registry.no_regression` (stage, metric, max_drop | max_ratio) into baseline gates over
    metrics/evaluate.json keys, for the enabled stages (in order). Pure: no I/O.

    previous: every model from the skill's stage on vs the model it started from (the stage's own gain included:
              e.g. dpo.pref_accuracy >= sft.pref_accuracy - max_drop);
    own:      the final model vs the skill's own stage (cumulative forgetting, e.g. final.perplexity <= 2 x
              cpt.perplexity);
    base:     the final model vs the base model."""
    def get(skill, name):
        return skill.get(name) if isinstance(skill, Mapping) else getattr(skill, name)

    order = ["base", *enabled]
    gates: list[dict] = []
    seen: set[tuple[str, str]] = set()

    def add(metric: str, baseline: str, skill, label: str) -> None:
        if (metric, baseline) in seen:
            return
        seen.add((metric, baseline))
        gates.append({"metric": metric, "baseline": baseline, "max_drop": get(skill, "max_drop"),
                      "max_ratio": get(skill, "max_ratio"), "name": label})

    for skill in skills:
        stage, key = get(skill, "stage"), get(skill, "metric")
        if stage not in enabled:
            continue
        if "previous" in vs:
            for model in order[order.index(stage):]:
                previous = order[order.index(model) - 1]
                add(f"{model}.{key}", f"{previous}.{key}", skill, f"no regression vs previous ({previous})")
        if "own" in vs and enabled[-1] != stage:
            add(f"final.{key}", f"{stage}.{key}", skill, f"forgetting of {stage}")
        if "base" in vs:
            add(f"final.{key}", f"base.{key}", skill, "no regression vs base")
    return gates
