"""benchmarks/gpu_validate.py --smoke: the GPU validation's code path on the CPU, figures finite.

Timings are never asserted: only that every figure the GPU run reports exists and is finite,
that the GPU spaces are skipped with a reason on a CPU, and that nothing failed.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = [
    "layers", "cpu-smoke.table_s", "cpu-smoke.base_ms", "cpu-smoke.median_error", "cpu-smoke.worst_error",
    "cpu-smoke.recompilations", "cpu-smoke.validation_new_compilations", "forward_backward_ms",
    "hutchinson_cost_per_probe_x_fwd_bwd", "fisher_cost_x_fwd_bwd", "ilp_predicted_ms", "refine_s",
    "refine_front_size", "compile.configurations", "compile.recompilations", "compile.graph_breaks",
    "peak_host_memory_gib", "total_s",
]


def test_smoke_run_writes_finite_figures(tmp_path):
    out = tmp_path / "figures.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_validate.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] is True and not data["failed"], data["failed"]
    figures = data["figures"]
    for name in FIGURES:
        assert name in figures, (name, sorted(figures))
        value = figures[name]
        assert isinstance(value, (int, float)) and math.isfinite(value), (name, value)
    assert figures["scores_finite"] is True
    assert figures["cpu-smoke.validation_new_compilations"] == 0  # validation reuses the table's compiled code
    for space in ("gpu-ao", "gpu-bnb"):
        assert space in data["skipped"] and "cuda" in data["skipped"][space]
    assert "total_s:" in proc.stdout and "median_error:" in proc.stdout
