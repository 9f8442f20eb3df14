"""Cost of the hessian sensitivity profile as the model grows: does it stay a few gradients per probe?

    python benchmarks/profile_cost.py                 # 2x, 4x, 8x the layers of tiny:llava, 8 probes
    python benchmarks/profile_cost.py --scales 2 4 8 --probes 8 --samples 8 --threads 1

For tiny:llava with its vision and language block counts multiplied by 2, 4 and 8 (same widths,
same processor), prints

    ratio = (hessian profile wall time) / (probes x one forward+backward over the calibration set)

where "one forward+backward" is a plain ``loss.backward()`` of the answer loss on every
calibration batch with every parameter trainable (the model as loaded, SDPA attention), and
the profile is ``mps.profile(..., method="hessian")`` on the same batches: Hutchinson probes
(exact Hessian-vector products by double backward, eager attention switched on for the run) plus
the per-format quantization errors of the ``cpu`` search space. Also printed: the Hutchinson
part alone (``hutch.only``), the finite-difference variant (``hvp="fd"``, whole profile) and the
per-format scoring time (``score s``: one ``quantize_weight`` per layer and format, independent of
the probe count). Times are CPU time of this process (``time.process_time``, one thread by
default), so that other jobs on a shared machine do not distort them; medians of ``--repeats``
runs, interleaved. Goal (issue 3): ratio <= 3 and flat as the layers grow.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def build(scale: int):
    """tiny:llava with ``scale`` times the vision and language blocks (random weights, seed 0)."""
    import copy

    import mpsearch as mps

    base, processor = mps.load_vlm("tiny:llava")
    cfg = copy.deepcopy(base.config)
    cfg.vision_config.num_hidden_layers = base.config.vision_config.num_hidden_layers * scale
    cfg.text_config.num_hidden_layers = base.config.text_config.num_hidden_layers * scale
    torch.manual_seed(0)
    model = type(base)(cfg).eval()
    return model, processor


def time_forward_backward(model, batches) -> float:
    from mpsearch.sensitivity.calib import answer_loss, n_answer_tokens

    total = n_answer_tokens(batches)
    model.zero_grad(set_to_none=True)
    t0 = time.process_time()
    for b in batches:
        (answer_loss(model, b, reduction="sum") / total).backward()
    dt = time.process_time() - t0
    model.zero_grad(set_to_none=True)
    return dt


def time_hutchinson(model, batches, layers, probes: int) -> float:
    """CPU seconds of the Hutchinson estimate alone (as profile runs it: eager attention, exact HVP)."""
    from mpsearch.models import get_module
    from mpsearch.sensitivity import hutchinson
    from mpsearch.sensitivity.calib import answer_loss, n_answer_tokens
    from mpsearch.sensitivity.profiler import _attention_for

    total = n_answer_tokens(batches)
    parts = [(lambda b=b: answer_loss(model, b, reduction="sum") / total) for b in batches]
    modules = {l.name: get_module(model, l.name) for l in layers}
    with _attention_for(model, "auto") as (method, _):
        t0 = time.process_time()
        hutchinson(model, parts, modules, n_probes=probes, method=method)
        return time.process_time() - t0


def main() -> None:
    import mpsearch as mps
    from mpsearch.sensitivity import calibration_batches
    from mpsearch.tasks import synthetic

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--space", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = synthetic.generate("dev", args.samples, seed=0)
    space = mps.SearchSpace.from_yaml(args.space)
    print(f"CPU time; torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.samples} samples in batches of "
          f"{args.batch_size}, {args.probes} probes, space {space.name}, medians of {args.repeats}")
    print(f"{'scale':>5} {'linears':>7} {'fwd+bwd ms':>10} {'profile s':>9} {'ratio':>6} {'hutch.only':>10} "
          f"{'fd ratio':>8} {'score s':>7}")
    for scale in args.scales:
        model, processor = build(scale)
        layers = mps.discover_layers(model)
        batches = calibration_batches(model, processor, rows, n_samples=args.samples, batch_size=args.batch_size)
        time_forward_backward(model, batches)  # warm-up (lazy imports, allocator, first quantizations)
        mps.profile(model, processor, None, layers, space, method="hessian", n_probes=1, batches=batches, progress=False)
        fb, prof, hutch, fd = [], [], [], []
        for _ in range(args.repeats):
            fb.append(time_forward_backward(model, batches))
            t0 = time.process_time()
            r = mps.profile(model, processor, None, layers, space, method="hessian", n_probes=args.probes,
                            batches=batches, progress=False)
            prof.append(time.process_time() - t0)
            hutch.append(time_hutchinson(model, batches, layers, args.probes))
            t0 = time.process_time()
            mps.profile(model, processor, None, layers, space, method="hessian", n_probes=args.probes,
                        batches=batches, hvp="fd", progress=False)
            fd.append(time.process_time() - t0)
            fb.append(time_forward_backward(model, batches))
        assert r.meta["hvp"] == "hvp" and r.meta["n_probes"] == args.probes
        f, p, h, d = (statistics.median(x) for x in (fb, prof, hutch, fd))
        unit = args.probes * f
        print(f"{scale:>4}x {len(layers):>7} {f * 1e3:>10.1f} {p:>9.2f} {p / unit:>6.2f} {h / unit:>10.2f} "
              f"{d / unit:>8.2f} {p - h:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
