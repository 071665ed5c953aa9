"""The format of ``ergo eval`` results: the benchmarks, the summary's keys and the Markdown table.

Its own module because both the evaluation and the model card use it; it sits in ``hub_card``, the lower of the two
packages in the repository map, so the card does not depend on the evaluation.
"""

from __future__ import annotations

BENCHMARKS = {
    "vstar": ("craigwu/vstar_bench", "V* Bench"),
    "hrbench": ("DreamMr/HR-Bench", "HR-Bench"),
    "mmerwl": ("yifanzhang114/MME-RealWorld-lite-lmms-eval", "MME-RealWorld-lite"),
}
"""Benchmark name -> (Hub dataset id, display name): where ``ergo eval-download`` fetches each benchmark and how the
card's model-index names it."""

SUMMARY_KEYS = ("benchmark", "mode", "budget", "accuracy", "accuracy_reference_protocol", "samples",
                "mean_vision_tokens", "mean_seconds", "categories")
"""What the card reads from each ``ergo eval`` summary."""


def check_summary(summary: object, name: str) -> None:
    """Raises ValueError naming ``name`` when ``summary`` is not an ``ergo eval`` summary, so a wrong file stops a
    conversion before it writes anything, not in the middle with a KeyError."""
    missing = [key for key in SUMMARY_KEYS if key not in summary] if isinstance(summary, dict) else list(SUMMARY_KEYS)
    if missing:
        raise ValueError(f"{name} is not an `ergo eval` summary (<out>/<benchmark>-summary.json): no "
                         f"{', '.join(repr(key) for key in missing)}")


def results_table(summaries: list[dict]) -> str:
    """``ergo eval`` summaries as a Markdown table: one row per (benchmark, mode, budget), then one per category.
    ``samples`` are the scored ones; requested = run + failed + missing (summaries written before these counts
    were kept show "-")."""
    lines = ["| benchmark | mode | budget | accuracy (failures wrong) | reference protocol | samples | requested | run "
             "| failed | missing | vision tokens | s / sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        counts = " | ".join(str(s.get(key, "-")) for key in ("requested", "run", "failed", "missing"))
        lines.append(f"| {s['benchmark']} | {s['mode']} | {s['budget']} | {_percent(s['accuracy'])} | "
                     f"{_percent(s['accuracy_reference_protocol'])} | {s['samples']} | {counts} | "
                     f"{_number(s['mean_vision_tokens'], '.0f')} | {_number(s['mean_seconds'], '.2f')} |")
        for name, category in s["categories"].items():
            lines.append(f"| | {name} | | {_percent(category['accuracy'])} | | {category['samples']} | | | | | | |")
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
