"""kill -9 during profile and latency, then the same command again: no half-written artifact,
and the rerun completes. (Search/refine: tests/test_workers.py, tests/test_refine.py; evaluate:
tests/test_evaluate.py; the whole run: tests/test_pipeline.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def kill_when(cmd: list[str], marker: str, timeout_s: float = 300) -> str:
    """Start ``cmd``, SIGKILL it as soon as ``marker`` appears in its output; return the output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    seen = b""
    deadline = time.time() + timeout_s
    os.set_blocking(proc.stdout.fileno(), False)
    while time.time() < deadline and proc.poll() is None:
        chunk = proc.stdout.read() or b""
        seen += chunk
        if marker.encode() in seen:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seen.decode(errors="replace")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"{marker!r} never appeared before the command ended:\n{seen.decode(errors='replace')[-2000:]}")


@pytest.mark.parametrize(
    "argv, marker",
    [
        (["profile", "tiny:llava", "--method", "kl", "--samples", "8", "--space", "cpu"], "kl (layer x format)"),
        (["latency", "tiny:llava", "--space", "cpu", "--workload", "threads=1,repeats=3,warmup=1"], "%"),
    ],
    ids=["profile", "latency"],
)
def test_kill_then_rerun(tmp_path, argv, marker):
    out = tmp_path / "artifact.json"
    cmd = [sys.executable, "-m", "mpsearch", *argv, "-o", str(out)]
    kill_when(cmd, marker)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert not out.exists(), "a killed run left a (half-written) artifact"
    assert not [n for n in leftovers if n.endswith(".tmp")], leftovers
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    obj = json.loads(out.read_text())
    assert obj["schema"] == 1 and obj["provenance"]["torch"]
