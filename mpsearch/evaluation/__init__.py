"""Re-evaluating precision policies on a benchmark, with crash-safe results (``mps.evaluate``).

For each policy (the full-precision baseline -- the model as loaded -- always first, then the
uniform policies a search space allows when ``space`` is given, then the caller's), the
quantized modules are swapped into the model through a :class:`mpsearch.formats.ModuleBank`
(built once, never re-quantized), the benchmark is answered, and the original modules are put
back. Each policy's :class:`Result` holds:

* ``accuracy`` over the scored questions, with a 95 % Wilson score interval (``accuracy_ci``),
  ``per_subject`` and (MMMU) ``per_discipline`` micro-averages, and ``per_skill`` (with
  ``per_skill_ci`` and ``per_skill_n``) where the benchmark labels skills (the synthetic set:
  ``perception`` and ``reasoning``);
* ``flips``: share of scored questions whose answer differs from the baseline's;
* ``kl``: mean KL(p_fp || p_q) of the next-token distribution at the last prompt position over
  the full vocabulary, on the same prompts;
* ``latency_ms``: measured end to end by :func:`mpsearch.latency.measure_model_latency` on
  ``workload``; ``memory_bytes``: exact weight bytes under the policy
  (:func:`mpsearch.formats.policy_memory_bytes`); ``peak_memory_bytes`` on CUDA;
  ``predicted_latency_ms`` from ``latency_table.predict(policy)`` when a table is given;
* ``fallbacks``: multiple-choice answers that could not be parsed (official rule: random letter).

Answer modes (:mod:`mpsearch.evaluation.answer`):

* ``logits``: one forward pass per batch; the answer is the option letter whose token scores
  highest at the last prompt position (each letter's score is the max over its encodings after
  the generation prompt: the bare letter, and the letter after a space when that is a different
  token). Open questions cannot be answered this way: they are skipped and counted in
  ``n_skipped`` (accuracy is over multiple-choice questions only).
* ``generate``: greedy decoding (one beam, no repetition penalty, whatever the model's
  generation config says), ``max_new_tokens`` new tokens, left padding; only the new tokens are
  decoded, then parsed by the official MMMU rules (:mod:`mpsearch.tasks.mmmu`).

Results go to ``results_path`` (JSONL, one record per policy, appended and fsynced as each
policy finishes; :mod:`mpsearch.evaluation.store`). A rerun reads the file first and skips every
(policy key, benchmark, split, mode, limit, model, questions, settings) already there: a crash
loses at most the policy in progress, and nothing is written twice.

Files: ``store.py`` (Result, the JSONL store, reading policies), ``answer.py`` (the answer
pass), ``scoring.py`` (intervals, per-skill accuracy), ``run.py`` (``evaluate``).

Example:
    >>> import mpsearch as mps
    >>> model, processor = mps.load_vlm("tiny:llava")                       # doctest: +SKIP
    >>> bench = mps.load_benchmark("synthetic", "dev", limit=8)             # doctest: +SKIP
    >>> results = mps.evaluate(model, processor, [], bench, mode="logits")  # doctest: +SKIP
    >>> results[0].label, 0.0 <= results[0].accuracy <= 1.0                 # doctest: +SKIP
    ('fp32', True)
"""
from __future__ import annotations

from mpsearch.evaluation.answer import letter_token_ids
from mpsearch.evaluation.run import MODES, evaluate
from mpsearch.evaluation.scoring import skill_accuracy, wilson_ci
from mpsearch.evaluation.store import RECORD_KIND, Result, load_policies, read_results

__all__ = ["Result", "evaluate", "load_policies", "read_results", "letter_token_ids", "wilson_ci",
           "skill_accuracy", "RECORD_KIND", "MODES"]
