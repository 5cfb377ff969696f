"""Markdown tables of the benchmark results beside the paper's numbers.

Reads ``benchmarks/results/{classification,anomaly,captioning}-*.json`` (the result-file
contract) and the speed benchmarks' ``bench_*.json``, and renders one table per task (ours:
last epoch, mean ± 95 % CI over seeds, and the paper's Table I / II value where it has one)
plus a table of the speed ratios.

Run: ``python benchmarks/report.py`` prints the tables; ``--write`` regenerates the block
between ``<!-- report:begin -->`` and ``<!-- report:end -->`` in ``benchmarks/README.md`` and
``docs/benchmarks.md`` and copies the convergence plots to ``docs/assets/results/``;
``--check`` fails when those files are stale (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

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


#: the loss form of result files written before they recorded it
LOSS_FORM = {"classification": "mean", "anomaly": "sum", "captioning": "replace"}


def cell(rec: Dict) -> str:
    return f"{100 * rec['mean']:.2f} ± {100 * rec['ci95']:.2f}"


def fmt_p(p) -> str:
    return "—" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def delta_cell(stats: Dict) -> str:
    """``+1.23 [+0.20, +2.26]`` in percentage points (paired over the shared seeds)."""
    if stats.get("ci95") is None:
        return f"{100 * stats['delta']:+.2f}"
    low, high = stats["delta"] - stats["ci95"], stats["delta"] + stats["ci95"]
    return f"{100 * stats['delta']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def title(payload: Dict) -> str:
    loss = {"sum": "real rows weigh 1 in every method", "mean": "old loss form: one mean over real and generated rows",
            "replace": "mixed rows replace real ones"}.get(payload.get("loss_form", LOSS_FORM[payload["task"]]), "")
    return (f"**{payload['task']} · {payload['dataset']} · student {payload['student']}** "
            f"({payload.get('student_features', '')} ← teacher {payload.get('teacher_features', payload['teacher'])}; "
            f"{len(payload['seeds'])} seeds, {payload['epochs']} epochs{', quick' if payload['quick'] else ''}"
            f"{'; ' + loss if loss else ''})")


def table(payload: Dict) -> List[str]:
    """One row per method: the metric(s), then the paired comparison with base on the same seeds."""
    key = (payload["task"], payload["dataset"], payload["student"])
    paper = PAPER.get(key, {})
    payload = C.with_paired(payload)
    metrics = [payload["metric"], *payload.get("metrics", {})]
    blocks = {payload["metric"]: payload["methods"], **payload.get("metrics", {})}
    head = " | ".join(f"{m} (ours)" for m in metrics)
    paper_head = " | ".join(f"{m} (paper)" for m in metrics) if paper else ""
    lines = [title(payload), "",
             f"| method | {head} | Δ vs base, paired [95 % CI] ({metrics[0]}) | p | p (Holm) |"
             + (f" {paper_head} |" if paper else ""),
             "|---" * (4 + len(metrics) + (len(metrics) if paper else 0)) + "|"]
    for name in payload["methods"]:
        cells = [cell(blocks[m][name]) for m in metrics]
        stats = payload["paired"].get(name)
        if name == "base" or stats is None:
            compare = "— | — | —"
        elif payload["methods"][name].get("identical_to") == "base":
            compare = "= base (identical by construction) | — | —"
        else:
            compare = f"{delta_cell(stats)} | {fmt_p(stats['p'])} | {fmt_p(stats['p_holm'])}"
        row = f"| {name} | " + " | ".join(cells) + f" | {compare} |"
        if paper:
            values = paper.get(name.replace("_tuned", "") if not name.endswith("_tuned") else "", ())
            row += " " + " | ".join(f"{v:.2f}" for v in values) + (" |" if values else " — |" * len(metrics))
        lines.append(row)
    effects = payload["teacher_effect"]
    if effects:
        lines += ["", f"Teacher effect (the method minus the same pipeline with an uninformative teacher, paired, "
                      f"{metrics[0]} points):", "", "| comparison | Δ [95 % CI] | p | p (Holm) |", "|---|---|---|---|"]
        lines += [f"| {name} | {delta_cell(e)} | {fmt_p(e['p'])} | {fmt_p(e['p_holm'])} |" for name, e in effects.items()]
    return lines


def result_files(results: Path) -> List[Path]:
    """The committed task results (``--quick`` / ``--smoke`` runs are smoke checks, not results)."""
    return [path for task in ("classification", "anomaly", "captioning")
            for path in sorted(results.glob(f"{task}-*.json")) if not path.stem.endswith("-quick")]


def label(payload: Dict) -> str:
    space = " pixels" if payload.get("student_space") == "pixels" else ""
    tag = f" {payload['tag']}" if payload.get("tag") else ""
    return f"{payload['task']} {payload['dataset']} {payload['student']}{space}{tag}"


def effect_summary(results: Path) -> List[str]:
    """Every teacher effect and every CMDA - base of every result file, in one table."""
    rows = []
    for path in result_files(results):
        payload = C.with_paired(json.loads(path.read_text()))
        for name, e in payload["teacher_effect"].items():
            rows.append(f"| {label(payload)} | teacher effect: {name} | {delta_cell(e)} | {fmt_p(e['p'])} | "
                        f"{fmt_p(e['p_holm'])} | {e['n']} |")
        for name in ("cmda", "cmda_offline", "mixup"):
            e = payload["paired"].get(name)
            if e is not None:
                rows.append(f"| {label(payload)} | {name} - base | {delta_cell(e)} | {fmt_p(e['p'])} | "
                            f"{fmt_p(e['p_holm'])} | {e['n']} |")
    if not rows:
        return []
    return ["**Teacher effects and gains over Base, every result file** (paired over the shared seeds, last "
            "epoch, percentage points; Holm over the comparisons of each file; `random_teacher` / "
            "`shuffled_teacher` are the same pipeline with an uninformative teacher)", "",
            "| result | comparison | Δ [95 % CI] | p | p (Holm) | seeds |", "|---|---|---|---|---|---|", *rows]


def forest_plot(results: Path, path: Path) -> Optional[Path]:
    """One row per teacher effect and per CMDA - base: the paired delta with its 95 % CI."""
    from teacher_studies import forest

    rows = []
    for file in result_files(results):
        payload = C.with_paired(json.loads(file.read_text()))
        for name, e in payload["teacher_effect"].items():
            rows.append((f"{label(payload)}: {name}", e, "tab:red"))
        for name in ("cmda", "cmda_offline"):
            if name in payload["paired"]:
                rows.append((f"{label(payload)}: {name} - base", payload["paired"][name], "tab:blue"))
    if not rows:
        return None
    return forest(rows, path, "red: teacher effect (CMDA - same pipeline, uninformative teacher);\n"
                              "blue: CMDA - Base (paired, 95 % CI over seeds)")


def refresh_paired(results: Path, write: bool) -> List[str]:
    """Result files whose ``paired`` / ``teacher_effect`` blocks are missing or stale (rewritten with ``write``)."""
    stale = []
    for path in result_files(results):
        payload = json.loads(path.read_text())
        fresh = C.with_paired(payload)
        if fresh != payload:
            stale.append(str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path))
            if write:
                path.write_text(json.dumps(fresh, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return stale


#: GPU rows also show the kernels without the argument checks, and TF32; CPU rows the matmul
#: floor (no targets: where the time goes)
BF16_RATIO = {"dense_bf16/clone_bf16": "bfloat16 batch, dense mix without checks vs a bfloat16 clone"}
EXTRA_RATIOS = {  # device type -> the no-target rows shown for it, in this order
    "cuda": {"dense_kernel/clone": "dense mix without argument checks",
             "topk_kernel/clone": "top-k mix without argument checks",
             "dense_tf32/clone": "dense, no checks, TF32 matmul", **BF16_RATIO},
    "cpu": {"matmul_floor/clone": "the dense flops at the measured sgemm peak: no fp32 mix is faster",
            **BF16_RATIO},
}


#: bench_loader's loader names as the speed table shows them
LOADER_NAMES = {"cmda": "CMDACollate", "default": "default_collate", "dataset": "CrossModalAugmentedDataset (its sampler)",
                "dataset_shuffle": "CrossModalAugmentedDataset (shuffle=True)"}


def speed_table(results: Path) -> List[str]:
    """One row per speed target, read from the bench_*.json files that exist."""
    rows: List[str] = []
    for mixing in sorted(results.glob("bench_mixing*.json")):
        payload = json.loads(mixing.read_text())
        gpu = payload.get("machine", {}).get("cuda")
        for result in payload.get("results", []):
            where = f"{gpu} " if result["device"].startswith("cuda") and gpu else ""
            case = f"{where}{result['device']} {result['threads']} thread(s) {result['case']}"
            for ratio, target in result.get("targets", {}).items():
                rows.append(f"| bench_mixing | {case} | {ratio} ({target['target']}) | {target['value']:.2f} | "
                            f"{'PASS' if target['pass'] else 'FAIL'} |")
            for ratio, what in EXTRA_RATIOS["cuda" if result["device"].startswith("cuda") else "cpu"].items():
                if ratio in result.get("ratios", {}):
                    rows.append(f"| bench_mixing | {case} | {ratio} ({what}) | {result['ratios'][ratio]:.2f} | "
                                f"no target |")
    for gmm in sorted(results.glob("bench_gmm*.json")):
        payload = json.loads(gmm.read_text())
        config = payload.get("config", {})
        machine = f"{config['cuda']} machine, " if config.get("cuda") else ""
        for row in payload.get("rows", []):
            ok = row["speedup"] >= 3 and row["rel_ll_diff"] <= 1e-4
            verdict = ("PASS" if ok else "FAIL") if row["covariance_type"] == "full" and row["device"] == "cpu" \
                else "no target"
            threads = f" ({config.get('torch_threads')} threads)" if row["device"] == "cpu" else ""
            rows.append(f"| bench_gmm | {machine}{row['device']}{threads} {row['covariance_type']} | speed-up vs "
                        f"scikit-learn (rel. log-lik. diff {row['rel_ll_diff']:.1e}) | {row['speedup']:.2f} | "
                        f"{verdict} |")
    for online in sorted(results.glob("bench_online*.json")):
        payload = json.loads(online.read_text())
        where = payload["machine"].get("cuda") or "cpu"
        case = f"{where}, batch {payload['batch']} photos 3x{payload['size']}x{payload['size']}, ResNet-18"
        for ratio, value in payload["ratios"].items():
            rows.append(f"| bench_online | {case} | {ratio} (host reads per CMDAugment call: "
                        f"{payload['host_reads_per_augment']}) | {value:.2f} | no target |")
    loader = results / "bench_loader.json"
    if loader.is_file():
        payload = json.loads(loader.read_text())
        # every target of the file (``targets``: collate vs default_collate, dataset vs collate); files
        # written before there were two carry only the first, as ``target``
        targets = payload.get("targets") or {"cmda": payload.get("target", {})}
        for target in targets.values():
            what = LOADER_NAMES.get(target.get("loader"), target.get("loader"))
            peer = LOADER_NAMES.get(target.get("relative_to"), target.get("relative_to"))
            for name, rec in target.get("per_dataset", {}).items():
                rows.append(f"| bench_loader | {name} dataset, 2 workers, B = {target.get('batch_size')} | "
                            f"{what} ÷ {peer} samples/s >= {target.get('threshold')} "
                            f"(CPU-time ratio {rec['cpu_ratio']:.2f}) | {rec['wall_ratio']:.2f} | {rec['verdict']} |")
        for name, case in payload.get("results", {}).get("batch_256", {}).items():  # reported beside the targets
            if "dataset_shuffle" in case.get("ratio_to_default", {}):
                rows.append(f"| bench_loader | {name} dataset, 2 workers, B = 256 | {LOADER_NAMES['dataset_shuffle']} "
                            f"÷ CMDACollate samples/s (CPU-time ratio "
                            f"{case['cpu_ratio_to_default']['dataset_shuffle']:.2f}) | "
                            f"{case['ratio_to_default']['dataset_shuffle']:.2f} | no target |")
    if not rows:
        return []
    return ["**Speed targets** (ratios measured in one run against a peer; see each JSON for the timings)", "",
            "| benchmark | case | ratio | value | target |", "|---|---|---|---|---|", *rows]


def aligner_table(results: Path) -> List[str]:
    """bench_aligner.json: retrieval on the Wikipedia test pairs, one row per latent space."""
    path = results / "bench_aligner.json"
    if not path.is_file():
        return []
    payload = json.loads(path.read_text())
    settings = payload.get("settings", {})
    rows = [f"| {r['method']} | {r['i2t_top1']:.4f} | {r['t2i_top1']:.4f} | {r['i2t_mAP']:.4f} | {r['t2i_mAP']:.4f} | "
            f"{r['mean_mAP']:.4f} |" for r in payload.get("rows", [])]
    return [f"**bench_aligner** (Wikipedia test pairs, {settings.get('epochs')} epochs, dim {settings.get('dim')}, "
            f"tau {settings.get('tau')}; mean mAP of a random ranking is about 0.11)", "",
            "| latent space | image→text top-1 | text→image top-1 | image→text mAP | text→image mAP | mean mAP |",
            "|---|---|---|---|---|---|", *rows]


def render(results: Path, plots: str) -> str:
    """The generated Markdown block: task tables with their plots, then the speed table."""
    parts: List[str] = []
    summary = effect_summary(results)
    if summary:
        forest = results / "teacher-effects.png"
        parts.append("\n".join(summary + ["", f"![Teacher effects and CMDA - Base, every result file]"
                                               f"({plots}/{forest.name})"]))
    for path in result_files(results):
        lines = table(json.loads(path.read_text()))
        png = path.with_suffix(".png")
        if png.is_file():
            lines += ["", f"![{path.stem}: metric per epoch per method]({plots}/{png.name})"]
        box = path.with_name(path.stem + "-box.png")
        if box.is_file():
            lines += ["", f"![{path.stem}: last-epoch metric over seeds]({plots}/{box.name})"]
        parts.append("\n".join(lines))
    speed = speed_table(results)
    if speed:
        parts.append("\n".join(speed))
    aligner = aligner_table(results)
    if aligner:
        parts.append("\n".join(aligner))
    return "\n\n".join(parts) + "\n"


STUDY_COMPARISONS = (("cmda_offline - random_teacher_offline", "teacher_effect"),
                     ("cmda_offline - shuffled_teacher_offline", "teacher_effect"),
                     ("cmda_offline", "paired"), ("mixup", "paired"))


def when_tables(results: Path, plots: str) -> str:
    """docs/when-it-helps.md: one table per study of ``teacher_studies.py`` (results/when-*.json)."""
    parts: List[str] = []
    summary = results / "when-it-helps.png"
    if summary.is_file():
        parts.append(f"![Teacher effect in every setting of every study]({plots}/{summary.name})")
    for path in sorted(results.glob("when-*.json")):
        if path.stem.endswith("-quick"):
            continue
        study = json.loads(path.read_text())
        lines = [f"**{study['study']}**: {study['what']} (`{path.name}`)", "",
                 "| setting | metric | teacher effect vs random | vs shuffled | CMDA - Base | Mixup - Base | "
                 "Base |", "|---|---|---|---|---|---|---|"]
        for record in study["settings"]:
            for metric, blocks in record["comparisons"].items():
                if metric.startswith("aupr"):
                    continue
                cells = []
                for name, block in STUDY_COMPARISONS:
                    e = blocks[block].get(name)
                    cells.append("—" if e is None else f"{delta_cell(e)}, p {fmt_p(e['p'])}")
                base = record["methods"][metric].get("base")
                lines.append(f"| {record['label']} | {metric} | " + " | ".join(cells) +
                             f" | {'—' if base is None else cell(base)} |")
        if study.get("pending"):
            lines += ["", f"Not run yet ({len(study['pending'])} settings; `teacher_studies.py {study['study']}` "
                          f"runs them): " + "; ".join(study["pending"]) + "."]
        png = path.with_suffix(".png")
        if png.is_file():
            lines += ["", f"![{path.stem}]({plots}/{png.name})"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n" if parts else "(no study has run yet)\n"


BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
REPO = Path(__file__).resolve().parents[1]
#: file -> (the path of the plots from there, the block's renderer)
TARGETS = {REPO / "benchmarks" / "README.md": ("results", render),
           REPO / "docs" / "benchmarks.md": ("assets/results", render),
           REPO / "docs" / "when-it-helps.md": ("assets/results", when_tables)}


def _replace_block(text: str, block: str, path: Path) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"report.py: {path} has no {BEGIN} ... {END} block to regenerate")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n<!-- generated by benchmarks/report.py --write: do not edit by hand -->\n\n{block}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="regenerate the README and docs blocks and plots")
    mode.add_argument("--check", action="store_true", help="exit 1 when the README or docs blocks are stale")
    args = parser.parse_args()
    results = Path(args.results)
    if not (args.write or args.check):
        print(render(results, "results"))
        return
    stale = refresh_paired(results, args.write)
    if args.write:
        forest_plot(results, results / "teacher-effects.png")
    assets = REPO / "docs" / "assets" / "results"
    for path, (plots, renderer) in TARGETS.items():
        text = path.read_text(encoding="utf-8")
        new = _replace_block(text, renderer(results, plots), path)
        if new != text:
            stale.append(str(path.relative_to(REPO)))
            if args.write:
                path.write_text(new, encoding="utf-8")
    for png in sorted(results.glob("*.png")):
        if "-quick" in png.stem:
            continue
        copy = assets / png.name
        if not copy.is_file() or copy.read_bytes() != png.read_bytes():
            stale.append(str(copy.relative_to(REPO)))
            if args.write:
                assets.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, copy)
    if args.check and stale:
        raise SystemExit("report.py: stale, run `python benchmarks/report.py --write`: " + ", ".join(stale))
    print("up to date" if not stale else "wrote " + ", ".join(stale))


if __name__ == "__main__":
    main()
