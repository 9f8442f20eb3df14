"""Search: the ILP against brute force, infeasible budgets, the Optuna study and its front, the CLI."""
from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import optuna
import pytest

from mpsearch.errors import InfeasibleBudget, MpsError
from mpsearch.formats import get_format
from mpsearch.latency import LatencyTable
from mpsearch.policy import Policy
from mpsearch.searching import (
    BYTES_PER_MB,
    BudgetSampler,
    ProxyProblem,
    ilp_front,
    pareto,
    read_front,
    search,
    solve_ilp,
    summarize_formats,
    write_front,
)
from mpsearch.searching._proxy import LayerInfo
from mpsearch.searching.synthetic import synthetic_instance
from mpsearch.sensitivity.report import SensitivityReport
from mpsearch.space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)
FORMATS = ["fp32", "torch.int8dyn", "bnb.nf4", "rtn.int4"]


# -- a small random instance with ties and a pin, and an independent brute force ----------------
def small_instance(seed: int, n_formats: int = 3):
    """7 layers: q/k/v tied, o, fc, a pinned head, a projector: 6 decisions, <= 3^5 policies."""
    rng = np.random.default_rng(seed)
    fmts = FORMATS[:n_formats]
    layers = [
        LayerInfo("blk.0.q_proj", "language", 32, 32, False),
        LayerInfo("blk.0.k_proj", "language", 32, 16, False),
        LayerInfo("blk.0.v_proj", "language", 32, 16, True),
        LayerInfo("blk.0.o_proj", "language", 32, 32, True),
        LayerInfo("blk.0.fc", "language", 32, 64, False),
        LayerInfo("proj.linear", "projector", 16, 32, True),
        LayerInfo("lm_head", "head", 32, 100, False),
    ]
    space = SearchSpace("small", {"vision": fmts, "projector": fmts[:2], "language": fmts, "head": fmts},
                        pin={"lm_head": "fp32"}, tie=[["q_proj", "k_proj", "v_proj"]])
    scores = {l.name: {f: (0.0 if f == "fp32" else float(rng.exponential())) for f in fmts} for l in layers}
    if seed % 3 == 0:  # a layer scored 0 everywhere (ties in loss): the cheaper format must win
        scores["blk.0.fc"] = {f: 0.0 for f in fmts}
    ms = {l.name: {f: float(rng.uniform(0.2, 2.0)) for f in fmts} for l in layers}
    return layers, space, SensitivityReport(scores), LatencyTable(1.5, ms)


def all_policies(layers, space):
    """Every policy: each layer any candidate format, tied layers equal (not via decisions())."""
    cands = [space.candidates(l) for l in layers]
    tied = ["blk.0.q_proj", "blk.0.k_proj", "blk.0.v_proj"]
    for combo in itertools.product(*cands):
        formats = {l.name: f for l, f in zip(layers, combo)}
        if len({formats[n] for n in tied}) == 1:
            yield Policy(formats, default="fp32")


def exact_costs(policy, layers, sens, lat):
    loss = math.fsum(sens.scores[l.name][policy.format_for(l.name)] for l in layers)
    mem = sum(get_format(policy.format_for(l.name)).storage_bytes(l.in_features, l.out_features, l.bias) for l in layers)
    return loss, lat.predict(policy), mem


@pytest.mark.parametrize("seed", range(12))
def test_ilp_equals_brute_force(seed):
    layers, space, sens, lat = small_instance(seed)
    table = [exact_costs(p, layers, sens, lat) for p in all_policies(layers, space)]
    lo_ms, hi_ms = min(t[1] for t in table), max(t[1] for t in table)
    lo_b, hi_b = min(t[2] for t in table), max(t[2] for t in table)
    rng = np.random.default_rng(100 + seed)
    for frac in list(rng.uniform(0, 1, 4)) + [0.0]:
        budget_ms = lo_ms + frac * (hi_ms - lo_ms)
        best = min(t[0] for t in table if t[1] <= budget_ms)
        pol = solve_ilp(sens, lat, space, budget_ms=budget_ms, layers=layers)
        loss, ms, mem = exact_costs(pol, layers, sens, lat)
        assert ms <= budget_ms
        assert loss == pytest.approx(best, abs=1e-9)
        # no equally good policy is cheaper (ties in loss are broken towards lower latency)
        assert not any(t[0] <= loss + 1e-12 and t[1] < ms - 1e-12 and t[1] <= budget_ms for t in table if t[2] <= mem)
        # memory budget, then both
        budget_b = lo_b + frac * (hi_b - lo_b)
        best_b = min(t[0] for t in table if t[2] <= budget_b)
        pol = solve_ilp(sens, lat, space, budget_mb=budget_b / BYTES_PER_MB, layers=layers)
        loss, _, mem = exact_costs(pol, layers, sens, lat)
        assert mem <= budget_b and loss == pytest.approx(best_b, abs=1e-9)
        both = [t[0] for t in table if t[1] <= budget_ms and t[2] <= budget_b]
        if both:
            pol = solve_ilp(sens, lat, space, budget_ms=budget_ms, budget_mb=budget_b / BYTES_PER_MB, layers=layers)
            loss, ms, mem = exact_costs(pol, layers, sens, lat)
            assert ms <= budget_ms and mem <= budget_b and loss == pytest.approx(min(both), abs=1e-9)
        else:
            with pytest.raises(InfeasibleBudget, match="together"):
                solve_ilp(sens, lat, space, budget_ms=budget_ms, budget_mb=budget_b / BYTES_PER_MB, layers=layers)


@pytest.mark.parametrize("seed", range(6))
def test_ilp_front_is_the_exact_pareto_front(seed):
    layers, space, sens, lat = small_instance(seed)
    table = {(round(t[0], 9), round(t[1], 9)) for t in (exact_costs(p, layers, sens, lat) for p in all_policies(layers, space))}
    exact = sorted(v for v in table if not any(w[0] <= v[0] and w[1] <= v[1] and w != v for w in table))
    front = ilp_front(sens, lat, space, layers=layers, n_points=None)
    got = sorted((round(c.proxy_loss, 9), round(c.predicted_latency_ms, 9)) for c in front)
    assert got == exact
    # a grid of budgets gives exact points too (a subset of the front)
    grid = ilp_front(sens, lat, space, layers=layers, n_points=5)
    assert {(round(c.proxy_loss, 9), round(c.predicted_latency_ms, 9)) for c in grid} <= set(exact)


def test_pinned_layers_and_ties_respected():
    layers, space, sens, lat = small_instance(1)
    pol = solve_ilp(sens, lat, space, budget_ms=1e-3 + min(exact_costs(p, layers, sens, lat)[1] for p in all_policies(layers, space)), layers=layers)
    assert pol.format_for("lm_head") == "fp32"
    assert len({pol.format_for(f"blk.0.{x}_proj") for x in "qkv"}) == 1
    assert set(pol.formats) == {l.name for l in layers}


def test_infeasible_budget_names_fastest_and_smallest():
    layers, space, sens, lat = small_instance(2)
    table = [(exact_costs(p, layers, sens, lat), p) for p in all_policies(layers, space)]
    fastest = min(t[0][1] for t in table)
    smallest = min(t[0][2] for t in table)
    with pytest.raises(InfeasibleBudget) as err:
        solve_ilp(sens, lat, space, budget_ms=fastest * 0.9, layers=layers)
    msg = str(err.value)
    assert isinstance(err.value, MpsError) and "\n" not in msg
    assert "budget_ms=" in msg and f"fastest: {fastest:.4g} ms" in msg
    assert f"smallest: {smallest / BYTES_PER_MB:.4g} MiB" in msg
    assert "all " in msg and "lm_head" in msg  # the policy summarised: majority format and the pinned exception
    with pytest.raises(InfeasibleBudget, match="smallest"):
        solve_ilp(sens, lat, space, budget_mb=smallest * 0.99 / BYTES_PER_MB, layers=layers)


def test_budget_above_slowest_warns_not_errors():
    layers, space, sens, lat = small_instance(3)
    slowest = max(exact_costs(p, layers, sens, lat)[1] for p in all_policies(layers, space))
    with pytest.warns(UserWarning, match="constrains nothing"):
        pol = solve_ilp(sens, lat, space, budget_ms=slowest * 2, layers=layers)
    assert exact_costs(pol, layers, sens, lat)[0] == pytest.approx(0.0)


def test_bad_inputs_raise_one_line_errors():
    layers, space, sens, lat = small_instance(4)
    partial = SensitivityReport({k: v for k, v in sens.scores.items() if k != "blk.0.fc"})
    with pytest.raises(MpsError, match="no scores for layer 'blk.0.fc'"):
        solve_ilp(partial, lat, space, budget_ms=10.0, layers=layers)
    short = LatencyTable(1.0, {k: {"fp32": 1.0} for k in lat.ms})
    with pytest.raises(MpsError, match="no timing for layer .* in format"):
        solve_ilp(sens, short, space, budget_ms=10.0, layers=layers)
    with pytest.raises(MpsError, match="budget_ms must be a positive"):
        solve_ilp(sens, lat, space, budget_ms=-1.0, layers=layers)
    with pytest.raises(MpsError, match="no budget"):
        solve_ilp(sens, lat, space, layers=layers)
    with pytest.raises(MpsError, match="sampler 'nope'"):
        search(sens, lat, space, budget_ms=10.0, n_trials=2, sampler="nope", layers=layers, progress=False)


def test_summary_names_majority_and_exceptions():
    s = summarize_formats({"a": "torch.int8dyn", "b": "torch.int8dyn", "c": "torch.int8dyn", "lm_head": "fp32"})
    assert s == "all torch.int8dyn except fp32: lm_head"


# -- the Optuna study ------------------------------------------------------------------------
def medium():
    inst = synthetic_instance(n_blocks=3, vision_blocks=2, hidden=256, vision_hidden=128, seed=5)
    prob = ProxyProblem.build(inst.sens, inst.lat, inst.space, inst.layers)
    lo, hi = prob.latency_ms(prob.fastest()), prob.latency_ms(prob.slowest())
    return inst, lo + 0.35 * (hi - lo)


def _check_front(front, budget_ms):
    assert front, "empty front"
    for c in front:
        assert c.predicted_latency_ms <= budget_ms
    vals = [(c.proxy_loss, c.predicted_latency_ms) for c in front]
    for i, a in enumerate(vals):
        for j, b in enumerate(vals):
            if i != j:
                assert not (b[0] <= a[0] and b[1] <= a[1] and b != a), "dominated candidate in the front"


@pytest.mark.parametrize("sampler", ["nsga2", "evo", "tpe"])
def test_search_front_feasible_nondominated_with_ilp(sampler):
    inst, budget = medium()
    front = search(inst.sens, inst.lat, inst.space, budget_ms=budget, n_trials=40, sampler=sampler,
                   layers=inst.layers, progress=False, front_points=4)
    _check_front(front, budget)
    ilp = solve_ilp(inst.sens, inst.lat, inst.space, budget_ms=budget, layers=inst.layers)
    assert ilp.key() in {c.key for c in front}
    assert front[0].proxy_loss == pytest.approx(ilp.meta["metrics"]["proxy_loss"])  # nothing beats the exact optimum
    assert front.meta["trials"]["complete"] == 40 and front.meta["ilp"]["proxy_loss"] == pytest.approx(front[0].proxy_loss)
    # the numbers of each candidate are those of its policy (re-evaluated, not copied)
    for c in front:
        assert c.predicted_latency_ms == pytest.approx(inst.lat.predict(c.policy))
        assert c.proxy_loss == pytest.approx(sum(inst.sens.scores[n][f] for n, f in c.policy.formats.items()))


def test_search_reproducible():
    inst, budget = medium()
    runs = [search(inst.sens, inst.lat, inst.space, budget_ms=budget, n_trials=30, sampler=s, seed=3,
                   layers=inst.layers, progress=False, front_points=2, seeding="uniform")
            for s in ("evo", "evo", "nsga2", "nsga2")]
    key = lambda f: [(c.key, c.proxy_loss, c.predicted_latency_ms) for c in f]  # noqa: E731
    assert key(runs[0]) == key(runs[1])
    assert key(runs[2]) == key(runs[3])


def test_budget_sampler_keeps_the_budget_nsga2_does_not():
    inst, budget = medium()
    share = {}
    for s in ("evo", "nsga2"):
        study_front = search(inst.sens, inst.lat, inst.space, budget_ms=budget, n_trials=60, sampler=s,
                             layers=inst.layers, progress=False, seeding="none", storage=None)
        share[s] = study_front.meta["trials"]["complete"]
        assert all(c.predicted_latency_ms <= budget for c in study_front)
    # feasible share among the sampler's own trials
    prob = ProxyProblem.build(inst.sens, inst.lat, inst.space, inst.layers)
    for s, want in (("evo", 0.9),):
        sampler = BudgetSampler(prob, budget_ms=budget, seed=0)
        study = optuna.create_study(directions=["minimize"] * 2, sampler=sampler)
        for _ in range(40):
            t = study.ask()
            idx = prob.from_params({prob.decisions[d].key: t.suggest_categorical(prob.decisions[d].key, list(prob.decisions[d].choices)) for d in prob.free})
            t.set_constraint("latency_ms", prob.latency_ms(idx) - budget)
            study.tell(t, [prob.loss(idx), prob.latency_ms(idx)])
        feas = sum(all(v <= 0 for v in t.constraints.values()) for t in study.trials) / len(study.trials)
        assert feas >= want


def test_memory_budget_search_and_front_file(tmp_path):
    inst, _ = medium()
    prob = ProxyProblem.build(inst.sens, inst.lat, inst.space, inst.layers)
    lo, hi = prob.memory_bytes(prob.smallest()), prob.memory_bytes(prob.largest())
    budget_mb = (lo + 0.4 * (hi - lo)) / BYTES_PER_MB
    front = search(inst.sens, None, inst.space, budget_mb=budget_mb, n_trials=20, sampler="evo",
                   layers=inst.layers, progress=False)
    assert front.meta["objectives"] == ["proxy_loss", "memory_mb"]
    assert all(c.memory_bytes <= budget_mb * BYTES_PER_MB and c.predicted_latency_ms is None for c in front)
    write_front(tmp_path / "front.json", front)
    back = read_front(tmp_path / "front.json")
    assert [c.key for c in back] == [c.key for c in front] and back.meta["budget_mb"] == budget_mb
    doc = json.loads((tmp_path / "front.json").read_text())
    assert doc["schema"] == 1 and doc["kind"] == "front" and "provenance" in doc


def test_pareto_helper():
    a = Policy({"l": "fp32"})
    from mpsearch.searching import Candidate

    cs = [Candidate(a, 1.0, 5.0, None, "a"), Candidate(Policy({"l": "bf16"}), 2.0, 6.0, None, "b"),
          Candidate(Policy({"l": "fp16"}), 0.5, 9.0, None, "c")]
    assert [c.source for c in pareto(cs, ("proxy_loss", "predicted_latency_ms"))] == ["c", "a"]


# -- resume with a storage ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_same_study_name_resumes(tmp_path, kind):
    inst, budget = medium()
    url = f"sqlite:///{tmp_path}/s.db" if kind == "sqlite" else f"journal:///{tmp_path}/s.log"
    kw = dict(budget_ms=budget, sampler="evo", layers=inst.layers, progress=False, storage=url, study_name="r", front_points=2)
    f1 = search(inst.sens, inst.lat, inst.space, n_trials=15, **kw)
    assert f1.meta["trials"] == {"total": 15, "complete": 15, "this_worker": 15}
    f2 = search(inst.sens, inst.lat, inst.space, n_trials=15, **kw)  # nothing left to do
    assert f2.meta["trials"]["this_worker"] == 0 and [c.key for c in f2] == [c.key for c in f1]
    f3 = search(inst.sens, inst.lat, inst.space, n_trials=25, **kw)  # topped up
    assert f3.meta["trials"] == {"total": 25, "complete": 25, "this_worker": 10}
    from mpsearch.searching import open_storage

    study = optuna.load_study(study_name="r", storage=open_storage(url))
    assert sorted(t.number for t in study.trials) == list(range(25))
    assert study.user_attrs["mpsearch"]["stage"] == "search" and "ilp" in study.user_attrs
    t0 = study.trials[0]
    assert t0.user_attrs["seed"] == "ilp" and "latency_ms" in t0.constraints and "policy" in t0.user_attrs
    # another budget under the same name is refused
    with pytest.raises(MpsError, match="made for other inputs"):
        search(inst.sens, inst.lat, inst.space, n_trials=25, **{**kw, "budget_ms": budget * 1.01})


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_search_and_infeasible(tmp_path, capsys):
    from mpsearch.cli import main

    inst, budget = medium()
    inst.sens.meta["search_space"] = "synthetic"
    inst.sens.to_json(tmp_path / "sens.json")
    inst.lat.to_json(tmp_path / "lat.json")
    space_yaml = tmp_path / "space.yaml"
    space_yaml.write_text(json.dumps({"name": "synthetic", "groups": inst.space.groups, "pin": inst.space.pin, "tie": inst.space.tie}))
    out = tmp_path / "front.json"
    rc = main(["search", "--sens", str(tmp_path / "sens.json"), "--latency", str(tmp_path / "lat.json"), "--space", str(space_yaml),
               "--budget-ms", str(budget), "--n-trials", "12", "--sampler", "evo", "--no-progress", "-o", str(out)])
    assert rc == 0
    front = read_front(out)
    assert front and all(c.predicted_latency_ms <= budget for c in front)
    assert "ILP optimum" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    rc = main(["search", "--sensitivity", str(tmp_path / "sens.json"), "--latency", str(tmp_path / "lat.json"), "--space",
               str(space_yaml), "--budget-ms", "0.001", "--trials", "5", "--no-progress", "-o", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: no policy of search space 'synthetic' meets budget_ms=0.001")
    assert "fastest:" in err and err.count("\n") == 1 and not bad.exists()


def test_cli_memory_budget_counts_the_whole_model(tmp_path, capsys):
    """--model: layers and exact whole-model memory (checked against policy_memory_bytes)."""
    from mpsearch.cli import main
    from mpsearch.formats import policy_memory_bytes
    from mpsearch.models import discover_layers, load_vlm

    model, _ = load_vlm("demo", load_processor=False)
    layers = discover_layers(model)
    space = SearchSpace.from_yaml("cpu")
    rng = np.random.default_rng(0)
    sens = SensitivityReport({l.name: {f: (0.0 if f == "fp32" else float(rng.exponential())) for f in space.candidates(l)}
                              for l in layers}, meta={"search_space": "cpu"})
    sens.to_json(tmp_path / "sens.json")
    names = [l.name for l in layers]
    full = policy_memory_bytes(model, Policy.uniform("fp32", names))
    budget_mb = 0.7 * full / BYTES_PER_MB
    rc = main(["search", "--sens", str(tmp_path / "sens.json"), "--model", "demo", "--budget-mb", str(budget_mb),
               "--n-trials", "10", "--sampler", "evo", "--no-progress", "-o", str(tmp_path / "front.json")])
    assert rc == 0, capsys.readouterr().err
    front = read_front(tmp_path / "front.json")
    assert front and front.meta["memory_scope"] == "model"
    for c in front:
        assert c.memory_bytes == policy_memory_bytes(model, c.policy) <= budget_mb * BYTES_PER_MB
