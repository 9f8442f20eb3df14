"""``mpsearch run``: profile -> latency table -> search -> refine -> evaluate -> export -> plots.

Every stage writes its artifact into the output folder and records, in ``stages.json``, a key
of its inputs (config values and the hashes of the upstream artifacts) and the hash of what it
wrote. Rerunning with the same inputs reuses the artifact; changing an input redoes that stage
and everything downstream. Optuna studies live in ``studies.db`` (SQLite) under names derived
from the inputs, so an interrupted search or refine resumes where it stopped; evaluation
results are appended to ``results.jsonl`` one record per policy, so an interrupted evaluation
loses at most the policy in progress.

Example:
    >>> from mpsearch.pipeline import RunConfig, run_pipeline
    >>> summary = run_pipeline(RunConfig(out="runs/demo"))           # doctest: +SKIP
    >>> print(summary.table())                                       # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mpsearch.hashing import json_key, file_key
from mpsearch._yaml import load_yaml
from mpsearch.artifacts import atomic_write_json, atomic_write_text, provenance
from mpsearch.choice import choose, pick_for_evaluation, verdict  # noqa: F401 - the export's choice, re-exported
from mpsearch.configs import EvaluateConfig, LatencyConfig, ProfileConfig, RefineConfig, SearchConfig
from mpsearch.errors import MpsError
from mpsearch.schemas import RUN_SCHEMA  # the run config's schema: mpsearch.schemas.RunConfigFile

MANIFEST = "stages.json"


@dataclass
class RunConfig:
    """What ``mpsearch run`` does; every field can be set in the run YAML (``mpsearch_run: 1``).

    Budgets: a number, ``"auto"`` or None (no budget of that kind; at least one is needed).
    ``budget_mb: auto`` is the weight memory of uniform 4-bit (the smallest uniform policy of a
    format with >= 4 bits per weight), ``budget_mb: auto:<bits>`` the weight memory at that many
    bits per weight (between the space's uniform policies); ``budget_ms: auto`` is the predicted
    latency of the fastest uniform int8-or-wider policy (see :func:`resolve_budgets`). The demo
    sets a memory budget only, ``auto:2.5``: on a CPU the fast formats (int8 dynamic, bf16) are
    few, and the demo model loses nothing at uniform 4-bit; what a mixed policy wins there is
    accuracy at a size where the only uniform policy that fits, 2-bit, loses 5.7 points. ``benchmark``/``split`` are what results are reported on; calibration data
    for profiling and refinement come from ``calib_split`` of the same benchmark (disjoint from
    the evaluation split). ``baselines``: ``relevant`` evaluates full precision and the uniform
    policies that are within the budgets or predicted faster than full precision (see
    :func:`relevant_uniform`; the summary names the others), ``all`` every uniform policy of the
    space. See ``examples/`` for a real-model config.

    Example:
        >>> RunConfig(model="demo", space="cpu").budget_ms is None
        True
    """

    model: str = "demo"
    revision: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    trust_remote_code: bool = False
    benchmark: str = "synthetic"
    split: str = "validation"
    data: str | None = None
    subjects: list[str] | None = None
    limit: int | None = None
    mode: str = "logits"
    max_new_tokens: int = 16
    calib_split: str = "dev"
    calib_samples: int = 32
    batch_size: int = 16
    space: str = "cpu"
    method: str = "fisher"
    n_probes: int = 8
    workload: dict[str, Any] = field(default_factory=lambda: {"batch": 1, "phase": "prefill"})
    budget_ms: float | str | None = None
    budget_mb: float | str | None = "auto:2.5"
    search_trials: int = 600
    sampler: str = "evo"
    refine_trials: int = 16
    top_k: int = 4
    baselines: str = "relevant"
    seed: int = 0
    storage: str | None = None
    out: str = "runs/demo"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        """Read a run config strictly: unknown keys and wrong types name the field and line."""
        from mpsearch.schemas import RunConfigFile, validate

        data, lines = load_yaml(path)
        validate(RunConfigFile, data, path, lines)
        cfg = cls(**{k: v for k, v in data.items() if k != "mpsearch_run"})
        cfg.validate(str(path))
        return cfg

    def validate(self, where_: str = "run config") -> None:
        """Check every field against :class:`mpsearch.schemas.RunConfigSchema` (types, ranges, names,
        the workload), so that a bad value fails before any stage runs."""
        from mpsearch.schemas import RunConfigSchema, validate

        validate(RunConfigSchema, dataclasses.asdict(self), where_)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (goes into provenance)."""
        return dataclasses.asdict(self)

    # -- the stages' configs (the run's fields, composed per workflow) -----------------------
    def profile_config(self) -> ProfileConfig:
        """The profile stage's settings. Example:
            >>> RunConfig().profile_config().method
            'fisher'
        """
        return ProfileConfig(method=self.method, n_samples=self.calib_samples, seed=self.seed,
                             batch_size=self.batch_size, n_probes=self.n_probes, model_name=self.model)

    def timing_workload(self) -> Any:
        """The :class:`mpsearch.Workload` of the run's ``workload`` field (what every stage times)."""
        from mpsearch.latency import Workload

        return Workload(**self.workload)

    def latency_config(self, cache_dir: str | None = None) -> LatencyConfig:
        """The latency stage's settings."""
        return LatencyConfig(workload=self.timing_workload(), cache_dir=cache_dir)

    def search_config(self, budget_ms: float | None, budget_mb: float | None, study_name: str | None = None) -> SearchConfig:
        """The proxy search's settings under the resolved budgets."""
        return SearchConfig(budget_ms=budget_ms, budget_mb=budget_mb, n_trials=self.search_trials,
                            storage=self.storage, seed=self.seed, sampler=self.sampler, study_name=study_name)

    def refine_config(self, budget_ms: float | None, budget_mb: float | None, storage: Any,
                      study_name: str | None = None) -> RefineConfig:
        """Refinement's settings under the resolved budgets (``storage``: where the study lives)."""
        return RefineConfig(budget_ms=budget_ms, budget_mb=budget_mb, n_trials=self.refine_trials, storage=storage,
                            study_name=study_name, seed=self.seed, workload=self.timing_workload(),
                            n_samples=self.calib_samples, batch_size=self.batch_size)

    def evaluate_config(self, results_path: Any = None, latency_table: Any = None,
                        uniform: Sequence[str] | None = None) -> EvaluateConfig:
        """Evaluation's settings (``results_path``: the run's JSONL; ``latency_table``: predictions;
        ``uniform``: the formats whose uniform baselines are evaluated, None for all)."""
        return EvaluateConfig(mode=self.mode, batch_size=self.batch_size, results_path=results_path,
                              workload=self.timing_workload(), latency_table=latency_table, seed=self.seed,
                              max_new_tokens=self.max_new_tokens, uniform=uniform)


# -- stage bookkeeping ------------------------------------------------------------------
def inputs_key(obj: Any) -> str:
    """Stable hash of a JSON-able description of a stage's inputs."""
    return json_key(obj)


def file_hash(path: str | Path) -> str:
    """A file's bytes' key (:func:`mpsearch.hashing.file_key`)."""
    return file_key(path)


class Manifest:
    """``stages.json``: for each stage, the key of its inputs and the hash of its artifact."""

    def __init__(self, out: Path) -> None:
        self.path = out / MANIFEST
        self.stages: dict[str, dict[str, str]] = {}
        if self.path.exists():
            from mpsearch.schemas import StagesFile, read_json_artifact

            self.stages = dict(read_json_artifact(self.path, StagesFile)[0].get("stages") or {})

    def fresh(self, stage: str, key: str, artifact: Path) -> bool:
        """True when ``artifact`` was written by ``stage`` from inputs ``key`` and is unchanged."""
        rec = self.stages.get(stage)
        return bool(rec and rec.get("inputs") == key and artifact.exists() and rec.get("artifact") == file_hash(artifact))

    def record(self, stage: str, key: str, artifact: Path) -> None:
        """Remember that ``stage`` wrote ``artifact`` from inputs ``key`` (atomic)."""
        self.stages[stage] = {"inputs": key, "artifact": file_hash(artifact)}
        atomic_write_json(self.path, {"schema": 1, "kind": "run-stages", "stages": self.stages})


@dataclass
class RunSummary:
    """What a run produced: the artifacts' paths, the budget and the evaluated results."""

    out: Path
    budget_ms: float | None
    budget_mb: float | None
    results: list[Any]
    exported: Path | None
    plots: list[Path]
    seconds: dict[str, float]
    chosen: Any = None
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The final summary table (one row per evaluated policy), the export's verdict, stage times."""
        from mpsearch.evaluation.report import format_table as results_table

        head = [f"output folder: {self.out}"]
        if self.budget_ms is not None:
            head.append(f"latency budget: {self.budget_ms:.3f} ms")
        if self.budget_mb is not None:
            head.append(f"memory budget: {self.budget_mb:.3f} MiB")
        body = results_table(self.results)
        tail = []
        if self.chosen is not None:
            tail.append(f"exported: {self.exported}  ({self.chosen.label})")
        tail += self.notes
        tail.append("stage times: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(head + [body] + tail)


# -- the pipeline -------------------------------------------------------------------------
def run_pipeline(cfg: RunConfig, log: Callable[[str], None] = print) -> RunSummary:
    """Run every stage of ``cfg`` (reusing finished ones) and return the summary.

    Example:
        >>> s = run_pipeline(RunConfig(out="runs/demo", search_trials=200))    # doctest: +SKIP
    """
    import torch

    from mpsearch.latency import LatencyTable, measure_latency_table
    from mpsearch.models import discover_layers, load_vlm, model_info
    from mpsearch.sensitivity import SensitivityReport, calibration_batches, profile
    from mpsearch.space import SearchSpace
    from mpsearch.tasks import load_benchmark

    cfg.validate()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out)
    seconds: dict[str, float] = {}
    # The proxy search is cheap (seconds in memory; a SQLite transaction per parameter would
    # dominate it), so it runs in memory unless a storage is configured; refine, which spends
    # real model time per trial, always lives in a storage so an interrupted run resumes it.
    storage = cfg.storage or f"sqlite:///{(out / 'studies.db').resolve()}"

    def stage(name: str) -> Callable[[], None]:
        t0 = time.perf_counter()
        log(f"[{name}] ...")

        def done() -> None:
            seconds[name] = time.perf_counter() - t0
            log(f"[{name}] done in {seconds[name]:.1f}s")
        return done

    # inputs first: a bad model, space or benchmark fails before any work is done
    done = stage("load")
    space = SearchSpace.from_yaml(cfg.space)
    space.check_device(cfg.device)
    model, processor = load_vlm(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    layers = discover_layers(model)
    space.searchable(layers)
    bench = load_benchmark(cfg.benchmark, cfg.split, path=cfg.data, subjects=cfg.subjects, limit=cfg.limit)
    calib_bench = load_benchmark(cfg.benchmark, cfg.calib_split, path=cfg.data, subjects=cfg.subjects)
    if not getattr(bench, "has_answers", True):
        raise MpsError(f"benchmark {cfg.benchmark!r} split {cfg.split!r} has no answers: it cannot be scored; "
                       "use a split with answers (e.g. validation)")
    workload = cfg.timing_workload()
    info = model_info(model)
    model_key = {"model": cfg.model, "revision": cfg.revision, "dtype": str(next(model.parameters()).dtype),
                 "device": cfg.device, "info": info}
    calib_key = {"benchmark": cfg.benchmark, "split": cfg.calib_split, "data": cfg.data,
                 "samples": cfg.calib_samples, "seed": cfg.seed}
    done()

    # 1. sensitivity
    done = stage("profile")
    sens_path = out / "sens.json"
    key = inputs_key({"model": model_key, "calib": calib_key, "method": cfg.method, "space": space.to_dict(),
                      "probes": cfg.n_probes})
    if manifest.fresh("profile", key, sens_path):
        sens = SensitivityReport.from_json(sens_path)
        log(f"[profile] reusing {sens_path}")
    else:
        sens = profile(model, processor, list(calib_bench), layers, space, config=cfg.profile_config())
        sens.to_json(sens_path)
        manifest.record("profile", key, sens_path)
    done()

    # 2. latency table
    done = stage("latency")
    lat_path = out / "latency.json"
    key = inputs_key({"model": model_key, "space": space.to_dict(), "workload": workload.to_dict()})
    if manifest.fresh("latency", key, lat_path):
        lat = LatencyTable.from_json(lat_path)
        log(f"[latency] reusing {lat_path}")
    else:
        lat = measure_latency_table(model, layers, space, config=cfg.latency_config(cache_dir=str(out / "cache")))
        lat.to_json(lat_path)
        manifest.record("latency", key, lat_path)
    done()

    # 3. budget and proxy search
    done = stage("search")
    budget_ms, budget_mb = resolve_budgets(cfg.budget_ms, cfg.budget_mb, lat, space, layers, model)
    if budget_ms is not None:
        log(f"[search] latency budget {budget_ms:.3f} ms" + (" (auto: the fastest uniform >= 8-bit policy, "
                                                             "predicted)" if cfg.budget_ms == "auto" else ""))
    if budget_mb is not None:
        how = ""
        if cfg.budget_mb == "auto":
            how = " (auto: uniform 4-bit's weight memory)"
        elif isinstance(cfg.budget_mb, str):  # auto:<bits>, the only other string the schema allows
            how = f" ({cfg.budget_mb}: the weight memory at {cfg.budget_mb[5:]} bits per weight)"
        log(f"[search] memory budget {budget_mb:.3f} MiB" + how)
    front_path = out / "front.json"
    key = inputs_key({"sens": file_hash(sens_path), "lat": file_hash(lat_path), "budget_ms": budget_ms,
                      "budget_mb": budget_mb, "trials": cfg.search_trials, "sampler": cfg.sampler,
                      "seed": cfg.seed, "space": space.to_dict()})
    from mpsearch.searching import read_front, search, solve_ilp, write_front

    if manifest.fresh("search", key, front_path):
        front = read_front(front_path)
        log(f"[search] reusing {front_path}")
    else:
        front = search(sens, lat, space, layers=layers, model=model,
                       config=cfg.search_config(budget_ms, budget_mb, study_name=f"search-{key}"))
        write_front(front_path, front, model=cfg.model, budget_ms=budget_ms, budget_mb=budget_mb, stage="search")
        manifest.record("search", key, front_path)
    ilp_policy = solve_ilp(sens, lat, space, budget_ms=budget_ms, budget_mb=budget_mb, layers=layers, model=model)
    ilp_policy.meta["label"] = "ilp"
    done()

    # 4. refine on the real model
    done = stage("refine")
    refined_path = out / "refined.json"
    key = inputs_key({"front": file_hash(front_path), "calib": calib_key, "trials": cfg.refine_trials,
                      "budget_ms": budget_ms, "budget_mb": budget_mb, "workload": workload.to_dict(),
                      "seed": cfg.seed})
    from mpsearch.searching import refine

    if cfg.refine_trials == 0:
        refined = list(front)
        log("[refine] skipped (refine_trials: 0)")
    elif manifest.fresh("refine", key, refined_path):
        refined = read_front(refined_path)
        log(f"[refine] reusing {refined_path}")
    else:
        batches = calibration_batches(model, processor, list(calib_bench), n_samples=cfg.calib_samples,
                                      batch_size=cfg.batch_size, seed=cfg.seed)
        refined = refine(model, processor, front, space, batches=batches, layers=layers, lat=lat, sens=sens,
                         config=cfg.refine_config(budget_ms, budget_mb, storage, study_name=f"refine-{key}"))
        write_front(refined_path, refined, model=cfg.model, budget_ms=budget_ms, budget_mb=budget_mb,
                    stage="refine")
        manifest.record("refine", key, refined_path)
    done()

    # 5. evaluate: the refined front's best, the ILP policy, uniform baselines, full precision
    done = stage("evaluate")
    from mpsearch.evaluation import evaluate

    if not refined:
        log("[evaluate] refine found no policy whose measured cost meets the budget; evaluating the proxy front")
    picks = pick_for_evaluation(refined or front, cfg.top_k)
    uniform, skipped = (None, []) if cfg.baselines == "all" else relevant_uniform(
        space, layers, lat, model, budget_ms, budget_mb)
    for line in skipped:
        log(f"[evaluate] {line}")
    results = evaluate(model, processor, [ilp_policy] + picks, bench, space=space, layers=layers,
                       config=cfg.evaluate_config(results_path=out / "results.jsonl", latency_table=lat,
                                                  uniform=uniform))
    done()

    # 6. export the best policy under the budget
    done = stage("export")
    try:
        chosen = choose(results, budget_ms=budget_ms, budget_mb=budget_mb)
        selection = "measured latency"
    except MpsError as exc:
        # Timing noise can put every measurement over a budget set from the table; say so and
        # choose on the table's prediction instead (recorded in the exported map).
        log(f"[export] {exc}; choosing on predicted latency instead")
        chosen = choose(results, budget_ms=budget_ms, budget_mb=budget_mb, latency="predicted")
        selection = "predicted latency"
    exported = out / "policy.yaml"
    export_result(chosen, exported, layers, model_name=cfg.model, revision=cfg.revision, workload=workload,
                  device=lat.device if hasattr(lat, "device") else cfg.device,
                  extra_provenance={"sensitivity": cfg.method, "search_space": space.name, "seed": cfg.seed,
                                    "benchmark": f"{cfg.benchmark}/{cfg.split}", "budget_ms": budget_ms,
                                    "selected_by": selection})
    done()

    # 7. plots
    done = stage("plots")
    from mpsearch import plots

    paths = plots.all_plots(results, out / "plots", proxy_front=front, sens=sens, layers=layers, chosen=chosen,
                            budget_ms=budget_ms, budget_mb=budget_mb,
                            title=f"{cfg.model} on {cfg.benchmark}/{cfg.split}, space {space.name}")
    done()
    notes = verdict(results, chosen, "measured" if selection == "measured latency" else "predicted") + skipped
    if cfg.refine_trials:
        from mpsearch.searching import fidelity_lines, proxy_fidelity

        notes += fidelity_lines(proxy_fidelity(refined_path))
    summary = RunSummary(out, budget_ms, budget_mb, results, exported, paths, seconds, chosen, notes)
    atomic_write_text(out / "summary.txt", summary.table() + "\n")
    return summary


def relevant_uniform(space: Any, layers: Sequence[Any], lat: Any, model: Any, budget_ms: float | None,
                     budget_mb: float | None) -> tuple[list[str], list[str]]:
    """The formats whose uniform baselines a run evaluates (``baselines: relevant``), and a line
    for each one it leaves out.

    A uniform policy is left out when it is over a budget (weight memory over ``budget_mb``, or
    predicted latency over ``budget_ms``) *and* predicted no faster than full precision: it cannot
    be exported, it cannot beat the export (which is within the budgets, so smaller or faster
    than it), and it shows no speed-up over full precision. Measured on the demo (2-core AVX2
    CPU): uniform bf16 (119 ms, 12.5 MiB) and torch.int8wo (46 ms, 7.1 MiB) against fp32's
    29 ms, each costing a full evaluation pass (122 s and 30 s of the run's 471 s). Which ones
    qualify depends on the CPU: on an AVX-512 VNNI/bf16 one bf16 ran as fast as fp32 (12.0 vs
    12.4 ms) and was evaluated. ``baselines: all`` evaluates every uniform policy.

    Example:
        >>> fmts, notes = relevant_uniform(space, layers, lat, model, None, 4.6)   # doctest: +SKIP
        >>> notes[0]                                                               # doctest: +SKIP
        'not evaluated: uniform bf16 (predicted 119.1 ms, 12.47 MiB): over the memory budget ...'
    """
    from mpsearch.formats import policy_memory_bytes

    keep: list[str] = []
    skipped: list[str] = []
    policies = space.uniform_policies(layers)
    ref = next((p for p in policies if p.meta["format"] == space.default_format), None)
    ref_ms = float(lat.predict(ref)) if ref is not None else None
    for pol in policies:
        fmt = pol.meta["format"]
        ms, mib = float(lat.predict(pol)), policy_memory_bytes(model, pol) / 2**20
        over = [name for name, hit in (("memory", budget_mb is not None and mib > budget_mb + 1e-9),
                                       ("latency", budget_ms is not None and ms > budget_ms)) if hit]
        if over and ref_ms is not None and fmt != space.default_format and ms >= ref_ms:
            skipped.append(f"not evaluated: uniform {fmt} (predicted {ms:.1f} ms, {mib:.2f} MiB): over the "
                           f"{' and '.join(over)} budget and no faster than {space.default_format} "
                           f"({ref_ms:.1f} ms predicted); 'baselines: all' evaluates it")
        else:
            keep.append(fmt)
    return keep, skipped


def resolve_budgets(budget_ms: Any, budget_mb: Any, lat: Any, space: Any, layers: Sequence[Any],
                    model: Any) -> tuple[float | None, float | None]:
    """Numbers for the ``"auto"`` budgets (see :class:`RunConfig`).

    Uniform policies put every layer in one format where its group allows it (else the group's
    first candidate). The auto budgets sit where mixed precision has something to win:

    * ``auto`` memory: the exact weight bytes of the smallest uniform policy whose format keeps
      at least 4 nominal bits per weight ("uniform 4-bit"): a mixed policy at that size can put
      the sensitive layers in 8 bits and pay with 2-3 bits where the model does not care. A space
      without a >= 4-bit quantized format: halfway between its smallest uniform policy and full
      precision.
    * ``auto:<bits>`` memory: the weight bytes of a model at ``<bits>`` nominal bits per weight,
      interpolated linearly between the smallest uniform policies of the nearest formats below
      and above (exactly a format's uniform policy when one has those bits). The demo's
      ``auto:2.5`` sits halfway between uniform 2-bit and 3-bit: its model keeps its accuracy at
      uniform 4-bit (78.6% against fp32's 79.1%) and at 3-bit (78.1%), so a 4-bit budget leaves
      mixed precision nothing to win, while uniform 2-bit loses 5.7 points; at 2.5 bits the only
      uniform policy that fits is 2-bit.
    * ``auto`` latency: the predicted latency of the fastest uniform policy whose format keeps at
      least 8 bits per weight (int8 is the precision known to keep accuracy): a mixed policy at
      that latency may use faster low-bit kernels where they are faster and cost nothing.

    Example:
        >>> resolve_budgets(40.0, None, lat, space, layers, model)   # doctest: +SKIP
        (40.0, None)
    """
    from mpsearch.formats import get_format, policy_memory_bytes
    from mpsearch.formats.base import dtype_format
    from mpsearch.policy import Policy

    uniform = space.uniform_policies(layers)
    full_fmt = dtype_format(next(model.parameters()).dtype)
    full_bits = get_format(full_fmt).bits

    def bits(p: Any) -> float:
        return float(get_format(p.meta["format"]).bits)

    auto_bits = isinstance(budget_mb, str) and budget_mb.startswith("auto:")
    ms = float(budget_ms) if budget_ms not in (None, "auto") else None
    mb = float(budget_mb) if budget_mb not in (None, "auto") and not auto_bits else None
    if auto_bits:
        mb = _memory_at_bits(float(budget_mb[5:]), uniform, bits, model, space.name)
    if budget_ms == "auto":
        int8 = [p for p in uniform if bits(p) >= 8] or uniform
        ms = min(lat.predict(p) for p in int8)
    if budget_mb == "auto":
        four = [p for p in uniform if 4 <= bits(p) < full_bits]
        if four:
            mb = min(policy_memory_bytes(model, p) for p in four) / 2**20
        else:
            sizes = [policy_memory_bytes(model, p) / 2**20 for p in uniform]
            full = policy_memory_bytes(model, Policy({}, default=full_fmt)) / 2**20
            mb = min(sizes) + 0.5 * (full - min(sizes))
    return ms, mb


def _memory_at_bits(target: float, uniform: Sequence[Any], bits: Callable[[Any], float], model: Any,
                    space_name: str) -> float:
    """MiB of weights at ``target`` nominal bits per weight (``budget_mb: auto:<bits>``): the smallest
    uniform policy of each bit width, linearly interpolated between the nearest widths around it."""
    from mpsearch.formats import policy_memory_bytes

    by_bits: dict[float, float] = {}
    for p in uniform:
        b, m = bits(p), policy_memory_bytes(model, p) / 2**20
        by_bits[b] = min(by_bits.get(b, m), m)
    if target in by_bits:
        return by_bits[target]
    below = [b for b in by_bits if b < target]
    above = [b for b in by_bits if b > target]
    if not below or not above:
        raise MpsError(f"budget_mb: auto:{target:g} is outside the bit widths of search space {space_name!r} "
                       f"({', '.join(f'{b:g}' for b in sorted(by_bits))}); give bits between them or a number of MiB")
    lo, hi = max(below), min(above)
    return by_bits[lo] + (target - lo) / (hi - lo) * (by_bits[hi] - by_bits[lo])


def export_result(result: Any, path: str | Path, layers: Sequence[Any], model_name: str, revision: str | None,
                  workload: Any, device: str, extra_provenance: Mapping[str, Any] | None = None) -> None:
    """Write ``result.policy`` as a fully expanded precision map with its measured metrics."""
    metrics = {
        "predicted_latency_ms": result.predicted_latency_ms,
        "measured_latency_ms": result.latency_ms,
        "memory_bytes": result.memory_bytes,
        "kl": result.kl,
        "flips": result.flips,
        f"{result.benchmark}_accuracy": result.accuracy,
        f"{result.benchmark}_accuracy_ci": list(result.accuracy_ci) if result.accuracy_ci else None,
        **{f"{result.benchmark}_accuracy_{k}": v for k, v in sorted((result.per_skill or {}).items())},
        "n": result.n,
        "mode": result.mode,
    }
    wl = workload.to_dict() if hasattr(workload, "to_dict") else dict(workload or {})
    result.policy.to_yaml(path, layer_names=[l.name for l in layers], model=model_name, revision=revision,
                          device=device, workload=wl, metrics={k: v for k, v in metrics.items() if v is not None},
                          provenance={**provenance(), **dict(extra_provenance or {}), "label": result.label})


def load_quantized(name_or_path: str, policy_path: str | Path, device: str = "cpu", dtype: str | None = None,
                   trust_remote_code: bool = False, revision: str | None = None) -> tuple[Any, Any]:
    """Load a model and apply a precision map in one call.

    Returns ``(model, processor)`` like :func:`mpsearch.load_vlm`; the
    :class:`~mpsearch.formats.AppliedReport` is on ``model.mpsearch_report``.

    Example:
        >>> model, processor = mps.load_quantized("demo", "runs/demo/policy.yaml")   # doctest: +SKIP
        >>> len(model.mpsearch_report.changes) > 0                                   # doctest: +SKIP
        True
    """
    from mpsearch.formats import apply_policy
    from mpsearch.models import load_vlm
    from mpsearch.policy import Policy

    policy = Policy.from_yaml(policy_path)
    model, processor = load_vlm(name_or_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                revision=revision)
    report = apply_policy(model, policy)
    model.mpsearch_report = report
    return model, processor
