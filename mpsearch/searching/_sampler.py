"""``BudgetSampler``: an Optuna sampler whose moves keep the budget (EvoPress-style).

Black-box samplers waste almost every trial at 300 decisions: a random policy is far outside
a tight latency budget, and NSGA-II's uniform crossover and per-parameter mutation rarely
land back inside it. This sampler knows each decision's per-format cost (the latency table
and exact bytes of a :class:`ProxyProblem`) and proposes children that fit the budget:

* **exchange** (EvoPress's level switch): from a good feasible parent, move one decision to
  another format and compensate with another decision so the predicted cost stays within the
  budget (raise one layer's precision, lower another's); half of the exchanges are *guided*:
  the raised decision is one of those the sensitivity table says gain most loss per unit of
  cost, and the budget is repaired by the cheapest loss-per-saved-cost moves elsewhere;
* **crossover** of two Pareto/elite parents (uniform), then **repair** into the budget by the
  cheapest loss-per-saved-cost moves of the sensitivity table;
* **mutation** of a Pareto parent (1-3 random decisions), repaired likewise.

The first trials (no complete trial yet) are random policies repaired into the budget. It
reads the completed trials from the study on every call, keeps no state that matters (a cache
of parsed trials only), and draws each trial's randomness from ``(seed, trial.number)``: it
works with any storage, with several workers, and optuna-dashboard shows its trials like any
other. Parents are chosen by the trials' objective values, so in ``refine`` (measured KL and
latency) the proxy only guides repairs and budget keeping. With ``calibrate=True`` the latency
budget of the moves is rescaled by the median measured/predicted latency ratio of completed
trials (user attributes ``measured_latency_ms`` / ``predicted_latency_ms``).

Example:
    >>> sampler = BudgetSampler(problem, budget_ms=40.0, seed=0)          # doctest: +SKIP
    >>> study = optuna.create_study(directions=["minimize"] * 2, sampler=sampler)  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import heapq
from typing import Any, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from mpsearch.searching._front import dominates
from mpsearch.searching._proxy import ProxyProblem


class BudgetSampler(optuna.samplers.BaseSampler):
    """Evolutionary sampler with budget-keeping moves over a :class:`ProxyProblem`'s decisions.

    Example:
        >>> s = BudgetSampler(problem, budget_ms=40.0, seed=0)   # doctest: +SKIP
    """

    def __init__(
        self,
        problem: ProxyProblem,
        budget_ms: float | None = None,
        budget_bytes: int | None = None,
        seed: int | None = None,
        p_exchange: float = 0.6,
        p_crossover: float = 0.25,
        p_guided: float = 0.6,
        guided_top: int = 8,
        max_moves: int = 3,
        elite_size: int = 16,
        calibrate: bool = False,
    ) -> None:
        self.problem = problem
        self.budget_ms = budget_ms
        self.budget_bytes = budget_bytes
        self.seed = 0 if seed is None else int(seed)
        self.p_exchange = p_exchange
        self.p_crossover = p_crossover
        self.p_guided = p_guided
        self.guided_top = guided_top
        self.max_moves = max_moves
        self.elite_size = elite_size
        self.calibrate = calibrate
        self._free = np.array(problem.free, dtype=np.int64)
        self._keys = [problem.decisions[d].key for d in problem.free]
        self._choices = [problem.decisions[d].choices for d in problem.free]
        self._nch = np.array([len(c) for c in self._choices], dtype=np.int64)
        self._random = optuna.samplers.RandomSampler(seed=seed)
        # cost tables over free decisions, padded to the widest choice list
        width = int(self._nch.max()) if len(self._nch) else 1
        fixed = [d for d in range(problem.n) if d not in set(problem.free)]
        self._budgets: list[tuple[np.ndarray, float]] = []  # (cost table [free, width], limit for the free part)
        if budget_ms is not None and problem.ms_tab is not None:
            const = problem.ms_offset + sum(float(problem.ms_tab[d][0]) for d in fixed)
            self._budgets.append((self._pad(problem.ms_tab, width), float(budget_ms) - const))
        if budget_bytes is not None and problem.bytes_tab is not None:
            const = problem.bytes_offset + sum(float(problem.bytes_tab[d][0]) for d in fixed)
            self._budgets.append((self._pad(problem.bytes_tab, width), float(budget_bytes) - const))
        self._loss = self._pad(problem.loss_tab, width, fill=np.inf)
        self._pops: dict[str, _Pop] = {}

    def _pad(self, tab: Sequence[np.ndarray], width: int, fill: float = np.inf) -> np.ndarray:
        out = np.full((len(self._free), width), fill, dtype=float)
        for i, d in enumerate(self._free):
            out[i, : len(tab[d])] = np.asarray(tab[d], dtype=float)
        return out

    # -- Optuna interface -------------------------------------------------------------------
    def reseed_rng(self) -> None:
        """Called by Optuna in forked workers; randomness is per trial number already."""
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """One categorical per free decision, fixed choices per name."""
        return {k: CategoricalDistribution(list(c)) for k, c in zip(self._keys, self._choices)}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """A whole policy at once (every decision), within the budget by construction."""
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}
        rng = np.random.RandomState(self._trial_seed(trial.number))
        pop = self._population(study)
        seen = pop.seen
        child = None
        for _attempt in range(20):
            child = self._propose(pop, rng, self._limits(study))
            if child.tobytes() not in seen:
                break
        assert child is not None
        return {k: self._choices[i][int(child[i])] for i, k in enumerate(self._keys) if k in search_space}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        """Parameters outside the decisions (none in mpsearch's studies): random."""
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    # -- population ---------------------------------------------------------------------------
    def _trial_seed(self, number: int) -> int:
        h = hashlib.sha256(f"{self.seed}:{number}".encode()).digest()
        return int.from_bytes(h[:4], "little")

    def _population(self, study: optuna.Study) -> "_Pop":
        """Parsed complete trials of the study: all, feasible, and the feasible Pareto archive."""
        pop = self._pops.setdefault(study.study_name, _Pop())
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in pop.numbers:
                continue
            pop.numbers.add(t.number)
            vec = self._vector(t.params)
            if vec is None or t.values is None:
                continue
            viol = float(sum(max(0.0, float(v)) for v in t.constraints.values()))
            pop.add((vec, tuple(float(v) for v in t.values), viol))
        return pop

    def _vector(self, params: dict[str, Any]) -> np.ndarray | None:
        vec = np.empty(len(self._keys), dtype=np.int64)
        for i, (k, ch) in enumerate(zip(self._keys, self._choices)):
            if k not in params or params[k] not in ch:
                return None
            vec[i] = ch.index(params[k])
        return vec

    def _limits(self, study: optuna.Study) -> list[float]:
        limits = [lim for _, lim in self._budgets]
        if self.calibrate and self.budget_ms is not None and self._budgets:
            ratios = []
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                m, p = t.user_attrs.get("measured_latency_ms"), t.user_attrs.get("predicted_latency_ms")
                if m and p:
                    ratios.append(float(m) / float(p))
            if ratios:
                # the predicted total must stay under budget / ratio: shift the free part's limit
                scale = float(np.median(ratios))
                total_limit = self.budget_ms / scale
                limits[0] = limits[0] - (self.budget_ms - total_limit)
        return limits

    # -- proposals ----------------------------------------------------------------------------
    def _propose(self, pop: "_Pop", rng: np.random.RandomState, limits: list[float]) -> np.ndarray:
        if not pop.feasible:
            if pop.items:
                parent = min(pop.items, key=lambda p: (p[2], p[1]))[0].copy()
                return self._repair(self._mutate(parent, rng), rng, limits)
            return self._repair(self._random_vector(rng), rng, limits)
        elite = heapq.nsmallest(self.elite_size, pop.feasible, key=lambda p: p[1])
        front = pop.archive
        u = rng.random_sample()
        if u < self.p_exchange:
            parent = self._tournament(elite, rng)
            if rng.random_sample() < self.p_guided:
                return self._guided_exchange(parent.copy(), rng, limits)
            return self._exchange(parent.copy(), rng, limits)
        if u < self.p_exchange + self.p_crossover and len(elite) + len(front) > 1:
            pool = elite + front
            a = self._tournament(pool, rng)
            b = self._tournament(pool, rng)
            mask = rng.random_sample(len(a)) < 0.5
            child = np.where(mask, a, b)
            return self._repair(child, rng, limits)
        parent = front[rng.randint(len(front))][0].copy()
        return self._repair(self._mutate(parent, rng), rng, limits)

    def _tournament(self, pool: list[tuple[np.ndarray, tuple[float, ...], float]], rng: np.random.RandomState, k: int = 2) -> np.ndarray:
        picks = [pool[rng.randint(len(pool))] for _ in range(k)]
        return min(picks, key=lambda p: p[1])[0]

    def _random_vector(self, rng: np.random.RandomState) -> np.ndarray:
        return (rng.random_sample(len(self._nch)) * self._nch).astype(np.int64)

    def _mutate(self, vec: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        for _ in range(rng.randint(1, self.max_moves + 1)):
            i = rng.randint(len(vec))
            if self._nch[i] > 1:
                vec[i] = (vec[i] + 1 + rng.randint(self._nch[i] - 1)) % self._nch[i]
        return vec

    def _costs(self, vec: np.ndarray) -> np.ndarray:
        idx = np.arange(len(vec))
        return np.array([float(tab[idx, vec].sum()) for tab, _ in self._budgets])

    def _exchange(self, vec: np.ndarray, rng: np.random.RandomState, limits: list[float]) -> np.ndarray:
        """EvoPress level switch: change one decision, compensate with another, stay in budget."""
        if not self._budgets:
            return self._mutate(vec, rng)
        lim = np.array(limits)
        cost = self._costs(vec)
        for _ in range(rng.randint(1, self.max_moves + 1)):
            i = rng.randint(len(vec))
            if self._nch[i] < 2:
                continue
            ci = (vec[i] + 1 + rng.randint(self._nch[i] - 1)) % self._nch[i]
            di = np.array([tab[i, ci] - tab[i, vec[i]] for tab, _ in self._budgets])
            new = cost + di
            if np.all(new <= lim):
                vec[i], cost = ci, new
                if np.all(di >= 0) or rng.random_sample() < 0.5:
                    continue
            # compensate: a random other decision whose change brings every budget back in
            best = None
            for _try in range(48):
                j = rng.randint(len(vec))
                if j == i or self._nch[j] < 2:
                    continue
                cj = (vec[j] + 1 + rng.randint(self._nch[j] - 1)) % self._nch[j]
                dj = np.array([tab[j, cj] - tab[j, vec[j]] for tab, _ in self._budgets])
                if np.all(cost + (0 if vec[i] == ci else di) + dj <= lim):
                    best = (j, cj, dj)
                    break
            if best is not None:
                if vec[i] != ci:
                    vec[i], cost = ci, cost + di
                j, cj, dj = best
                vec[j], cost = cj, cost + dj
        return vec if np.all(cost <= lim) else self._repair(vec, rng, limits)

    def _guided_exchange(self, vec: np.ndarray, rng: np.random.RandomState, limits: list[float]) -> np.ndarray:
        """Raise the precision of a decision where the sensitivity table says it pays most per unit
        of cost, then repair the budget elsewhere by the cheapest loss-per-saved-cost moves."""
        if not self._budgets:
            return self._mutate(vec, rng)
        rows = np.arange(len(vec))
        tab = self._budgets[0][0]
        with np.errstate(invalid="ignore"):
            dloss = self._loss - self._loss[rows, vec][:, None]  # < 0: better
            dcost = tab - tab[rows, vec][:, None]
        ok = np.isfinite(dloss) & (dloss < 0)
        if not ok.any():
            return self._exchange(vec, rng, limits)
        with np.errstate(invalid="ignore", divide="ignore"):  # padded choices are inf
            score = np.where(ok, -dloss / np.maximum(dcost, 1e-12 * float(np.abs(tab[np.isfinite(tab)]).max())), 0.0)
        top = np.argsort(score, axis=None)[::-1][: self.guided_top]
        top = [f for f in top if score.flat[f] > 0]
        picks = rng.permutation(len(top))[: rng.randint(1, self.max_moves + 1)]
        frozen = []
        for k in picks:
            d, c = np.unravel_index(top[k], score.shape)
            if int(d) not in frozen:
                vec[d] = c
                frozen.append(int(d))
        return self._repair(vec, rng, limits, frozen=frozen)

    def _repair(self, vec: np.ndarray, rng: np.random.RandomState, limits: list[float], frozen: Sequence[int] = ()) -> np.ndarray:
        """Greedy: while over a budget, take a move with small loss increase per unit of excess removed."""
        if not self._budgets:
            return vec
        lim = np.array(limits)
        rows = np.arange(len(vec))
        for _ in range(int(self._nch.sum()) + 1):
            cost = self._costs(vec)
            over = cost - lim
            if np.all(over <= 0):
                return vec
            w = np.where(over > 0, 1.0 / np.maximum(np.abs(lim), 1e-12), 0.0)  # weight of each violated budget
            cur_loss = self._loss[rows, vec][:, None]
            saved = np.zeros_like(self._loss)
            for (tab, _), wk in zip(self._budgets, w):
                saved += wk * (tab[rows, vec][:, None] - tab)
            saved[~np.isfinite(saved)] = 0.0
            dloss = self._loss - cur_loss
            ok = (saved > 0) & np.isfinite(dloss)
            if len(frozen):
                ok[list(frozen)] = False
            if not ok.any():
                break
            score = np.where(ok, np.maximum(dloss, 0.0) / np.where(ok, saved, 1.0), np.inf)
            flat = np.argsort(score, axis=None)[: 3]
            flat = [f for f in flat if np.isfinite(score.flat[f])]
            pick = flat[rng.randint(len(flat))]
            d, c = np.unravel_index(pick, score.shape)
            vec[d] = c
        return vec


Item = tuple[np.ndarray, tuple[float, ...], float]


class _Pop:
    """Complete trials parsed so far (per study), the feasible ones and their Pareto archive."""

    def __init__(self) -> None:
        self.numbers: set[int] = set()
        self.items: list[Item] = []
        self.feasible: list[Item] = []
        self.archive: list[Item] = []
        self.seen: set[bytes] = set()

    def add(self, item: Item) -> None:
        self.items.append(item)
        self.seen.add(item[0].tobytes())
        if item[2] > 0.0:
            return
        self.feasible.append(item)
        v = item[1]
        if any(_dominates(a[1], v) or a[1] == v for a in self.archive):
            return
        self.archive = [a for a in self.archive if not _dominates(v, a[1])]
        self.archive.append(item)


_dominates = dominates  # the shared Pareto rule of mpsearch.searching._front
