"""Refine on a tiny random LLaVA: measured KL against an independent reference, failures, resume, CLI."""
from __future__ import annotations

import copy
import math

import numpy as np
import optuna
import pytest
import torch

from mpsearch.errors import MpsError
from mpsearch.formats import apply_policy, current_formats
from mpsearch.latency import LatencyTable, Workload
from mpsearch.policy import Policy
from mpsearch.searching import Candidate, read_front, solve_ilp, write_front
from mpsearch.sensitivity.kl import kl_to_reference, reference_logits
from mpsearch.sensitivity.report import SensitivityReport
from mpsearch.space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = SearchSpace("tiny", {"vision": ["fp32", "torch.int8dyn"], "projector": ["fp32", "torch.int8dyn"],
                             "language": ["fp32", "torch.int8dyn", "rtn.int4"], "head": ["fp32"]},
                    tie=[["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]])
WORKLOAD = Workload(threads=1, repeats=3, warmup=1)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from mpsearch.models import discover_layers, load_vlm
    from mpsearch.sensitivity.calib import calibration_batches
    from mpsearch.tasks import load_benchmark

    model, processor = load_vlm("tiny:llava")
    layers = discover_layers(model)
    bench = load_benchmark("synthetic", split="dev", limit=8)
    batches = calibration_batches(model, processor, bench, n_samples=4, batch_size=2, seed=0)
    rng = np.random.default_rng(0)
    sens = SensitivityReport({l.name: {f: (0.0 if f == "fp32" else float(rng.exponential()) * (3 if f == "rtn.int4" else 1))
                                       for f in SPACE.candidates(l)} for l in layers})
    lat = LatencyTable(1.0, {l.name: {f: {"fp32": 0.3, "torch.int8dyn": 0.2, "rtn.int4": 0.5}[f] * (1 + rng.random())
                                      for f in SPACE.candidates(l)} for l in layers})
    pristine = copy.deepcopy(model)
    return model, processor, layers, batches, sens, lat, pristine


def _front(layers, sens, lat):
    names = [l.name for l in layers]
    fp32 = Policy.uniform("fp32", names)
    int8 = Policy({l.name: ("fp32" if l.group == "head" else "torch.int8dyn") for l in layers}, "fp32")
    ilp = solve_ilp(sens, lat, SPACE, budget_ms=0.5 * (lat.predict(fp32) + lat.predict(int8)), layers=layers)
    return [Candidate(p, 0.0, lat.predict(p), None, src) for p, src in ((ilp, "ilp"), (fp32, "uniform fp32"), (int8, "uniform int8"))]


def test_refine_measures_kl_like_a_fresh_quantization(setup):
    from mpsearch.searching._refine import refine

    model, processor, layers, batches, sens, lat, pristine = setup
    front = _front(layers, sens, lat)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    refined = refine(model, processor, front, SPACE, n_trials=6, batches=batches, workload=WORKLOAD, lat=lat, sens=sens,
                     sampler="evo", seed=1, progress=False)
    # the model is given back untouched
    assert set(current_formats(model).values()) == {"fp32"}
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    study_trials = refined.meta["trials"]
    assert study_trials["complete"] == 6 and study_trials["total"] == 6 and not refined.failures
    # reference: quantize a fresh copy with apply_policy and measure KL independently
    ref = reference_logits(pristine, batches)
    for c in refined:
        fresh = copy.deepcopy(pristine)
        apply_policy(fresh, c.policy)
        assert c.kl == pytest.approx(kl_to_reference(fresh, batches, ref), rel=1e-6, abs=1e-12)
        assert c.measured_latency_ms > 0 and c.predicted_latency_ms == pytest.approx(lat.predict(c.policy))
    # the all-fp32 seed is exact: KL 0, and it is on the front (lowest KL)
    assert refined[0].kl <= 1e-12
    fid = refined.meta["fidelity"]
    assert fid["n"] == 6 and 0.0 <= fid["swap_share"] < 0.5 and fid["spearman_proxy_kl"] is not None
    non_dominated = [(c.kl, c.measured_latency_ms) for c in refined]
    for i, a in enumerate(non_dominated):
        assert not any(b[0] <= a[0] and b[1] <= a[1] and b != a for j, b in enumerate(non_dominated) if j != i)


def test_refine_never_requantizes_per_trial(setup, monkeypatch):
    import mpsearch.formats.apply as fa
    from mpsearch.searching._refine import refine

    model, processor, layers, batches, sens, lat, _ = setup
    calls = []
    real = fa._build
    monkeypatch.setattr(fa, "_build", lambda *a, **k: calls.append(1) or real(*a, **k))
    refine(model, processor, _front(layers, sens, lat), SPACE, n_trials=5, batches=batches, workload=WORKLOAD,
           lat=lat, sens=sens, progress=False)
    built = len(calls)
    expected = sum(len([f for f in SPACE.candidates(l) if f != "fp32"]) for l in layers)
    assert built == expected  # each (layer, format) once, before the study; trials only swap


def test_failed_trials_are_recorded_and_the_study_goes_on(setup, monkeypatch):
    import mpsearch.sensitivity.kl as klmod
    from mpsearch.searching._refine import refine

    model, processor, layers, batches, sens, lat, _ = setup
    real = klmod.kl_to_reference
    n = {"calls": 0}

    def flaky(m, b, r):
        n["calls"] += 1
        if n["calls"] == 2:
            return math.nan
        if n["calls"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(m, b, r)

    monkeypatch.setattr(klmod, "kl_to_reference", flaky)
    refined = refine(model, processor, _front(layers, sens, lat), SPACE, n_trials=5, batches=batches, workload=WORKLOAD,
                     progress=False, seed=2)
    reasons = sorted(f["reason"] for f in refined.failures)
    assert len(reasons) == 2
    assert reasons[0].startswith("KL to the full-precision model is nan") and reasons[1].startswith("out of memory")
    assert refined.meta["trials"]["complete"] == 3 and refined.meta["trials"]["total"] == 5
    assert set(current_formats(model).values()) == {"fp32"}


def test_refine_resumes_without_rerunning(setup, tmp_path):
    from mpsearch.searching._refine import refine

    model, processor, layers, batches, sens, lat, _ = setup
    url = f"sqlite:///{tmp_path}/refine.db"
    kw = dict(batches=batches, workload=WORKLOAD, lat=lat, sens=sens, storage=url, study_name="rf", progress=False, sampler="evo")
    r1 = refine(model, processor, _front(layers, sens, lat), SPACE, n_trials=3, **kw)
    assert r1.meta["trials"]["this_worker"] == 3
    from mpsearch.searching import open_storage

    first = {t.number: t.values for t in optuna.load_study(study_name="rf", storage=open_storage(url)).trials}
    r2 = refine(model, processor, _front(layers, sens, lat), SPACE, n_trials=5, **kw)
    assert r2.meta["trials"]["this_worker"] == 2 and r2.meta["trials"]["total"] == 5
    again = {t.number: t.values for t in optuna.load_study(study_name="rf", storage=open_storage(url)).trials}
    assert all(again[k] == v for k, v in first.items()) and sorted(again) == list(range(5))


def test_refine_rejects_bad_input(setup):
    from mpsearch.searching._refine import refine

    model, processor, layers, batches, sens, lat, _ = setup
    alien = Candidate(Policy({"not.a.layer": "fp32"}, "fp32"), 0.0, None, None, "alien")
    with pytest.raises(MpsError, match="unknown layer 'not.a.layer'"):
        refine(model, processor, [alien], SPACE, n_trials=2, batches=batches, workload=WORKLOAD, progress=False)
    with pytest.raises(MpsError, match="calibration data"):
        refine(model, processor, _front(layers, sens, lat), SPACE, n_trials=2, workload=WORKLOAD, progress=False)


def test_cli_refine(setup, tmp_path, capsys):
    from mpsearch.cli import main

    model, processor, layers, batches, sens, lat, _ = setup
    space_yaml = tmp_path / "tiny.yaml"
    space_yaml.write_text("name: tiny\ngroups:\n  vision: [fp32, torch.int8dyn]\n  projector: [fp32, torch.int8dyn]\n"
                          "  language: [fp32, torch.int8dyn, rtn.int4]\n  head: [fp32]\n"
                          "tie: [[q_proj, k_proj, v_proj], [gate_proj, up_proj]]\n")
    write_front(tmp_path / "front.json", _front(layers, sens, lat), space="tiny")
    lat.to_json(tmp_path / "lat.json")
    out = tmp_path / "refined.json"
    rc = main(["refine", "tiny:llava", "--front", str(tmp_path / "front.json"), "--space", str(space_yaml), "--samples", "2",
               "--batch-size", "2", "--latency", str(tmp_path / "lat.json"), "--workload", "threads=1,repeats=2,warmup=0",
               "--n-trials", "4", "--budget-ms", "100000", "--no-progress", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "fidelity:" in text and "swap share" in text
    refined = read_front(out)
    assert refined and all(c.kl is not None and c.measured_latency_ms is not None for c in refined)
    assert refined.meta["stage"] == "refine" and refined.meta["fidelity"]["n"] == 4


def test_refine_accepts_the_issue_argument_order(setup):
    from mpsearch.searching._refine import refine

    model, processor, layers, batches, sens, lat, _ = setup
    front = _front(layers, sens, lat)
    a = refine(model, processor, batches, front, SPACE, 1e6, 2, workload=WORKLOAD, progress=False)
    b = refine(model, processor, front, SPACE, 1e6, 2, batches=batches, workload=WORKLOAD, progress=False)
    assert a.meta["trials"]["total"] == b.meta["trials"]["total"] == 2 and a.meta["budget_ms"] == b.meta["budget_ms"] == 1e6
    assert a[0].kl == b[0].kl == 0.0  # the fp32 seed, exact in both
