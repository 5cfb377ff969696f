"""Print the Markdown tables of the task results beside the paper's numbers.

Reads ``benchmarks/results/{classification,anomaly,captioning}-*.json`` (the result-file
contract) and prints one table per task: ours (last epoch, mean ± 95 % CI over seeds) and the
paper's Table I / II value for the same data set and student where the paper has one.

Run: ``python benchmarks/report.py [--results benchmarks/results]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

RESULTS = Path(__file__).resolve().parent / "results"

#: paper Table I (Wikipedia; AUROC, AUPR) and Table II / VI (Wikipedia accuracy), percent
PAPER = {
    ("anomaly", "wikipedia", "image"): {"base": (73.07, 95.48), "mixup": (74.49, 95.94), "cmda": (76.22, 96.10)},
    ("anomaly", "wikipedia", "text"): {"base": (89.69, 98.36), "mixup": (89.24, 98.34), "cmda": (91.48, 98.73)},
    ("classification", "wikipedia", "image"): {"base": (53.39,), "mixup": (53.96,), "cmda": (54.79,),
                                               "cmda_offline": (54.75,)},
    ("classification", "wikipedia", "text"): {"base": (70.82,), "mixup": (68.17,), "cmda": (72.11,),
                                              "cmda_offline": (71.80,)},
}


def cell(rec: Dict) -> str:
    return f"{100 * rec['mean']:.2f} ± {100 * rec['ci95']:.2f}"


def table(payload: Dict) -> List[str]:
    key = (payload["task"], payload["dataset"], payload["student"])
    paper = PAPER.get(key, {})
    metrics = [payload["metric"], *payload.get("metrics", {})]
    blocks = {payload["metric"]: payload["methods"], **payload.get("metrics", {})}
    base = {m: blocks[m].get("base") for m in metrics}
    head = " | ".join(f"{m} (ours)" for m in metrics)
    paper_head = " | ".join(f"{m} (paper)" for m in metrics) if paper else ""
    lines = [f"**{payload['task']} · {payload['dataset']} · student {payload['student']}** "
             f"({payload.get('student_features', '')} ← teacher {payload.get('teacher_features', payload['teacher'])}; "
             f"{len(payload['seeds'])} seeds, {payload['epochs']} epochs{', quick' if payload['quick'] else ''})", "",
             f"| method | {head} | Δ vs base ({metrics[0]}) |" + (f" {paper_head} |" if paper else ""),
             "|---" * (2 + len(metrics) + (len(metrics) if paper else 0)) + "|"]
    for name, rec in payload["methods"].items():
        cells = [cell(blocks[m][name]) for m in metrics]
        delta = "" if base[metrics[0]] is None else f"{100 * (rec['mean'] - base[metrics[0]]['mean']):+.2f}"
        row = f"| {name} | " + " | ".join(cells) + f" | {delta} |"
        if paper:
            values = paper.get(name.replace("_tuned", "") if not name.endswith("_tuned") else "", ())
            row += " " + " | ".join(f"{v:.2f}" for v in values) + (" |" if values else " — |" * len(metrics))
        lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    for task in ("classification", "anomaly", "captioning"):
        for path in sorted(Path(args.results).glob(f"{task}-*.json")):
            print("\n".join(table(json.loads(path.read_text()))) + "\n")


if __name__ == "__main__":
    main()
