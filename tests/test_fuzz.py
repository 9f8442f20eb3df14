"""Seeded mutations of every artifact mpsearch reads (issue 19).

Each artifact is built from small real objects (``Policy``, ``SensitivityReport``,
``LatencyTable``, ``Candidate``/``write_front``, ``Result``, ``RunConfig``), written as mpsearch
writes it, then corrupted a few hundred times with a seeded generator: values replaced by
other types / NaN / inf / negatives / unknown names, keys dropped, added or misspelt,
containers swapped, bytes of the text flipped or cut. Every corrupted input must either load
into valid data or raise :class:`MpsError`; no report or table holding NaN, inf or a negative
score may load. A smaller set goes through the CLI (``report``, ``plot --front``, ``run``): exit
0 or 2, one ``error:`` line, never a traceback, nothing written on error.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from mpsearch.errors import MpsError

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    "model.vision_tower.encoder.layers.0.self_attn.q_proj": "vision",
    "model.vision_tower.encoder.layers.0.mlp.fc1": "vision",
    "model.multi_modal_projector.linear_1": "projector",
    "model.language_model.layers.0.self_attn.q_proj": "language",
    "model.language_model.layers.0.mlp.down_proj": "language",
    "lm_head": "head",
}
FMTS = ["fp32", "torch.int8dyn", "rtn.int4"]

#: Mutations per artifact through the Python API.
N_API = {"map": 400, "space": 400, "report": 400, "table": 400, "front": 250, "results": 250, "run": 250,
         "stages": 150, "workload": 150}

WEIRD: list[Any] = [None, True, False, 0, 1, -1, 7, 1.5, -0.5, -1e-300, float("nan"), float("inf"), float("-inf"),
                    10 ** 30, "", "x", "NaN", "-1", "bnb.nf4", "fp33", "vision", "eye", "auto", [], {}, [1, 2],
                    ["a"], {"a": 1}, {"fp32": 1.0}, [[1]], "model.language_model.layers.0.mlp.down_proj"]


# --------------------------------------------------------------------------- seed artifacts
def _policy():
    from mpsearch.policy import Policy

    return Policy({"model.language_model.layers.0.mlp.down_proj": "rtn.int4", "lm_head": "fp32"}, default="fp32",
                  meta={"label": "pareto-1"}, rules=[("model.vision_tower.*", "torch.int8dyn")])


def seed_map(tmp: Path) -> str:
    """A fully expanded map as ``Policy.to_yaml`` writes it, plus a hand-written rules section."""
    from mpsearch.latency import Workload

    path = tmp / "seed_map.yaml"
    _policy().to_yaml(path, layer_names=list(LAYERS), model="tiny:llava", device="cpu",
                      workload=Workload(threads=1).to_dict(), metrics={"kl": 0.01, "predicted_latency_ms": 3.5})
    doc = yaml.safe_load(path.read_text())
    doc["rules"] = [{"match": "*.q_proj", "format": "torch.int8dyn"}, {"match": "lm_*", "format": "fp32"}]
    return yaml.safe_dump(doc, sort_keys=False)


def seed_space() -> str:
    return (ROOT / "search_spaces" / "cpu.yaml").read_text() if (ROOT / "search_spaces" / "cpu.yaml").is_file() else \
        "name: s\ngroups:\n  vision: [fp32, torch.int8dyn]\n  projector: [fp32]\n  language: [fp32, rtn.int4]\n" \
        "  head: [fp32]\npin: {'*lm_head': fp32}\ntie: [[q_proj, k_proj, v_proj]]\n"


def seed_report() -> dict[str, Any]:
    from mpsearch.sensitivity import SensitivityReport

    scores = {n: {f: (0.0 if f == "fp32" else 0.1 * (i + 1) * (j + 1)) for j, f in enumerate(FMTS)}
              for i, n in enumerate(LAYERS)}
    meta = {"groups": dict(LAYERS), "depths": {n: 0 for n in LAYERS}, "dead": ["lm_head"], "model": "tiny:llava",
            "n_samples": 4, "negative_trace": []}
    return SensitivityReport(scores, method="activation", meta=meta, provenance={"seed": 0}).to_dict()


def seed_table() -> dict[str, Any]:
    from mpsearch.latency import LatencyTable

    ms = {n: {f: 0.05 * (i + 1) / (j + 1) for j, f in enumerate(FMTS)} for i, n in enumerate(LAYERS)}
    meta = {"device": "cpu: test", "model": "tiny:llava", "layer_groups": dict(LAYERS), "workload": {"batch": 1},
            "cache_key": {"device": "cpu: test"}}
    return LatencyTable(1.25, ms, meta=meta).to_dict()


def seed_front(tmp: Path) -> dict[str, Any]:
    from mpsearch.policy import Policy
    from mpsearch.searching import Candidate, Front, write_front

    cands = [Candidate(_policy(), 0.3, 4.0, 1234, "ilp", trial=None),
             Candidate(Policy({"lm_head": "rtn.int4"}, "fp32", {"label": "t"}), math.nan, 2.5, 999, "refine trial 3",
                       kl=0.02, measured_latency_ms=2.7, trial=3, meta={"x": 1})]
    front = Front(cands, meta={"stage": "refine", "seed": 0, "budget_ms": 5.0, "objectives": ["kl", "latency"],
                               "trials": {"total": 4, "complete": 3}},
                  failures=[{"trial": 2, "reason": "boom", "label": None, "params_key": None}])
    path = tmp / "seed_front.json"
    write_front(path, front, model="tiny:llava", budget_mb=None, inputs={"front": "front.json"})
    return json.loads(path.read_text())


def seed_result_line(label: str = "pareto-1", acc: float = 0.5) -> dict[str, Any]:
    from mpsearch.evaluation import Result

    pol = _policy()
    pol.meta["label"] = label
    r = Result(pol, accuracy=acc, accuracy_ci=(0.25, 0.75), per_subject={"Art": acc}, per_skill={"perception": acc},
               per_skill_ci={"perception": (0.1, 0.9)}, per_skill_n={"perception": 4}, flips=0.25, kl=0.01,
               latency_ms=3.0, memory_bytes=2 ** 20, predicted_latency_ms=2.9, n=8, mode="logits",
               benchmark="synthetic", split="dev", limit=8, per_subject_n={"Art": 8}, answers={"q1": "A"},
               correct={"q1": True}, seconds=1.5, notes=["n"])
    return {"schema": 1, "kind": "eval_result", "identity": {"policy_key": pol.key(), "benchmark": "synthetic"},
            "provenance": {"seed": 0}, "result": r.to_dict()}


def seed_stages() -> dict[str, Any]:
    return {"schema": 1, "kind": "run-stages", "stages": {"profile": {"inputs": "ab12", "artifact": "cd34"},
                                                          "latency": {"inputs": "ef56", "artifact": "0789"}}}


def seed_run() -> str:
    text = (ROOT / "examples" / "demo.yaml").read_text()
    doc = yaml.safe_load(text)
    doc["workload"] = {"batch": 1, "phase": "prefill", "threads": 1, "repeats": 3}
    doc["out"] = "OUT"
    return yaml.safe_dump(doc, sort_keys=False)


# --------------------------------------------------------------------------- mutations
def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _typo(rng: random.Random, key: Any) -> Any:
    if not isinstance(key, str) or not key:
        return rng.choice(WEIRD[:10]) if rng.random() < 0.3 else f"{key}x"
    i = rng.randrange(len(key))
    return rng.choice([key[:i] + key[i + 1:], key[:i] + "x" + key[i:], key.upper(), key + "_", " " + key])


def mutate_obj(rng: random.Random, obj: Any) -> Any:
    """One structural mutation of a parsed document (returns the new document)."""
    obj = copy.deepcopy(obj)
    paths = _paths(obj)
    path = rng.choice(paths)
    op = rng.random()
    if not path:  # the whole document
        return rng.choice([None, [], "text", 3, [obj], {}, {"x": obj}]) if op < 0.5 else obj
    parent, last = _get(obj, path[:-1]), path[-1]
    value = parent[last]
    if op < 0.45:
        parent[last] = rng.choice(WEIRD)
    elif op < 0.55:
        del parent[last]
    elif op < 0.65 and isinstance(parent, dict):
        parent[_typo(rng, last)] = parent.pop(last)
    elif op < 0.72 and isinstance(value, dict):
        value[rng.choice(["extra", "phae", "lm_head", "vision", "bnb.nf4", "x" * 3, "1"])] = rng.choice(WEIRD)
    elif op < 0.78 and isinstance(value, dict):
        parent[last] = list(value)
    elif op < 0.82 and isinstance(value, list):
        parent[last] = {str(i): v for i, v in enumerate(value)}
    elif op < 0.9 and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[last] = rng.choice([-value - 1.0, value * 1e308, float("nan"), -abs(value) - 1e-9, str(value),
                                   int(value) if math.isfinite(value) else 0])
    elif op < 0.95 and isinstance(value, str):
        parent[last] = rng.choice([_typo(rng, value), value + ".x", "", 5, [value]])
    else:
        parent[last] = rng.choice(WEIRD)
    return obj


def mutate_text(rng: random.Random, text: str) -> bytes:
    """A byte-level corruption of a file's text."""
    data = bytearray(text.encode("utf-8"))
    op = rng.random()
    if not data:
        return b"\xff"
    i = rng.randrange(len(data))
    if op < 0.3:
        return bytes(data[:i])  # torn
    if op < 0.5:
        data[i] = rng.choice(b"{}[]:,\"'-#&*!|>\n\t 0x\xff\xfe")
    elif op < 0.7:
        del data[i:i + rng.randint(1, 20)]
    elif op < 0.85:
        data[i:i] = rng.choice([b"\n  bad: [", b"NaN", b"Infinity", b"- ", b"\xc3\x28", b"!!python/object:os.system ",
                                b"&a ", b"*a ", b"\n---\n", b"\"", b"\x00"])
    else:
        lines = text.splitlines(keepends=True)
        if lines:
            j = rng.randrange(len(lines))
            lines.insert(j, lines[j])  # a duplicated key
        return "".join(lines).encode("utf-8")
    return bytes(data)


def corrupted(rng: random.Random, seed_obj: Any, dump: Callable[[Any], str], seed_text: str | None = None,
              text_mutations: bool = True) -> bytes:
    """Either 1-3 structural mutations (most cases) or a byte-level corruption of the text."""
    if rng.random() < 0.2 and text_mutations:
        return mutate_text(rng, seed_text if seed_text is not None else dump(seed_obj))
    obj = seed_obj
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        obj = mutate_obj(rng, obj)
    try:
        return dump(obj).encode("utf-8")
    except (TypeError, ValueError, yaml.YAMLError):
        return dump(seed_obj).encode("utf-8")


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=1, allow_nan=True)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False)


# --------------------------------------------------------------------------- invariants of loaded data
def _formats() -> set[str]:
    from mpsearch.formats import FORMATS

    return set(FORMATS)


def _score_ok(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x >= 0


def check_report(r: Any, registry: bool = True) -> None:
    """Scores finite and >= 0, groups valid and complete; formats of the registry (files only:
    reports made in Python may score abstract formats, as the unit tests do)."""
    fmts = _formats()
    for layer, per in r.scores.items():
        assert isinstance(layer, str) and layer
        for f, v in per.items():
            assert (f in fmts or not registry) and _score_ok(v), (layer, f, v)
    groups = r.meta.get("groups")
    if groups is not None:
        assert all(n in groups for n in r.scores)
        assert set(groups.values()) <= {"vision", "projector", "language", "head"}


def check_table(t: Any) -> None:
    fmts = _formats()
    assert isinstance(t.base_ms, float) and math.isfinite(t.base_ms)
    for layer, row in t.ms.items():
        assert isinstance(layer, str) and layer and row
        for f, v in row.items():
            assert f in fmts and _score_ok(v), (layer, f, v)


def check_policy(p: Any) -> None:
    fmts = _formats()
    assert p.used_formats() <= fmts
    assert all(isinstance(n, str) and n for n in p.formats)


def check_space(s: Any) -> None:
    assert set(s.groups) <= {"vision", "projector", "language", "head"} and s.groups
    assert set(s.formats()) <= _formats()


def check_front(front: Any) -> None:
    for c in front:
        check_policy(c.policy)
        assert math.isnan(c.proxy_loss) or (math.isfinite(c.proxy_loss) and c.proxy_loss >= 0)
        for v in (c.predicted_latency_ms, c.kl, c.measured_latency_ms):
            assert v is None or math.isfinite(v)


def check_results(results: list[Any]) -> None:
    for r in results:
        check_policy(r.policy)
        assert 0.0 <= r.accuracy <= 1.0 and all(0.0 <= x <= 1.0 for x in r.accuracy_ci)
        assert r.latency_ms is None or (math.isfinite(r.latency_ms) and r.latency_ms >= 0)


# --------------------------------------------------------------------------- the Python API
def _load_map(path: Path) -> None:
    from mpsearch.policy import Policy

    check_policy(Policy.from_yaml(path))


def _load_space(path: Path) -> None:
    from mpsearch.space import SearchSpace

    check_space(SearchSpace.from_yaml(path))


def _load_report(path: Path) -> None:
    from mpsearch.sensitivity import SensitivityReport

    check_report(SensitivityReport.from_json(path))


def _load_table(path: Path) -> None:
    from mpsearch.latency import LatencyTable

    check_table(LatencyTable.from_json(path))


def _load_front(path: Path) -> None:
    from mpsearch.searching import read_front

    check_front(read_front(path))


def _load_results(path: Path) -> None:
    from mpsearch.evaluation import read_results

    check_results(read_results(path))


def _load_run(path: Path) -> None:
    from mpsearch.latency import Workload
    from mpsearch.pipeline import RunConfig

    cfg = RunConfig.from_yaml(path)
    cfg.validate()
    Workload(**cfg.workload)  # what run_pipeline builds first


def _load_stages(path: Path) -> None:
    from mpsearch.pipeline import Manifest

    m = Manifest(path.parent)
    assert all(isinstance(v, dict) and set(v) == {"inputs", "artifact"} for v in m.stages.values())


def _load_workload(path: Path) -> None:
    from mpsearch.latency import Workload

    w = Workload.from_dict(json.loads(path.read_text()))  # a workload dict, as artifacts record it
    assert w.batch >= 1 and w.phase in ("prefill", "decode", "both")


def _build_report_in_python(obj: Any) -> None:
    """The same corrupted scores handed to ``SensitivityReport(...)`` directly."""
    from mpsearch.sensitivity import SensitivityReport

    if isinstance(obj, dict):
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        check_report(SensitivityReport(obj.get("scores"), meta=meta), registry=False)


def _build_table_in_python(obj: Any) -> None:
    from mpsearch.latency import LatencyTable

    if isinstance(obj, dict):
        t = LatencyTable(obj.get("base_ms"), obj.get("ms"))
        assert math.isfinite(t.base_ms) and all(_score_ok(v) for row in t.ms.values() for v in row.values())


def _cases(tmp: Path) -> dict[str, tuple[Any, Callable[[Any], str], str | None, str, Callable[[Path], None]]]:
    """artifact -> (seed object, dump, seed text, file name, loader)."""
    map_text, space_text, run_text = seed_map(tmp), seed_space(), seed_run()
    stages = seed_stages()
    return {
        "map": (yaml.safe_load(map_text), dump_yaml, map_text, "map.yaml", _load_map),
        "space": (yaml.safe_load(space_text), dump_yaml, space_text, "space.yaml", _load_space),
        "report": (seed_report(), dump_json, None, "sens.json", _load_report),
        "table": (seed_table(), dump_json, None, "latency.json", _load_table),
        "front": (seed_front(tmp), dump_json, None, "front.json", _load_front),
        "results": ([seed_result_line("a"), seed_result_line("b", 0.75)],
                    lambda recs: "".join(json.dumps(r) + "\n" for r in recs) if isinstance(recs, list)
                    else json.dumps(recs) + "\n", None, "results.jsonl", _load_results),
        "run": (yaml.safe_load(run_text), dump_yaml, run_text, "run.yaml", _load_run),
        "stages": (stages, dump_json, None, "stages.json", _load_stages),
        "workload": ({"batch": 2, "phase": "both", "new_tokens": 4, "threads": 1, "clock": "cpu", "compile": False},
                     dump_json, None, "workload.json", _load_workload),
    }


def test_seed_artifacts_load(tmp_path):
    """The uncorrupted seeds are valid: the fuzzing starts from real, loadable files."""
    for name, (obj, dump, text, fname, load) in _cases(tmp_path).items():
        d = tmp_path / name
        d.mkdir()
        (d / fname).write_text(text if text is not None else dump(obj))
        load(d / fname)


def test_fuzz_python_api(tmp_path):
    """Thousands of seeded corruptions: each loads into valid data or raises MpsError."""
    cases = _cases(tmp_path)
    outcomes: dict[str, Counter] = {}
    for a, (name, (obj, dump, text, fname, load)) in enumerate(cases.items()):
        rng = random.Random(1000 + a)
        d = tmp_path / f"fuzz-{name}"
        d.mkdir()
        path = d / fname
        count: Counter = Counter()
        for i in range(N_API[name]):
            data = corrupted(rng, obj, dump, text, text_mutations=name != "workload")  # a workload is a dict
            path.write_bytes(data)
            try:
                load(path)
                count["loaded"] += 1
            except MpsError as exc:
                assert "\n" not in str(exc), f"{name} #{i}: message not one line: {exc!r}"
                count["MpsError"] += 1
            except Exception as exc:  # noqa: BLE001 - that is what the test looks for
                raise AssertionError(f"{name} mutation #{i} raised {type(exc).__name__}: {exc}\n"
                                     f"input: {data[:600]!r}") from exc
            if name in ("report", "table"):  # the same values handed over in Python
                try:
                    parsed = json.loads(data)
                except (ValueError, UnicodeDecodeError):
                    continue
                try:
                    (_build_report_in_python if name == "report" else _build_table_in_python)(parsed)
                    count["python ok"] += 1
                except MpsError:
                    count["python MpsError"] += 1
        outcomes[name] = count
        assert count["loaded"] and count["MpsError"], (name, count)  # the fuzzing reaches both outcomes
    print("\nfuzz outcomes per artifact:", {k: dict(v) for k, v in outcomes.items()})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -1.0, -1e-12])
def test_no_nan_inf_or_negative_score_loads(tmp_path, bad):
    from mpsearch.latency import LatencyTable
    from mpsearch.sensitivity import SensitivityReport

    rep, tab = seed_report(), seed_table()
    rep["scores"]["lm_head"]["rtn.int4"] = bad
    tab["ms"]["lm_head"]["rtn.int4"] = bad
    (tmp_path / "s.json").write_text(dump_json(rep))
    (tmp_path / "t.json").write_text(dump_json(tab))
    with pytest.raises(MpsError, match=r"s.json:\d+: field scores\['lm_head'\]\['rtn.int4'\] must be a finite number >= 0"):
        SensitivityReport.from_json(tmp_path / "s.json")
    with pytest.raises(MpsError, match=r"t.json:\d+: field ms\['lm_head'\]\['rtn.int4'\] must be a finite number >= 0"):
        LatencyTable.from_json(tmp_path / "t.json")
    with pytest.raises(MpsError, match="finite number >= 0"):
        SensitivityReport(rep["scores"])
    with pytest.raises(MpsError, match="finite number >= 0"):
        LatencyTable(1.0, tab["ms"])


@pytest.mark.parametrize("groups, needle", [(True, "meta.groups must be a mapping"),
                                            (["x"], "meta.groups must be a mapping"),
                                            ({"lm_head": "eye"}, "valid: vision, projector, language, head"),
                                            ({"lm_head": "head"}, "must map every scored layer")])
def test_report_groups_checked(tmp_path, groups, needle):
    from mpsearch.sensitivity import SensitivityReport

    rep = seed_report()
    rep["meta"]["groups"] = groups
    (tmp_path / "s.json").write_text(dump_json(rep))
    with pytest.raises(MpsError, match=needle):
        SensitivityReport.from_json(tmp_path / "s.json")


def test_schemas_mirror_the_dataclasses():
    """Each schema is declared once; these guards keep it in step with the classes it checks."""
    import dataclasses

    from mpsearch.evaluation import Result
    from mpsearch.latency import Workload
    from mpsearch.pipeline import RunConfig
    from mpsearch.schemas import ResultBody, RunConfigSchema, WorkloadSchema

    w = {f.name: getattr(Workload(), f.name) for f in dataclasses.fields(Workload) if f.name not in ("inputs", "processor")}
    assert WorkloadSchema().model_dump() == w
    cfg = dataclasses.asdict(RunConfig())
    schema = RunConfigSchema().model_dump()
    assert set(schema) == set(cfg)
    assert schema.pop("workload") == WorkloadSchema(**cfg.pop("workload")).model_dump()
    assert schema == cfg
    assert set(Result.__dataclass_fields__) | {"policy_key"} == set(ResultBody.model_fields)


# --------------------------------------------------------------------------- the CLI
def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    from mpsearch.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean(code: int, err: str, what: str) -> None:
    assert code in (0, 2), f"{what}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{what}: traceback\n{err}"
    if code == 2:
        ours = [l for l in err.strip().splitlines() if l.startswith("error: ")]
        assert len(ours) == 1, f"{what}: expected one error line\n{err}"


def test_fuzz_cli_report_plot_run(tmp_path, capsys, monkeypatch):
    """~60 corrupted files through ``mpsearch report``, ``plot --front`` and ``run`` (in-process)."""
    import mpsearch.pipeline as pipeline

    cases = _cases(tmp_path)
    calls: list[Any] = []

    class _Summary:
        def table(self) -> str:
            return "summary"

    def fake_run(cfg: Any, log: Any = print) -> Any:  # never the real pipeline: only its inputs are tested
        calls.append(cfg)
        return _Summary()

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    good_results = tmp_path / "good.jsonl"
    good_results.write_text("".join(json.dumps(r) + "\n" for r in cases["results"][0]))
    count: Counter = Counter()
    rng = random.Random(7)
    obj, dump, text, _, _ = cases["results"]
    for i in range(30):
        path = tmp_path / f"r{i}.jsonl"
        path.write_bytes(corrupted(rng, obj, dump, text))
        code, _, err = _cli(capsys, ["report", path])
        _assert_clean(code, err, f"report #{i}")
        count[f"report exit {code}"] += 1
    obj, dump, text, _, _ = cases["front"]
    for i in range(12):
        path = tmp_path / f"f{i}.json"
        path.write_bytes(corrupted(rng, obj, dump, text))
        out = tmp_path / f"plots{i}"
        code, _, err = _cli(capsys, ["plot", good_results, "--front", path, "-o", out])
        _assert_clean(code, err, f"plot #{i}")
        if code == 2:
            assert not out.exists() or not any(out.iterdir()), f"plot #{i} wrote files before failing"
        count[f"plot exit {code}"] += 1
    obj, dump, text, _, _ = cases["run"]
    for i in range(30):
        path = tmp_path / f"run{i}.yaml"
        path.write_bytes(corrupted(rng, obj, dump, text))
        before = len(calls)
        code, _, err = _cli(capsys, ["run", path, "-o", tmp_path / f"out{i}"])
        _assert_clean(code, err, f"run #{i}")
        if code == 2:
            assert len(calls) == before, f"run #{i}: the pipeline started before the config was refused"
        assert not (tmp_path / f"out{i}").exists()
        count[f"run exit {code}"] += 1
    assert count["report exit 2"] and count["run exit 2"], count
    print("\nCLI outcomes:", dict(count))


def test_workload_typo_in_run_config_is_one_line(tmp_path, capsys):
    """The known case: ``phae:`` in a run config's workload was a TypeError from Workload(**...)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("mpsearch_run: 1\nmodel: demo\nworkload:\n  batch: 1\n  phae: prefill\n")
    code, _, err = _cli(capsys, ["run", cfg, "-o", tmp_path / "out"])
    assert code == 2
    line = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(line) == 1 and "run.yaml:5: unknown field 'phae' in workload; valid: batch," in line[0]
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_smoke(tmp_path):
    """A few corrupted inputs through the real console entry point: exit 2, one line, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = seed_result_line()
    res["result"]["accuracy"] = float("nan")
    (tmp_path / "r.jsonl").write_text(json.dumps(res) + "\n")
    front = seed_front(tmp_path)
    front["candidates"][0]["policy"]["layers"]["lm_head"] = "int5"
    (tmp_path / "f.json").write_text(dump_json(front))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(seed_result_line()) + "\n")
    (tmp_path / "run.yaml").write_text("mpsearch_run: 1\nworkload: {phae: prefill}\n")
    for argv, needle in ((["report", tmp_path / "r.jsonl"], "r.jsonl:1: field result.accuracy"),
                         (["plot", good, "--front", tmp_path / "f.json", "-o", tmp_path / "p"], "unknown format 'int5'"),
                         (["run", tmp_path / "run.yaml", "-o", tmp_path / "out"], "unknown field 'phae'")):
        proc = subprocess.run([sys.executable, "-m", "mpsearch", *map(str, argv)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
        assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "p").exists() and not (tmp_path / "out").exists()
