"""What a probe found, in words and in a picture: the table, the reading and the forest plot."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional


def _points(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    points = 100 * value
    return f"{0.0 if abs(points) < 0.05 else points:+.1f}"  # no "-0.0"


def _interval(stats: Mapping[str, Any]) -> str:
    if stats["ci95"] is None:
        return "[n/a]"
    return f"[{_points(stats['delta'] - stats['ci95'])}, {_points(stats['delta'] + stats['ci95'])}]"


def _p(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}" if value >= 0.001 else "<0.001"


def _is(name: str, value: Optional[float]) -> str:
    text = _p(value)
    return f"{name} < {text[1:]}" if text.startswith("<") else f"{name} = {text}"


def verdict(effect: Mapping[str, Any]) -> str:
    """What a teacher-effect record of :func:`cmda_data.stats.compare_methods` says, in words.

    Holm's p-value (over every comparison of the probe) decides at the 5 % level.

    Examples:
        >>> verdict({"delta": 0.004, "ci95": 0.01, "p": 0.31, "p_holm": 0.62})
        "not distinguishable from an uninformative teacher on this data; CMDA's gain over Base,
        if any, is a generic mixing gain"
        >>> verdict({"delta": 0.03, "ci95": 0.01, "p": 0.001, "p_holm": 0.004})
        'the teacher helps on this data, beyond what mixing with an uninformative teacher gives'
        >>> verdict({"delta": 0.0025, "ci95": 0.0, "p": 0.0, "p_holm": 0.0})[:45]
        'every seed gave the same difference, so the s'
    """
    if effect["p_holm"] is None:
        return "too few seeds to tell"
    if effect["ci95"] == 0.0 and effect["delta"] != 0.0:  # a t-test needs some spread: p = 0 says nothing here
        return "every seed gave the same difference, so the seeds cannot measure its uncertainty: run more seeds"
    if effect["p_holm"] < 0.05 and effect["delta"] > 0:
        return "the teacher helps on this data, beyond what mixing with an uninformative teacher gives"
    if effect["p_holm"] < 0.05:
        return "the teacher hurts on this data: an uninformative teacher does better"
    return ("not distinguishable from an uninformative teacher on this data; CMDA's gain over Base, if any, "
            "is a generic mixing gain")


def reading(effect: Mapping[str, Any]) -> str:
    """One plain sentence: the teacher effect in points, its interval, p and :func:`verdict`.

    Examples:
        >>> reading({"delta": 0.004, "ci95": 0.01, "p": 0.31, "p_holm": 0.62}).split(": ")[0]
        'teacher effect +0.4 points [-0.6, +1.4], p = 0.310'
    """
    return (f"teacher effect {_points(effect['delta'])} points {_interval(effect)}, {_is('p', effect['p'])}: "
            + verdict(effect))


def report(result: Mapping[str, Any]) -> str:
    """The probe's table (accuracy, difference with Base, p, Holm p), teacher effects and reading."""
    data, split = result["data"], result["split"]
    title = (f"cmda probe: {data['file'] or 'in-memory data'}, N = {data['n']} ({split['train']} train / "
             f"{split['test']} held out), student dim {data['student_dim']}, teacher dim {data['teacher_dim']}, "
             f"{data['classes']} classes, {len(result['seeds'])} seeds, {result['epochs']} epochs"
             f"{' (quick)' if result['quick'] else ''}")
    legend = ("accuracy on the held-out split after the last epoch, mean ± 95% CI over seeds (percent); "
              "differences in points")
    lines = [title, legend, "", f"{'method':<18}{'accuracy':>16}   {'vs base':<24}{'p':>8}{'p_holm':>9}"]
    for name, rec in result["methods"].items():
        acc = f"{100 * rec['mean']:.2f} ± {100 * rec['ci95']:.2f}"
        if name == "base":
            tail = ""
        elif rec.get("identical_to"):
            tail = f"= {rec['identical_to']} (same real-row weight under loss_form 'sum')"
        else:
            stats = result["paired"][name]
            delta = f"{_points(stats['delta'])} {_interval(stats)}"
            tail = f"{delta:<24}{_p(stats['p']):>8}{_p(stats['p_holm']):>9}"
        lines.append(f"{name:<18}{acc:>16}   {tail}".rstrip())
    for key, effect in result["teacher_effect"].items():
        line = (f"teacher effect {key}: {_points(effect['delta'])} points {_interval(effect)}, "
                f"{_is('p', effect['p'])}, {_is('p_holm', effect['p_holm'])}")
        lines += ["", line, f"reading: {verdict(effect)}."]
    return "\n".join(lines)


def plot_forest(result: Mapping[str, Any], path: Any) -> Optional[Path]:
    """Draw each method - base and each teacher effect: point = difference in points, bar = 95 % CI.

    Returns the path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [(f"{name} - base", stats, "#4c72b0") for name, stats in result["paired"].items()
            if not result["methods"][name].get("identical_to")]
    rows += [(f"teacher: {key}", stats, "#c44e52") for key, stats in result["teacher_effect"].items()]
    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.45 * max(1, len(rows))))
    for i, (_, stats, color) in enumerate(reversed(rows)):
        ci = stats["ci95"]
        ax.errorbar(100 * stats["delta"], i, xerr=None if ci is None else 100 * ci, fmt="o", color=color, capsize=3)
        ax.annotate(f"p_holm {_p(stats['p_holm'])}", (1.01, i), xycoords=("axes fraction", "data"), va="center",
                    fontsize=7)
    ax.axvline(0.0, color="0.4", lw=1, ls="--")
    if result["teacher_effect"] and len(rows) > len(result["teacher_effect"]):  # teacher effects below the line
        ax.axhline(len(result["teacher_effect"]) - 0.5, color="0.7", lw=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in reversed(rows)], fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("difference in held-out accuracy (points), 95% CI over seeds")
    name = result["data"]["file"] or "in-memory data"
    ax.set_title(f"cmda probe: {name}, {len(result['seeds'])} seeds, {result['epochs']} epochs", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
