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
from mpsearch.models import Layer
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
        Layer("blk.0.q_proj", "language", 32, 32, False),
        Layer("blk.0.k_proj", "language", 32, 16, False),
        Layer("blk.0.v_proj", "language", 32, 16, True),
        Layer("blk.0.o_proj", "language", 32, 32, True),
        Layer("blk.0.fc", "language", 32, 64, False),
        Layer("proj.linear", "projector", 16, 32, True),
        Layer("lm_head", "head", 32, 100, False),
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
    f4 = search(inst.sens, inst.lat, inst.space, n_trials=10, **kw)  # n_trials is the study's size: it holds more already
    assert f4.meta["trials"] == {"total": 25, "complete": 25, "this_worker": 0}
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


# -- issue 14: lexicographic ILP, one memory model, no dominated candidates ---------------------
@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_two_layer_tie_gives_the_faster_policy_in_both_orders(order):
    """Quantizing a or b costs the same loss; a is 5 ms in bf16, b 2 ms: the 2.0 ms policy wins."""
    ms = {"a": {"bf16": 5.0, "torch.int8dyn": 0.0}, "b": {"bf16": 2.0, "torch.int8dyn": 0.0}}
    layers = [Layer(n, "language", 64, 64, False) for n in order]
    space = SearchSpace("t", {"language": ["bf16", "torch.int8dyn"]})
    sens = SensitivityReport({n: {"bf16": 0.0, "torch.int8dyn": 1.0} for n in order})
    lat = LatencyTable(0.0, {n: ms[n] for n in order})
    pol = solve_ilp(sens, lat, space, budget_ms=5.0, layers=layers)
    assert lat.predict(pol) == 2.0 and pol.format_for("a") == "torch.int8dyn" and pol.format_for("b") == "bf16"
    front = ilp_front(sens, lat, space, layers=layers, n_points=None)
    assert 5.0 not in [c.predicted_latency_ms for c in front]


def tied_instance(seed: int):
    """small_instance with integer scores and latencies on a coarse grid: many exact ties in loss
    and latency, so the lexicographic tie-breaks decide."""
    layers, space, _, _ = small_instance(seed)
    rng = np.random.default_rng(1000 + seed)
    fmts = space.formats()
    scores = {l.name: {f: (0.0 if f == "fp32" else float(rng.integers(0, 3))) for f in fmts} for l in layers}
    ms = {l.name: {f: float(rng.integers(1, 4)) * 0.5 for f in fmts} for l in layers}
    return layers, space, SensitivityReport(scores), LatencyTable(1.0, ms)


def _lex_best(table, fits):
    """Brute-force lexicographic optimum (loss, then latency, then memory) among rows that fit."""
    ok = [t for t in table if fits(t)]
    lo = min(t[0] for t in ok)
    ok = [t for t in ok if t[0] <= lo + 1e-9]
    lm = min(t[1] for t in ok)
    ok = [t for t in ok if t[1] <= lm + 1e-9]
    return lo, lm, min(t[2] for t in ok)


@pytest.mark.parametrize("seed", range(10))
def test_ilp_is_lexicographic_against_brute_force_with_ties(seed):
    layers, space, sens, lat = tied_instance(seed)
    table = [exact_costs(p, layers, sens, lat) for p in all_policies(layers, space)]
    lo_ms, hi_ms = min(t[1] for t in table), max(t[1] for t in table)
    lo_b, hi_b = min(t[2] for t in table), max(t[2] for t in table)
    for frac in (0.0, 0.2, 0.5, 0.8):
        budget_ms = lo_ms + frac * (hi_ms - lo_ms)
        got = exact_costs(solve_ilp(sens, lat, space, budget_ms=budget_ms, layers=layers), layers, sens, lat)
        assert got == pytest.approx(_lex_best(table, lambda t: t[1] <= budget_ms), abs=1e-9)
        budget_b = int(lo_b + frac * (hi_b - lo_b))
        got = exact_costs(solve_ilp(sens, lat, space, budget_mb=budget_b / BYTES_PER_MB, layers=layers), layers, sens, lat)
        assert got == pytest.approx(_lex_best(table, lambda t: t[2] <= budget_b), abs=1e-9)
    # every ILP front point (latency and memory fronts) is beaten on every objective by no policy
    for metric in ("latency", "memory"):
        for c in ilp_front(sens, lat, space, layers=layers, n_points=None, metric=metric):
            v = (c.proxy_loss, c.predicted_latency_ms, c.memory_bytes)
            assert not any(all(a <= b + 1e-12 for a, b in zip(t, v)) and any(a < b - 1e-9 for a, b in zip(t, v))
                           for t in table), (metric, v)


def _tiny_llava(dtype, tied: bool):
    import mpsearch as mps

    model, _ = mps.load_vlm("tiny:llava", dtype=dtype)
    if tied:  # as Qwen2-VL-2B, SmolVLM, Gemma: the head *is* the input embedding matrix
        model.lm_head.weight = model.get_input_embeddings().weight
    return model, mps.discover_layers(model)


@pytest.mark.parametrize("dtype,tied", [("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True)])
def test_proxy_memory_is_policy_memory_bytes_to_the_byte(dtype, tied):
    """Property: for random policies of a space, the proxy's bytes equal policy_memory_bytes exactly."""
    import copy

    from mpsearch.formats import apply_policy, module_bytes, policy_memory_bytes

    model, layers = _tiny_llava(dtype, tied)
    native = "fp32" if dtype == "float32" else "bf16"
    fmts = [native, "rtn.int4", "bnb.int8", "bnb.nf4"]
    space = SearchSpace("m", {g: fmts for g in ("vision", "projector", "language", "head")}, tie=[["q_proj", "k_proj", "v_proj"]])
    sens = SensitivityReport({l.name: {f: 0.0 for f in fmts} for l in layers})
    prob = ProxyProblem.build(sens, None, space, layers, model=model)
    pols = space.sample(layers, 25, seed=3) + space.uniform_policies(layers)
    for p in pols:
        idx = prob.indices(p)
        assert prob.memory_bytes(idx) == policy_memory_bytes(model, p) == policy_memory_bytes(model, prob.policy(idx))
    # a tied head quantized without its embedding costs what it really costs
    head = Policy({l.name: ("rtn.int4" if l.group == "head" else native) for l in layers}, default=native)
    real = copy.deepcopy(model)
    apply_policy(real, head)
    assert prob.memory_bytes(prob.indices(head)) == policy_memory_bytes(model, head) == module_bytes(real)
    if tied:
        emb = model.get_input_embeddings().weight
        base = prob.memory_bytes(prob.indices(Policy({l.name: native for l in layers}, default=native)))
        assert prob.memory_bytes(prob.indices(head)) > base  # the embedding stays: quantizing the head adds bytes
        assert emb.numel() * emb.element_size() <= base


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ilp_never_exceeds_a_memory_budget_on_a_tied_model(dtype):
    from mpsearch.formats import policy_memory_bytes

    model, layers = _tiny_llava(dtype, tied=True)
    native = "fp32" if dtype == "float32" else "bf16"
    fmts = [native, "rtn.int4", "bnb.int8"]
    space = SearchSpace("m", {g: fmts for g in ("vision", "projector", "language", "head")})
    rng = np.random.default_rng(0)
    sens = SensitivityReport({l.name: {f: (0.0 if f == native else float(rng.exponential())) for f in fmts} for l in layers})
    prob = ProxyProblem.build(sens, None, space, layers, model=model)
    lo, hi = prob.memory_bytes(prob.smallest()), prob.memory_bytes(prob.largest())
    for frac in (0.05, 0.3, 0.6, 0.9):
        budget_mb = (lo + frac * (hi - lo)) / BYTES_PER_MB
        pol = solve_ilp(sens, None, space, budget_mb=budget_mb, layers=layers, model=model)
        mem = policy_memory_bytes(model, pol)
        assert mem <= budget_mb * BYTES_PER_MB and mem == pol.meta["metrics"]["memory_bytes"]


def test_uniform_and_sampled_policies_share_the_searchs_keys():
    inst = synthetic_instance(n_blocks=2, vision_blocks=1, seed=0)
    prob = ProxyProblem.build(inst.sens, inst.lat, inst.space, inst.layers)
    for p in inst.space.uniform_policies(inst.layers) + inst.space.sample(inst.layers, 5, seed=1):
        assert prob.policy(prob.indices(p)).key() == p.key()
        assert p.default == inst.space.default_format
    a, b = inst.space.sample(inst.layers, 3, seed=7), inst.space.sample(inst.layers, 5, seed=7)
    assert [p.key() for p in a] == [p.key() for p in b[:3]]
    for p in inst.space.uniform_policies(inst.layers):
        idx = prob.uniform(p.meta["format"])
        assert idx is None or prob.policy(idx).key() == p.key()


def test_one_pareto_filter_nan_and_none_never_shield():
    from mpsearch.plots import _pareto_xy
    from mpsearch.searching import Candidate
    from mpsearch.searching._front import pareto_indices

    assert pareto_indices([(1.0, float("nan")), (1.0, 2.0), (None, 0.0), (0.5, 3.0)]) == [1, 2, 3]
    cs = [Candidate(Policy({"l": "fp32"}), math.nan, 1.0, None, "nan"), Candidate(Policy({"l": "bf16"}), 0.5, 1.0, None, "ok")]
    assert [c.source for c in pareto(cs, ("proxy_loss", "predicted_latency_ms"))] == ["ok"]
    assert _pareto_xy([(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (1.0, 0.5)]) == [(1.0, 0.5), (2.0, 0.7)]


def test_proxy_fidelity_from_a_refined_front(tmp_path):
    from mpsearch.searching import Candidate, Front
    from mpsearch.searching._fidelity import fidelity_lines, proxy_fidelity

    rng = np.random.default_rng(0)
    fmts = ["fp32", "bf16", "fp16", "bnb.int8", "bnb.nf4", "rtn.int4"]  # front files hold registry formats only
    cs = [Candidate(Policy({"l": fmts[i]}), float(i), float(10 - i), None, "t", kl=float(i) + rng.uniform(0, 0.1),
                    measured_latency_ms=float(10 - i) + 0.5) for i in range(6)]
    fid = proxy_fidelity(cs)
    assert fid["spearman_proxy_kl"] == pytest.approx(1.0) and fid["n_proxy_kl"] == 6 and fid["n_latency"] == 6
    rec = {"n": 16, "spearman_proxy_kl": 0.29, "spearman_predicted_measured_latency": -0.21, "median_latency_error": 0.2}
    write_front(tmp_path / "refined.json", Front(cs, meta={"fidelity": rec}))
    fid = proxy_fidelity(tmp_path / "refined.json")
    assert (fid["spearman_proxy_kl"], fid["n_proxy_kl"], fid["spearman_latency"], fid["n_latency"]) == (0.29, 16, -0.21, 16)
    assert "over 16 policies" in "\n".join(fidelity_lines(fid))
