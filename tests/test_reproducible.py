"""Same seed and inputs: the same sensitivity report, the same proxy front and the same chosen
policy (reliability issue, item 7)."""
from __future__ import annotations

import pytest

import mpsearch as mps
from mpsearch.latency import LatencyTable
from mpsearch.searching import search, solve_ilp


@pytest.fixture(scope="module")
def setup():
    model, processor = mps.load_vlm("tiny:llava")
    layers = mps.discover_layers(model)
    space = mps.SearchSpace.from_yaml("cpu")
    bench = list(mps.load_benchmark("synthetic", "dev", limit=8))
    return model, processor, layers, space, bench


@pytest.mark.parametrize("method", ["activation", "fisher", "hessian", "kl"])
def test_same_seed_same_sensitivity_report(setup, method):
    model, processor, layers, space, bench = setup
    kw = dict(method=method, n_samples=6, seed=3, batch_size=3, n_probes=2, progress=False)
    a = mps.profile(model, processor, bench, layers, space, **kw)
    b = mps.profile(model, processor, bench, layers, space, **kw)
    assert a.scores == b.scores


def test_same_seed_same_front_and_chosen_policy(setup):
    model, processor, layers, space, bench = setup
    sens = mps.profile(model, processor, bench, layers, space, method="activation", n_samples=6, seed=0,
                       batch_size=3, progress=False)
    # a fixed latency table (timings are measurements, not seeded): per-format cost by layer size
    cost = {"fp32": 1.0, "torch.int8dyn": 0.5, "bnb.int8": 2.0, "bnb.nf4": 1.5, "bnb.fp4": 1.5,
            "rtn.int4": 1.8, "rtn.int3": 2.2, "rtn.int2": 2.0, "bf16": 0.6, "torch.int8wo": 1.2,
            "torch.int4wo": 1.3}
    lat = LatencyTable(base_ms=1.0, ms={l.name: {f: cost[f] * l.params / 1e4 for f in space.candidates(l)}
                                         for l in layers})
    full = lat.predict(mps.Policy({}, default="fp32"))
    budget = 0.8 * full
    runs = [search(sens, lat, space, budget_ms=budget, n_trials=60, seed=7, sampler="evo", layers=layers,
                   model=model, progress=False) for _ in range(2)]
    assert [c.policy.key() for c in runs[0]] == [c.policy.key() for c in runs[1]]
    assert [c.proxy_loss for c in runs[0]] == [c.proxy_loss for c in runs[1]]
    p1 = solve_ilp(sens, lat, space, budget_ms=budget, layers=layers, model=model)
    p2 = solve_ilp(sens, lat, space, budget_ms=budget, layers=layers, model=model)
    assert p1.key() == p2.key()
