"""Shared harness of the task benchmarks (classification, anomaly_ssd, captioning).

What every task script gets from here:

* :func:`add_common_args` / :func:`resolve_preset`: ``--seeds``, ``--epochs``, ``--device``,
  ``--quick`` (a few minutes on a 2-core CPU), ``--smoke`` (seconds; used by the tests),
  ``--out`` (results folder), ``--no-plot``.
* :func:`mean_ci95`: mean and half-width of the 95 % Student-t confidence interval over seeds.
* :func:`summarise_method`: the per-method record of the result-file contract
  (``mean``, ``ci95``, ``per_seed``, ``curve``, ``curve_ci95``, ``max_over_epochs``).
* :func:`write_result` (JSON + convergence plot + Markdown table next to it) and
  :func:`check_result` (the schema the tests and other tools rely on).

Reporting rule: ``mean`` / ``per_seed`` are the LAST epoch. ``max_over_epochs`` (the
authors' test-set model selection) is stored separately and always labelled as such.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TASKS = ("anomaly", "classification", "captioning")
METRICS = {"auroc": (0.0, 1.0), "aupr": (0.0, 1.0), "accuracy": (0.0, 1.0), "bleu4": (0.0, 1.0),
           "auroc_all_abnormal": (0.0, 1.0), "aupr_all_abnormal": (0.0, 1.0)}
SCHEMA_VERSION = 1

# two-sided 97.5 % quantiles of Student's t for small degrees of freedom (scipy if available)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, dof))
    except ImportError:  # pragma: no cover - scipy is a bench dependency
        keys = [k for k in sorted(_T975) if k <= dof]
        return _T975[keys[-1]] if keys else _T975[1]


def mean_ci95(values: Iterable[float]) -> tuple:
    """``(mean, half-width)`` of the 95 % Student-t interval; half-width 0.0 for one value.

    Examples:
        >>> m, h = mean_ci95([0.5, 0.7])
        >>> round(m, 3), round(h, 3)
        (0.6, 1.271)
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci95: expected at least one value, got none")
    if x.size == 1:
        return float(x[0]), 0.0
    half = t_quantile(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


# --------------------------------------------------------------------------------- arguments
def add_common_args(parser: argparse.ArgumentParser, *, default_epochs: int) -> argparse.ArgumentParser:
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; quick 2)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs (default {default_epochs})")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small preset: minutes on a 2-core CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny preset for the tests (seconds)")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="results folder (default benchmarks/results)")
    parser.add_argument("--no-plot", action="store_true", help="skip the convergence plot")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="hide tqdm bars")
    return parser


def resolve_preset(args: argparse.Namespace, *, default_epochs: int, quick_epochs: int,
                   smoke_epochs: int = 2) -> argparse.Namespace:
    """Fill ``seeds`` / ``epochs`` from the preset unless given explicitly."""
    if args.smoke:
        args.quick = True
    preset_epochs = smoke_epochs if args.smoke else quick_epochs if args.quick else default_epochs
    args.epochs = args.epochs or preset_epochs
    args.seeds = args.seeds or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def progress(iterable: Iterable, *, desc: str, enabled: bool = True, total: Optional[int] = None) -> Iterable:
    """tqdm around ``iterable`` when tqdm is installed and ``enabled``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def generator(seed: int, *salt: int) -> torch.Generator:
    """An explicit CPU generator seeded by ``(seed, *salt)`` (never the global RNG)."""
    value = int(seed)
    for s in salt:
        value = (value * 1_000_003 + int(s)) % (2 ** 62)
    return torch.Generator().manual_seed(value)


# --------------------------------------------------------------------------------- results
def summarise_method(per_seed_curves: Sequence[Sequence[float]], **extra: Any) -> Dict[str, Any]:
    """The contract's method record from one metric curve per seed (last epoch = result)."""
    curves = np.asarray(per_seed_curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[1] == 0:
        raise ValueError(f"summarise_method: expected [seeds, epochs] curves, got shape {curves.shape}")
    last = curves[:, -1]
    mean, ci = mean_ci95(last)
    curve, curve_ci = zip(*(mean_ci95(curves[:, e]) for e in range(curves.shape[1])))
    best = curves.max(axis=1)
    best_mean, best_ci = mean_ci95(best)
    record = {"mean": mean, "ci95": ci, "per_seed": last.tolist(), "curve": list(curve),
              "curve_ci95": list(curve_ci), "per_seed_curves": curves.tolist(),
              "max_over_epochs": {"mean": best_mean, "ci95": best_ci, "per_seed": best.tolist(),
                                  "note": "test-set model selection (the authors' protocol), not the result"}}
    record.update(extra)
    return record


def result_path(out: Any, task: str, dataset: str, student: str, suffix: str = "", *, quick: bool = False) -> Path:
    """``<task>-<dataset>-<student>[-suffix][-quick].json``: a ``--quick`` (or ``--smoke``) run
    never overwrites the full result of the same benchmark (report.py skips ``-quick`` files)."""
    parts = [task, dataset, student, *(p for p in (suffix, "quick" if quick else "") if p)]
    return Path(out) / ("-".join(parts) + ".json")


def paired_blocks(methods: Mapping[str, Mapping[str, Any]], *, reference: str = "base") -> Dict[str, Any]:
    """``{"paired", "teacher_effect"}`` of a metric's method records (per-seed last epochs):
    :func:`cmda_data.stats.compare_methods`, Holm over every comparison of the file."""
    from cmda_data.stats import compare_methods

    return compare_methods({name: rec["per_seed"] for name, rec in methods.items()}, reference=reference)


#: the order of the rows in result files and tables (unknown names go last, as they came)
METHOD_ORDER = ("base", "base_matched", "align", "mixup", "cmda", "random_teacher", "shuffled_teacher",
                "cmda_constant", "cmda_offline", "random_teacher_offline", "shuffled_teacher_offline",
                "cmda_tuned", "cmda_offline_tuned")


def ordered(methods: Mapping[str, Any]) -> Dict[str, Any]:
    """``methods`` with the rows in :data:`METHOD_ORDER` (a control beside its method)."""
    rank = {name: i for i, name in enumerate(METHOD_ORDER)}
    return {name: methods[name] for name in sorted(methods, key=lambda n: rank.get(n, len(rank)))}


def with_paired(payload: Mapping[str, Any]) -> Dict[str, Any]:
    """``payload`` with its ``paired`` / ``teacher_effect`` blocks computed from ``per_seed``
    (the primary metric; an anomaly file's AUPR blocks go to ``metrics_paired``)."""
    out = dict(payload)
    out["methods"] = ordered(payload["methods"])
    if payload.get("metrics"):
        out["metrics"] = {metric: ordered(methods) for metric, methods in payload["metrics"].items()}
    out.update(paired_blocks(payload["methods"]))
    extra = {metric: paired_blocks(methods) for metric, methods in payload.get("metrics", {}).items()}
    if extra:
        out["metrics_paired"] = extra
    return out


def write_result(path: Path, payload: Mapping[str, Any], *, plot: bool = True) -> Path:
    """Write the JSON, a Markdown table (``.md``) and the convergence plot (``.png``) next to it.

    The paired statistics (:func:`paired_blocks`) are computed here from ``per_seed``, so
    every result file carries them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = with_paired(payload)
    payload.setdefault("schema_version", SCHEMA_VERSION)
    payload.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    payload.setdefault("host", {"python": platform.python_version(), "torch": torch.__version__,
                                "threads": torch.get_num_threads()})
    check_result(payload)
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    path.with_suffix(".md").write_text(markdown_table(payload) + "\n", encoding="utf-8")
    if plot:
        plot_curves(payload, path.with_suffix(".png"))
    return path


def _metric_blocks(payload: Mapping[str, Any]) -> Dict[str, Mapping[str, Any]]:
    """``{metric: methods}``: the primary ``methods`` plus any extra ``metrics`` map."""
    blocks = {payload["metric"]: payload["methods"]}
    for metric, methods in payload.get("metrics", {}).items():
        blocks.setdefault(metric, methods)
    return blocks


def markdown_table(payload: Mapping[str, Any]) -> str:
    """One row per method, one column per metric: ``mean ± ci95`` in percent (last epoch)."""
    blocks = _metric_blocks(payload)
    metrics = list(blocks)
    methods = list(payload["methods"])
    title = (f"{payload['task']} · {payload['dataset']} · student {payload['student']} "
             f"(teacher {payload['teacher']}), {len(payload['seeds'])} seeds, {payload['epochs']} epochs"
             f"{' (quick)' if payload['quick'] else ''}")
    lines = [f"**{title}** — last epoch, mean ± 95% CI (Student t), percent", "",
             "| method | " + " | ".join(metrics) + " | " + " | ".join(f"max-over-epochs {m}" for m in metrics) + " |",
             "|---" * (1 + 2 * len(metrics)) + "|"]
    for method in methods:
        cells, best = [], []
        for metric in metrics:
            rec = blocks[metric].get(method)
            cells.append("—" if rec is None else f"{100 * rec['mean']:.2f} ± {100 * rec['ci95']:.2f}")
            moe = None if rec is None else rec.get("max_over_epochs")
            best.append("—" if not moe else f"{100 * moe['mean']:.2f} ± {100 * moe['ci95']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " | " + " | ".join(best) + " |")
    return "\n".join(lines)


def plot_curves(payload: Mapping[str, Any], path: Path) -> Optional[Path]:
    """Metric per epoch per method, mean ± 95 % CI band (Fig. 6/7 style); one panel per metric."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    blocks = _metric_blocks(payload)
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.2 * len(blocks), 3.8), squeeze=False)
    for ax, (metric, methods) in zip(axes[0], blocks.items()):
        for method, rec in methods.items():
            y = np.asarray(rec["curve"], dtype=float)
            ci = np.asarray(rec.get("curve_ci95", np.zeros_like(y)), dtype=float)
            x = np.arange(1, y.size + 1)
            ax.plot(x, 100 * y, label=method, lw=1.4)
            ax.fill_between(x, 100 * (y - ci), 100 * (y + ci), alpha=0.18)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{payload['task']} {payload['dataset']} {payload['student']}: {metric}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_result(payload: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``payload`` follows the result-file contract (see the README)."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ValueError(f"result file: expected {what}")

    for key in ("task", "dataset", "student", "teacher", "metric", "quick", "seeds", "epochs", "methods"):
        need(key in payload, f"a {key!r} field")
    need(payload["task"] in TASKS, f"task in {TASKS}, got {payload['task']!r}")
    need(payload["student"] in ("image", "text"), f"student 'image' or 'text', got {payload['student']!r}")
    need(isinstance(payload["quick"], bool), "quick to be a bool")
    need(isinstance(payload["seeds"], list) and len(payload["seeds"]) >= 1, "a non-empty list of seeds")
    need(isinstance(payload["epochs"], int) and payload["epochs"] >= 1, "epochs >= 1")
    for metric, methods in _metric_blocks(payload).items():
        need(metric in METRICS, f"metric in {tuple(METRICS)}, got {metric!r}")
        low, high = METRICS[metric]
        need(isinstance(methods, Mapping) and len(methods) >= 1, f"a non-empty methods map for {metric}")
        for name, rec in methods.items():
            for key in ("mean", "ci95", "per_seed", "curve"):
                need(key in rec, f"{metric}.{name}.{key}")
            need(len(rec["per_seed"]) == len(payload["seeds"]), f"{metric}.{name}: one per_seed value per seed")
            values = [rec["mean"], rec["ci95"], *rec["per_seed"], *rec["curve"]]
            need(all(isinstance(v, (int, float)) and math.isfinite(v) for v in values),
                 f"finite numbers in {metric}.{name}")
            need(all(low <= v <= high for v in [rec["mean"], *rec["per_seed"], *rec["curve"]]),
                 f"{metric}.{name} values in [{low}, {high}]")
            need(rec["ci95"] >= 0, f"{metric}.{name}.ci95 >= 0")


def run_seeds(fn: Callable[[int], Dict[str, Any]], seeds: Sequence[int], *, desc: str,
              enabled: bool = True) -> List[Dict[str, Any]]:
    """``[fn(seed) for seed in seeds]`` with a progress bar."""
    return [fn(seed) for seed in progress(list(seeds), desc=desc, enabled=enabled)]


def run_pool(fn: Callable[..., Any], tasks: Sequence[tuple], *, jobs: int = 1,
             max_minutes: Optional[float] = None, initializer: Optional[Callable[..., None]] = None,
             initargs: tuple = (), on_result: Optional[Callable[[int, Any], None]] = None,
             desc: str = "runs", enabled: bool = True) -> Dict[int, Any]:
    """``{i: fn(*tasks[i])}`` for the tasks that ran, in ``jobs`` processes when ``jobs > 1``.

    ``jobs > 1`` starts that many *spawned* worker processes (CUDA-safe), each running
    ``initializer(*initargs)`` once (load the data there, not per task). With
    ``max_minutes`` no task is *started* after that many minutes; the tasks already running
    finish, the rest are left out of the returned map (the caller reports which ran).
    ``on_result(i, result)`` runs in this process as each task finishes (e.g. to append it to
    a partial-results file). An exception in a task is raised here.
    """
    jobs = int(jobs)
    if jobs < 1:
        raise ValueError(f"run_pool: jobs: expected an integer >= 1, got {jobs}")
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * float(max_minutes)
    results: Dict[int, Any] = {}
    bar = progress(range(len(tasks)), desc=desc, enabled=enabled, total=len(tasks))
    bar_update = getattr(bar, "update", lambda n=1: None)

    def done(i: int, value: Any) -> None:
        results[i] = value
        if on_result is not None:
            on_result(i, value)
        bar_update(1)

    if jobs == 1:
        if initializer is not None:
            initializer(*initargs)
        for i, task in enumerate(tasks):
            if deadline is not None and time.monotonic() >= deadline:
                break
            done(i, fn(*task))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                      initializer=initializer, initargs=initargs)
        pending: Dict[Any, int] = {}
        queue = list(enumerate(tasks))
        try:
            while queue or pending:
                while queue and len(pending) < jobs and (deadline is None or time.monotonic() < deadline):
                    i, task = queue.pop(0)
                    pending[pool.submit(fn, *task)] = i
                if not pending:
                    break  # past the deadline with nothing running
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    done(pending.pop(future), future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    close = getattr(bar, "close", None)
    if close is not None:
        close()
    return results


_GRID: Dict[str, Any] = {}


def _grid_init(prepare: Callable[..., Any], kwargs: Mapping[str, Any], threads: Optional[int],
               data: Any = None) -> None:
    if threads:
        torch.set_num_threads(threads)
    _GRID["data"] = data if data is not None else prepare(**kwargs)


def _grid_task(task: Callable[..., Any], *args: Any) -> Dict[str, Any]:
    start = time.time()
    value = task(_GRID["data"], *args)
    return {"value": value, "seconds": round(time.time() - start, 1)}


def run_grid(task: Callable[..., Any], tasks: Sequence[tuple], *, data: Any, prepare: Callable[..., Any],
             prepare_kwargs: Mapping[str, Any], jobs: int = 1, max_minutes: Optional[float] = None,
             on_result: Optional[Callable[[int, Any], None]] = None, desc: str = "runs",
             enabled: bool = True) -> Dict[int, Dict[str, Any]]:
    """:func:`run_pool` for the task scripts: ``{i: {"value": task(data, *tasks[i]), "seconds"}}``.

    In-process (``jobs=1``) the prepared ``data`` is used; each of ``jobs > 1`` worker
    processes prepares its own once with ``prepare(**prepare_kwargs)`` and splits the CPU
    cores with the others. ``task`` and ``prepare`` must be module-level functions.
    """
    threads = threads_per_job(jobs) if jobs > 1 else None
    initargs = (prepare, dict(prepare_kwargs), threads) if jobs > 1 else (prepare, dict(prepare_kwargs), None, data)
    return run_pool(functools.partial(_grid_task, task), tasks, jobs=jobs, max_minutes=max_minutes,
                    initializer=_grid_init, initargs=initargs, on_result=on_result, desc=desc, enabled=enabled)


def threads_per_job(jobs: int) -> int:
    """CPU threads for each of ``jobs`` parallel runs (the cores split evenly, at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, int(jobs)))


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device: expected an available device, got {name!r} (no CUDA here)")
    return device


def env_threads() -> None:
    """Respect OMP_NUM_THREADS for torch as well (the machine is shared)."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value and value.isdigit():
        torch.set_num_threads(int(value))
