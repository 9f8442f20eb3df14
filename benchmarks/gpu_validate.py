"""One prepared GPU run: every CUDA path of mpsearch on a real-size random-weight VLM, in minutes.

    python benchmarks/gpu_validate.py                       # Qwen2-VL-2B architecture, bf16, CUDA (< 8 min)
    python benchmarks/gpu_validate.py --smoke               # same code path, tiny:qwen2_vl on CPU (< 60 s)
    python benchmarks/gpu_validate.py --out figures.json --probes 8 --trials 4

Builds Qwen2-VL-2B's architecture from its config values (written below, random weights, bf16 on
CUDA), then runs, each stage timed and reported:

1. ``discover_layers``: layers per group;
2. a latency table for each of the ``gpu-ao`` and ``gpu-bnb`` spaces with ``compile`` on
   (isolated method, each Linear configuration compiled once and reused), then validation on 10
   random policies of the space, timed end to end: median and worst relative error
   (goal: median <= 5%); recompilations counted from dynamo's counters; a space whose packages
   (torchao, bitsandbytes) are missing or broken is reported as skipped with the reason;
3. a Hutchinson (``method="hessian"``) and a Fisher profile on random tokens, each against one
   forward+backward of the same batches (goal: Hutchinson <= 3x per probe);
4. the ILP (``solve_ilp``) at a budget halfway between the fastest uniform policy and bf16;
5. a 4-trial ``refine`` (real KL, real compiled latency per trial);
6. peak memory (CUDA allocator; host RSS on CPU).

Prints one line per figure and the total time, writes the figures as JSON (``--out``). A stage
that fails is reported with its error and the exit status is 1; skipped stages are not failures.
``--smoke``: ``tiny:qwen2_vl`` in fp32 on the CPU, a CPU space (fp32, torch.int8dyn, rtn.int4)
besides the two GPU spaces (which are then skipped: they need CUDA), dynamo's ``eager`` backend
(capture, guards and recompile counting without code generation), few repeats.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

#: Qwen2-VL-2B-Instruct's config.json (the values that shape the model; weights are random).
QWEN2_VL_2B = {
    "text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True, sliding_window=32768,
                 use_sliding_window=False, attention_dropout=0.0,
                 rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    "vision": dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16, in_chans=3, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
    "ids": dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
                vision_token_id=151654, image_token_id=151655, video_token_id=151656),
}
GPU_SPACES = ("gpu-ao", "gpu-bnb")


# -- setup ---------------------------------------------------------------------------------------
def build_qwen2_vl_2b(device: str, dtype: torch.dtype) -> Any:
    """Qwen2-VL-2B's architecture with random weights (seed 0), built directly in ``dtype`` on ``device``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    c = QWEN2_VL_2B
    config = Qwen2VLConfig(text_config=dict(c["text"]), vision_config=dict(c["vision"]), **c["ids"],
                           tie_word_embeddings=True)
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def smoke_space() -> Any:
    """The CPU stand-in space of ``--smoke``: a fast int8 path and mpsearch's own 4-bit format."""
    import mpsearch as mps

    fmts = ["fp32", "torch.int8dyn", "rtn.int4"]
    return mps.SearchSpace("smoke-cpu", {"vision": fmts, "projector": ["fp32"], "language": fmts, "head": ["fp32"]},
                           pin={"*lm_head": "fp32"}, tie=[["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]])


def space_unavailable(space: Any, device: str, dtype: torch.dtype) -> str | None:
    """Why ``space`` cannot run here (device, a missing or broken package), or None."""
    from torch import nn

    from mpsearch.errors import MpsError
    from mpsearch.formats import DTYPE_FORMATS, get_format

    wants = getattr(space, "device", None)
    if wants and wants != device:
        return f"space {space.name!r} is for {wants}, this run is on {device}"
    try:
        space.check_device(device)
    except MpsError as exc:
        return str(exc).split(";")[0]
    for f in space.formats():
        if DTYPE_FORMATS.get(dtype) == f:
            continue
        try:
            get_format(f).make_module(nn.Linear(256, 256, device=device, dtype=dtype))
        except Exception as exc:  # noqa: BLE001 - ImportError, a broken wheel, an unsupported GPU
            return f"format {f}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


def random_batches(model: Any, workload: Any, n: int, answer_tokens: int) -> list[dict[str, Any]]:
    """``n`` calibration batches of one row: random pixels and text ids, the last tokens as the answer."""
    from mpsearch.latency import dummy_inputs

    batches = []
    for i in range(n):
        inputs = dummy_inputs(model, workload, seed=100 + i)
        ids = inputs["input_ids"]
        labels = torch.full_like(ids, -100)
        labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
        last = torch.full((ids.shape[0],), ids.shape[1] - answer_tokens - 1, dtype=torch.long)
        batches.append({**{k: v for k, v in inputs.items()}, "labels": labels, "prompt_last": last})
    return batches


# -- the run ---------------------------------------------------------------------------------------
class Run:
    """Figures, skipped and failed stages, and stage times; one printed line per figure."""

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    def figure(self, name: str, value: Any, unit: str = "") -> None:
        self.figures[name] = value
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{name}: {shown}{(' ' + unit) if unit else ''}", flush=True)

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        print(f"{name}: skipped ({reason})", flush=True)

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - report the stage, go on with the others
            self.failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(file=sys.stderr)
            return None
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 2)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def forward_backward_s(model: Any, batches: list[dict[str, Any]], device: str) -> float:
    """Seconds of one forward+backward of the answer loss over all batches (median of 3)."""
    from mpsearch.sensitivity.calib import answer_loss, n_answer_tokens

    total = n_answer_tokens(batches)
    times = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            (answer_loss(model, b, reduction="sum") / total).backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def measure_space(run: Run, model: Any, layers: list[Any], name: str, space: Any, workload: Any, k: int) -> Any:
    """Latency table (compile on) and validation on ``k`` random policies; returns the table."""
    import mpsearch as mps
    from mpsearch.latency import compile_stats, random_policies, validate_table

    t0 = time.perf_counter()
    before = compile_stats()
    table = mps.measure_latency_table(model, layers, space, workload, progress=False, log=lambda m: print(m))
    run.figure(f"{name}.table_s", round(time.perf_counter() - t0, 2), "s")
    run.figure(f"{name}.unique_keys", sum(table.meta["unique_keys"].values()))
    run.figure(f"{name}.base_ms", table.base_ms, "ms")
    for label, pol in ((p.meta["label"], p) for p in mps.latency.uniform_policies(space, layers)):
        run.figure(f"{name}.predicted_ms[{label}]", table.predict(pol), "ms")
    after_table = compile_stats()
    run.figure(f"{name}.table_compiled_configurations", after_table["configurations"] - before["configurations"])
    pols = random_policies(space, layers, k, seed=7)
    t0 = time.perf_counter()
    report = validate_table(table, model, layers, space, workload, policies=pols, fit=True)
    after = compile_stats()
    run.figure(f"{name}.validation_s", round(time.perf_counter() - t0, 2), "s")
    run.figure(f"{name}.median_error", report.median_error)
    run.figure(f"{name}.worst_error", report.worst_error)
    run.figure(f"{name}.measurement_spread", report.noise)
    if report.correction is not None and report.correction.cv_median_error is not None:
        run.figure(f"{name}.corrected_median_error_loo", report.correction.cv_median_error)
    run.figure(f"{name}.validation_new_compilations", after["compilations"] - after_table["compilations"])
    run.figure(f"{name}.recompilations", after["recompilations"] - before["recompilations"])
    run.figure(f"{name}.graph_breaks", after["graph_breaks"] - before["graph_breaks"])
    return table


def profiles(run: Run, model: Any, layers: list[Any], space: Any, batches: list[dict[str, Any]], probes: int,
             device: str) -> Any:
    """Hutchinson and Fisher profiles, each against one forward+backward; returns the hessian report."""
    import mpsearch as mps

    fb = forward_backward_s(model, batches, device)
    run.figure("forward_backward_ms", fb * 1e3, "ms")
    sync(device)
    t0 = time.perf_counter()
    sens = mps.profile(model, None, None, layers, space, method="hessian", n_probes=probes, batches=batches,
                       progress=False)
    sync(device)
    hess = time.perf_counter() - t0
    run.figure("hutchinson_s", hess, "s")
    run.figure("hutchinson_hvp", sens.meta.get("hvp", "?"))
    run.figure("hutchinson_cost_per_probe_x_fwd_bwd", hess / (probes * fb))
    t0 = time.perf_counter()
    fisher = mps.profile(model, None, None, layers, space, method="fisher", batches=batches, progress=False)
    sync(device)
    fis = time.perf_counter() - t0
    run.figure("fisher_s", fis, "s")
    run.figure("fisher_cost_x_fwd_bwd", fis / fb)
    finite = all(math.isfinite(v) for row in sens.scores.values() for v in row.values())
    finite &= all(math.isfinite(v) for row in fisher.scores.values() for v in row.values())
    run.figure("scores_finite", bool(finite))
    return sens


def ilp_and_refine(run: Run, model: Any, layers: list[Any], space: Any, table: Any, sens: Any,
                   batches: list[dict[str, Any]], workload: Any, trials: int) -> None:
    import mpsearch as mps
    from mpsearch.latency import uniform_policies

    preds = [table.predict(p) for p in uniform_policies(space, layers)]
    ref = preds[0]
    budget = (min(preds) + ref) / 2 if min(preds) < ref else ref
    run.figure("ilp_budget_ms", budget, "ms")
    t0 = time.perf_counter()
    policy = mps.solve_ilp(sens, table, space, budget_ms=budget, layers=layers)
    run.figure("ilp_s", time.perf_counter() - t0, "s")
    run.figure("ilp_predicted_ms", table.predict(policy), "ms")
    t0 = time.perf_counter()
    front = mps.refine(model, None, [policy], space, budget_ms=None, n_trials=trials, batches=batches,
                       workload=workload, lat=table, sens=sens, layers=layers, eager=False, progress=False)
    run.figure("refine_s", time.perf_counter() - t0, "s")
    run.figure("refine_front_size", len(front))
    if len(front):
        c = front[0]
        kl = getattr(c, "kl", None) if getattr(c, "kl", None) is not None else c.policy.meta.get("kl")
        run.figure("refine_best_measured_ms", float(getattr(c, "measured_latency_ms", None) or
                                                     c.policy.meta.get("measured_latency_ms") or math.nan), "ms")
        if kl is not None:
            run.figure("refine_best_kl", float(kl))
    run.figure("refine_failures", len(getattr(front, "failures", []) or []))


def main(argv: list[str] | None = None) -> int:
    import mpsearch as mps
    from mpsearch.latency import Workload, compile_stats

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny:qwen2_vl on the CPU, same code path (< 60 s)")
    ap.add_argument("--out", default="gpu_validate.json", help="write the figures here (JSON)")
    ap.add_argument("--k", type=int, default=10, help="random policies validated per space")
    ap.add_argument("--probes", type=int, default=None, help="Hutchinson probes (default 8; smoke 2)")
    ap.add_argument("--trials", type=int, default=4, help="refine trials")
    ap.add_argument("--phase", default="prefill", choices=("prefill", "decode"))
    args = ap.parse_args(argv)
    run = Run()
    if args.smoke:
        device, dtype = "cpu", torch.float32
        torch.set_num_threads(1)
        model, _ = mps.load_vlm("tiny:qwen2_vl")
        workload = Workload(image_size=56, prompt_tokens=8, phase=args.phase, compile="eager", threads=1,
                            repeats=3, warmup=1)
        spaces = {"cpu-smoke": smoke_space(), **{n: mps.SearchSpace.from_yaml(n) for n in GPU_SPACES}}
        probes, answer, n_batches = args.probes or 2, 4, 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
            return 2
        device, dtype = "cuda", torch.bfloat16
        model = run.stage("build", lambda: build_qwen2_vl_2b(device, dtype))
        if model is None:
            return 1
        workload = Workload(image_size=448, prompt_tokens=128, phase=args.phase, compile=True, repeats=20, warmup=3)
        spaces = {n: mps.SearchSpace.from_yaml(n) for n in GPU_SPACES}
        probes, answer, n_batches = args.probes or 8, 16, 2
    run.figure("device", mps.latency.current_device_name(model))
    run.figure("torch", torch.__version__)
    run.figure("workload", json.dumps(workload.timing_key()))
    layers = run.stage("discover_layers", lambda: mps.discover_layers(model)) or []
    run.figure("layers", len(layers))
    for g in ("vision", "projector", "language", "head"):
        run.figure(f"layers.{g}", sum(1 for x in layers if x.group == g))
    tables: dict[str, Any] = {}
    for name, space in spaces.items():
        why = space_unavailable(space, device, dtype)
        if why is not None:
            run.skip(f"{name}", why)
            continue
        table = run.stage(f"latency[{name}]", lambda s=space, n=name: measure_space(run, model, layers, n, s, workload,
                                                                                   args.k))
        if table is not None:
            tables[name] = (space, table)
    primary = next(iter(tables), None)
    batches = random_batches(model, workload, n_batches, answer)
    sens = None
    if primary is None:
        run.skip("profiles", "no latency table was measured (every space skipped or failed)")
    else:
        space, table = tables[primary]
        run.figure("primary_space", primary)
        sens = run.stage("profiles", lambda: profiles(run, model, layers, space, batches, probes, device))
    if sens is not None:
        run.stage("ilp_refine", lambda: ilp_and_refine(run, model, layers, space, table, sens, batches, workload,
                                                       args.trials))
    else:
        run.skip("ilp_refine", "needs a latency table and a sensitivity profile")
    stats = compile_stats()
    run.figure("compile.configurations", stats["configurations"])
    run.figure("compile.recompilations", stats["recompilations"])
    run.figure("compile.graph_breaks", stats["graph_breaks"])
    if device == "cuda":
        run.figure("peak_cuda_memory_gib", torch.cuda.max_memory_allocated() / 2**30, "GiB")
    run.figure("peak_host_memory_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, "GiB")
    total = time.perf_counter() - run.start
    run.figure("total_s", round(total, 1), "s")
    out = {"smoke": args.smoke, "device": run.figures.get("device"), "figures": run.figures, "skipped": run.skipped,
           "failed": run.failed, "stage_seconds": run.seconds,
           "goals": {"table_median_error_max": 0.05, "hutchinson_per_probe_max": 3.0, "total_s_max": 480}}
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}; {len(run.failed)} stage(s) failed, {len(run.skipped)} skipped", flush=True)
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
