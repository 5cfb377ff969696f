"""The ``--quick`` presets of the task benchmarks run end to end on the real data (minutes each).

Each preset must finish in under 10 minutes on a 2-core CPU; measured on this machine with one
thread and another job running: classification 1.6 min, anomaly 2.2, captioning 2.0, pixels
2.6 (no timing is asserted here; the subprocess timeout only guards against a hang). The
result files must honour the contract: the schema, 2 seeds, finite metrics in range, one
curve point per epoch. The ranking of the methods is never asserted.
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

PAIRS = [(d, s) for d in ("wikipedia", "webnews") for s in ("image", "text")]
CASES = {
    "classification": (["classification.py"], [f"classification-{d}-{s}-quick.json" for d, s in PAIRS]),
    "anomaly": (["anomaly_ssd.py"], [f"anomaly-{d}-{s}-quick.json" for d, s in PAIRS]),
    "captioning": (["captioning.py"], ["captioning-webnews-image-quick.json"]),
    "pixels": (["classification.py", "--student-space", "pixels"], ["classification-webnews-image-pixels-quick.json"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_quick_preset_writes_valid_results(case, tmp_path):
    require_data("wikipedia")
    require_data("webnews")
    args, files = CASES[case]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:], "--quick", "--no-progress", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in files:
        payload = json.loads((tmp_path / name).read_text())
        _common.check_result(payload)
        assert payload["quick"] is True and len(payload["seeds"]) == 2
        for metric_methods in [payload["methods"], *payload.get("metrics", {}).values()]:
            for rec in metric_methods.values():
                assert len(rec["curve"]) == payload["epochs"]
                assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in rec["per_seed"])
        assert (tmp_path / name).with_suffix(".png").is_file() and (tmp_path / name).with_suffix(".md").is_file()
