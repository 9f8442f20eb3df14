"""One config per workflow: what each stage does, apart from what it works on.

A workflow function takes its *inputs* (the model, the data, the reports it reads) and one
frozen config of *settings*. The settings can also be given as keywords, which override the
config's fields, so ``mps.profile(model, processor, bench, layers, space, method="kl")`` and
``mps.profile(model, processor, bench, layers, space, config=ProfileConfig(method="kl"))`` are
the same call. An unknown keyword is an error that names the valid ones.

======================  ===============================  ======================================
function                config                           inputs
======================  ===============================  ======================================
``profile``             :class:`ProfileConfig`           model, processor, bench, layers, space
``measure_latency_table``  :class:`LatencyConfig`        model, layers, space
``search``              :class:`SearchConfig`            sens, lat, space, layers, model
``refine``              :class:`RefineConfig`            model, processor, candidates, space, data
``evaluate``            :class:`EvaluateConfig`          model, processor, policies, bench, space
======================  ===============================  ======================================

:class:`mpsearch.pipeline.RunConfig` (the ``mpsearch run`` YAML) composes them: its
``profile_config()`` ... ``evaluate_config()`` give each stage's config, and the CLI's
subcommands fill the same classes from their flags.

Example:
    >>> cfg = SearchConfig(budget_ms=40.0, n_trials=300)
    >>> SearchConfig.resolve(cfg, {"seed": 3}, "search").seed
    3
    >>> SearchConfig.resolve(None, {"n_trails": 3}, "search")
    Traceback (most recent call last):
    ...
    TypeError: search() got an unexpected keyword argument 'n_trails'; its settings (SearchConfig): budget_ms, budget_mb, n_trials, storage, seed, sampler, study_name, front_points, seeding, progress, timeout_s
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

#: Memory for the activation method's Gram matrices per pass (MiB).
MAX_GRAM_MB = 4096

C = TypeVar("C", bound="StageConfig")


@dataclass(frozen=True)
class StageConfig:
    """Base of the workflow configs: :meth:`resolve` merges keyword settings into one."""

    @classmethod
    def resolve(cls: type[C], config: C | None, options: Mapping[str, Any], where: str) -> C:
        """``config`` (default: all defaults) with ``options`` replacing its fields.

        Raises ``TypeError`` naming the valid settings for a keyword that is not one, as
        Python does for a misspelled keyword argument.
        """
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"{where}(): config must be a {cls.__name__}, got {type(config).__name__}")
        base = config if config is not None else cls()
        fields = [f.name for f in dataclasses.fields(cls)]
        for k in options:
            if k not in fields:
                raise TypeError(f"{where}() got an unexpected keyword argument {k!r}; "
                                f"its settings ({cls.__name__}): {', '.join(fields)}")
        return dataclasses.replace(base, **dict(options)) if options else base


@dataclass(frozen=True)
class ProfileConfig(StageConfig):
    """Settings of :func:`mpsearch.profile` (see its docstring for what each means).

    Attributes:
        method: ``hessian``, ``fisher``, ``activation`` or ``kl``.
        n_samples, seed, batch_size, placement: the calibration rows drawn from the bench.
        n_probes, tol, hvp, eps: Hutchinson probes, early stop, Hessian-vector products.
        gradient_checkpointing, check_reach, max_gram_mb: memory and reach checks.
        model_name: recorded in the report (default: the model's own name).
        progress: tqdm bars.

    Example:
        >>> ProfileConfig(method="kl").n_samples
        32
    """

    method: str = "hessian"
    n_samples: int = 32
    seed: int = 0
    batch_size: int = 8
    n_probes: int = 16
    tol: float | None = None
    hvp: str = "auto"
    eps: float | None = None
    gradient_checkpointing: bool = False
    check_reach: bool = True
    max_gram_mb: float = MAX_GRAM_MB
    placement: str = "inline"
    model_name: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class LatencyConfig(StageConfig):
    """Settings of :func:`mpsearch.measure_latency_table`.

    Attributes:
        workload: the :class:`mpsearch.Workload` timed (default ``Workload()``).
        cache_dir: reuse a table measured under exactly the same key.
        method: ``auto``, ``context`` or ``isolated``; ``mixed``: random mixed policies the
            context method also runs.
        check_thread_count: warn when one thread beats the configured count (CPU).
        progress: tqdm bars.

    Example:
        >>> LatencyConfig().method
        'auto'
    """

    workload: Any = None
    cache_dir: str | None = None
    method: str = "auto"
    mixed: int | None = None
    check_thread_count: bool = True
    progress: bool = True


@dataclass(frozen=True)
class SearchConfig(StageConfig):
    """Settings of :func:`mpsearch.search`.

    Attributes:
        budget_ms, budget_mb: predicted-latency (ms) and weight-memory (MiB) budgets.
        n_trials: trials the study should hold in total; storage, study_name: where.
        seed, sampler: ``nsga2``, ``tpe``, ``gp``, ``evo`` or an Optuna sampler.
        front_points, seeding: ILP front points enqueued; ``ilp``, ``uniform`` or ``none``.
        progress, timeout_s: tqdm bar; stop claiming trials after this many seconds.

    Example:
        >>> SearchConfig(budget_ms=40.0).n_trials
        2000
    """

    budget_ms: float | None = None
    budget_mb: float | None = None
    n_trials: int = 2000
    storage: Any = None
    seed: int = 0
    sampler: Any = "nsga2"
    study_name: str | None = None
    front_points: int = 16
    seeding: str = "ilp"
    progress: bool = True
    timeout_s: float | None = None


@dataclass(frozen=True)
class RefineConfig(StageConfig):
    """Settings of :func:`mpsearch.refine`.

    Attributes:
        budget_ms, budget_mb: budgets on *measured* latency and exact weight memory.
        n_trials: trials the study should hold in total (default 50); storage, study_name.
        seed, sampler: as in :class:`SearchConfig`.
        workload: the :class:`mpsearch.Workload` timed per trial.
        n_samples, batch_size: calibration rows drawn from a bench.
        eager: quantize every (layer, format) before the study.
        progress, timeout_s: as in :class:`SearchConfig`.

    Example:
        >>> RefineConfig().n_trials is None
        True
    """

    budget_ms: float | None = None
    budget_mb: float | None = None
    n_trials: int | None = None
    storage: Any = None
    study_name: str | None = None
    seed: int = 0
    sampler: Any = "nsga2"
    workload: Any = None
    n_samples: int = 16
    batch_size: int = 4
    eager: bool = True
    progress: bool = True
    timeout_s: float | None = None


@dataclass(frozen=True)
class EvaluateConfig(StageConfig):
    """Settings of :func:`mpsearch.evaluate`.

    Attributes:
        mode: ``logits`` or ``generate``; max_new_tokens, fallback (``random``: official).
        batch_size, placement, seed: how questions are batched, where inputs go, the seed.
        results_path: JSONL file, resumable.
        include_baselines: full precision and the space's uniform policies first.
        uniform: the formats whose uniform policies are included (None: every format of the
            space; a format the space lacks raises).
        workload, latency_table, measure_latency: what is timed, and whether.
        progress: tqdm bars.

    Example:
        >>> EvaluateConfig().mode
        'logits'
    """

    mode: str = "logits"
    batch_size: int = 8
    results_path: Any = None
    workload: Any = None
    latency_table: Any = None
    include_baselines: bool = True
    uniform: Any = None
    seed: int = 0
    max_new_tokens: int = 32
    placement: str = "inline"
    fallback: str = "random"
    measure_latency: bool = True
    progress: bool = True


__all__ = ["StageConfig", "ProfileConfig", "LatencyConfig", "SearchConfig", "RefineConfig", "EvaluateConfig",
           "MAX_GRAM_MB"]
