"""Re-evaluating precision policies on a benchmark, with crash-safe results (``mps.evaluate``).

For each policy (the full-precision baseline -- the model as loaded -- always first, then the
uniform policies a search space allows when ``space`` is given, then the caller's), the
quantized modules are swapped into the model through a :class:`mpsearch.formats.ModuleBank`
(built once, never re-quantized), the benchmark is answered, and the original modules are put
back. Each policy's :class:`Result` holds:

* ``accuracy`` over the scored questions, with a 95 % bootstrap interval (``n_boot`` resamples
  of the questions, seeded), ``per_subject`` and (MMMU) ``per_discipline`` micro-averages;
* ``flips``: share of scored questions whose answer differs from the baseline's;
* ``kl``: mean KL(p_fp || p_q) of the next-token distribution at the last prompt position over
  the full vocabulary, on the same prompts;
* ``latency_ms``: measured end to end by :func:`mpsearch.latency.measure_model_latency` on
  ``workload``; ``memory_bytes``: exact weight bytes under the policy
  (:func:`mpsearch.formats.policy_memory_bytes`); ``peak_memory_bytes`` on CUDA;
  ``predicted_latency_ms`` from ``latency_table.predict(policy)`` when a table is given;
* ``fallbacks``: multiple-choice answers that could not be parsed (official rule: random letter).

Answer modes:

* ``logits``: one forward pass per batch; the answer is the option letter whose token scores
  highest at the last prompt position (each letter's score is the max over its encodings after
  the generation prompt: the bare letter, and the letter after a space when that is a different
  token). Open questions cannot be answered this way: they are skipped and counted in
  ``n_skipped`` (accuracy is over multiple-choice questions only).
* ``generate``: greedy decoding (one beam, no repetition penalty, whatever the model's
  generation config says), ``max_new_tokens`` new tokens, left padding; only the new tokens are
  decoded, then parsed by the official MMMU rules (:mod:`mpsearch.tasks.mmmu`).

Results go to ``results_path`` (JSONL, one record per policy, appended and fsynced as each
policy finishes). A rerun reads the file first and skips every (policy key, benchmark, split,
mode, limit, model, questions, settings) already there: a crash loses at most the policy in
progress, and nothing is written twice.

Example:
    >>> import mpsearch as mps
    >>> model, processor = mps.load_vlm("tiny:llava")                       # doctest: +SKIP
    >>> bench = mps.load_benchmark("synthetic", "dev", limit=8)             # doctest: +SKIP
    >>> results = mps.evaluate(model, processor, [], bench, mode="logits")  # doctest: +SKIP
    >>> results[0].label, 0.0 <= results[0].accuracy <= 1.0                 # doctest: +SKIP
    ('fp32', True)
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mpsearch.errors import ArtifactError, MpsError

__all__ = ["Result", "evaluate", "load_policies", "read_results", "letter_token_ids", "RECORD_KIND", "MODES"]

RECORD_KIND = "eval_result"
MODES = ("logits", "generate")
_SCORING = "official MMMU rules (MMMU-Benchmark/MMMU eval/eval_utils.py), mpsearch.tasks.mmmu"


# --------------------------------------------------------------------------- the result
@dataclass
class Result:
    """One policy evaluated on one benchmark split.

    Example:
        >>> from mpsearch.policy import Policy
        >>> r = Result(Policy({}, "fp32", {"label": "fp32"}), accuracy=0.5, accuracy_ci=(0.2, 0.8), n=4)
        >>> Result.from_dict(r.to_dict()).accuracy_ci
        (0.2, 0.8)
    """

    policy: Any
    accuracy: float = 0.0
    accuracy_ci: tuple[float, float] = (0.0, 0.0)
    per_subject: dict[str, float] = field(default_factory=dict)
    per_discipline: dict[str, float] = field(default_factory=dict)
    flips: float | None = None
    kl: float | None = None
    latency_ms: float | None = None
    memory_bytes: int | None = None
    predicted_latency_ms: float | None = None
    peak_memory_bytes: int | None = None
    n: int = 0
    n_skipped: int = 0
    fallbacks: int = 0
    mode: str = "logits"
    benchmark: str = ""
    split: str = ""
    limit: int | None = None
    label: str = ""
    baseline: bool = False
    per_subject_n: dict[str, int] = field(default_factory=dict)
    answers: dict[str, Any] = field(default_factory=dict)
    correct: dict[str, bool] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.label:
            meta = getattr(self.policy, "meta", {}) or {}
            self.label = str(meta.get("label") or (self.policy.key() if hasattr(self.policy, "key") else "policy"))
        self.accuracy_ci = (float(self.accuracy_ci[0]), float(self.accuracy_ci[1]))

    @property
    def policy_key(self) -> str:
        """The policy's stable hash."""
        return self.policy.key()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the policy as ``Policy.to_dict()``)."""
        d = asdict(self)
        d["policy"] = self.policy.to_dict()
        d["policy_key"] = self.policy.key()
        d["accuracy_ci"] = list(self.accuracy_ci)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Result":
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        from mpsearch.policy import Policy

        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["policy"] = Policy.from_dict(d["policy"])
        kwargs["accuracy_ci"] = tuple(d.get("accuracy_ci") or (0.0, 0.0))
        return cls(**kwargs)


# --------------------------------------------------------------------------- reading policies
def load_policies(path: str | Path) -> list[Any]:
    """Policies from a precision-map YAML, or from JSON: a front file
    (``{"schema": 1, "kind": "front", "candidates": [{"policy": {...}}, ...]}``), a list of
    candidates, or a list of policy dicts (``Policy.to_dict()``).

    Candidates without a label get ``pareto-<i>`` (their position in the file, from 1).

    Example:
        >>> load_policies("front.json")[0].meta["label"]  # doctest: +SKIP
        'pareto-1'
    """
    from mpsearch.policy import Policy

    p = Path(path)
    if not p.is_file():
        raise MpsError(f"{p}: no such file (--policies takes a precision-map YAML or a front/policy JSON)")
    if p.suffix.lower() in (".yaml", ".yml"):
        return [Policy.from_yaml(p)]
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{p}: not valid JSON ({exc}); --policies takes a precision-map YAML or a front JSON") from None
    if isinstance(obj, dict):
        if "candidates" not in obj:
            raise ArtifactError(f"{p}: a JSON object needs field 'candidates' (a front file: kind 'front')")
        from mpsearch.artifacts import check_header

        check_header(obj, p, kind=obj.get("kind") if obj.get("kind") in ("front", "candidates") else "front")
        items = obj["candidates"]
    elif isinstance(obj, list):
        items = obj
    else:
        raise ArtifactError(f"{p}: expected a front object or a list of policies, found {type(obj).__name__}")
    if not isinstance(items, list) or not items:
        raise ArtifactError(f"{p}: field 'candidates' must be a non-empty list")
    out = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ArtifactError(f"{p}: candidate {i} is {type(item).__name__}, expected an object")
        d = item.get("policy", item)
        if not isinstance(d, dict) or ("layers" not in d and "default" not in d):
            raise ArtifactError(f"{p}: candidate {i}: field 'policy' must be a policy object with 'default' and 'layers'")
        try:
            pol = Policy.from_dict(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{p}: candidate {i}: not a policy ({exc})") from None
        pol.meta.setdefault("label", item.get("label") or f"pareto-{i}")
        for k in ("predicted_latency_ms", "proxy_loss", "memory_bytes"):
            if k in item and k not in pol.meta:
                pol.meta[k] = item[k]
        out.append(pol)
    return out


def read_results(path: str | Path) -> list[Result]:
    """Every result record of a results JSONL file (torn last line ignored; foreign records refused)."""
    from mpsearch.artifacts import check_header, read_jsonl

    out = []
    for i, rec in enumerate(read_jsonl(path), 1):
        check_header(rec, f"{path}:{i}", kind=RECORD_KIND)
        try:
            out.append(Result.from_dict(rec["result"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{path}:{i}: not a result record ({exc})") from None
    return out


# --------------------------------------------------------------------------- tokens and batches
def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def letter_token_ids(processor: Any, prompt_text: str, letters: Sequence[str]) -> dict[str, list[int]]:
    """Token ids that start an answer ``L`` right after the rendered prompt, per letter.

    For each letter the prompt is tokenized alone and followed by ``L`` and by ``" " + L``; the
    first token after the prompt's tokens is kept when it decodes to the letter (a tokenizer
    that writes ``"▁A"`` after ``ASSISTANT:`` yields that token). A letter without such a token
    raises :class:`MpsError`: logits mode cannot score it.

    Example:
        >>> letter_token_ids(processor, "USER: hi ASSISTANT:", ["A", "B"])  # doctest: +SKIP
        {'A': [39], 'B': [40]}
    """
    tok = _tokenizer(processor)
    base = tok(prompt_text, add_special_tokens=False)["input_ids"]
    out: dict[str, list[int]] = {}
    for letter in letters:
        ids: list[int] = []
        for suffix in (letter, " " + letter):
            full = tok(prompt_text + suffix, add_special_tokens=False)["input_ids"]
            if full[: len(base)] != base or len(full) <= len(base):
                continue  # the suffix merged with the prompt's last token
            first = int(full[len(base)])
            if tok.decode([first]).strip() == letter and first not in ids:
                ids.append(first)
        if not ids:
            raise MpsError(f"logits mode: the tokenizer has no token for option letter {letter!r} after the "
                           f"generation prompt; use mode='generate'")
        out[letter] = ids
    return out


def _model_dtype(model: Any) -> Any:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    import torch

    return torch.float32


def _model_device(model: Any) -> Any:
    for p in model.parameters():
        return p.device
    import torch

    return torch.device("cpu")


def _to_model(batch: Mapping[str, Any], model: Any) -> dict[str, Any]:
    import torch

    dev, dtype = _model_device(model), _model_dtype(model)
    out = {}
    for k, v in batch.items():
        if k in ("prompt_last", "labels"):
            continue
        if isinstance(v, torch.Tensor):
            v = v.to(dev, dtype=dtype) if v.is_floating_point() else v.to(dev)
        out[k] = v
    return out


@dataclass
class _Pass:
    """What one policy's pass over the benchmark produced (per question position)."""

    answers: dict[int, Any] = field(default_factory=dict)
    correct: dict[int, bool] = field(default_factory=dict)
    fallback: dict[int, bool] = field(default_factory=dict)
    logprobs: dict[int, Any] = field(default_factory=dict)  # position -> float32 log-softmax (CPU)
    kl: dict[int, float] = field(default_factory=dict)  # position -> KL(p_reference || p_this)
    responses: dict[int, str] = field(default_factory=dict)


def _run_pass(model: Any, processor: Any, bench: Any, positions: Sequence[int], mode: str, batch_size: int,
              max_new_tokens: int, placement: str, fallback: str, letter_ids: Mapping[str, list[int]] | None,
              reference: _Pass | None, desc: str, progress: bool = True) -> _Pass:
    """Answer the questions at ``positions``. Without ``reference`` the next-token log-probs are
    kept (the full-precision pass); with one, only each question's KL to it is kept."""
    import random

    import torch
    from tqdm.auto import tqdm

    from mpsearch.tasks import mmmu
    from mpsearch.tasks.prompts import encode_batch

    out = _Pass()
    rng = random.Random(42)  # the official stream: random.seed(42) at import of eval_utils
    tok = _tokenizer(processor)
    bar = tqdm(total=len(positions), desc=desc, unit="q", leave=False, disable=not progress)
    try:
        for start in range(0, len(positions), batch_size):
            chunk = list(positions[start:start + batch_size])
            samples = [bench[i] for i in chunk]
            side = "left" if mode == "generate" else "right"
            enc = encode_batch(processor, samples, placement=placement, padding_side=side)
            inputs = _to_model(enc, model)
            with torch.inference_mode():
                if mode == "logits":
                    last = _last_logits(model, inputs, enc["prompt_last"])
                    texts: list[str] | None = None
                else:
                    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                    # Pure greedy: a shipped generation_config's sampling, beams or repetition
                    # penalty (Qwen2-VL ships 1.05) would change which token comes first.
                    gen = model.generate(**inputs, do_sample=False, num_beams=1, repetition_penalty=1.0,
                                         max_new_tokens=max_new_tokens, output_logits=True,
                                         return_dict_in_generate=True, pad_token_id=pad)
                    last = gen.logits[0].float()
                    new = gen.sequences[:, inputs["input_ids"].shape[1]:]
                    texts = tok.batch_decode(new, skip_special_tokens=True)
            lp = torch.log_softmax(last, dim=-1).cpu()
            for k, i in enumerate(chunk):
                if reference is None:
                    out.logprobs[i] = lp[k]
                else:
                    ref = reference.logprobs[i]
                    out.kl[i] = float(torch.sum(torch.exp(ref) * (ref - lp[k])))
            for k, i in enumerate(chunk):
                q = bench.question(i)
                if mode == "logits":
                    choices = q.choices
                    scores = [max(float(last[k, t]) for t in letter_ids[c]) for c in choices]  # type: ignore[index]
                    pred = choices[max(range(len(choices)), key=lambda j: (scores[j], -j))]
                    out.answers[i] = pred
                    out.correct[i] = mmmu.eval_multi_choice(q.answer, pred)  # type: ignore[arg-type]
                    out.fallback[i] = False
                else:
                    s = mmmu.score_response(texts[k], q.question_type, q.answer, q.options, fallback, rng)  # type: ignore[index,arg-type]
                    out.responses[i] = texts[k]  # type: ignore[index]
                    out.answers[i] = s.pred if isinstance(s.pred, (str, type(None))) else sorted(map(repr, s.pred))
                    out.correct[i] = s.correct
                    out.fallback[i] = s.fallback
            bar.update(len(chunk))
    finally:
        bar.close()
    return out


def _last_logits(model: Any, inputs: Mapping[str, Any], prompt_last: Any) -> Any:
    """Float32 next-token logits ``[rows, vocab]`` at each row's ``prompt_last``.

    Models whose forward takes ``logits_to_keep`` (transformers' own classes) compute the head on
    those positions only, not on the whole sequence (a [batch, seq, vocab] tensor).
    """
    import inspect

    import torch

    rows = torch.arange(prompt_last.shape[0])
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        keep = torch.unique(prompt_last)  # sorted
        dev = inputs["input_ids"].device
        logits = model(**inputs, logits_to_keep=keep.to(dev)).logits
        col = torch.searchsorted(keep, prompt_last)
        return logits[rows.to(logits.device), col.to(logits.device)].float()
    logits = model(**inputs).logits
    return logits[rows.to(logits.device), prompt_last.to(logits.device)].float()


def _bootstrap_ci(correct: Sequence[bool], n_boot: int, seed: int) -> tuple[float, float]:
    import numpy as np

    c = np.asarray(correct, dtype=np.float64)
    if c.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for b0 in range(0, n_boot, 256):  # chunks keep memory at 256 x n
        b1 = min(n_boot, b0 + 256)
        means[b0:b1] = c[rng.integers(0, c.size, size=(b1 - b0, c.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return (float(lo), float(hi))


# --------------------------------------------------------------------------- policies
def _baseline_policy(model: Any) -> Any:
    from mpsearch.formats import dtype_format
    from mpsearch.policy import Policy

    fmt = dtype_format(_model_dtype(model))
    return Policy({}, default=fmt, meta={"label": fmt, "baseline": True})


def _uniform_policies(model: Any, space: Any, baseline: Any, layers: Sequence[Any] | None) -> list[Any]:
    from mpsearch.policy import Policy

    if layers is None:
        from mpsearch.models import discover_layers

        layers = discover_layers(model)
    out = []
    for fmt in space.formats():
        formats = {}
        for layer in layers:
            cands = space.candidates(layer)
            formats[layer.name] = fmt if fmt in cands else cands[0]
        pol = Policy(formats, default=baseline.default, meta={"label": f"uniform {fmt}", "uniform": fmt,
                                                                "search_space": space.name})
        if pol.key() != baseline.key():
            out.append(pol)
    return out


def _model_name(model: Any) -> str:
    try:
        from mpsearch.models import model_source

        return model_source(model)
    except Exception:  # noqa: BLE001 - models loaded another way
        return str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)


# --------------------------------------------------------------------------- evaluate
def evaluate(
    model: Any,
    processor: Any,
    policies: Iterable[Any],
    bench: Any,
    mode: str = "logits",
    batch_size: int = 8,
    results_path: str | Path | None = None,
    space: Any = None,
    workload: Any = None,
    latency_table: Any = None,
    include_baselines: bool = True,
    seed: int = 0,
    *,
    max_new_tokens: int = 32,
    placement: str = "inline",
    fallback: str = "random",
    n_boot: int = 1000,
    measure_latency: bool = True,
    layers: Sequence[Any] | None = None,
    progress: bool = True,
) -> list[Result]:
    """Evaluate each policy (baseline first) on ``bench``; see the module docstring.

    ``policies``: :class:`mpsearch.policy.Policy` objects (or candidates with ``.policy``).
    ``space``: add the uniform policies the space allows (one per format it names; layers whose
    group does not allow a format keep the group's first candidate). ``workload``: what
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
    from mpsearch.artifacts import SCHEMA_VERSION, append_jsonl, check_header, drop_torn_tail, provenance, read_jsonl
    from mpsearch.latency.measure import current_device_name
    from mpsearch.tasks import mmmu

    if mode not in MODES:
        raise MpsError(f"mode={mode!r}: valid modes are {', '.join(MODES)}")
    if fallback not in ("random", "none"):
        raise MpsError(f"fallback={fallback!r}: valid values are 'random' (official) and 'none'")
    if int(batch_size) < 1 or int(max_new_tokens) < 1 or int(n_boot) < 1:
        raise MpsError("batch_size, max_new_tokens and n_boot must be positive integers")
    if processor is None:
        raise MpsError("evaluate needs the model's processor (load_vlm(..., load_processor=True))")
    bench.require_answers()

    # -- the policies, baseline first ------------------------------------------------------
    baseline = _baseline_policy(model)
    ordered: list[Any] = [baseline] if include_baselines else []
    if space is not None and include_baselines:
        ordered += _uniform_policies(model, space, baseline, layers)
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
    questions_hash = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]
    model_name = _model_name(model)
    settings = {"placement": placement, "n_boot": int(n_boot), "seed": int(seed)}
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

    def run(desc: str, reference: _Pass | None) -> _Pass:
        return _run_pass(model, processor, bench, positions, mode, int(batch_size), int(max_new_tokens), placement,
                         fallback, letter_ids, reference, desc, progress)

    def finish(policy: Any, ps: _Pass, fp: _Pass, seconds: float, is_base: bool) -> Result:
        import torch

        corr = [bool(ps.correct[i]) for i in positions]
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
        dev = _model_device(model)
        peak = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" and torch.cuda.is_available() else None
        predicted = float(latency_table.predict(policy)) if latency_table is not None else None
        return Result(
            policy=policy, accuracy=agg.overall["acc"], accuracy_ci=_bootstrap_ci(corr, int(n_boot), int(seed)),
            per_subject={s: v["acc"] for s, v in agg.per_subject.items()},
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

    dev = _model_device(model)
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(dev)
