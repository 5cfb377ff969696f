"""The ``probe`` entry: check the options, train every method on every seed, write ``probe.json``."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import __version__
from ..core._validation import check_int, check_option, check_probability, fail
from ..stats import compare_methods
from ._data import SPLIT_SEED, load_probe_data, split_stratified
from ._report import plot_forest, reading, report
from ._training import CMDA_DEFAULTS, _bank, _control_bank, _latent_dim, _Setup, _setup, _summary, _train

METHODS = ("base", "base_matched", "mixup", "cmda", "random_teacher", "shuffled_teacher")
"""Every method the probe can train, in table order."""
DEFAULT_METHODS = METHODS
"""The methods of a plain ``cmda probe``."""
LOSS_FORMS = ("sum", "mean")
#: defaults of a full and of a ``quick`` probe
PRESETS = {False: {"seeds": 5, "epochs": 50, "aligner_epochs": 30},
           True: {"seeds": 3, "epochs": 15, "aligner_epochs": 10}}
_NEEDS_BANK = {"cmda": None, "random_teacher": "random", "shuffled_teacher": "shuffled"}


def probe(data: Any, *, student: str, teacher: str, label: str, train_size: Optional[int] = None,
          train_frac: Optional[float] = None, seeds: Optional[int] = None, epochs: Optional[int] = None,
          aligner_epochs: Optional[int] = None, quick: bool = False, methods: Optional[Sequence[str]] = None,
          loss_form: str = "sum", cmda_options: Optional[Mapping[str, Any]] = None, batch_size: int = 128,
          threads: Optional[int] = 1, out: Optional[Any] = None, progress: bool = True,
          echo: Optional[Callable[[str], None]] = print) -> Dict[str, Any]:
    """Does the teacher help on this data? Base, Mixup, CMDA and CMDA with uninformative teachers.

    Args:
        data: a path to an ``.npz`` file (``numpy.savez``; read without pickle) or a mapping
            of arrays (numpy, torch or lists).
        student: key of the ``[N, d]`` student features (the ones that are mixed and classified).
        teacher: key of the ``[N, t]`` teacher features (the ones that guide the mixing).
        label: key of the ``[N]`` integer class labels.
        train_size: number of train rows (the rest is the held-out split).
        train_frac: share of train rows (default 0.8); not together with ``train_size``.
        seeds: training seeds ``0..seeds-1`` (default 5; quick 3; at least 2).
        epochs: classifier epochs (default 50; quick 15).
        aligner_epochs: epochs of the contrastive aligner (default 30; quick 10).
        quick: the quick preset (3 seeds, 15 epochs, aligner 10 epochs).
        methods: the methods to run (default :data:`DEFAULT_METHODS`; ``base`` is required).
        loss_form: ``"sum"``: CE(real) + CE(generated), the real rows weigh 1 in every
            method (``base_matched`` is Base); ``"mean"``: one mean over all rows
            (``base_matched`` is Base with its loss times ``1 / (1 + p)``).
        cmda_options: changes to :data:`CMDA_DEFAULTS` (``top_k``, ``p``, ``temperature``,
            ``self_weight``, ``intra``, ``similarity``, ``n_components``).
        batch_size: real rows per step.
        threads: torch CPU threads while the probe runs (restored afterwards; None: leave
            as is). The models are small: one thread is usually the fastest, by far on a busy
            machine.
        out: folder for ``probe.json`` and ``probe.png`` (None: write nothing).
        progress: show a tqdm bar (if tqdm is installed).
        echo: where the report lines go (None: nowhere).

    Returns:
        The content of ``probe.json``: ``methods.<name>.{mean, ci95, per_seed, curve,
        curve_ci95}`` (accuracy as fractions), ``paired``, ``teacher_effect`` and the
        configuration (keys, sizes, split, seeds, epochs, options, version, file hash).

    Raises:
        ValidationError: bad input (a missing key, labels that are not integers, NaN
            features, a class with a single row, a bad option, ...), one line naming the key.
        ShapeError: arrays of the wrong rank, or row counts that differ.
        FileNotFoundError: ``data`` names no file.
    """
    quick = bool(quick)
    preset = PRESETS[quick]
    seeds = check_int("seeds", preset["seeds"] if seeds is None else seeds, minimum=2)
    epochs = check_int("epochs", preset["epochs"] if epochs is None else epochs, minimum=1)
    aligner_epochs = check_int("aligner_epochs", preset["aligner_epochs"] if aligner_epochs is None
                               else aligner_epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=2)
    threads = check_int("threads", threads, minimum=1, allow_none=True)
    check_option("loss_form", loss_form, LOSS_FORMS)
    methods = _check_methods(DEFAULT_METHODS if methods is None else methods)
    cmda = dict(CMDA_DEFAULTS)
    for key, value in dict(cmda_options or {}).items():
        check_option("cmda_options", key, tuple(CMDA_DEFAULTS))
        cmda[key] = value
    if check_probability("cmda_options['p']", cmda["p"]) == 0.0:
        fail("cmda_options['p']", "a share of generated rows in (0, 1]", cmda["p"])
    loaded = load_probe_data(data, student=student, teacher=teacher, label=label)
    train, test = split_stratified(loaded.labels, train_size=train_size, train_frac=train_frac)
    setup = _setup(loaded, train, test, epochs=epochs, aligner_epochs=aligner_epochs, batch_size=batch_size,
                   loss_form=loss_form, cmda=cmda)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        records, seconds = _run(setup, methods, seeds, progress)
    finally:
        torch.set_num_threads(previous)
    result = {
        "task": "probe", "metric": "accuracy", "dataset": loaded.source["file"], "student": student,
        "teacher": teacher, "label": label, "quick": quick, "seeds": list(range(seeds)), "epochs": epochs,
        "aligner_epochs": aligner_epochs, "batch_size": batch_size, "loss_form": loss_form,
        "threads": torch.get_num_threads() if threads is None else threads,
        "loss": "sum: CE(real) + CE(generated), the real rows weigh 1 in every method" if loss_form == "sum" else
                "mean: one mean over the real and the generated rows (base_matched: Base's loss times 1 / (1 + p))",
        "data": {"file": loaded.source["file"], "sha256": loaded.source["sha256"], "keys": loaded.keys,
                 "n": len(loaded.labels), "student_dim": int(loaded.student.shape[1]),
                 "teacher_dim": int(loaded.teacher.shape[1]), "classes": len(loaded.classes),
                 "class_values": list(loaded.classes)},
        "split": {"train": len(train), "test": len(test), "seed": SPLIT_SEED, "stratified": True,
                  "train_per_class": np.bincount(loaded.labels[train], minlength=len(loaded.classes)).tolist(),
                  "test_per_class": np.bincount(loaded.labels[test], minlength=len(loaded.classes)).tolist(),
                  "train_size": train_size,
                  "train_frac": None if train_size is not None else 0.8 if train_frac is None else float(train_frac)},
        "cmda": cmda,
        "aligner": {"loss": "eq8", "dim": _latent_dim(len(train)), "head_hidden": [256], "epochs": aligner_epochs,
                    "gmm_reg_covar": 1e-4},
        "classifier": "Linear(d, 256)-ReLU-Dropout(0.2)-Linear(256, C); SGD lr 0.01, momentum 0.9, wd 1e-4, cosine",
        "methods": records, **compare_methods({m: rec["per_seed"] for m, rec in records.items()}),
        "seconds": seconds,
        "protocol": "accuracy on the held-out split after the last epoch; nothing is tuned on it",
        "version": {"cmda_data": __version__, "torch": torch.__version__, "numpy": np.__version__},
    }
    result["reading"] = {key: reading(effect) for key, effect in result["teacher_effect"].items()}
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "probe.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        if plot_forest(result, folder / "probe.png") is None and echo is not None:
            echo("note: matplotlib is not installed, so probe.png was not drawn (pip install matplotlib)")
    if echo is not None:
        for line in report(result).splitlines():
            echo(line)
    return result


def _run(setup: _Setup, methods: List[str], seeds: int, progress: bool
         ) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """Every method on every seed (seed-major); the method records and the seconds spent."""
    alias = setup.loss_form == "sum" and "base_matched" in methods
    trained = [m for m in methods if not (alias and m == "base_matched")]
    scale = {"base_matched": 1.0 / (1.0 + float(setup.cmda["p"]))}
    needs_bank = any(m in _NEEDS_BANK for m in trained)
    curves: Dict[str, List[List[float]]] = {m: [] for m in trained}
    seconds = {m: 0.0 for m in ["aligner_and_bank", *trained]}
    bar = _bar(progress, seeds * (len(trained) + needs_bank))
    for seed in range(seeds):
        bank = None
        if needs_bank:
            start = _step(bar, f"seed {seed}: aligner + bank")
            bank = _bank(setup, seed)
            seconds["aligner_and_bank"] += _done(bar, start)
        for method in trained:
            start = _step(bar, f"seed {seed}: {method}")
            run_bank = _control_bank(bank, _NEEDS_BANK[method], seed) if method in _NEEDS_BANK else None
            curves[method].append(_train(method, seed, setup, run_bank, scale.get(method, 1.0)))
            seconds[method] += _done(bar, start)
    if bar is not None:
        bar.close()
    records = {m: _summary(curves[m]) for m in trained}
    if alias:
        records["base_matched"] = dict(records["base"], identical_to="base",
                                       note="loss_form 'sum': the real rows weigh 1 in every method, so Base is "
                                            "already matched (not retrained)")
    return {m: records[m] for m in methods}, {k: round(v, 2) for k, v in seconds.items()}


def _check_methods(methods: Sequence[str]) -> List[str]:
    chosen = [methods] if isinstance(methods, str) else list(methods)
    for method in chosen:
        check_option("methods", method, METHODS)
    if "base" not in chosen:
        fail("methods", "a list that includes 'base' (every method is compared with it)", chosen)
    return [m for m in METHODS if m in chosen]


def _bar(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc="cmda probe", leave=False)


def _step(bar: Any, what: str) -> float:
    if bar is not None:
        bar.set_description(what)
    return time.perf_counter()


def _done(bar: Any, start: float) -> float:
    if bar is not None:
        bar.update(1)
    return time.perf_counter() - start

