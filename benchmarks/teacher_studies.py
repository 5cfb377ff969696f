"""Where does the teacher pay off? The studies behind docs/when-it-helps.md.

Every setting is one run of a task script (``classification.py`` or ``anomaly_ssd.py``) with
the teacher controls as standard rows, 5 seeds, written to ``results/studies/``; a study
collects its settings' paired statistics into ``results/when-<study>.json`` (the full
configuration of every run, its teacher effects and its gains over Base) and a forest plot
``results/when-<study>.png``. ``--summary`` draws every study in one forest plot
(``results/when-it-helps.png``).

Studies:

* ``anomaly-normal-sets``: SSD anomaly detection (20 epochs), text students of Wikipedia and Web
  News and the Web News image student, five normal-class sets per data set (the paper's
  three classes, two other three-class sets, a five- and a seven-class set: the paper's
  Table V says the margin grows with the number of normal groups), scored on the ``split``
  and the ``all_abnormal`` test sets.
  Offline CMDA with its random- and shuffled-teacher controls, Base and Mixup.
* ``teacher-strength``: a dose-response curve. Wikipedia classification, image (SIFT)
  student, with teachers of rising quality: LDA-10, LDA-50, MiniLM (the committed run; a
  logistic regression on them scores 67 / 81 / 85 %), each with its shuffled and random
  controls; and a text student on LDA-10 (near the paper's Doc2Vec regime).
* ``train-size``: 10 / 25 / 50 / 100 % of the Wikipedia and Web News train splits (image
  students), each seed's epoch chosen on a validation split (``--select-on-val``).
* ``budget``: generated rows per real row (1, 2, 4) and their loss weight (0.5, 1, 2),
  Wikipedia image student, offline CMDA against its random teacher and Mixup at the same
  budget.

Run: ``python benchmarks/teacher_studies.py all`` (hours on 2 CPU cores; a finished setting
is not run again unless ``--rerun``), ``--quick`` (2 seeds, few epochs, ``-quick`` files).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

BENCH = Path(__file__).resolve().parent
OFFLINE = ["base", "mixup", "cmda_offline", "random_teacher_offline", "shuffled_teacher_offline"]
#: the anomaly study trains 20 epochs (the committed anomaly results: 40), the CPU budget of 50 runs
ANOMALY_EPOCHS = 20
#: the students of the anomaly study: both text students, and Web News images (the committed
#: Web News image result has a teacher effect too; Wikipedia's SIFT images score near chance)
ANOMALY_PAIRS = (("webnews", "text"), ("webnews", "image"), ("wikipedia", "text"))
#: normal-class sets per data set: the paper's, two other three-class sets, five and seven classes
NORMAL_SETS = {"wikipedia": ["7,8,9", "0,2,5", "1,3,6", "0,3,5,7,9", "0,1,2,4,6,8,9"],
               "webnews": ["2,6,9", "0,4,7", "1,3,8", "0,2,4,6,9", "0,1,3,5,6,8,9"]}


def settings(study: str) -> List[Dict[str, Any]]:
    """The runs of ``study``: ``{"label", "script", "args", "file"}`` (file name without -quick)."""
    runs: List[Dict[str, Any]] = []
    if study == "anomaly-normal-sets":
        for dataset, student in ANOMALY_PAIRS:
            for normal in NORMAL_SETS[dataset]:
                runs.append({"label": f"{dataset} {student}, normal {{{normal}}}", "script": "anomaly_ssd.py",
                             "epochs": ANOMALY_EPOCHS,
                             "args": ["--dataset", dataset, "--student", student, "--normal", normal,
                                      "--all-abnormal", "--methods", *OFFLINE],
                             "file": f"anomaly-{dataset}-{student}-normal-{normal.replace(',', '-')}.json"})
    elif study == "teacher-strength":
        controls = ["base", "mixup", "cmda_offline", "random_teacher_offline", "shuffled_teacher_offline"]
        for features in ("lda10", "lda50", "minilm384"):
            runs.append({"label": f"wikipedia image <- text {features}", "script": "classification.py",
                         "args": ["--dataset", "wikipedia", "--student", "image", "--text-features", features,
                                  "--methods", *controls],
                         "file": f"classification-wikipedia-image-text-{features}.json"})
        runs.append({"label": "wikipedia text lda10 <- image SIFT", "script": "classification.py",
                     "args": ["--dataset", "wikipedia", "--student", "text", "--text-features", "lda10",
                              "--methods", *controls],
                     "file": "classification-wikipedia-text-text-lda10.json"})
    elif study == "train-size":
        for dataset in ("wikipedia", "webnews"):
            for frac in (0.1, 0.25, 0.5, 1.0):
                part = f"-frac{round(100 * frac)}" if frac < 1 else ""
                runs.append({"label": f"{dataset} image, {round(100 * frac)} % of train",
                             "script": "classification.py",
                             "args": ["--dataset", dataset, "--student", "image", "--train-frac", str(frac),
                                      "--select-on-val", "--methods", *OFFLINE[:4]],
                             "file": f"classification-{dataset}-image{part}-valsel.json"})
    elif study == "budget":
        for per_real, weight in ((1, 0.5), (1, 2.0), (2, 1.0), (4, 1.0)):
            parts = (f"-gen{per_real}" if per_real > 1 else "") + (f"-w{weight:g}" if weight != 1 else "")
            runs.append({"label": f"wikipedia image, {per_real} generated per real row at weight {weight:g}",
                         "script": "classification.py",
                         "args": ["--dataset", "wikipedia", "--student", "image", "--gen-per-real", str(per_real),
                                  "--gen-weight", str(weight), "--methods", *OFFLINE[:4]],
                         "file": f"classification-wikipedia-image{parts}.json"})
    else:
        raise SystemExit(f"study: expected one of {STUDIES}, got {study!r}")
    return runs


STUDIES = ("anomaly-normal-sets", "teacher-strength", "train-size", "budget")
#: one line per study for its JSON (the module docstring says more)
DESCRIPTIONS = {
    "anomaly-normal-sets": "SSD anomaly detection (20 epochs), text students and the Web News image student, "
                           "five normal-class sets per data set "
                           "(3, 3, 3, 5 and 7 classes), split and all_abnormal test sets; offline CMDA and its "
                           "random / shuffled teacher controls, Base, Mixup",
    "teacher-strength": "Wikipedia classification, image student with text teachers LDA-10 < LDA-50 < MiniLM, and a "
                        "text student on LDA-10; offline CMDA and its controls",
    "train-size": "Wikipedia and Web News classification, image students, 10 / 25 / 50 / 100 % of the train split, "
                  "each seed's epoch chosen on a validation split; offline CMDA and its random teacher",
    "budget": "Wikipedia classification, image student: generated rows per real row and their loss weight; "
              "offline CMDA, its random teacher and Mixup at the same budget",
}


def run_setting(run: Dict[str, Any], args: argparse.Namespace) -> Path:
    """Run one setting (unless its result exists and not ``--rerun``); return its result file."""
    folder = Path(args.out) / "studies"
    path = folder / (run["file"].replace(".json", "-quick.json") if args.quick else run["file"])
    if path.is_file() and not args.rerun:
        return path
    cmd = [sys.executable, str(BENCH / run["script"]), *run["args"], "--out", str(folder), "--no-progress",
           "--jobs", str(args.jobs)]
    if args.quick:
        cmd.append("--smoke" if args.smoke else "--quick")
    else:
        cmd += ["--seeds", str(args.seeds)] if args.seeds else []
        cmd += ["--epochs", str(run["epochs"])] if run.get("epochs") else []
    start = time.time()
    print(f"== {run['label']}: {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, cwd=BENCH.parent, env=dict(os.environ, MPLBACKEND="Agg"))
    if done.returncode != 0:
        raise SystemExit(f"{run['script']} failed ({done.returncode}) for {run['label']}")
    if not path.is_file():
        raise SystemExit(f"{run['script']} wrote no {path}")
    print(f"   {time.time() - start:.0f} s -> {path.name}", flush=True)
    return path


def setting_record(run: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """What the study keeps of one run: its configuration and paired comparisons, per metric."""
    payload = json.loads(path.read_text())
    blocks = {payload["metric"]: C.paired_blocks(payload["methods"]),
              **{m: C.paired_blocks(methods) for m, methods in payload.get("metrics", {}).items()}}
    config = {k: v for k, v in payload.items() if k not in ("methods", "metrics", "paired", "teacher_effect",
                                                            "metrics_paired")}
    means = {metric: {name: {"mean": rec["mean"], "ci95": rec["ci95"]} for name, rec in methods.items()}
             for metric, methods in [(payload["metric"], payload["methods"]), *payload.get("metrics", {}).items()]}
    flags = [*run["args"], *(["--epochs", str(run["epochs"])] if run.get("epochs") else []),
             "--out", "benchmarks/results/studies"]
    return {"label": run["label"], "file": f"studies/{path.name}",
            "command": f"python benchmarks/{run['script']} " + " ".join(flags), "config": config, "methods": means,
            "comparisons": blocks}


def forest(rows: List[tuple], path: Path, title: str) -> Optional[Path]:
    """``rows`` = ``[(label, stats, colour)]``: paired delta with its 95 % CI, one line each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a bench dependency
        return None
    fig, ax = plt.subplots(figsize=(9.0, 0.26 * len(rows) + 1.3))
    for y, (label, e, colour) in enumerate(reversed(rows)):
        ax.errorbar(100 * e["delta"], y, xerr=100 * (e["ci95"] or 0.0), fmt="o", color=colour, ms=3.5,
                    capsize=2, lw=1.1)
    ax.axvline(0, color="0.3", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=6.5)
    ax.set_xlabel("paired difference, points (95 % CI over seeds)")
    ax.set_title(title, fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def forest_rows(record: Dict[str, Any], metric: str) -> List[tuple]:
    """The teacher effects (red) and CMDA - Base (blue) of one setting's ``metric``."""
    block = record["comparisons"][metric]
    rows = [(f"{record['label']} [{metric}]: {name}", e, "tab:red") for name, e in block["teacher_effect"].items()]
    for name in ("cmda", "cmda_offline"):
        if name in block["paired"]:
            rows.append((f"{record['label']} [{metric}]: {name} - base", block["paired"][name], "tab:blue"))
    return rows


def collect(study: str, args: argparse.Namespace) -> Path:
    """Run the settings of ``study`` that have no result yet (``--collect-only``: none), then
    write its JSON and forest plot from the settings that have one; the others are listed
    under ``pending``."""
    runs = settings(study)[:args.limit]
    records, pending = [], []
    for run in C.progress(runs, desc=study, enabled=not args.no_progress):
        path = Path(args.out) / "studies" / (run["file"].replace(".json", "-quick.json") if args.quick
                                             else run["file"])
        if args.collect_only and not path.is_file():
            pending.append(run["label"])
            continue
        records.append(setting_record(run, run_setting(run, args)))
    if not records:
        raise SystemExit(f"{study}: no setting has a result yet (run it without --collect-only)")
    out = Path(args.out) / f"when-{study}{'-quick' if args.quick else ''}.json"
    payload = {"study": study, "quick": bool(args.quick), "what": DESCRIPTIONS[study], "settings": records,
               "pending": pending,
               "statistics": "paired t over the seeds every method shares (data order, initialisation); Holm over "
                             "the comparisons of each run; deltas in metric units (fractions)",
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    metrics = lambda r: [m for m in r["comparisons"] if m.startswith("auroc") or m == "accuracy"]  # noqa: E731
    rows = [row for r in records for m in metrics(r) for row in forest_rows(r, m)]
    forest(rows, out.with_suffix(".png"), f"{study}: red = teacher effect (CMDA - same pipeline,\n"
                                          f"uninformative teacher), blue = CMDA - Base")
    print(f"wrote {out}", flush=True)
    return out


def summary(out: Path, quick: bool = False) -> Optional[Path]:
    """One forest plot of every study's teacher effects: results/when-it-helps.png."""
    rows = []
    for study in STUDIES:
        path = Path(out) / f"when-{study}{'-quick' if quick else ''}.json"
        if not path.is_file():
            continue
        for record in json.loads(path.read_text())["settings"]:
            metric = "auroc" if "auroc" in record["comparisons"] else "accuracy"
            rows += [row for row in forest_rows(record, metric) if row[2] == "tab:red"]
    if not rows:
        return None
    return forest(rows, Path(out) / f"when-it-helps{'-quick' if quick else ''}.png",
                  "Teacher effect: CMDA minus the same pipeline with a random / shuffled teacher\n"
                  "(paired over 5 seeds, 95 % CI)")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", nargs="?", default="all", choices=(*STUDIES, "all"))
    parser.add_argument("--quick", action="store_true", help="2 seeds, few epochs (-quick files)")
    parser.add_argument("--smoke", action="store_true", help="the tests' preset (implies --quick)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of every run (default 5)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel inside each script")
    parser.add_argument("--rerun", action="store_true", help="run settings whose result file exists again")
    parser.add_argument("--summary", action="store_true", help="only redraw results/when-it-helps.png")
    parser.add_argument("--limit", type=int, default=None, help="only the first N settings of each study")
    parser.add_argument("--collect-only", action="store_true",
                        help="run nothing: write the study from the settings that have a result (the rest: pending)")
    parser.add_argument("--out", default=str(C.RESULTS_DIR), help="results folder (runs go to its studies/)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    args.quick = args.quick or args.smoke
    (Path(args.out) / "studies").mkdir(parents=True, exist_ok=True)
    if not args.summary:
        for study in (STUDIES if args.study == "all" else (args.study,)):
            collect(study, args)
    path = summary(Path(args.out), args.quick)
    if path is not None:
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
