"""Arguments and helpers shared by several subcommands."""
from __future__ import annotations

import argparse
from typing import Any


def add_model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """MODEL positional (hub id, local dir, cache, ``demo`` or ``tiny:<arch>``) and loading flags."""
    if default is None:
        p.add_argument("model", help="hub id, local directory, 'demo' or 'tiny:<arch>'")
    else:
        p.add_argument("model", nargs="?", default=default, help=f"hub id, local directory, 'demo' or 'tiny:<arch>' (default {default})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: the model's)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own Python code (InternVL2 chat, XComposer2); off by default")


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the model named by :func:`add_model_args` arguments."""
    from mpsearch.models import load_vlm

    return load_vlm(args.model, device=args.device, dtype=args.dtype,
                    trust_remote_code=args.trust_remote_code, revision=args.revision)


def fmt_bytes(n: float) -> str:
    """Bytes as MiB with two decimals."""
    return f"{n / 2**20:.2f} MiB"
