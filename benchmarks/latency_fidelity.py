"""How well does a latency table predict end-to-end latency? Predicted vs measured on random policies.

    python benchmarks/latency_fidelity.py                       # demo model (or tiny:llava), CPU
    python benchmarks/latency_fidelity.py --clock cpu           # thread CPU time (shared, loaded machine)
    python benchmarks/latency_fidelity.py --space cpu --policies 20 --json fidelity.json

Model: the shipped demo VLM when ``mpsearch/demo/config.json`` exists, else ``tiny:llava``
(``--model`` picks another). Formats: fp32 and ``torch.int8dyn`` for every layer (``--space``
names another search space). For each table method (``isolated``: every unique shape timed
alone, base = full model minus its layers, the plain approach; ``context``: every Linear timed by
hooks inside the real forward in uniform and mixed configurations, with the per-format overhead
outside the Linear calls fitted on their end-to-end times) the script measures a table, then
times the uniform policies and ``--policies`` random policies end to end, twice (sessions A and
B, each interleaved round-robin so load changes hit all policies alike; A before the tables are
measured, B after, so a slow drift of the machine's speed cancels in their mean), and prints:

* median and worst relative error |predicted / measured - 1| over the random policies (and over
  all, uniform included), measured = median of the A and B samples together;
* the noise floor: median |A / B - 1| over the same policies (what a perfect predictor would
  still show against one session);
* the same errors after the offset + per-format scale correction, by leave-one-out.

Nothing here is a test: timings depend on the machine; the figures go to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _model_name(arg: str | None) -> str:
    if arg:
        return arg
    return "demo" if (ROOT / "mpsearch" / "demo" / "config.json").is_file() else "tiny:llava"


def _space(name: str):
    from mpsearch.space import SearchSpace

    if name == "int8":
        fmts = ["fp32", "torch.int8dyn"]
        return SearchSpace("fp32-int8dyn", {g: list(fmts) for g in ("vision", "projector", "language", "head")})
    return SearchSpace.from_yaml(name)


def _errors(pred: list[float], meas: list[float]) -> list[float]:
    return [abs(p / m - 1.0) for p, m in zip(pred, meas)]


def _stats(errs: list[float]) -> str:
    return f"median {statistics.median(errs) * 100:5.1f}%  worst {max(errs) * 100:5.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: demo if shipped, else tiny:llava")
    ap.add_argument("--space", default="int8", help="'int8' (fp32 + torch.int8dyn everywhere) or a search space")
    ap.add_argument("--policies", type=int, default=20, help="random policies to validate on")
    ap.add_argument("--methods", default="isolated,context")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"))
    ap.add_argument("--stat", default="median", choices=("median", "min"))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--phase", default="prefill", choices=("prefill", "decode"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all rows and figures here")
    args = ap.parse_args(argv)

    import warnings

    import torch

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)
    from mpsearch.latency import (Workload, fit_correction, measure_latency_table, measure_policies,
                                  random_policies, uniform_policies)
    from mpsearch.latency.validate import loo_predictions
    from mpsearch.latency import current_device_name
    from mpsearch.models import discover_layers, load_vlm

    name = _model_name(args.model)
    model, _ = load_vlm(name, dtype="float32")
    layers = discover_layers(model)
    space = _space(args.space)
    w = Workload(threads=1, clock=args.clock, stat=args.stat, repeats=args.repeats, phase=args.phase)
    device = current_device_name(model)
    shapes = {(x.in_features, x.out_features, x.bias) for x in layers}
    print(f"model {name}: {len(layers)} Linear layers, {len(shapes)} unique shapes; space {space.name} "
          f"({', '.join(space.formats())}); device {device}; threads 1; clock {args.clock}; stat {args.stat}")
    uni = uniform_policies(space, layers)
    rnd = random_policies(space, layers, args.policies, seed=args.seed)
    policies = uni + rnd
    out: dict = {"model": name, "device": device, "workload": w.to_dict(), "space": space.name, "methods": {}}
    tables = {}
    t0 = time.perf_counter()
    sess_a = measure_policies(model, layers, policies, w)
    print(f"session A: {len(policies)} policies timed end to end in {time.perf_counter() - t0:.1f} s")
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        tables[method] = measure_latency_table(model, layers, space, w, method=method, progress=False,
                                               log=lambda m: print("  " + m))
        tok = tables[method].meta.get("rows_observed")
        print(f"table [{method}]: base {tables[method].base_ms:.3f} ms, {time.perf_counter() - t0:.1f} s; rows {tok}")
    t0 = time.perf_counter()
    sess_b = measure_policies(model, layers, policies, w)
    print(f"session B: {time.perf_counter() - t0:.1f} s")
    both = [sorted(a.samples_ms + b.samples_ms) for a, b in zip(sess_a, sess_b)]
    meas = [(min(s) if args.stat == "min" else statistics.median(s)) for s in both]
    va = [a.value(args.stat) for a in sess_a]
    vb = [b.value(args.stat) for b in sess_b]
    noise = _errors(va, vb)
    n_u = len(uni)
    print(f"noise floor (|A/B - 1|): random {_stats(noise[n_u:])}; all {_stats(noise)}")
    out["noise"] = {"random_median": statistics.median(noise[n_u:]), "random_worst": max(noise[n_u:]),
                    "all_median": statistics.median(noise), "all_worst": max(noise)}
    for method, table in tables.items():
        pred = [table.predict(p) for p in policies]
        errs = _errors(pred, meas)
        pairs = list(zip(policies, meas))
        loo = loo_predictions(table, pairs)
        cerrs = _errors(loo, meas)
        print(f"[{method}] random policies: {_stats(errs[n_u:])}; all: {_stats(errs)}; "
              f"corrected (leave-one-out): random {_stats(cerrs[n_u:])}")
        out["methods"][method] = {
            "random_median": statistics.median(errs[n_u:]), "random_worst": max(errs[n_u:]),
            "all_median": statistics.median(errs), "all_worst": max(errs),
            "corrected_random_median": statistics.median(cerrs[n_u:]), "corrected_random_worst": max(cerrs[n_u:]),
            "base_ms": table.base_ms, "fit": table.meta.get("fit"),
            "correction": fit_correction(table, pairs).to_dict(),
            "rows": [{"policy": p.meta.get("label"), "predicted_ms": pr, "measured_ms": m, "a_ms": a, "b_ms": b}
                     for p, pr, m, a, b in zip(policies, pred, meas, va, vb)],
        }
    print()
    head = f"{'policy':<22}{'measured':>10}{'A':>9}{'B':>9}" + "".join(f"{m:>12}" for m in tables)
    print(head)
    for i, p in enumerate(policies):
        cells = "".join(f"{tables[m].predict(p):8.3f} {100 * (tables[m].predict(p) / meas[i] - 1):+3.0f}%"
                        for m in tables)
        print(f"{p.meta.get('label', '?'):<22}{meas[i]:10.3f}{va[i]:9.3f}{vb[i]:9.3f}  {cells}")
    if args.json:
        from mpsearch.artifacts import atomic_write_json, provenance

        atomic_write_json(args.json, {"schema": 1, "kind": "latency-fidelity", **out,
                                      "provenance": provenance(device=device, model=name)})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
