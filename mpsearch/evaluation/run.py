"""``mps.evaluate``: each policy swapped in, the benchmark answered, scored and stored."""
from __future__ import annotations

import json
import time
from typing import Any, Iterable, Mapping, Sequence

from mpsearch.hashing import json_key
from mpsearch.configs import EvaluateConfig
from mpsearch.errors import ArtifactError, MpsError
from mpsearch.evaluation.answer import Pass, letter_token_ids, run_pass
from mpsearch.models.params import model_device, model_dtype
from mpsearch.models.source import model_label
from mpsearch.evaluation.scoring import skill_accuracy, wilson_ci
from mpsearch.evaluation.store import RECORD_KIND, Result

__all__ = ["evaluate", "MODES"]

MODES = ("logits", "generate")
_SCORING = "official MMMU rules (MMMU-Benchmark/MMMU eval/eval_utils.py), mpsearch.tasks.mmmu"


# --------------------------------------------------------------------------- policies
def _baseline_policy(model: Any) -> Any:
    from mpsearch.formats import dtype_format
    from mpsearch.policy import Policy

    fmt = dtype_format(model_dtype(model))
    return Policy({}, default=fmt, meta={"label": fmt, "baseline": True})


def _uniform_policies(model: Any, space: Any, baseline: Any, layers: Sequence[Any] | None,
                      formats: Sequence[str] | None = None) -> list[Any]:
    """The space's uniform policies (:meth:`SearchSpace.uniform_policies`, the one way to make
    them), the one equal to the baseline left out; only those of ``formats`` when given."""
    if layers is None:
        from mpsearch.models import discover_layers

        layers = discover_layers(model)
    if formats is not None:
        unknown = [f for f in formats if f not in space.formats()]
        if unknown:
            raise MpsError(f"uniform={unknown[0]!r}: not a format of search space {space.name!r} "
                           f"(its formats: {', '.join(space.formats())})")
    out = []
    for pol in space.uniform_policies(layers):
        if formats is not None and pol.meta["format"] not in formats:
            continue
        pol.meta.update(uniform=pol.meta["format"], search_space=space.name)
        if pol.key() != baseline.key():
            out.append(pol)
    return out


# --------------------------------------------------------------------------- evaluate
def evaluate(
    model: Any,
    processor: Any,
    policies: Iterable[Any],
    bench: Any,
    *,
    space: Any = None,
    layers: Sequence[Any] | None = None,
    config: EvaluateConfig | None = None,
    **settings: Any,
) -> list[Result]:
    """Evaluate each policy (baseline first) on ``bench``; see the module docstring.

    Settings come from ``config`` (:class:`mpsearch.configs.EvaluateConfig`); keywords named like
    its fields override them (``mode="generate"``, ``results_path=...``).
    ``policies``: :class:`mpsearch.policy.Policy` objects (or candidates with ``.policy``).
    ``space``: add the uniform policies the space allows (one per format it names, or per format
    of ``uniform``; layers whose group does not allow a format keep the group's first candidate). ``workload``: what
    ``measure_model_latency`` times (default ``Workload()``); ``measure_latency=False`` skips
    timing. ``results_path``: JSONL file, resumable. ``fallback``: ``"random"`` (official) or
    ``"none"``. Returns the results in order: baseline, uniform policies, then ``policies``
    (duplicates by policy key evaluated once).

    Example:
        >>> results = evaluate(model, processor, [policy], bench, mode="logits",
        ...                    results_path="results.jsonl")  # doctest: +SKIP
        >>> [(r.label, r.accuracy, r.flips) for r in results]  # doctest: +SKIP
        [('fp32', 0.62, 0.0), ('pareto-1', 0.61, 0.03)]
    """
    cfg = EvaluateConfig.resolve(config, settings, "evaluate")
    mode, batch_size, results_path, workload, latency_table = (
        cfg.mode, cfg.batch_size, cfg.results_path, cfg.workload, cfg.latency_table)
    include_baselines, seed, max_new_tokens, placement, fallback = (
        cfg.include_baselines, cfg.seed, cfg.max_new_tokens, cfg.placement, cfg.fallback)
    measure_latency, progress = cfg.measure_latency, cfg.progress
    from mpsearch.artifacts import SCHEMA_VERSION, append_jsonl, check_header, drop_torn_tail, provenance, read_jsonl
    from mpsearch.latency import current_device_name
    from mpsearch.tasks import mmmu

    if mode not in MODES:
        raise MpsError(f"mode={mode!r}: valid modes are {', '.join(MODES)}")
    if fallback not in ("random", "none"):
        raise MpsError(f"fallback={fallback!r}: valid values are 'random' (official) and 'none'")
    if int(batch_size) < 1 or int(max_new_tokens) < 1:
        raise MpsError("batch_size and max_new_tokens must be positive integers")
    if processor is None:
        raise MpsError("evaluate needs the model's processor (load_vlm(..., load_processor=True))")
    bench.require_answers()

    # -- the policies, baseline first ------------------------------------------------------
    baseline = _baseline_policy(model)
    ordered: list[Any] = [baseline] if include_baselines else []
    if space is not None and include_baselines:
        ordered += _uniform_policies(model, space, baseline, layers, cfg.uniform)
    for p in policies:
        ordered.append(getattr(p, "policy", p))
    unique: dict[str, Any] = {}
    for p in ordered:
        unique.setdefault(p.key(), p)
    if not unique:
        raise MpsError("nothing to evaluate: no policies given and include_baselines=False")

    # -- which questions each mode scores ----------------------------------------------------
    all_pos = list(range(len(bench)))
    if mode == "logits":
        positions = [i for i in all_pos if bench.question(i).is_multiple_choice]
        n_skipped = len(all_pos) - len(positions)
        if not positions:
            raise MpsError(f"{bench.name} {bench.split}: all {len(bench)} questions are open; logits mode "
                           f"answers multiple-choice questions only; use mode='generate'")
    else:
        positions, n_skipped = all_pos, 0
    ids = [bench.question(i).id for i in all_pos]
    questions_hash = json_key(ids, n=12)
    model_name = model_label(model)
    settings = {"placement": placement, "seed": int(seed), "interval": "wilson"}
    if mode == "generate":
        settings.update(max_new_tokens=int(max_new_tokens), fallback=fallback)
    limit = getattr(bench, "limit", None)

    def identity(policy: Any) -> dict[str, Any]:
        return {"policy_key": policy.key(), "benchmark": bench.name, "split": bench.split, "mode": mode,
                "limit": limit, "model": model_name, "questions": questions_hash, "settings": settings}

    def ident_key(d: Mapping[str, Any]) -> str:
        return json.dumps(d, sort_keys=True)

    # -- what is done already -----------------------------------------------------------------
    done: dict[str, Result] = {}
    if results_path is not None:
        for line, rec in enumerate(read_jsonl(results_path), 1):
            check_header(rec, f"{results_path}:{line}", kind=RECORD_KIND)
            if "identity" not in rec or "result" not in rec:
                raise ArtifactError(f"{results_path}:{line}: a result record needs fields 'identity' and 'result'")
            done[ident_key(rec["identity"])] = Result.from_dict(rec["result"])
    todo = [p for p in unique.values() if ident_key(identity(p)) not in done]

    # -- latency machinery ---------------------------------------------------------------------
    measure = None
    latency_note = None
    if measure_latency and todo:
        try:
            from mpsearch.latency import Workload, measure_model_latency

            measure = measure_model_latency
            workload = workload if workload is not None else Workload()
        except ImportError as exc:
            latency_note = f"latency not measured: mpsearch.latency.measure_model_latency unavailable ({exc})"
    elif not measure_latency:
        latency_note = "latency not measured (measure_latency=False)"

    # -- runs --------------------------------------------------------------------------------
    letter_ids = None
    if mode == "logits" and todo:
        from mpsearch.tasks.prompts import render_prompt

        letters = sorted({c for i in positions for c in bench.question(i).choices})
        text, _ = render_prompt(processor, bench[positions[0]], placement)
        letter_ids = letter_token_ids(processor, text, letters)

    from mpsearch.formats import ModuleBank, policy_memory_bytes

    bank = None
    if todo:
        fmts = sorted({f for p in todo for f in p.used_formats()})
        bank = ModuleBank(model, None, fmts)

    def run(desc: str, reference: Pass | None) -> Pass:
        return run_pass(model, processor, bench, positions, mode, int(batch_size), int(max_new_tokens), placement,
                         fallback, letter_ids, reference, desc, progress)

    def finish(policy: Any, ps: Pass, fp: Pass, seconds: float, is_base: bool) -> Result:
        import torch

        n_correct = sum(bool(ps.correct[i]) for i in positions)
        skills = skill_accuracy((bench.question(i).skill, ps.correct[i]) for i in positions)
        agg = mmmu.aggregate((bench.question(i).subject, ps.correct[i]) for i in positions)
        flips = sum(ps.answers[i] != fp.answers[i] for i in positions) / len(positions)
        kl = 0.0 if is_base else sum(ps.kl[i] for i in positions) / len(positions)
        notes: list[str] = list(bench.notes)
        if n_skipped:
            notes.append(f"{n_skipped} open questions not answerable in logits mode: skipped, not scored")
        latency = None
        if measure is not None:
            try:
                lat = measure(model, policy, workload)
                latency = float(getattr(lat, "median_ms", lat))
            except MpsError as exc:
                notes.append(f"latency not measured: {exc}")
        elif latency_note:
            notes.append(latency_note)
        dev = model_device(model)
        peak = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" and torch.cuda.is_available() else None
        predicted = float(latency_table.predict(policy)) if latency_table is not None else None
        return Result(
            policy=policy, accuracy=agg.overall["acc"], accuracy_ci=wilson_ci(n_correct, len(positions)),
            per_subject={s: v["acc"] for s, v in agg.per_subject.items()},
            per_skill={s: v[0] for s, v in skills.items()}, per_skill_ci={s: v[1] for s, v in skills.items()},
            per_skill_n={s: v[2] for s, v in skills.items()},
            per_discipline={d: v["acc"] for d, v in agg.per_discipline.items()},
            flips=0.0 if is_base else flips, kl=kl, latency_ms=latency,
            memory_bytes=int(policy_memory_bytes(model, policy)), predicted_latency_ms=predicted,
            peak_memory_bytes=peak, n=len(positions), n_skipped=n_skipped,
            fallbacks=sum(bool(ps.fallback[i]) for i in positions), mode=mode, benchmark=bench.name,
            split=bench.split, limit=limit, baseline=is_base,
            per_subject_n={s: int(v["num"]) for s, v in agg.per_subject.items()},
            answers={ids[i]: ps.answers[i] for i in positions},
            correct={ids[i]: bool(ps.correct[i]) for i in positions},
            seconds=round(seconds, 3), notes=notes,
        )

    def record(result: Result, policy: Any) -> None:
        if results_path is None:
            return
        drop_torn_tail(results_path)
        rec = {"schema": SCHEMA_VERSION, "kind": RECORD_KIND, "identity": identity(policy),
               "provenance": provenance(model=model_name, benchmark=bench.name, split=bench.split,
                                        source=getattr(bench, "source", ""), mode=mode, seed=int(seed),
                                        scoring=_SCORING, device=current_device_name(model),
                                        workload=workload.to_dict() if hasattr(workload, "to_dict") else None),
               "result": result.to_dict()}
        append_jsonl(results_path, rec)

    fresh: dict[str, Result] = {}
    if todo:
        # The reference pass: the model as loaded. It is the baseline's result and the answers /
        # distributions every other policy is compared with (rerun when only the record exists).
        t0 = time.perf_counter()
        _reset_peak(model)
        fp = run(f"{baseline.meta['label']} (full precision) [{mode}]", None)
        fp_seconds = time.perf_counter() - t0
        for policy in todo:
            if policy.key() == baseline.key():
                res = finish(policy, fp, fp, fp_seconds, True)
            else:
                assert bank is not None
                t0 = time.perf_counter()
                bank.apply(policy)
                try:
                    _reset_peak(model)
                    ps = run(f"{policy.meta.get('label', policy.key())} [{mode}]", fp)
                    res = finish(policy, ps, fp, time.perf_counter() - t0, False)
                finally:
                    bank.restore()
            record(res, policy)
            fresh[ident_key(identity(policy))] = res
    out: list[Result] = []
    for p in unique.values():
        k = ident_key(identity(p))
        out.append(fresh.get(k) or done[k])
    return out


def _reset_peak(model: Any) -> None:
    import torch

    dev = model_device(model)
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(dev)
