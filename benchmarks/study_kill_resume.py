"""Kill a 100,000-trial SQLite search with SIGKILL, then ask for 20 trials more than it holds.

The scenario of issue 15: ``mpsearch search --n-trials 100000 --storage sqlite:///study.db`` is
killed ``--kill-after`` seconds (25) after it starts; the same command with ``--n-trials`` = the
trials the study holds + 20 must finish within 300 s with more finished trials, no duplicate
trial numbers and no trial evaluated twice. Inputs: the default synthetic instance (243 layers,
146 free decisions, like a 2B VLM), budget at 40 % of the latency range, NSGA-II (the default
sampler), 16 ILP front points as seeds.

Run:
    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/study_kill_resume.py --workdir /tmp/kill-bench
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _counts(db: Path, name: str) -> dict[str, int]:
    import optuna

    from mpsearch.searching import open_storage
    from mpsearch.searching._study import retried_numbers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{db}")).get_trials(deepcopy=False)
    out: dict[str, int] = {"trials": len(trials), "retried": len(retried_numbers(trials))}
    for t in trials:
        out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    numbers = [t.number for t in trials]
    out["duplicate_numbers"] = len(numbers) - len(set(numbers))
    with sqlite3.connect(db) as con:
        out["rows_in_trials_table"] = con.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    return out


def main() -> int:
    """Build the inputs, run, kill, rerun; print the figures as JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/mpsearch-kill-bench")
    ap.add_argument("--kill-after", type=float, default=25.0)
    ap.add_argument("--more", type=int, default=20)
    ap.add_argument("--sampler", default="nsga2")
    args = ap.parse_args()

    from mpsearch.searching._proxy import ProxyProblem
    from mpsearch.searching.synthetic import synthetic_instance

    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    for f in wd.glob("study.db*"):
        f.unlink()
    inst = synthetic_instance(seed=0)
    inst.sens.to_json(wd / "sens.json")
    inst.lat.to_json(wd / "lat.json")
    (wd / "space.yaml").write_text(json.dumps({"name": "synthetic", "groups": inst.space.groups, "pin": inst.space.pin,
                                               "tie": inst.space.tie}))
    prob = ProxyProblem.build(inst.sens, inst.lat, inst.space, inst.layers)
    lo, hi = prob.latency_ms(prob.fastest()), prob.latency_ms(prob.slowest())
    budget = lo + 0.4 * (hi - lo)
    db = wd / "study.db"

    def cmd(n: int) -> list[str]:
        return [sys.executable, "-m", "mpsearch.cli", "search", "--sens", str(wd / "sens.json"), "--latency",
                str(wd / "lat.json"), "--space", str(wd / "space.yaml"), "--budget-ms", repr(budget), "--n-trials",
                str(n), "--sampler", args.sampler, "--storage", f"sqlite:///{db}", "--study-name", "bench",
                "--no-progress", "-o", str(wd / "front.json")]

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd(100_000), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(args.kill_after)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _counts(db, "bench")
    held = killed["trials"]
    t0 = time.monotonic()
    rerun = subprocess.run(cmd(held + args.more), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    after = _counts(db, "bench")
    front = json.loads((wd / "front.json").read_text()) if rerun.returncode == 0 else {}
    report = {
        "decisions": len(prob.free), "sampler": args.sampler, "kill_after_s": args.kill_after,
        "after_kill": killed, "rerun_n_trials": held + args.more, "rerun_rc": rerun.returncode,
        "rerun_s": round(took, 1), "rerun_evaluated": front.get("trials", {}).get("this_worker"),
        "after_rerun": after,
    }
    print(json.dumps(report, indent=1))
    if rerun.returncode != 0:
        print(rerun.stderr[-2000:], file=sys.stderr)
    return 0 if rerun.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
