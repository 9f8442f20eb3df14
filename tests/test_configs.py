"""One config per workflow (mpsearch.configs): a config and the same settings as keywords are
the same call; a misspelled setting names the valid ones; RunConfig composes the stages'."""
from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch

import mpsearch as mps
from mpsearch.configs import (EvaluateConfig, LatencyConfig, ProfileConfig, RefineConfig, SearchConfig,
                              StageConfig)
from mpsearch.pipeline import RunConfig

from test_search_plain_dicts import instance, space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_resolve_overrides_and_refuses_unknown_settings():
    base = SearchConfig(budget_ms=5.0, n_trials=40)
    got = SearchConfig.resolve(base, {"seed": 7}, "search")
    assert (got.budget_ms, got.n_trials, got.seed) == (5.0, 40, 7)
    assert SearchConfig.resolve(base, {}, "search") is base
    with pytest.raises(TypeError, match=r"search\(\) got an unexpected keyword argument 'n_trails'.*n_trials"):
        SearchConfig.resolve(None, {"n_trails": 3}, "search")
    with pytest.raises(TypeError, match="config must be a SearchConfig"):
        SearchConfig.resolve(ProfileConfig(), {}, "search")


def test_every_workflow_names_its_config_in_the_error():
    sens, lat = instance(0)
    with pytest.raises(TypeError, match="SearchConfig"):
        mps.search(sens, lat, space(), budget_ms=9.0, n_trails=5)
    model, processor = mps.load_vlm("tiny:llava")
    with pytest.raises(TypeError, match="ProfileConfig"):
        mps.profile(model, processor, [], None, "cpu", methd="kl")
    with pytest.raises(TypeError, match="LatencyConfig"):
        mps.measure_latency_table(model, mps.discover_layers(model), mps.SearchSpace.from_yaml("cpu"), repeats=3)
    with pytest.raises(TypeError, match="RefineConfig"):
        mps.refine(model, processor, [], "cpu", n_trial=2)
    with pytest.raises(TypeError, match="EvaluateConfig"):
        mps.evaluate(model, processor, [], mps.load_benchmark("synthetic", "dev", limit=2), mod="logits")


def test_search_config_equals_keywords():
    sens, lat = instance(3)
    kw = dict(budget_ms=9.0, n_trials=30, seed=2, sampler="tpe", progress=False)
    a = mps.search(sens, lat, space(), **kw)
    b = mps.search(sens, lat, space(), config=SearchConfig(**kw))
    c = mps.search(sens, lat, space(), 9.0, config=SearchConfig(n_trials=30, seed=2, sampler="tpe", progress=False))
    keys = [[x.policy.key() for x in f] for f in (a, b, c)]
    assert keys[0] == keys[1] == keys[2] and keys[0]


def test_profile_config_equals_keywords():
    torch.manual_seed(0)
    model, processor = mps.load_vlm("tiny:llava")
    bench = list(mps.load_benchmark("synthetic", "dev", limit=4))
    layers = mps.discover_layers(model)[:6]
    kw = dict(method="activation", n_samples=4, batch_size=2, seed=1, progress=False)
    a = mps.profile(model, processor, bench, layers, "cpu", **kw)
    b = mps.profile(model, processor, bench, layers, "cpu", config=ProfileConfig(**kw))
    assert a.scores == b.scores and a.scores


def test_run_config_composes_the_stage_configs():
    run = RunConfig(method="hessian", calib_samples=12, batch_size=3, n_probes=5, seed=4, search_trials=77,
                    refine_trials=6, sampler="tpe", mode="logits", max_new_tokens=9,
                    workload={"batch": 2, "phase": "prefill"})
    p = run.profile_config()
    assert (p.method, p.n_samples, p.batch_size, p.n_probes, p.seed, p.model_name) == ("hessian", 12, 3, 5, 4, "demo")
    s = run.search_config(1.5, None, study_name="x")
    assert (s.budget_ms, s.budget_mb, s.n_trials, s.sampler, s.seed, s.study_name) == (1.5, None, 77, "tpe", 4, "x")
    r = run.refine_config(None, 2.0, "sqlite:///x.db")
    assert (r.budget_mb, r.n_trials, r.storage, r.n_samples, r.workload.batch) == (2.0, 6, "sqlite:///x.db", 12, 2)
    e = run.evaluate_config(results_path="r.jsonl")
    assert (e.mode, e.batch_size, e.max_new_tokens, e.results_path, e.workload.batch) == ("logits", 3, 9, "r.jsonl", 2)
    assert run.latency_config("c").workload.batch == 2 and run.latency_config("c").cache_dir == "c"


def test_configs_are_frozen_and_documented():
    for cls in (ProfileConfig, LatencyConfig, SearchConfig, RefineConfig, EvaluateConfig):
        assert issubclass(cls, StageConfig)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cls().seed = 1 if hasattr(cls(), "seed") else None  # type: ignore[misc]
        for f in dataclasses.fields(cls):
            assert f.name in (cls.__doc__ or ""), f"{cls.__name__}.{f.name} is not documented"
