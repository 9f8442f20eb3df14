"""Time of each format's module relative to fp32, per layer shape and rows, measured in one run.

A benchmark, not a test: it prints what this machine does. Bits do not predict latency.

    python benchmarks/format_speed.py                 # the issue-13 grid: 9 shapes x rows 1, 64 x 6 formats, 1 thread
    python benchmarks/format_speed.py --shapes 4096x4096 --rows 1 --threads 2 --formats torch.int8wo torch.int4wo

Shapes are ``OUTxIN`` (``out_features x in_features``). Default grid: the demo's language MLP
(1024x256 up, 256x1024 down), SmolVLM-256M's (hidden 576, MLP 1536: 1536x576, 576x1536),
Qwen2-VL-2B's language model (hidden 1536, MLP 8960: 8960x1536, 1536x8960) and 2048x8192,
8192x2048; rows 1 (one decode token) and 64 (a prefill chunk); formats fp32 (``nn.Linear``),
``bf16``, ``torch.int8dyn``, ``torch.int8wo``, ``torch.int4wo``, ``rtn.int4``.

Method: a random fp32 ``nn.Linear`` (with bias) per shape, each format's module built from it
(``get_format(f).make_module``), fp32 inputs (the demo model is fp32: formats that compute in
bf16 cast in and out, and that cast is part of their time), ``torch.no_grad``, eval mode,
``torch.set_num_threads(--threads)``. Per (shape, rows): 3 warm-up calls of every module, then
``--repeats`` rounds; a round times ``inner`` back-to-back calls of every module in turn (fp32
included; ``inner`` is chosen so fp32's block lasts about ``--block-ms``). The ratio
``time(format) / time(fp32)`` is taken within each round and its median reported (below 1 =
faster than fp32): load from other processes hits a round's modules alike.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from torch import nn

from mpsearch.errors import MpsError
from mpsearch.formats import get_format

DEFAULT_SHAPES = ["1024x256", "256x1024", "1536x576", "576x1536", "8960x1536", "1536x8960", "2048x8192", "8192x2048"]
DEFAULT_ROWS = [1, 64]
DEFAULT_FORMATS = ["bf16", "torch.int8dyn", "torch.int8wo", "torch.int4wo", "rtn.int4"]
FP32 = "fp32"


def parse_shape(text: str) -> tuple[int, int]:
    """``"1024x256"`` -> ``(out_features, in_features)`` = ``(1024, 256)``.

    Example:
        >>> parse_shape("2048x8192")
        (2048, 8192)
    """
    try:
        out_f, in_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise MpsError(f"shape {text!r}: expected OUTxIN, e.g. 1024x256") from None
    return out_f, in_f


@torch.no_grad()
def _block_s(module: nn.Module, x: torch.Tensor, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        module(x)
    return (time.perf_counter() - t0) / inner


@torch.no_grad()
def time_interleaved(modules: dict[str, nn.Module], x: torch.Tensor, repeats: int, inner: int) -> dict[str, list[float]]:
    """Seconds per call of every module, round-robin: each round times ``inner`` calls of every
    module once, so load from other processes hits them alike and ratios are taken within a round.

    Example:
        >>> t = time_interleaved({"a": nn.Linear(4, 4)}, torch.randn(1, 4), repeats=2, inner=3)
        >>> len(t["a"])
        2
    """
    for m in modules.values():
        for _ in range(3):
            m(x)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name, m in modules.items():
            times[name].append(_block_s(m, x, inner))
    return times


@dataclass
class Cell:
    """One (shape, rows) row of the table: fp32's median ms and each format's median time ratio."""

    out_features: int
    in_features: int
    rows: int
    fp32_ms: float
    ratio: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def bench(out_f: int, in_f: int, rows: int, formats: list[str], repeats: int, block_ms: float, seed: int = 0) -> Cell:
    """Median fp32 ms and median within-round time ratio to fp32 of each format, one shape and row count."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f).eval()
    x = torch.randn(1, rows, in_f)
    modules: dict[str, nn.Module] = {FP32: lin}
    cell = Cell(out_f, in_f, rows, 0.0)
    for name in formats:
        try:
            modules[name] = get_format(name).make_module(lin).eval()
        except MpsError as exc:
            cell.skipped[name] = str(exc)
    one = min(_block_s(lin, x, 1) for _ in range(3))
    inner = max(1, math.ceil(block_ms / 1e3 / max(one, 1e-7)))
    times = time_interleaved(modules, x, repeats, inner)
    base = times[FP32]
    cell.fp32_ms = statistics.median(base) * 1e3
    for name, ts in times.items():
        if name != FP32:
            cell.ratio[name] = statistics.median(t / b for t, b in zip(ts, base))
    return cell


def markdown_table(cells: list[Cell], formats: list[str]) -> str:
    """The cells as a Markdown table: shape, rows, fp32 ms, then ``time / fp32 time`` per format."""
    head = "| out x in | rows | fp32 ms | " + " | ".join(formats) + " |"
    lines = [head, "|" + "---|" * (3 + len(formats))]
    for c in cells:
        vals = [f"{c.ratio[f]:.2f}" if f in c.ratio else "-" for f in formats]
        lines.append(f"| {c.out_features}x{c.in_features} | {c.rows} | {c.fp32_ms:.3f} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="OUTxIN (default: the issue-13 grid)")
    ap.add_argument("--rows", "--tokens", nargs="+", type=int, default=DEFAULT_ROWS, help="rows per call (default 1 64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds per (shape, rows)")
    ap.add_argument("--block-ms", type=float, default=20.0, help="length of fp32's timed block in a round")
    ap.add_argument("--formats", nargs="*", default=DEFAULT_FORMATS, help="formats besides fp32")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = [get_format(f).name for f in args.formats if f != FP32]
    t0 = time.time()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} interleaved rounds, fp32 inputs")
    cells = []
    for shape in args.shapes:
        out_f, in_f = parse_shape(shape)
        for rows in args.rows:
            cell = bench(out_f, in_f, rows, formats, args.repeats, args.block_ms)
            cells.append(cell)
            print(f"  {out_f}x{in_f} rows {rows}: fp32 {cell.fp32_ms:.3f} ms; "
                  + ", ".join(f"{f} {r:.2f}" for f, r in cell.ratio.items()), flush=True)
            for f, why in cell.skipped.items():
                print(f"    {f}: skipped ({why})")
    print(f"\ntime / fp32 time (below 1 = faster), {time.time() - t0:.0f} s in all\n")
    print(markdown_table(cells, formats))


if __name__ == "__main__":
    main()
