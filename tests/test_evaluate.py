"""mps.evaluate on tiny models: answer modes, flips/KL/memory, crash-safe resumable results, CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from mpsearch.errors import ArtifactError, MpsError  # noqa: E402
from mpsearch.evaluation import evaluate, wilson_ci, letter_token_ids, load_policies, read_results  # noqa: E402
from mpsearch.policy import Policy  # noqa: E402
from mpsearch.tasks import load_benchmark  # noqa: E402
from mpsearch.tasks.base import Benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(measure_latency=False, progress=False)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny():
    from mpsearch.models import load_vlm

    return load_vlm("tiny:llava")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("synthetic", "dev", limit=6)


def _letter_model(bench):
    """tiny:llava rebuilt to answer every question with one letter, A-D, that depends on the input.

    The head keeps only the four letter tokens (every other token gets a -1e4 bias), and the
    letter rows read the two main directions in which the questions' last hidden states differ
    (+u1 -> A, -u1 -> B, +u2 -> C, -u2 -> D, centred on their mean). So greedy decoding answers a
    single letter, and which letter depends on the image and question.
    """
    from mpsearch.models import load_vlm
    from mpsearch.tasks.prompts import encode_batch, render_prompt

    model, processor = load_vlm("tiny:llava")
    text, _ = render_prompt(processor, bench[0])
    ids = letter_token_ids(processor, text, ["A", "B", "C", "D"])
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    enc = encode_batch(processor, [bench[i] for i in range(len(bench))])
    with torch.no_grad():
        model(**{k: v for k, v in enc.items() if k != "prompt_last"})
    hook.remove()
    h = seen[0][torch.arange(len(bench)), enc["prompt_last"]]
    mean = h.mean(0)
    _, sv, vt = torch.linalg.svd(h - mean, full_matrices=False)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        scale = 10.0 / float(sv[0] / len(bench) ** 0.5)
        for letter, w in zip("ABCD", (vt[0], -vt[0], vt[1], -vt[1])):
            for t in ids[letter]:
                head.weight[t] = scale * w
                head.bias[t] = -scale * float(w @ mean)
    model.lm_head = head
    return model, processor


# --------------------------------------------------------------------------- answer modes
def test_logits_and_generate_agree_on_single_letter_model():
    b = load_benchmark("synthetic", "validation", limit=10)  # prompts of several lengths: padding matters
    model, processor = _letter_model(b)
    lg = evaluate(model, processor, [], b, mode="logits", batch_size=4, **FAST)[0]
    gen = evaluate(model, processor, [], b, mode="generate", batch_size=4, max_new_tokens=1, **FAST)[0]
    assert gen.fallbacks == 0  # every generated answer was a letter the official parser read
    assert lg.answers == gen.answers
    assert lg.accuracy == gen.accuracy and lg.n == gen.n == 10
    # the letters really vary, so agreement is not trivial
    assert len(set(lg.answers.values())) > 1


@pytest.mark.skipif(not (ROOT / "mpsearch" / "demo" / "config.json").is_file(), reason="demo model not shipped yet")
def test_logits_and_generate_agree_on_demo_model():
    from mpsearch.models import load_vlm

    model, processor = load_vlm("demo")
    b = load_benchmark("synthetic", "validation", limit=16)
    lg = evaluate(model, processor, [], b, mode="logits", batch_size=8, **FAST)[0]
    gen = evaluate(model, processor, [], b, mode="generate", batch_size=8, max_new_tokens=4, **FAST)[0]
    assert gen.fallbacks == 0
    assert lg.answers == gen.answers


def test_letter_token_ids_char_tokenizer(tiny):
    _, processor = tiny
    ids = letter_token_ids(processor, "USER: x ASSISTANT:", ["A", "B"])
    tok = processor.tokenizer
    assert [tok.decode(ids["A"]), tok.decode(ids["B"])] == ["A", "B"]


# --------------------------------------------------------------------------- metrics
def test_flips_kl_memory_and_model_restored(tiny, bench):
    from mpsearch.formats.apply import current_formats

    model, processor = tiny
    enc_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q = Policy({}, default="rtn.int2", meta={"label": "all-int2"})
    base, res = evaluate(model, processor, [q], bench, mode="logits", batch_size=4, **FAST)
    assert base.baseline and base.label == "fp32" and base.flips == 0.0 and base.kl == 0.0
    assert res.label == "all-int2" and not res.baseline
    assert res.kl > 0.0
    assert res.memory_bytes < base.memory_bytes
    differ = sum(res.answers[k] != base.answers[k] for k in base.answers)
    assert res.flips == differ / len(base.answers)
    assert base.accuracy == sum(base.correct.values()) / base.n
    assert base.accuracy_ci[0] <= base.accuracy <= base.accuracy_ci[1]
    from mpsearch.tasks.synthetic import SKILL_OF_SUBJECT, SUBJECTS
    assert set(base.per_subject) <= set(SUBJECTS)
    # per skill: accuracy over the questions of that skill, with its Wilson interval
    skills = {SKILL_OF_SUBJECT[s] for s in base.per_subject}
    assert set(base.per_skill) == set(base.per_skill_ci) == set(base.per_skill_n) == skills
    assert skills == {"perception", "reasoning"}  # the 6 dev questions span both skills
    for skill in base.per_skill:
        subs = [s for s in base.per_subject if SKILL_OF_SUBJECT[s] == skill]
        n = sum(base.per_subject_n[s] for s in subs)
        k = sum(round(base.per_subject[s] * base.per_subject_n[s]) for s in subs)
        assert base.per_skill_n[skill] == n and abs(base.per_skill[skill] - k / n) < 1e-12
        assert base.per_skill_ci[skill] == wilson_ci(k, n)
    assert base.per_discipline == {}  # synthetic subjects are not MMMU subjects
    assert any("latency not measured" in n for n in base.notes)
    # the bank put every original module back
    assert set(current_formats(model).values()) == {"fp32"}
    for n, p in model.named_parameters():
        assert torch.equal(p, enc_before[n]), n


def test_wilson_interval():
    # 10 of 10 correct: the interval does not collapse (a percentile bootstrap gives (1.0, 1.0)).
    lo, hi = wilson_ci(10, 10)
    z = 1.959963984540054
    assert hi == 1.0 and abs(lo - 10 / (10 + z * z)) < 1e-9  # Wilson's lower bound at p = 1: n / (n + z^2)
    lo, hi = wilson_ci(20, 40)
    # Wilson at p = 0.5: 0.5 +- z * sqrt(0.25 / n + z^2 / (4 n^2)) / (1 + z^2 / n)
    half = z * (0.25 / 40 + z * z / (4 * 40 * 40)) ** 0.5 / (1 + z * z / 40)
    assert abs(lo - (0.5 - half)) < 1e-9 and abs(hi - (0.5 + half)) < 1e-9
    assert wilson_ci(0, 0) == (0.0, 0.0)


def _img():
    from PIL import Image

    return Image.new("RGB", (8, 8), (10, 200, 10))


def _mmmu_bench(answers=("A", "B"), with_open=True, name="mmmu"):
    rows = []
    for k, subj in enumerate(["Art", "Math", "History"][: len(answers)]):
        rows.append({"id": f"validation_{subj}_1", "question": "<image 1> Which?", "options": "['x', 'y', 'z']",
                     "answer": answers[k], "question_type": "multiple-choice", "subject": subj, "image_1": _img()})
    if with_open:
        rows.append({"id": "validation_Math_2", "question": "<image 1> How many?", "options": "[]",
                     "answer": "['3', 'three']", "question_type": "open", "subject": "Math", "image_1": _img()})
    return Benchmark(name, "validation", rows, source="memory")


def test_mmmu_disciplines_and_open_questions(tiny):
    model, processor = tiny
    b = _mmmu_bench(answers=("A", "B", "C"))
    r = evaluate(model, processor, [], b, mode="logits", **FAST)[0]
    assert r.n == 3 and r.n_skipped == 1
    assert any("1 open questions not answerable in logits mode" in n for n in r.notes)
    assert set(r.per_discipline) == {"Art and Design", "Science", "Humanities and Social Science"}
    g = evaluate(model, processor, [], b, mode="generate", max_new_tokens=3, **FAST)[0]
    assert g.n == 4 and g.n_skipped == 0
    only_open = Benchmark("mmmu", "validation", [b[3]], source="memory")
    with pytest.raises(MpsError, match="logits mode answers multiple-choice questions only"):
        evaluate(model, processor, [], only_open, mode="logits", **FAST)


def test_withheld_answers_refused(tiny):
    model, processor = tiny
    b = _mmmu_bench(answers=("?", "?"), with_open=False)
    with pytest.raises(MpsError, match="answers are withheld"):
        evaluate(model, processor, [], b, **FAST)
    with pytest.raises(MpsError, match="mode='beam'"):
        evaluate(model, processor, [], _mmmu_bench(), mode="beam", **FAST)


def test_uniform_policies_from_space(tiny, bench):
    from mpsearch.space import SearchSpace

    model, processor = tiny
    space = SearchSpace("t", {"vision": ["fp32", "rtn.int4"], "projector": ["fp32"],
                              "language": ["fp32", "rtn.int4"], "head": ["fp32"]})
    rs = evaluate(model, processor, [], bench, space=space, **FAST)
    assert [r.label for r in rs] == ["fp32", "uniform rtn.int4"]  # uniform fp32 is the baseline itself
    assert rs[1].policy.format_for("lm_head") == "fp32"  # the head group does not allow rtn.int4
    # uniform= names the formats whose uniform policies are included; unknown names raise
    space2 = SearchSpace("t", {"vision": ["fp32", "rtn.int4", "rtn.int2"], "projector": ["fp32"],
                               "language": ["fp32", "rtn.int4", "rtn.int2"], "head": ["fp32"]})
    rs = evaluate(model, processor, [], bench, space=space2, uniform=["fp32", "rtn.int2"], **FAST)
    assert [r.label for r in rs] == ["fp32", "uniform rtn.int2"]
    with pytest.raises(MpsError, match="uniform='bf16': not a format of search space 't'"):
        evaluate(model, processor, [], bench, space=space2, uniform=["bf16"], **FAST)


# --------------------------------------------------------------------------- results file
def test_results_file_resume_and_torn_tail(tiny, bench, tmp_path, monkeypatch):
    import mpsearch.evaluation.run as E

    model, processor = tiny
    out = tmp_path / "r.jsonl"
    p1 = Policy({}, default="rtn.int4", meta={"label": "int4"})
    first = evaluate(model, processor, [p1], bench, results_path=out, **FAST)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 2
    for rec in recs:
        assert rec["schema"] == 1 and rec["kind"] == "eval_result"
        assert {"torch", "created", "model", "benchmark"} <= set(rec["provenance"])
        assert rec["identity"]["benchmark"] == "synthetic" and rec["identity"]["limit"] == 6
    # rerun: nothing evaluated again, nothing written, same results back
    calls = []
    real = E.run_pass
    monkeypatch.setattr(E, "run_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = evaluate(model, processor, [p1], bench, results_path=out, **FAST)
    assert calls == [] and len(out.read_text().splitlines()) == 2
    assert [r.to_dict() for r in again] == [r.to_dict() for r in first]
    # a record torn by a crash mid-write is cut, never glued to the next one
    with open(out, "a") as fh:
        fh.write('{"schema": 1, "kind": "eval_res')
    p2 = Policy({}, default="rtn.int3", meta={"label": "int3"})
    rs = evaluate(model, processor, [p1, p2], bench, results_path=out, **FAST)
    assert [r.label for r in rs] == ["fp32", "int4", "int3"]
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x) for x in lines)
    assert [r.label for r in read_results(out)] == ["fp32", "int4", "int3"]
    # another mode or limit is another record
    evaluate(model, processor, [], load_benchmark("synthetic", "dev", limit=3), results_path=out, **FAST)
    assert len(out.read_text().splitlines()) == 4


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import mpsearch.evaluation.run as E
    from mpsearch.models import load_vlm
    from mpsearch.policy import Policy
    from mpsearch.tasks import load_benchmark

    real = E.run_pass
    def slow(*a, **k):            # each policy's pass takes >= 2 s: the kill lands between records
        out = real(*a, **k)
        time.sleep(2.0)
        return out
    E.run_pass = slow
    model, processor = load_vlm("tiny:llava")
    bench = load_benchmark("synthetic", "dev", limit=4)
    pols = [Policy({}, default=f, meta={"label": f}) for f in ("rtn.int4", "rtn.int3", "rtn.int2")]
    E.evaluate(model, processor, pols, bench, results_path=sys.argv[1], measure_latency=False,
               progress=False, batch_size=4)
""")


def _complete_records(path: Path) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def test_kill_mid_run_then_rerun_loses_and_duplicates_nothing(tiny, tmp_path):
    out = tmp_path / "killed.jsonl"
    script = tmp_path / "run_eval.py"
    script.write_text(KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while _complete_records(out) < 1:
            if proc.poll() is not None:
                pytest.fail(f"evaluation ended before the kill: {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no record written in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = out.read_bytes()
    n_before = before.count(b"\n")
    assert 1 <= n_before < 4  # killed mid-run
    # rerun (same inputs), here in-process
    model, processor = tiny
    bench = load_benchmark("synthetic", "dev", limit=4)
    pols = [Policy({}, default=f, meta={"label": f}) for f in ("rtn.int4", "rtn.int3", "rtn.int2")]
    rs = evaluate(model, processor, pols, bench, results_path=out, batch_size=4, measure_latency=False,
                  progress=False)
    after = out.read_bytes()
    assert after.startswith(before[: before.rfind(b"\n") + 1])  # finished records untouched
    recs = [json.loads(x) for x in after.decode().splitlines()]
    keys = [json.dumps(r["identity"], sort_keys=True) for r in recs]
    assert len(recs) == 4 and len(set(keys)) == 4  # none lost, none duplicated
    assert [r.label for r in rs] == ["fp32", "rtn.int4", "rtn.int3", "rtn.int2"]


# --------------------------------------------------------------------------- policies files, CLI
def test_load_policies(tmp_path):
    front = {"schema": 1, "kind": "front", "candidates": [
        {"policy": Policy({"a": "rtn.int4"}, default="fp32").to_dict(), "predicted_latency_ms": 3.0},
        {"policy": Policy({}, default="rtn.int4", meta={"label": "ilp"}).to_dict()},
    ]}
    (tmp_path / "front.json").write_text(json.dumps(front))
    ps = load_policies(tmp_path / "front.json")
    assert [p.meta["label"] for p in ps] == ["pareto-1", "ilp"] and ps[0].meta["predicted_latency_ms"] == 3.0
    (tmp_path / "list.json").write_text(json.dumps([Policy({}, default="fp32").to_dict()]))
    assert load_policies(tmp_path / "list.json")[0].default == "fp32"
    Policy({}, default="rtn.int4", meta={"label": "mine"}).to_yaml(tmp_path / "p.yaml", model="tiny:llava")
    assert load_policies(tmp_path / "p.yaml")[0].default == "rtn.int4"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_policies(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": 1, "kind": "latency_table", "candidates": []}))
    with pytest.raises(ArtifactError, match="kind"):
        load_policies(tmp_path / "other.json")
    (tmp_path / "v2.json").write_text(json.dumps({"schema": 2, "kind": "front", "candidates": [{}]}))
    with pytest.raises(ArtifactError, match="schema"):
        load_policies(tmp_path / "v2.json")
    with pytest.raises(MpsError, match="no such file"):
        load_policies(tmp_path / "missing.yaml")


def _parser():
    import argparse

    from mpsearch._cli import evaluate as cli_eval

    parser = argparse.ArgumentParser(prog="mpsearch")
    parser.add_argument("--debug", action="store_true")
    cli_eval.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_evaluate_and_report(tmp_path, capsys):
    front = {"schema": 1, "kind": "front",
             "candidates": [{"policy": Policy({}, default="rtn.int4").to_dict()}]}
    (tmp_path / "front.json").write_text(json.dumps(front))
    out = tmp_path / "res.jsonl"
    args = _parser().parse_args(["evaluate", "tiny:llava", "--policies", str(tmp_path / "front.json"),
                                 "--benchmark", "synthetic", "--split", "dev", "--limit", "4",
                                 "--no-latency", "-o", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "pareto-1" in printed and "fp32" in printed and "synthetic dev (4 questions" in printed
    args = _parser().parse_args(["report", str(out)])
    assert args.func(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["policy", "latency_ms", "memory_MiB", "acc%"]
    assert [line.split()[0] for line in table[1:]] == ["fp32", "pareto-1"]
    bad = _parser().parse_args(["report", str(tmp_path / "nope.jsonl")])
    with pytest.raises(MpsError, match="no such file"):
        bad.func(bad)


def test_cli_bad_input_exits_2(tmp_path):
    import mpsearch.cli as cli

    (tmp_path / "bad.json").write_text("[1, 2]")
    code = cli.main(["evaluate", "tiny:llava", "--policies", str(tmp_path / "bad.json"), "--benchmark", "synthetic",
                     "-o", str(tmp_path / "r.jsonl")])
    assert code == 2
    assert cli.main(["evaluate", "tiny:llava", "--benchmark", "mmmu", "--split", "test", "--data",
                     str(tmp_path / "none"), "-o", str(tmp_path / "r.jsonl")]) == 2


def test_latency_measured_and_predicted(tiny, bench):
    from mpsearch import latency

    class Table:  # the one method evaluate uses
        def predict(self, policy):
            return 1.5 if policy.default == "fp32" else 0.75

    model, processor = tiny
    q = Policy({}, default="rtn.int4", meta={"label": "int4"})
    rs = evaluate(model, processor, [q], bench, workload=latency.Workload(repeats=1, warmup=0, prompt_tokens=8, threads=1),
                  latency_table=Table(), progress=False)
    assert all(r.latency_ms is not None and r.latency_ms > 0 for r in rs)
    assert [r.predicted_latency_ms for r in rs] == [1.5, 0.75]
    assert not any("latency not measured" in n for r in rs for n in r.notes)


def test_cli_answerless_split_exits_2_and_writes_nothing(tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    cli = pytest.importorskip("mpsearch.cli")
    rows = [{"id": f"test_Art_{k}", "question": "<image 1> Which?", "options": "['x', 'y']", "answer": "?",
             "question_type": "multiple-choice", "image_1": _img()} for k in range(1, 3)]
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "mmmu"))
    capsys.readouterr()  # drop the save progress bar
    out = tmp_path / "r.jsonl"
    code = cli.main(["evaluate", "tiny:llava", "--benchmark", "mmmu", "--split", "test", "--data",
                     str(tmp_path / "mmmu"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: mmmu split 'test': answers are withheld (2 of 2 rows")
    assert code == 2


def test_per_skill_on_a_benchmark_with_two_skills(tiny):
    from mpsearch.evaluation.report import format_table

    model, processor = tiny
    b = load_benchmark("synthetic", "dev", limit=18)
    (base,) = evaluate(model, processor, [], b, mode="logits", batch_size=6, **FAST)
    skills = {b.question(i).id: b.question(i).skill for i in range(len(b))}
    for skill in ("perception", "reasoning"):
        ids = [q for q, s in skills.items() if s == skill]
        k = sum(base.correct[q] for q in ids)
        assert base.per_skill_n[skill] == len(ids) and base.per_skill[skill] == k / len(ids)
        assert base.per_skill_ci[skill] == wilson_ci(k, len(ids))
    header = format_table([base]).splitlines()[0].split()
    assert "perception%" in header and "reasoning%" in header
