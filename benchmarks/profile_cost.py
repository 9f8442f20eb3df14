"""Cost of the hessian sensitivity profile as the model grows: does it stay a few gradients per probe?

    python benchmarks/profile_cost.py                 # 2x, 4x, 8x the blocks of tiny:llava, 16 probes
    python benchmarks/profile_cost.py --scales 2 4 8 --probes 16 --samples 8 --repeats 3 --threads 1
    python benchmarks/profile_cost.py --smolvlm --probes 2 --samples 2 --batch-size 1 --repeats 1 --threads 1

``--smolvlm`` times a SmolVLM-256M-sized model instead (:func:`build_smolvlm`: transformers'
Idefics3 classes with SmolVLM-256M's sizes, 284 linear layers, random weights, 512x512 images
of 64 tokens), where issue 14 measured 4.7x with 2 probes.

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


#: SmolVLM-256M-Instruct's sizes (HuggingFaceTB/SmolVLM-256M-Instruct config.json): a SigLIP-style
#: vision tower (12 blocks of width 768, 512x512 images in 16x16 patches), a pixel-shuffle
#: connector (scale factor 4: 64 tokens per image) and a 30-block Llama of width 576.
SMOLVLM_256M = {
    "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=512, patch_size=16),
    "text": dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                 tie_word_embeddings=False),
    "scale_factor": 4,
}


def build_smolvlm(seed: int = 0):
    """A SmolVLM-256M-sized Idefics3 model (random weights) and a processor for it.

    The processor is tiny:idefics3's character-level tokenizer with an image processor for
    512x512 images (no splitting: one 64-token image per prompt).

    Example:
        >>> model, processor = build_smolvlm()                               # doctest: +SKIP
        >>> len(mps.discover_layers(model))                                   # doctest: +SKIP
        284
    """
    import transformers as T

    import mpsearch as mps

    _, tiny = mps.load_vlm("tiny:idefics3")
    tok = tiny.tokenizer
    sz = SMOLVLM_256M
    side = sz["vision"]["image_size"]
    seq = (side // sz["vision"]["patch_size"]) ** 2 // sz["scale_factor"] ** 2
    image_processor = T.Idefics3ImageProcessorPil(size={"longest_edge": side}, max_image_size={"longest_edge": side},
                                                  do_image_splitting=False)
    processor = T.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq,
                                    chat_template=tiny.chat_template)
    text = T.LlamaConfig(**sz["text"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    cfg = T.Idefics3Config(vision_config=dict(sz["vision"]), text_config=text, image_token_id=tok.image_token_id,
                           scale_factor=sz["scale_factor"], tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T.Idefics3ForConditionalGeneration(cfg).eval()
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
    ap.add_argument("--smolvlm", action="store_true", help="time a SmolVLM-256M-sized model (284 linears) instead")
    ap.add_argument("--methods", nargs="+", default=["auto", "hvp"], choices=["auto", "hvp"],
                    help="Hessian-vector products to time (default both)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the 1-probe warm-up profiles (large models)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = synthetic.generate("dev", args.samples, seed=0)
    space = mps.SearchSpace.from_yaml(args.space)
    print(f"CPU time; torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.samples} samples in batches "
          f"of {args.batch_size}, {args.probes} probes, space {space.name} ({len(space.formats())} formats), "
          f"medians of {args.repeats}")
    print(f"{'scale':>5} {'linears':>7} {'fwd+bwd ms':>10} | {'auto (fd): ratio':>16} {'probes only':>11} | "
          f"{'hvp: ratio':>10} {'probes only':>11} | {'score s':>7}")
    for scale in ([0] if args.smolvlm else args.scales):
        model, processor = build_smolvlm() if args.smolvlm else build(scale)
        layers = mps.discover_layers(model)
        batches = calibration_batches(model, processor, rows, n_samples=args.samples, batch_size=args.batch_size)
        time_forward_backward(model, batches)  # warm-up: lazy imports, allocator, first quantizations
        for m in ([] if args.no_warmup else args.methods):
            time_profile(model, processor, layers, space, batches, 1, m)
        nan = [float("nan")]
        fb, auto, auto_p, hvp, hvp_p, score = [], [], [], [], [], []
        for _ in range(args.repeats):
            fb.append(time_forward_backward(model, batches))
            if "auto" in args.methods:
                w, p = time_profile(model, processor, layers, space, batches, args.probes, "auto")
                auto.append(w)
                auto_p.append(p)
            if "hvp" in args.methods:
                w, p = time_profile(model, processor, layers, space, batches, args.probes, "hvp")
                hvp.append(w)
                hvp_p.append(p)
            score.append(time_scoring(model, layers, space))
            fb.append(time_forward_backward(model, batches))
        f, a, ap_, h, hp, sc = (statistics.median(x or nan) for x in (fb, auto, auto_p, hvp, hvp_p, score))
        unit = args.probes * f
        tag = "smol" if args.smolvlm else f"{scale}x"
        print(f"{tag:>5} {len(layers):>7} {f * 1e3:>10.1f} | {a / unit:>16.2f} {ap_ / unit:>11.2f} | "
              f"{h / unit:>10.2f} {hp / unit:>11.2f} | {sc:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
