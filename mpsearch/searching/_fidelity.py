"""How well the additive proxy predicted what refine measured: rank correlations with their counts.

From a refined front (``refine``'s :class:`Front`, or its file): Spearman's rho of the proxy
loss against the measured KL and of the predicted against the measured latency, each with the
number of policies behind it, and the median relative latency error. Refine records these
over *all* its complete trials in ``meta["fidelity"]``; when that is absent (an older file, or
a front assembled by hand) they are computed from the front's own candidates (fewer policies:
the Pareto set only), and ``source`` says which.

Example:
    >>> from mpsearch.policy import Policy
    >>> from mpsearch.searching._front import Candidate
    >>> cs = [Candidate(Policy({"l": f}), loss, ms, None, "t", kl=kl, measured_latency_ms=m)
    ...       for f, loss, ms, kl, m in [("fp32", 0.0, 9.0, 0.00, 10.0), ("bnb.int8", 1.0, 5.0, 0.02, 6.0),
    ...                                  ("bnb.nf4", 2.0, 3.0, 0.05, 3.5)]]
    >>> fid = proxy_fidelity(cs)
    >>> fid["spearman_proxy_kl"], fid["n_proxy_kl"], fid["spearman_latency"], fid["n_latency"]
    (1.0, 3, 1.0, 3)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence


def proxy_fidelity(refined: Any) -> dict[str, Any]:
    """Spearman of proxy loss vs measured KL and of predicted vs measured latency, with counts.

    ``refined``: a refined :class:`Front` (or a list of candidates with ``kl`` and
    ``measured_latency_ms``), or the path of a refined front file. Returns
    ``{"spearman_proxy_kl", "n_proxy_kl", "spearman_latency", "n_latency",
    "median_latency_error", "source"}``; a rho is None with fewer than 3 policies or a
    constant side.

    Example:
        >>> proxy_fidelity([])["n_proxy_kl"]
        0
    """
    if isinstance(refined, (str, Path)):
        from mpsearch.searching._front import read_front

        refined = read_front(refined)
    meta = getattr(refined, "meta", None) or {}
    rec = meta.get("fidelity")
    if isinstance(rec, dict) and int(rec.get("n") or 0) > 0:
        n = int(rec["n"])
        has_kl = "spearman_proxy_kl" in rec
        has_lat = "spearman_predicted_measured_latency" in rec
        return {
            "spearman_proxy_kl": rec.get("spearman_proxy_kl"),
            "n_proxy_kl": n if has_kl else 0,
            "spearman_latency": rec.get("spearman_predicted_measured_latency"),
            "n_latency": n if has_lat else 0,
            "median_latency_error": rec.get("median_latency_error"),
            "source": f"refine trials ({n})",
        }
    cands = list(refined)
    kl_pairs = [(c.proxy_loss, c.kl) for c in cands if _num(c.proxy_loss) and _num(c.kl)]
    lat_pairs = [(c.predicted_latency_ms, c.measured_latency_ms) for c in cands
                 if _num(c.predicted_latency_ms) and _num(c.measured_latency_ms)]
    errs = sorted(abs(m - p) / m for p, m in lat_pairs if m)
    return {
        "spearman_proxy_kl": _rho(kl_pairs),
        "n_proxy_kl": len(kl_pairs),
        "spearman_latency": _rho(lat_pairs),
        "n_latency": len(lat_pairs),
        "median_latency_error": errs[len(errs) // 2] if errs else None,
        "source": f"refined front candidates ({len(cands)})",
    }


def fidelity_lines(fid: dict[str, Any]) -> list[str]:
    """Terminal lines for :func:`proxy_fidelity`'s result.

    Example:
        >>> fidelity_lines({"spearman_proxy_kl": 0.29, "n_proxy_kl": 16, "spearman_latency": -0.21, "n_latency": 16,
        ...                 "median_latency_error": 0.1, "source": "refine trials (16)"})[1]
        '  proxy loss vs measured KL:          Spearman +0.29 over 16 policies'
    """
    def rho(v: Any) -> str:
        return "-" if v is None else f"{float(v):+.2f}"

    lines = [f"proxy fidelity (from {fid.get('source', '?')}):",
             f"  proxy loss vs measured KL:          Spearman {rho(fid.get('spearman_proxy_kl'))} over {fid.get('n_proxy_kl', 0)} policies",
             f"  predicted vs measured latency:      Spearman {rho(fid.get('spearman_latency'))} over {fid.get('n_latency', 0)} policies"]
    err = fid.get("median_latency_error")
    if err is not None:
        lines.append(f"  median relative latency error:      {100 * float(err):.1f}%")
    return lines


def _num(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))


def _rho(pairs: Sequence[tuple[float, float]]) -> float | None:
    if len(pairs) < 3:
        return None
    a, b = [float(x) for x, _ in pairs], [float(y) for _, y in pairs]
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)
