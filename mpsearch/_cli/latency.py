"""``mpsearch latency MODEL``: measure the per-layer latency table on this machine, optionally validated.

Example:
    $ mpsearch latency tiny:llava --space cpu --workload batch=1,phase=prefill,threads=1 -o latency.json
    $ mpsearch latency demo --space cpu --workload threads=1 --validate 20 --cache-dir ~/.cache/mpsearch
    $ mpsearch latency OpenGVLab/InternVL2-2B --device cuda --dtype bfloat16 --space gpu-ao \\
          --workload phase=decode,prompt_tokens=256 -o latency.json
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from mpsearch._cli.common import add_model_args, fmt_bytes


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``latency`` subcommand to the ``mpsearch`` parser."""
    p = sub.add_parser(
        "latency",
        help="measure a per-layer latency table on this device (and check it end to end)",
        description="Time every unique (layer shape, format, tokens) of MODEL for the search space's formats on "
                    "this device, plus the rest of the model as a base term, and write the table. With "
                    "--validate K, time the uniform policies and K random ones end to end, print predicted vs "
                    "measured and the median and worst relative error, and fit a correction where the table is "
                    "off by more than the noise.",
    )
    add_model_args(p)
    p.add_argument("--space", required=True, help="search space: a shipped name (cpu, gpu-bnb, gpu-ao, llm-only) or a YAML file")
    p.add_argument("--workload", default="",
                   help="key=value list: batch, image_size, prompt_tokens, new_tokens, phase (prefill|decode|both), "
                        "compile (true|false|mode|backend: each Linear configuration compiled once), threads "
                        "(more than 1 on a CPU: warns when one thread runs the model faster), repeats, warmup, "
                        "stat (median|min); e.g. batch=1,phase=prefill,threads=1")
    p.add_argument("--method", default="auto", choices=("auto", "context", "isolated"),
                   help="context: hooks time each Linear inside the real forward (default); isolated: each unique "
                        "shape alone (used with compile)")
    p.add_argument("--mixed", type=int, default=None, metavar="N",
                   help="context method: random mixed configurations timed besides the uniform ones "
                        "(default: twice the number of formats)")
    p.add_argument("--validate", type=int, default=0, metavar="K",
                   help="time the uniform policies and K random policies end to end and compare")
    p.add_argument("--correct", default="auto", choices=("auto", "always", "never"),
                   help="with --validate: write the table corrected by the fitted offset + per-format scale "
                        "(auto: only where the error exceeds the noise and cross-validation says it helps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random validation policies")
    p.add_argument("--cache-dir", default=None, help="reuse a table measured under exactly the same key here")
    p.add_argument("--report", default=None, help="also write the validation rows as JSON here")
    p.add_argument("-o", "--output", default=None, help="write the latency table (JSON) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measure (or load from cache), print a summary, validate if asked, write the table."""
    from mpsearch._cli.common import load_model
    from mpsearch.errors import MpsError
    from mpsearch.latency import Workload, measure_latency_table, validate_table
    from mpsearch.latency.workload import token_counts
    from mpsearch.models import discover_layers
    from mpsearch.space import SearchSpace

    workload = Workload.parse(args.workload)
    if args.validate < 0:
        raise MpsError(f"--validate K must be >= 0, got {args.validate}")
    if args.correct == "always" and not args.validate:
        raise MpsError("--correct always needs --validate K (the correction is fitted on end-to-end runs)")
    model, processor = load_model(args)
    space = SearchSpace.from_yaml(args.space)
    layers = discover_layers(model)
    if workload.inputs is None and workload.processor is None:
        try:
            token_counts(model, workload)
        except MpsError as exc:
            if processor is None:
                raise
            print(f"note: {exc}; building the timing inputs with the model's processor instead", file=sys.stderr)
            workload = workload.with_(processor=processor)
    from mpsearch.configs import LatencyConfig

    config = LatencyConfig(workload=workload, cache_dir=args.cache_dir, method=args.method, mixed=args.mixed,
                           progress=not args.no_progress)
    table = measure_latency_table(model, layers, space, config=config)
    out = print
    _summary(out, model, layers, space, table, workload)
    if args.validate:
        report = validate_table(table, model, layers, space, workload, k=args.validate, seed=args.seed,
                                progress=not args.no_progress)
        roof = _roofline_fn(model, layers, table, workload)
        out("")
        out("validation (measured = median of interleaved end-to-end runs; corrected* = leave-one-out):")
        for line in report.lines(roofline=roof):
            out("  " + line)
        out(report.summary())
        table.meta["validation"] = {k: v for k, v in report.to_dict().items() if k != "rows"}
        table = _maybe_correct(out, table, report, args.correct)
        if args.report:
            from mpsearch.artifacts import atomic_write_json, provenance

            atomic_write_json(args.report, {"schema": 1, "kind": "latency-validation", **report.to_dict(),
                                            "provenance": provenance(device=report.device)})
            out(f"wrote {args.report}")
    if args.output:
        table.to_json(args.output)
        out(f"wrote {args.output}")
    return 0


def _maybe_correct(out: Callable[[str], Any], table: Any, report: Any, mode: str) -> Any:
    c = report.correction
    if mode == "never":
        return table
    if c is None:
        if mode == "always":
            from mpsearch.errors import MpsError

            raise MpsError("--correct always: too few validation policies to fit a correction; raise --validate K")
        out("correction: not fitted (too few policies for offset + one scale per format)")
        return table
    scales = ", ".join(f"{f} x{s:.3f}" for f, s in c.scale.items())
    helps = c.cv_median_error is not None and c.cv_median_error < report.median_error
    needed = report.median_error > report.noise
    if mode == "always" or (helps and needed):
        out(f"correction applied: base {c.base_ms:.3f} ms, {scales} (cross-validated median error "
            f"{c.cv_median_error * 100:.1f}% vs {report.median_error * 100:.1f}% uncorrected)")
        return c.apply(table)
    why = "the error is within the measurement noise" if not needed else "it does not help under cross-validation"
    out(f"correction not applied: {why} (fitted: base {c.base_ms:.3f} ms, {scales})")
    return table


def _weights_read(model: Any, layers: Sequence[Any], policy: Any, table: Any) -> int:
    """Bytes of Linear weights one timed call reads under ``policy`` (layers that do not run excluded)."""
    from mpsearch.formats import get_format
    from mpsearch.models import get_module

    total = 0
    for x in layers:
        row = table.ms.get(x.name, {})
        if row and all(v == 0.0 for v in row.values()):
            continue  # not run in this phase (vision layers in decode)
        dtype = get_module(model, x.name).weight.dtype
        total += get_format(policy.format_for(x.name)).storage_bytes(x.in_features, x.out_features, x.bias, dtype)
    return total


def _roofline_fn(model: Any, layers: Sequence[Any], table: Any, workload: Any) -> Callable[[Any], float | None] | None:
    from mpsearch.latency import bandwidth_bytes_per_s, roofline_ms

    device = table.device or ""
    if bandwidth_bytes_per_s(device) is None:
        return None
    steps = 1 if workload.phase != "both" else 1 + workload.new_tokens

    def bound(policy: Any) -> float | None:
        return steps * roofline_ms(_weights_read(model, layers, policy, table), device)

    return bound


def _summary(out: Callable[[str], Any], model: Any, layers: Sequence[Any], space: Any, table: Any, workload: Any) -> None:
    from mpsearch.formats import policy_memory_bytes
    from mpsearch.latency import bandwidth_bytes_per_s, uniform_policies

    m = table.meta
    out(f"model {m.get('model')} on {table.device}: {len(layers)} linear layers, dtype {m.get('dtype')}, "
        f"threads {m.get('threads')}")
    out(f"workload {workload.to_dict()}; method {m.get('method')}; unique keys per phase {m.get('unique_keys')}; "
        f"forward passes {m.get('forward_passes')}; {m.get('seconds', '?')} s")
    rows = m.get("rows_observed") or {}
    for phase, groups in rows.items():
        desc = ", ".join(f"{g} {sorted({sum(r) for r in rs})}" for g, rs in groups.items())
        out(f"rows per Linear call ({phase}): {desc}")
    out(f"base (everything but the Linear layers): {table.base_ms:.3f} ms")
    roof = _roofline_fn(model, layers, table, workload)
    head = f"  {'policy':<24} {'predicted ms':>12} {'weights':>12}"
    if roof is not None:
        head += f" {'roofline ms':>12}"
    out(head)
    for pol in uniform_policies(space, layers):
        line = f"  {pol.meta['label'][:24]:<24} {table.predict(pol):12.3f} {fmt_bytes(policy_memory_bytes(model, pol)):>12}"
        if roof is not None:
            line += f" {roof(pol):12.3f}"
        out(line)
    if roof is None:
        out(f"  (no roofline: memory bandwidth of {table.device!r} not known)")
    else:
        out(f"  roofline = Linear weights read once at {bandwidth_bytes_per_s(table.device or '') / 1e12:.2f} TB/s "
            "(a lower bound; activations and the KV cache come on top)")
