"""Reports and tables built from plain dicts (DESIGN: constructible from plain dicts) in
``solve_ilp``, ``search`` and ``mpsearch search``, with no model: the layer groups come from the
names by discover_layers' rule. Checked against brute force over every policy and against an
ILP written here independently with ``scipy.optimize.milp`` (one binary per layer x format).
"""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import optuna
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

import mpsearch as mps
from mpsearch.errors import MpsError

optuna.logging.set_verbosity(optuna.logging.WARNING)

FMTS = ["fp32", "torch.int8dyn", "rtn.int4"]
VISION = ["model.vision_tower.encoder.layers.0.mlp.fc1", "model.vision_tower.encoder.layers.0.mlp.fc2"]
PROJ = ["model.multi_modal_projector.linear_1"]
QKV = [f"model.language_model.layers.0.self_attn.{x}_proj" for x in "qkv"]
LANG = [*QKV, "model.language_model.layers.0.mlp.down_proj"]
HEAD = ["lm_head"]
NAMES = VISION + PROJ + LANG + HEAD
GROUP = {**{n: "vision" for n in VISION}, **{n: "projector" for n in PROJ}, **{n: "language" for n in LANG}, "lm_head": "head"}


def space() -> mps.SearchSpace:
    return mps.SearchSpace("plain", {"vision": FMTS, "projector": FMTS[:2], "language": FMTS, "head": FMTS},
                           pin={"lm_head": "fp32"}, tie=[["q_proj", "k_proj", "v_proj"]])


def instance(seed: int):
    """Plain dicts only: no model, no layer list, no meta."""
    rng = np.random.default_rng(seed)
    scores = {n: {f: (0.0 if f == "fp32" else float(rng.exponential())) for f in FMTS} for n in NAMES}
    ms = {n: {f: float(rng.uniform(0.1, 2.0)) for f in FMTS} for n in NAMES}
    return mps.SensitivityReport(scores=scores), mps.LatencyTable(base_ms=1.25, ms=ms)


def candidates(name: str) -> list[str]:
    """Written out from the space above (not via SearchSpace.candidates)."""
    return ["fp32"] if name == "lm_head" else FMTS[:2] if GROUP[name] == "projector" else FMTS


def all_assignments():
    """Every policy as {layer: format}: each layer any candidate, q/k/v equal."""
    for combo in itertools.product(*(candidates(n) for n in NAMES)):
        formats = dict(zip(NAMES, combo))
        if len({formats[n] for n in QKV}) == 1:
            yield formats


def costs(formats, sens, lat) -> tuple[float, float]:
    loss = math.fsum(sens.scores[n][formats[n]] for n in NAMES)
    return loss, lat.base_ms + math.fsum(lat.ms[n][formats[n]] for n in NAMES)


def milp_optimum(sens, lat, budget_ms: float) -> float:
    """min sum(score) s.t. one format per layer, q/k/v equal, base + sum(ms) <= budget."""
    var = [(n, f) for n in NAMES for f in candidates(n)]
    col = {v: i for i, v in enumerate(var)}
    c = np.array([sens.scores[n][f] for n, f in var])
    rows, lo, hi = [], [], []
    for n in NAMES:  # one-hot
        row = np.zeros(len(var))
        for f in candidates(n):
            row[col[(n, f)]] = 1.0
        rows.append(row), lo.append(1.0), hi.append(1.0)
    for other in QKV[1:]:  # ties: x[q, f] == x[other, f]
        for f in FMTS:
            row = np.zeros(len(var))
            row[col[(QKV[0], f)]], row[col[(other, f)]] = 1.0, -1.0
            rows.append(row), lo.append(0.0), hi.append(0.0)
    budget = np.array([lat.ms[n][f] for n, f in var])
    rows.append(budget), lo.append(-np.inf), hi.append(budget_ms - lat.base_ms)
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(len(var)),
               bounds=Bounds(0, 1))
    assert res.status == 0, res.message
    return float(res.fun)


def budgets(sens, lat, seed: int) -> list[float]:
    table = [costs(a, sens, lat)[1] for a in all_assignments()]
    lo, hi = min(table), max(table)
    return [lo + 1e-9 + frac * (hi - lo) for frac in (0.0, *np.random.default_rng(seed).uniform(0.05, 0.95, 3))]


def test_plain_dict_layers_are_placed_by_discovers_rule():
    from mpsearch.searching._search import resolve_layers

    sens, _ = instance(0)
    layers = resolve_layers(None, None, sens)
    assert [l.name for l in layers] == NAMES
    assert {l.name: l.group for l in layers} == GROUP
    assert isinstance(layers[0], mps.Layer)
    # the same function discover_layers uses: a model with these module paths is placed the same way
    from mpsearch.models.groups import place_names

    assert place_names(NAMES) == GROUP


@pytest.mark.parametrize("seed", range(6))
def test_solve_ilp_on_plain_dicts_equals_brute_force_and_milp(seed):
    sens, lat = instance(seed)
    table = [(costs(a, sens, lat), a) for a in all_assignments()]
    for budget in budgets(sens, lat, seed):
        best = min(t[0][0] for t in table if t[0][1] <= budget)
        assert milp_optimum(sens, lat, budget) == pytest.approx(best, abs=1e-9)  # the two references agree
        policy = mps.solve_ilp(sens, lat, space(), budget_ms=budget)
        assert isinstance(policy, mps.Policy)
        got = {n: policy.format_for(n) for n in NAMES}
        assert got["lm_head"] == "fp32" and len({got[n] for n in QKV}) == 1
        loss, ms = costs(got, sens, lat)
        assert ms <= budget + 1e-9 and lat.predict(policy) == pytest.approx(ms)
        assert loss == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_search_on_plain_dicts_is_feasible_nondominated_and_holds_the_optimum(seed):
    sens, lat = instance(seed)
    budget = budgets(sens, lat, seed)[1]
    best = min(l for l, m in (costs(a, sens, lat) for a in all_assignments()) if m <= budget)
    front = mps.search(sens, lat, space(), budget_ms=budget, n_trials=60, seed=seed, progress=False)
    assert front and all(isinstance(c, mps.Candidate) for c in front)
    points = []
    for c in front:
        got = {n: c.policy.format_for(n) for n in NAMES}
        loss, ms = costs(got, sens, lat)
        assert c.proxy_loss == pytest.approx(loss, abs=1e-9) and c.predicted_latency_ms == pytest.approx(ms)
        assert ms <= budget + 1e-9 and got["lm_head"] == "fp32" and len({got[n] for n in QKV}) == 1
        points.append((c.proxy_loss, c.predicted_latency_ms))
    for i, a in enumerate(points):
        for j, b in enumerate(points):
            if i != j:
                assert not (b[0] <= a[0] and b[1] <= a[1] and b != a), f"dominated candidate {a} by {b}"
    assert min(p[0] for p in points) == pytest.approx(best, abs=1e-9)  # the exact optimum is on the front


@pytest.mark.filterwarnings("ignore:.*constrains nothing")
def test_a_name_no_rule_places_is_named_with_how_to_give_groups():
    sens, lat = instance(1)
    scores = dict(sens.scores, **{"value_head.fc": {f: float(f != "fp32") for f in FMTS}})
    ms = dict(lat.ms, **{"value_head.fc": {f: 1.0 for f in FMTS}})
    bad_sens, bad_lat = mps.SensitivityReport(scores=scores), mps.LatencyTable(base_ms=1.0, ms=ms)
    for call in (lambda: mps.solve_ilp(bad_sens, bad_lat, space(), budget_ms=100.0),
                 lambda: mps.search(bad_sens, bad_lat, space(), budget_ms=100.0, n_trials=5, progress=False)):
        with pytest.raises(MpsError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and "cannot place 1 linear layer(s)" in msg and "value_head.fc" in msg
        assert "--model" in msg and "meta={'groups'" in msg and "layers=" in msg
    # giving the groups works
    groups = dict(GROUP, **{"value_head.fc": "head"})
    fixed = mps.SensitivityReport(scores=scores, meta={"groups": groups})
    policy = mps.solve_ilp(fixed, bad_lat, space(), budget_ms=100.0)
    assert policy.format_for("value_head.fc") == "fp32"


def test_cli_search_on_a_plain_dict_report(tmp_path, capsys):
    from mpsearch.cli import main

    sens, lat = instance(2)
    sens.to_json(tmp_path / "sens.json")
    lat.to_json(tmp_path / "lat.json")
    (tmp_path / "space.yaml").write_text(
        "name: plain\ngroups:\n  vision: [fp32, torch.int8dyn, rtn.int4]\n  projector: [fp32, torch.int8dyn]\n"
        "  language: [fp32, torch.int8dyn, rtn.int4]\n  head: [fp32, torch.int8dyn, rtn.int4]\n"
        "pin: {lm_head: fp32}\ntie: [[q_proj, k_proj, v_proj]]\n")
    budget = budgets(sens, lat, 2)[2]
    best = min(l for l, m in (costs(a, sens, lat) for a in all_assignments()) if m <= budget)
    out = tmp_path / "front.json"
    rc = main(["search", "--sens", str(tmp_path / "sens.json"), "--latency", str(tmp_path / "lat.json"),
               "--space", str(tmp_path / "space.yaml"), "--budget-ms", repr(float(budget)), "--n-trials", "30",
               "--no-progress", "-o", str(out)])
    assert rc == 0 and out.is_file()
    assert "candidates" in capsys.readouterr().out
    from mpsearch.searching import read_front

    front = read_front(out)
    assert min(c.proxy_loss for c in front) == pytest.approx(best, abs=1e-9)
    assert json.loads(out.read_text())  # a JSON file
