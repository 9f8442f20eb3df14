"""Speed of each format's module relative to fp32, per layer shape, measured in one run.

A benchmark, not a test: it prints what this machine does. Bits do not predict latency.

    python benchmarks/format_speed.py                       # 256x256 and 1024x256, 64 tokens, 1 thread
    python benchmarks/format_speed.py --tokens 1 --threads 2 --shapes 4096x4096

Each (shape, format) is timed with ``time.perf_counter`` after warm-up, under
``torch.no_grad`` in eval mode: ``--repeats`` rounds, each timing ``--inner`` calls of every
format in turn (fp32 included), so the ratio ``time(format) / time(fp32)`` (below 1 =
faster) is taken within a round and its median reported: robust to load from other jobs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.formats import available_formats, get_format


def _parse_shape(text: str) -> tuple[int, int]:
    """``"1024x256"`` -> (out_features=1024, in_features=256)."""
    out_f, in_f = (int(v) for v in text.lower().split("x"))
    return out_f, in_f


@torch.no_grad()
def _time_once(module: nn.Module, x: torch.Tensor, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        module(x)
    return (time.perf_counter() - t0) / inner


@torch.no_grad()
def time_interleaved(modules: dict[str, nn.Module], x: torch.Tensor, repeats: int, inner: int) -> dict[str, list[float]]:
    """Seconds per call of every module, round-robin: each round times all modules once, so
    load from other processes hits them alike and ratios are taken within a round."""
    for m in modules.values():
        for _ in range(3):
            m(x)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name, m in modules.items():
            times[name].append(_time_once(m, x, inner))
    return times


def bench_shape(out_f: int, in_f: int, formats: list[str], tokens: int, repeats: int, inner: int) -> list[tuple[str, float, float]]:
    """``(format, median ms, median within-round ratio to fp32)`` for one shape."""
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f).eval()
    x = torch.randn(1, tokens, in_f)
    modules: dict[str, nn.Module] = {"fp32 (nn.Linear)": lin}
    for name in formats:
        try:
            modules[name] = get_format(name).make_module(lin).eval()
        except MpsError as exc:
            print(f"  {name}: skipped ({exc})")
    times = time_interleaved(modules, x, repeats, inner)
    base = times["fp32 (nn.Linear)"]
    return [(name, statistics.median(ts) * 1e3, statistics.median(t / b for t, b in zip(ts, base)))
            for name, ts in times.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["256x256", "1024x256"], help="OUTxIN")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--formats", nargs="*", default=None, help="default: every format available on cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = [f for f in (args.formats or available_formats("cpu")) if f != "fp32"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.tokens} tokens, "
          f"median of {args.repeats}x{args.inner} calls")
    for shape in args.shapes:
        out_f, in_f = _parse_shape(shape)
        print(f"\n{out_f}x{in_f} (out x in)")
        print(f"  {'format':<18} {'ms':>9} {'x fp32':>8}")
        for name, ms, ratio in bench_shape(out_f, in_f, formats, args.tokens, args.repeats, args.inner):
            print(f"  {name:<18} {ms:>9.4f} {ratio:>8.2f}")


if __name__ == "__main__":
    main()
