"""Search: the exact ILP optimum of the additive proxy, the Optuna proxy search, and refine.

The fidelity ladder's first two rungs (DESIGN.md):

* :func:`solve_ilp` / :func:`ilp_front`: the exact optimum (and Pareto front) of the additive
  proxy under a latency and/or memory budget (``scipy.optimize.milp``);
* :func:`search`: an Optuna study over the proxy (NSGA-II, TPE, GP or the budget-keeping
  :class:`BudgetSampler`), seeded with the ILP front and the uniform policies;
* :func:`refine`: an Optuna study on the real model (KL to the full-precision model and
  measured latency per trial), seeded with the proxy front.

Studies live in any Optuna storage (see :mod:`mpsearch.searching._study` for the URLs); the same
study name resumes; several workers may share one study.

Example:
    >>> import mpsearch as mps                                                        # doctest: +SKIP
    >>> policy = mps.solve_ilp(sens, lat, space, budget_ms=40.0, model=model)         # doctest: +SKIP
    >>> front = mps.search(sens, lat, space, budget_ms=40.0, n_trials=500, model=model)  # doctest: +SKIP
"""
from __future__ import annotations

from mpsearch.searching._fidelity import fidelity_lines, proxy_fidelity
from mpsearch.searching._front import Candidate, Front, pareto, read_front, write_front
from mpsearch.searching._ilp import BYTES_PER_MB, ilp_front, solve_ilp
from mpsearch.searching._proxy import ProxyProblem, summarize_formats
from mpsearch.searching._sampler import BudgetSampler
from mpsearch.searching._search import SAMPLERS, search
from mpsearch.searching._study import TrialFailed, open_storage, redact

__all__ = [
    "BYTES_PER_MB",
    "BudgetSampler",
    "Candidate",
    "Front",
    "ProxyProblem",
    "SAMPLERS",
    "TrialFailed",
    "fidelity_lines",
    "ilp_front",
    "open_storage",
    "pareto",
    "proxy_fidelity",
    "read_front",
    "redact",
    "refine",
    "search",
    "solve_ilp",
    "summarize_formats",
    "write_front",
]


def __getattr__(name: str):  # refine pulls in torch: import it on first use
    if name == "refine":
        from mpsearch.searching._refine import refine

        return refine
    raise AttributeError(f"module 'mpsearch.searching' has no attribute {name!r}")
