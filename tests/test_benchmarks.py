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
    payload = check_file(tmp_path / "classification-wikipedia-text-quick.json", task="classification", metric="accuracy",
                         methods=("base", "mixup", "cmda", "cmda_offline"))
    assert payload["teacher"] == "image"
    assert payload["cmda_configs"]["cmda"]["top_k"] is None  # the faithful configuration
    assert not (tmp_path / "classification-wikipedia-text.json").exists()  # never the full result's name


def test_classification_pixels_smoke(tmp_path):
    require_data("webnews")
    run_script("classification.py", "--student-space", "pixels", "--seeds", "2", tmp_path=tmp_path)
    payload = check_file(tmp_path / "classification-webnews-image-pixels-quick.json", task="classification",
                         metric="accuracy", methods=("base", "cmda_offline"))
    assert payload["student_space"] == "pixels"


def test_pixel_augmentation_is_the_per_sample_crop_and_flip():
    """The batched crop + flip equals cropping each photo on its own with the same draws."""
    import classification
    import torch
    from torch import nn

    x = torch.rand(37, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(3)
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, 37), generator=gen)
    flip = torch.rand(37, generator=gen) < 0.5
    expected = torch.stack([padded[i, :, dy[i]:dy[i] + 20, dx[i]:dx[i] + 24] for i in range(37)])
    expected = torch.stack([e.flip(2) if f else e for e, f in zip(expected, flip)])
    got = classification.augment_pixels(x, torch.Generator().manual_seed(3))
    assert torch.equal(got, expected)
    assert not torch.equal(got, x[:, :, :20, :24])  # something moved


def test_run_pool_in_processes_deadline_and_errors():
    import operator

    seen = []
    tasks = [(2, 3), (4, 5), (6, 7)]
    results = _common.run_pool(operator.mul, tasks, jobs=2, on_result=lambda i, v: seen.append((i, v)),
                               enabled=False)
    assert results == {0: 6, 1: 20, 2: 42} and sorted(seen) == [(0, 6), (1, 20), (2, 42)]
    assert _common.run_pool(operator.mul, tasks, jobs=1, enabled=False) == results
    assert _common.run_pool(operator.mul, tasks, jobs=1, max_minutes=0, enabled=False) == {}
    assert _common.run_pool(operator.mul, tasks, jobs=2, max_minutes=0, enabled=False) == {}
    with pytest.raises(ZeroDivisionError):
        _common.run_pool(operator.truediv, [(1, 1), (1, 0)], jobs=2, enabled=False)
    with pytest.raises(ValueError, match="jobs: expected an integer >= 1, got 0"):
        _common.run_pool(operator.mul, tasks, jobs=0)


def test_classification_resume_uses_finished_runs_and_redoes_the_rest(tmp_path):
    """--resume takes the runs in the .partial.jsonl (same epochs) and trains only the others."""
    require_data("wikipedia")
    partial = tmp_path / "classification-wikipedia-text-quick.partial.jsonl"
    fake = {("base", 0): [0.11, 0.12], ("base", 1): [0.21, 0.22], ("mixup", 0): [0.31, 0.32]}
    config = {"top_k": None, "p": 1.0, "temperature": None, "self_weight": None, "intra": "soft", "n_components": 2,
              "similarity": "abs_cosine"}  # the faithful configuration, as the runs record it
    lines = [{"name": n, "seed": s, "epochs": 2, "curve": c, "seconds": 1.0, "config": config, "loss_form": "sum",
              "gen_weight": 1.0} for (n, s), c in fake.items()]
    lines.append({"name": "mixup", "seed": 1, "epochs": 2, "curve": [0.7, 0.7], "seconds": 1.0, "config": config,
                  "loss_form": "mean", "gen_weight": 1.0})  # another loss form: trained again
    lines.append({"name": "mixup", "seed": 1, "epochs": 3, "curve": [0.9, 0.9, 0.9], "seconds": 1.0,
                  "config": config})  # another length: trained again
    lines.append({"name": "cmda_offline", "seed": 0, "epochs": 2, "curve": [0.8, 0.8], "seconds": 1.0,
                  "config": dict(config, top_k=2)})  # another configuration: trained again
    partial.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    run_script("classification.py", "--dataset", "wikipedia", "--student", "text", "--methods", "base", "mixup",
               "cmda_offline", "--resume", tmp_path=tmp_path)
    payload = check_file(tmp_path / "classification-wikipedia-text-quick.json", task="classification", metric="accuracy",
                         methods=("base", "mixup", "cmda_offline"))
    assert payload["methods"]["cmda_offline"]["per_seed_curves"][0] != [0.8, 0.8]
    assert payload["methods"]["base"]["per_seed_curves"] == [fake[("base", 0)], fake[("base", 1)]]
    assert payload["methods"]["mixup"]["per_seed_curves"][0] == fake[("mixup", 0)]
    assert payload["methods"]["mixup"]["per_seed_curves"][1] not in ([0.9, 0.9], [0.7, 0.7])  # trained again
    assert not partial.exists()  # folded into the result file


def test_classification_align_control_merges_into_the_result(tmp_path):
    """--methods align --add: the control (Eq. 9 alignment term, no mixing) joins the existing file."""
    require_data("wikipedia")
    run_script("classification.py", "--dataset", "wikipedia", "--student", "text", "--methods", "base", "cmda",
               tmp_path=tmp_path)
    before = json.loads((tmp_path / "classification-wikipedia-text-quick.json").read_text())
    run_script("classification.py", "--dataset", "wikipedia", "--student", "text", "--methods", "align", "--add",
               tmp_path=tmp_path)
    payload = check_file(tmp_path / "classification-wikipedia-text-quick.json", task="classification",
                         metric="accuracy", methods=("base", "cmda", "align"))
    assert payload["methods"]["base"] == before["methods"]["base"]  # merged, not retrained
    assert payload["methods"]["align"]["per_seed_curves"] != payload["methods"]["base"]["per_seed_curves"]
    assert payload["methods"]["align"]["per_seed_curves"] != payload["methods"]["cmda"]["per_seed_curves"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(BENCH / "classification.py"), "--smoke", "--no-progress", "--out",
                           str(tmp_path / "empty"), "--dataset", "wikipedia", "--student", "text", "--methods",
                           "align", "--add"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0 and "--add: expected an existing result file" in proc.stderr


def test_classification_max_minutes_zero_reports_no_finished_seed(tmp_path):
    require_data("wikipedia")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    cmd = [sys.executable, str(BENCH / "classification.py"), "--smoke", "--no-progress", "--out", str(tmp_path),
           "--dataset", "wikipedia", "--student", "text", "--max-minutes", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    assert "--max-minutes: no seed finished for every method" in proc.stderr
    assert not (tmp_path / "classification-wikipedia-text-quick.json").exists()


def test_classification_study_then_tuned_rows(tmp_path):
    """--study scores the grid and the base / mixup references on the validation split; the next
    run adds a *_tuned row with the study's best configuration (file name carries --tag)."""
    require_data("wikipedia")
    run_script("classification.py", "--dataset", "wikipedia", "--student", "text", "--study",
               "--study-method", "cmda_offline", "--study-seeds", "2", tmp_path=tmp_path)
    study = json.loads((tmp_path / "study-classification-wikipedia-text-quick.json").read_text())
    assert study["split"] == "validation" and study["seeds"] == [0, 1]
    assert set(study["references"]) == {"base", "mixup"}
    assert all(len(r["per_seed"]) == 2 for r in [*study["rows"], *study["references"].values()])
    assert study["best"] == max(study["rows"], key=lambda r: r["val_accuracy"])
    run_script("classification.py", "--dataset", "wikipedia", "--student", "text", "--methods", "base",
               "cmda_offline", "--tag", "t1", tmp_path=tmp_path)
    payload = check_file(tmp_path / "classification-wikipedia-text-t1-quick.json", task="classification",
                         metric="accuracy", methods=("base", "cmda_offline", "cmda_offline_tuned"))
    assert payload["tag"] == "t1"
    assert payload["cmda_configs"]["cmda_offline_tuned"] == study["best"]["config"]
    assert payload["tuned_from"] == {"cmda_offline_tuned": {
        "file": "study-classification-wikipedia-text-quick.json", "method": "cmda_offline", "seeds": [0, 1],
        "epochs": study["epochs"]}}
    # an online study has its own file; each *_tuned row takes its own method's study
    run_script("classification.py", "--dataset", "wikipedia", "--student", "text", "--study",
               "--study-method", "cmda", "--study-seeds", "1", "--no-references", tmp_path=tmp_path)
    online = json.loads((tmp_path / "study-classification-wikipedia-text-online-quick.json").read_text())
    assert online["method"] == "cmda" and online["seeds"] == [0]
    run_script("classification.py", "--dataset", "wikipedia", "--student", "text", "--methods", "cmda",
               "cmda_offline", "--seeds", "1", "--tag", "t2", tmp_path=tmp_path)
    payload = json.loads((tmp_path / "classification-wikipedia-text-t2-quick.json").read_text())
    assert {name: rec["method"] for name, rec in payload["tuned_from"].items()} == {
        "cmda_tuned": "cmda", "cmda_offline_tuned": "cmda_offline"}
    assert payload["cmda_configs"]["cmda_tuned"] == online["best"]["config"]


def test_weight_diagnostics_on_hand_cases():
    import torch
    import weights_diagnostics as D

    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2])
    real = D.batch_metrics(torch.eye(4, dtype=torch.float64), x, y, 3)  # every row its own sample
    assert real == pytest.approx({"eff_partners": 1.0, "max_weight": 1.0, "same_class": 1.0, "label_purity": 1.0,
                                  "to_mean": 1.0})
    mean = D.batch_metrics(torch.full((4, 4), 0.25, dtype=torch.float64), x, y, 3)  # every row the batch mean
    assert mean == pytest.approx({"eff_partners": 4.0, "max_weight": 0.25, "same_class": (0.5 + 0.5 + 0.25 + 0.25) / 4,
                                  "label_purity": 0.5, "to_mean": 0.0})


def test_weight_diagnostics_script(tmp_path):
    require_data("wikipedia")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    cmd = [sys.executable, str(BENCH / "weights_diagnostics.py"), "--dataset", "wikipedia", "--student", "image",
           "--batches", "2", "--aligner-epochs", "1", "--no-progress", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    payload = json.loads((tmp_path / "diagnostics-weights.json").read_text())
    (pair,) = payload["pairs"]
    bic = {int(k): v for k, v in pair["bic"].items()}
    assert sorted(bic) == [1, 2, 3, 4, 5, 6] and pair["bic_m"] == min(bic, key=bic.get)
    configs = pair["configs"]
    for rec in configs.values():
        assert 1.0 - 1e-9 <= rec["eff_partners"] <= 128 + 1e-9
        assert 0.0 < rec["max_weight"] <= 1.0 and 0.0 <= rec["same_class"] <= 1.0
        assert 1 / pair["num_classes"] - 1e-9 <= rec["label_purity"] <= 1.0 and rec["to_mean"] >= 0.0
    assert configs["top_k=2"]["eff_partners"] <= 2 + 1e-9 and configs["top_k=8"]["eff_partners"] <= 8 + 1e-9
    assert configs["faithful"]["eff_partners"] > configs["top_k=8"]["eff_partners"]
    assert (tmp_path / "diagnostics-weights.png").is_file() and (tmp_path / "diagnostics-weights.md").is_file()


def test_anomaly_smoke(tmp_path):
    require_data("webnews")
    run_script("anomaly_ssd.py", "--dataset", "webnews", "--student", "image", tmp_path=tmp_path)
    payload = check_file(tmp_path / "anomaly-webnews-image-quick.json", task="anomaly", metric="auroc",
                         methods=("base", "mixup", "cmda", "cmda_offline"))
    assert set(payload["metrics"]["aupr"]) == set(payload["methods"])  # AUPR beside AUROC
    assert payload["split"]["test_anomaly"] > 0


def test_anomaly_study_in_two_processes(tmp_path):
    require_data("wikipedia")
    run_script("anomaly_ssd.py", "--dataset", "wikipedia", "--student", "image", "--study", "--study-seeds", "2",
               "--jobs", "2", tmp_path=tmp_path)
    study = json.loads((tmp_path / "study-anomaly-wikipedia-image-quick.json").read_text())
    assert set(study["references"]) == {"base", "mixup"} and len(study["rows"]) == 3  # the smoke grid
    assert all(len(r["per_seed"]) == 2 and 0.0 <= r["val_auroc"] <= 1.0
               for r in [*study["rows"], *study["references"].values()])
    assert study["best"] == max(study["rows"], key=lambda r: r["val_auroc"])


def test_captioning_smoke(tmp_path):
    require_data("webnews")
    run_script("captioning.py", tmp_path=tmp_path)
    payload = check_file(tmp_path / "captioning-webnews-image-quick.json", task="captioning", metric="bleu4",
                         methods=("base", "cmda"))
    assert (tmp_path / "captioning-webnews-image-quick-box.png").is_file()
    assert "attenuation" in payload


def test_generated_result_tables_are_current():
    """README and docs tables are regenerated from benchmarks/results by report.py --write."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script, args, out", [
    ("bench_online.py", ["--batch", "4", "--size", "32", "--steps", "2"], "bench_online.json"),
    ("bench_mixing.py", ["--quick", "--device", "cpu", "--threads", "1", "--cases", "vec1024", "--repeats", "3"],
     "bench_mixing.json"),
    ("bench_gmm.py", ["--n", "400", "--d", "4", "--m", "2", "--repeats", "1", "--max-iter", "3"], "bench_gmm.json"),
])
def test_speed_benchmarks_run_and_write_json(script, args, out, tmp_path):
    """The speed benchmarks run end to end at toy sizes (the figures themselves are not asserted)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(tmp_path / out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    payload = json.loads((tmp_path / out).read_text())
    if script == "bench_online.py":
        assert set(payload["median_ms"]) == {"mixup_step", "augment", "cmda_step"}
        assert all(v > 0 for v in payload["median_ms"].values()) and payload["host_reads_per_augment"] <= 12
    elif script == "bench_mixing.py":
        (result,) = payload["results"]
        assert result["ratios"]["loop/dense"] > 1
        assert set(result["targets"]) == {"topk/dense", "dense/dense_kernel", "loop/dense", "loop/topk"}
    else:
        assert {r["covariance_type"] for r in payload["rows"]} == {"full", "tied", "diag", "spherical"}
        assert all(r["rel_ll_diff"] <= 1e-6 for r in payload["rows"])


def test_bench_aligner_runs_on_the_wikipedia_pairs(tmp_path):
    """bench_aligner --quick at one epoch: every row is a retrieval score of the real test split."""
    folder = require_data("wikipedia")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CMDA_DATA_DIR=str(folder.parent))
    out = tmp_path / "bench_aligner.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_aligner.py"), "--quick", "--epochs", "1", "--cca", "10",
                           "--no-progress", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and rows[-1]["method"].startswith("sklearn CCA")
    for row in rows:  # mAP of a ranking of 693 test pairs over 10 classes: in (0, 1), near chance 0.11
        assert 0.05 < row["mean_mAP"] < 1.0
