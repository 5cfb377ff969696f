"""The task benchmarks run end to end (``--smoke`` presets, results in tmp_path).

Asserts the result-file contract (schema, finite metrics in range, one value per seed, the
plot and the Markdown table next to the JSON), never the ranking of the methods.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_data

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402


def run_script(script, *args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    cmd = [sys.executable, str(BENCH / script), "--smoke", "--no-progress", "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def check_file(path, *, task, metric, methods, seeds=2):
    assert path.is_file(), f"missing {path}"
    payload = json.loads(path.read_text())
    _common.check_result(payload)  # the contract (raises on any violation)
    assert payload["task"] == task and payload["metric"] == metric
    assert payload["quick"] is True and len(payload["seeds"]) == seeds
    assert set(methods) <= set(payload["methods"])
    for name, rec in payload["methods"].items():
        assert len(rec["curve"]) == payload["epochs"]
        assert rec["per_seed"] == [c[-1] for c in rec["per_seed_curves"]]  # last epoch is the result
        assert "note" in rec["max_over_epochs"]  # max over epochs only when labelled
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in rec["per_seed"])
    assert path.with_suffix(".png").is_file() and path.with_suffix(".md").is_file()
    return payload


def test_mean_ci95_is_student_t():
    from scipy import stats

    values = [0.61, 0.64, 0.59, 0.66, 0.62]
    mean, half = _common.mean_ci95(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    assert mean == pytest.approx(sum(values) / 5)
    assert half == pytest.approx((high - low) / 2)
    assert _common.mean_ci95([0.3]) == (0.3, 0.0)


def test_check_result_rejects_out_of_range():
    rec = _common.summarise_method([[0.2, 0.4], [0.3, 0.5]])
    good = {"task": "classification", "dataset": "d", "student": "image", "teacher": "text",
            "metric": "accuracy", "quick": True, "seeds": [0, 1], "epochs": 2, "methods": {"base": rec}}
    _common.check_result(good)
    bad = dict(good, methods={"base": dict(rec, mean=float("nan"))})
    with pytest.raises(ValueError, match="finite"):
        _common.check_result(bad)
    with pytest.raises(ValueError, match="student"):
        _common.check_result(dict(good, student="audio"))


def test_classification_features_smoke(tmp_path):
    require_data("wikipedia")
    run_script("classification.py", "--dataset", "wikipedia", "--student", "text", tmp_path=tmp_path)
    payload = check_file(tmp_path / "classification-wikipedia-text.json", task="classification", metric="accuracy",
                         methods=("base", "mixup", "cmda", "cmda_offline"))
    assert payload["teacher"] == "image"
    assert payload["cmda_configs"]["cmda"]["top_k"] is None  # the faithful configuration


def test_classification_pixels_smoke(tmp_path):
    require_data("webnews")
    run_script("classification.py", "--student-space", "pixels", "--seeds", "2", tmp_path=tmp_path)
    payload = check_file(tmp_path / "classification-webnews-image-pixels.json", task="classification",
                         metric="accuracy", methods=("base", "cmda_offline"))
    assert payload["student_space"] == "pixels"


def test_anomaly_smoke(tmp_path):
    require_data("webnews")
    run_script("anomaly_ssd.py", "--dataset", "webnews", "--student", "image", tmp_path=tmp_path)
    payload = check_file(tmp_path / "anomaly-webnews-image.json", task="anomaly", metric="auroc",
                         methods=("base", "mixup", "cmda", "cmda_offline"))
    assert set(payload["metrics"]["aupr"]) == set(payload["methods"])  # AUPR beside AUROC
    assert payload["split"]["test_anomaly"] > 0


def test_captioning_smoke(tmp_path):
    require_data("webnews")
    run_script("captioning.py", tmp_path=tmp_path)
    payload = check_file(tmp_path / "captioning-webnews-image.json", task="captioning", metric="bleu4",
                         methods=("base", "cmda"))
    assert (tmp_path / "captioning-webnews-image-box.png").is_file()
    assert "attenuation" in payload


def test_generated_result_tables_are_current():
    """README and docs tables are regenerated from benchmarks/results by report.py --write."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
