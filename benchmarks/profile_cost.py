"""Cost of the hessian sensitivity profile as the model grows: does it stay a few gradients per probe?

    python benchmarks/profile_cost.py                 # 2x, 4x, 8x the blocks of tiny:llava, 16 probes
    python benchmarks/profile_cost.py --scales 2 4 8 --probes 16 --samples 8 --repeats 3 --threads 1

For tiny:llava with its vision and language block counts multiplied by 2, 4 and 8 (same widths,
same processor, random weights), prints

    ratio = (hessian profile time) / (probes x one forward+backward over the calibration set)

"one forward+backward": ``loss.backward()`` of the answer loss on every calibration batch, every
parameter trainable, the model as loaded (SDPA attention). "profile": the whole
``mps.profile(..., method="hessian")`` on the same batches: the Hutchinson probes plus scoring
(one ``quantize_weight`` per layer and format of the ``cpu`` space, a cost that does not depend
on the probe count; timed alone, its seconds are printed as ``score s``). Two Hessian-vector products:

* ``auto``: what ``hvp="auto"`` runs on fp32 weights: finite differences (two gradients per probe,
  the model's own SDPA attention);
* ``hvp``: exact double backward (``hvp="hvp"``; eager attention switched on for the run).

``probes only`` columns are the Hutchinson part alone. Times are CPU time of this process
(``time.process_time``, one thread), so that other jobs on a shared machine do not distort
them; medians of ``--repeats`` interleaved runs. Goal (issue 3): ratio <= 3 and flat.
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
    """CPU seconds of one forward+backward of the answer loss over all batches."""
    from mpsearch.sensitivity.calib import answer_loss, n_answer_tokens

    total = n_answer_tokens(batches)
    model.zero_grad(set_to_none=True)
    t0 = time.process_time()
    for b in batches:
        (answer_loss(model, b, reduction="sum") / total).backward()
    dt = time.process_time() - t0
    model.zero_grad(set_to_none=True)
    return dt


def time_profile(model, processor, layers, space, batches, probes: int, hvp: str) -> tuple[float, float]:
    """CPU seconds of the whole profile, and of its Hutchinson part alone (same settings)."""
    import mpsearch as mps
    from mpsearch.models import get_module
    from mpsearch.sensitivity import hutchinson
    from mpsearch.sensitivity.calib import answer_loss, n_answer_tokens
    from mpsearch.sensitivity.profiler import _attention_for, auto_hvp

    t0 = time.process_time()
    r = mps.profile(model, processor, None, layers, space, method="hessian", n_probes=probes, batches=batches,
                    hvp=hvp, progress=False)
    whole = time.process_time() - t0
    assert r.meta["n_probes"] == probes and r.meta["hvp"] == ("fd" if hvp == "auto" else hvp)
    total = n_answer_tokens(batches)
    parts = [(lambda b=b: answer_loss(model, b, reduction="sum") / total) for b in batches]
    modules = {l.name: get_module(model, l.name) for l in layers}
    with _attention_for(model, auto_hvp(modules) if hvp == "auto" else hvp) as (method, _):
        t0 = time.process_time()
        hutchinson(model, parts, modules, n_probes=probes, method=method)
        probes_only = time.process_time() - t0
    return whole, probes_only


def time_scoring(model, layers, space) -> float:
    """CPU seconds of the scoring step alone: ``quantize_weight`` per layer and candidate format."""
    from mpsearch.models import get_module
    from mpsearch.sensitivity.profiler import _per_format

    modules = {l.name: get_module(model, l.name) for l in layers}
    candidates = {l.name: space.candidates(l) for l in layers}
    t0 = time.process_time()
    _per_format(modules, candidates, lambda n, w, q: float((q - w.float()).pow(2).sum()))
    return time.process_time() - t0


def main() -> None:
    import mpsearch as mps
    from mpsearch.sensitivity import calibration_batches
    from mpsearch.tasks import synthetic

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--space", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = synthetic.generate("dev", args.samples, seed=0)
    space = mps.SearchSpace.from_yaml(args.space)
    print(f"CPU time; torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.samples} samples in batches "
          f"of {args.batch_size}, {args.probes} probes, space {space.name} ({len(space.formats())} formats), "
          f"medians of {args.repeats}")
    print(f"{'scale':>5} {'linears':>7} {'fwd+bwd ms':>10} | {'auto (fd): ratio':>16} {'probes only':>11} | "
          f"{'hvp: ratio':>10} {'probes only':>11} | {'score s':>7}")
    for scale in args.scales:
        model, processor = build(scale)
        layers = mps.discover_layers(model)
        batches = calibration_batches(model, processor, rows, n_samples=args.samples, batch_size=args.batch_size)
        time_forward_backward(model, batches)  # warm-up: lazy imports, allocator, first quantizations
        time_profile(model, processor, layers, space, batches, 1, "auto")
        time_profile(model, processor, layers, space, batches, 1, "hvp")
        fb, auto, auto_p, hvp, hvp_p, score = [], [], [], [], [], []
        for _ in range(args.repeats):
            fb.append(time_forward_backward(model, batches))
            w, p = time_profile(model, processor, layers, space, batches, args.probes, "auto")
            auto.append(w)
            auto_p.append(p)
            w, p = time_profile(model, processor, layers, space, batches, args.probes, "hvp")
            hvp.append(w)
            hvp_p.append(p)
            score.append(time_scoring(model, layers, space))
            fb.append(time_forward_backward(model, batches))
        f, a, ap_, h, hp, sc = (statistics.median(x) for x in (fb, auto, auto_p, hvp, hvp_p, score))
        unit = args.probes * f
        print(f"{scale:>4}x {len(layers):>7} {f * 1e3:>10.1f} | {a / unit:>16.2f} {ap_ / unit:>11.2f} | "
              f"{h / unit:>10.2f} {hp / unit:>11.2f} | {sc:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
