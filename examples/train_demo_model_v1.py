"""Train the FIRST demo VLM (v1, perception only) on the ``synthetic-v1`` benchmark.

    python examples/train_demo_model_v1.py --out runs/demo-v1          # train (resumes if interrupted)
    python examples/train_demo_model_v1.py --out runs/demo-v1 --fresh  # start over
    python examples/train_demo_model_v1.py --out runs/demo-v1 --eval-only

Kept for reproducibility and as the base of the shipped recipe (``train_demo_model.py`` builds
its model, processor and batches with this file's functions); ``mpsearch/demo`` now holds the
v2 model.

What it builds: a real ``LlavaForConditionalGeneration`` (CLIP vision tower, 2-layer GELU
projector, Llama language model), a word-level tokenizer made with ``tokenizers`` from the
benchmark's own words, and a ``LlavaProcessor`` whose chat template renders
``USER: <image> {text} ASSISTANT:``. Everything is written with ``save_pretrained`` and loads
back with ``AutoModelForImageTextToText`` / ``AutoProcessor``.

Recipe (see issue 7): stage 1 pretrains the vision tower alone on the generator's scene
attributes through a small classification head (dropped afterwards); stage 2 trains the whole
VLM on exactly the prompts evaluation builds (``mpsearch.tasks.prompts.encode_batch``), the
loss on the answer letter and eos, with an open-ended auxiliary mix (the answer word).

Deterministic: the data of step ``t`` is rows ``[t*B, (t+1)*B)`` of the train stream, so the
same seed gives the same weights on the same machine (same thread count), and a resumed run
continues exactly where the checkpoint was taken (``mpsearch/demo/_train_state/``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mpsearch.tasks import synthetic_v1 as synthetic  # noqa: E402
from mpsearch.tasks.prompts import encode_batch, option_letters, parse_options  # noqa: E402

DEFAULT_OUT = ROOT / "runs" / "demo-v1"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% if not loop.last %} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "image": "<image>"}

CONFIG = {
    "image_size": 64, "patch_size": 16,
    "vision_hidden": 128, "vision_layers": 4, "vision_heads": 4, "vision_mlp": 256,
    "text_hidden": 128, "text_layers": 4, "text_heads": 4, "text_mlp": 384,
}


# ----------------------------------------------------------------------------- building
def build_tokenizer(words_of_benchmark: list[str] | None = None):
    """A word-level tokenizer over the benchmark's words (default: the demo set's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from mpsearch.tasks.prompts import MC_INSTRUCTION, OPEN_INSTRUCTION

    words: list[str] = []
    corpus = " ".join(synthetic.WORDS if words_of_benchmark is None else words_of_benchmark) + " " + MC_INSTRUCTION + " " + OPEN_INSTRUCTION + " USER: ASSISTANT: SYSTEM:"
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    words += [w for w, _ in pre.pre_tokenize_str(corpus)]
    words += [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += list("0123456789") + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    words += ["image", "Image", "Question", "Answer", "Options", "option", "options"]
    vocab: dict[str, int] = {}
    for tok in [SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"], SPECIAL["image"]] + words:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tk.pre_tokenizer = pre
    tk.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", pair=f"{SPECIAL['bos']} $A $B",
        special_tokens=[(SPECIAL["bos"], vocab[SPECIAL["bos"]])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], unk_token=SPECIAL["unk"],
        pad_token=SPECIAL["pad"], extra_special_tokens={"image_token": SPECIAL["image"]},
        model_max_length=512, padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": [SPECIAL["image"]]})
    return tok


def build_processor(config: dict | None = None, words_of_benchmark: list[str] | None = None):
    """The LlavaProcessor for ``config`` (default :data:`CONFIG`) and the benchmark's words."""
    config = CONFIG if config is None else config
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = build_tokenizer(words_of_benchmark)
    s = config["image_size"]
    ip = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                            do_center_crop=True, do_resize=True, do_convert_rgb=True)
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=config["patch_size"],
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token=SPECIAL["image"])


def build_model(processor, seed: int, config: dict | None = None):
    """The LlavaForConditionalGeneration of ``config`` (default :data:`CONFIG`), seeded."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    c = CONFIG if config is None else config
    vision = CLIPVisionConfig(image_size=c["image_size"], patch_size=c["patch_size"], hidden_size=c["vision_hidden"],
                              intermediate_size=c["vision_mlp"], num_hidden_layers=c["vision_layers"],
                              num_attention_heads=c["vision_heads"], projection_dim=c["vision_hidden"],
                              hidden_act="gelu")
    text = LlamaConfig(vocab_size=len(tok), hidden_size=c["text_hidden"], intermediate_size=c["text_mlp"],
                       num_hidden_layers=c["text_layers"], num_attention_heads=c["text_heads"],
                       num_key_value_heads=c["text_heads"], max_position_embeddings=512,
                       tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, rope_theta=10000.0)
    n_img = (c["image_size"] // c["patch_size"]) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(SPECIAL["image"]),
                      projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
                      image_seq_length=n_img, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.max_new_tokens = 8
    model.generation_config.do_sample = False
    return model


def param_groups(model) -> dict[str, int]:
    out = {"vision": 0, "projector": 0, "language": 0, "head": 0}
    for name, p in model.named_parameters():
        if "vision_tower" in name:
            out["vision"] += p.numel()
        elif "multi_modal_projector" in name:
            out["projector"] += p.numel()
        elif "lm_head" in name:
            out["head"] += p.numel()
        else:
            out["language"] += p.numel()
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- fast batching
class Encoder:
    """``encode_batch``'s exact output, fast: token ids cached per distinct prompt and answer,
    pixels normalized in numpy. Checked against ``encode_batch`` at start (``verify``)."""

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        ip = processor.image_processor
        self.mean = np.asarray(ip.image_mean, dtype=np.float32).reshape(1, 1, 3)
        self.std = np.asarray(ip.image_std, dtype=np.float32).reshape(1, 1, 3)
        self.cache: dict[tuple, tuple[list[int], int]] = {}

    def _key(self, s, answer):
        return (s["question"], s.get("options"), s.get("question_type"), answer)

    def _ids(self, s, answer):
        k = self._key(s, answer)
        if k not in self.cache:
            enc = encode_batch(self.processor, [s], answers=None if answer is None else [answer])
            ids = enc["input_ids"][0].tolist()
            if answer is None:
                self.cache[k] = (ids, len(ids))
            else:
                first = int((enc["labels"][0] != -100).nonzero()[0])
                self.cache[k] = (ids, first)
        return self.cache[k]

    def pixels(self, images):
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0
        arr = (arr * np.float32(1.0) - self.mean) / self.std  # noqa: PLR6104
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))

    def __call__(self, samples, answers=None):
        rows = [self._ids(s, None if answers is None else a) for s, a in zip(samples, answers or [None] * len(samples))]
        L = max(len(ids) for ids, _ in rows)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(rows), L), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        last = torch.zeros(len(rows), dtype=torch.long)
        for i, (ids, first) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            labels[i, first: len(ids)] = torch.tensor(ids[first:])
            last[i] = first - 1
        out = {"input_ids": input_ids, "attention_mask": mask,
               "pixel_values": self.pixels([s["image_1"] for s in samples]), "prompt_last": last}
        if answers is not None:
            out["labels"] = labels
        return out

    def verify(self, samples, answers):
        ref = encode_batch(self.processor, samples, answers=answers)
        mine = self(samples, answers)
        for k in ("input_ids", "attention_mask", "labels", "prompt_last"):
            if not torch.equal(ref[k], mine[k]):
                raise AssertionError(f"fast encoder differs from encode_batch on {k}")
        if not torch.allclose(ref["pixel_values"].float(), mine["pixel_values"], atol=1e-5):
            raise AssertionError("fast encoder differs from encode_batch on pixel_values")
        ref = encode_batch(self.processor, samples)
        mine = self(samples)
        for k in ("input_ids", "attention_mask", "prompt_last"):
            if not torch.equal(ref[k], mine[k]):
                raise AssertionError(f"fast encoder differs from encode_batch (no answers) on {k}")


def open_variant(row, attrs):
    """The same picture and question, open-ended (answer: the word), for the auxiliary mix."""
    r = dict(row)
    r["question_type"] = "open"
    r["options"] = "[]"
    return r, attrs["answer_text"]


# ----------------------------------------------------------------------------- stage 1
ATTR_HEADS = {"largest": 7, "count": 5, "circle": 7, "square": 7, "triangle": 7, "tallest": 7, "shortest": 7,
              **{f"cell{i}_kind": 4 for i in range(4)}, **{f"cell{i}_colour": 7 for i in range(4)},
              **{f"bar{i}_colour": 6 for i in range(4)}, **{f"bar{i}_rank": 4 for i in range(4)}}


def attr_targets(attrs_list):
    """Classification targets of the scene attributes (-100 where one does not apply).

    Besides the question-level facts (largest colour, count, each kind's colour, tallest and
    shortest bar), dense spatial ones: the kind and colour of what each 2x2-grid cell holds
    (class 0 / 6 = empty) and each bar's colour and height rank, left to right.
    """
    col = {c: i for i, c in enumerate(synthetic.COLOURS)}
    kind = {k: i + 1 for i, k in enumerate(synthetic.SHAPES)}
    t = {k: torch.full((len(attrs_list),), -100, dtype=torch.long) for k in ATTR_HEADS}
    for i, a in enumerate(attrs_list):
        if "count" in a:
            t["count"][i] = a["count"]
        if "largest" in a:
            t["largest"][i] = col[a["largest"]]
        if "tallest" in a:
            t["tallest"][i] = col[a["tallest"]]
            t["shortest"][i] = col[a["shortest"]]
        if "kinds" in a:  # kinds are distinct in these scenes: absent kinds are known (class 6)
            for k in synthetic.SHAPES:
                t[k][i] = col[a["kinds"][k]] if k in a["kinds"] else 6
        for j, cell in enumerate(a.get("cells") or []):
            t[f"cell{j}_kind"][i] = 0 if cell is None else kind[cell[0]]
            t[f"cell{j}_colour"][i] = 6 if cell is None else col[cell[1]]
        for j, (c, rank) in enumerate(a.get("bars") or []):
            t[f"bar{j}_colour"][i] = col[c]
            t[f"bar{j}_rank"][i] = rank
    return t


GLOBAL_HEADS = ("largest", "count", "circle", "square", "triangle", "tallest", "shortest")


class AttrHead(nn.Module):
    """Stage-1 head. Scene-level facts are read from the MEAN of the patch tokens (so every patch
    carries them, which is what an attention average in the language model sees); the per-cell
    and per-bar facts from the flattened patch tokens (they need position)."""

    def __init__(self, hidden: int, n_tokens: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.pool = nn.Linear(hidden, 256)
        self.proj = nn.Linear(hidden * n_tokens, 256)
        self.heads = nn.ModuleDict({k: nn.Linear(256, n) for k, n in ATTR_HEADS.items()})

    def forward(self, feats):  # feats: (B, n_tokens, hidden) patch tokens of the last layer
        x = self.norm(feats)
        g = torch.nn.functional.gelu(self.pool(x.mean(1)))
        h = torch.nn.functional.gelu(self.proj(x.flatten(1)))
        return {k: head(g if k in GLOBAL_HEADS else h) for k, head in self.heads.items()}


def vision_feats(model, pixel_values):
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    return out.hidden_states[-1][:, 1:]  # what LLaVA feeds the projector (layer -1, CLS dropped)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_letters(model, enc: Encoder, rows, batch: int = 100, by_skill: bool = False):
    """Accuracy by next-token logits at the last prompt token, restricted to the option letters
    (overall, and per subject; ``by_skill``: also per ``skill:<name>``)."""
    model.eval()
    tok = enc.tok
    correct, per_subject = [], {}
    for i in range(0, len(rows), batch):
        chunk = rows[i: i + batch]
        b = enc(chunk)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       pixel_values=b["pixel_values"]).logits
        last = logits[torch.arange(len(chunk)), b["prompt_last"]]
        for r, lg in zip(chunk, last):
            letters = option_letters(len(parse_options(r["options"])))
            ids = tok.convert_tokens_to_ids(letters)
            pred = letters[int(torch.argmax(lg[ids]))]
            ok = pred == r["answer"]
            correct.append(ok)
            per_subject.setdefault(r["subject"], []).append(ok)
            if by_skill:
                per_subject.setdefault("skill:" + r["skill"], []).append(ok)
    model.train()
    return float(np.mean(correct)), {k: float(np.mean(v)) for k, v in sorted(per_subject.items())}


def summarize_attrs(acc):
    """Per-head accuracies with the per-cell / per-bar heads averaged into one number each."""
    out, groups = {}, {}
    for k, v in acc.items():
        for prefix in ("cell", "bar"):
            if k.startswith(prefix) and k[len(prefix)].isdigit():
                groups.setdefault(prefix + "*" + k[len(prefix) + 1:], []).append(v)
                break
        else:
            out[k] = v
    out.update({k: sum(v) / len(v) for k, v in groups.items()})
    return out


@torch.no_grad()
def evaluate_generate(model, processor, rows, batch: int = 50, by_skill: bool = False):
    """Accuracy of greedy generation, the text parsed by the official MMMU rules (per subject;
    ``by_skill``: also per ``skill:<name>``)."""
    from mpsearch.tasks import mmmu

    tok = processor.tokenizer
    correct, per_subject, bare = [], {}, 0
    rng = mmmu.official_rng()  # unparseable answers: the official random fallback
    for i in range(0, len(rows), batch):
        chunk = rows[i: i + batch]
        enc = encode_batch(processor, chunk, padding_side="left")
        enc.pop("prompt_last")
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for r, text in zip(chunk, texts):
            index2ans, choices = mmmu.get_multi_choice_info(parse_options(r["options"]))
            pred = mmmu.parse_multi_choice(text, choices, index2ans, rng=rng)
            bare += text.strip() in choices
            ok = mmmu.eval_multi_choice(r["answer"], pred)
            correct.append(ok)
            per_subject.setdefault(r["subject"], []).append(ok)
            if by_skill:
                per_subject.setdefault("skill:" + r["skill"], []).append(ok)
    return (float(np.mean(correct)), {k: float(np.mean(v)) for k, v in sorted(per_subject.items())},
            bare / len(rows))


@torch.no_grad()
def evaluate_attrs(model, head, enc, pairs):
    model.eval()
    rows, attrs = zip(*pairs)
    logits = head(vision_feats(model, enc.pixels([r["image_1"] for r in rows])))
    t = attr_targets(attrs)
    acc = {}
    for k, lg in logits.items():
        m = t[k] != -100
        if m.any():
            acc[k] = float((lg.argmax(-1)[m] == t[k][m]).float().mean())
    model.train()
    return acc


# ----------------------------------------------------------------------------- training
def lr_at(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def adamw(params, lr, state=None):
    """AdamW (weight decay 0.01) over ``params`` (tensors or groups), resumed from ``state`` when given."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if state is not None:
        opt.load_state_dict(state)
    return opt


def set_lr(opt, lr) -> None:
    """Every parameter group's learning rate: ``lr`` times the group's ``scale`` (1 without one)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("scale", 1.0)


def optimizer_step(opt, loss, params, bar) -> None:
    """One update: gradients of ``loss``, clipped to norm 1 over ``params``, an ``opt`` step, the bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def save_state(path: Path, **state):
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: fastest on a shared machine, and reproducible anywhere)")
    ap.add_argument("--stage1-steps", type=int, default=1000)
    ap.add_argument("--stage1-batch", type=int, default=96)
    ap.add_argument("--stage1-lr", type=float, default=2e-3)
    ap.add_argument("--stage2-steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--vision-lr-scale", type=float, default=0.3)
    ap.add_argument("--open-frac", type=float, default=0.25)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--fresh", action="store_true", help="ignore a saved training state")
    ap.add_argument("--keep-state", action="store_true",
                    help="keep the training state (_train_state/) after the final save")
    ap.add_argument("--eval-only", action="store_true",
                    help="evaluate the saved model on the validation split (logits and greedy generation)")
    ap.add_argument("--eval-only-n", type=int, default=500, help="validation questions for --eval-only")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    out: Path = args.out
    state_dir = out / "_train_state"

    if args.eval_only:
        from transformers import AutoModelForImageTextToText, AutoProcessor
        processor = AutoProcessor.from_pretrained(out)
        model = AutoModelForImageTextToText.from_pretrained(out)
        model.eval()
        rows = synthetic.generate("validation", n=args.eval_only_n, seed=0)
        acc, per = evaluate_letters(model, Encoder(processor), rows)
        gen_acc, gen_per, parsed_share = evaluate_generate(model, processor, rows)
        print(json.dumps({"n": len(rows), "logits": {"accuracy": acc, "per_subject": per},
                          "generate": {"accuracy": gen_acc, "per_subject": gen_per,
                                       "bare_letter_share": parsed_share}}, indent=1))
        return

    if args.fresh and state_dir.exists():
        shutil.rmtree(state_dir)

    processor = build_processor()
    model = build_model(processor, args.seed)
    enc = Encoder(processor)
    counts = param_groups(model)
    print("parameters:", counts, flush=True)

    val_rows = synthetic.generate("validation", seed=0)
    val_pairs = synthetic.generate_with_attributes("validation", n=args.eval_n, seed=0)
    n_tok = (CONFIG["image_size"] // CONFIG["patch_size"]) ** 2
    head = AttrHead(CONFIG["vision_hidden"], n_tok)

    log = {"config": CONFIG, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "parameters": counts, "stage1": [], "stage2": [], "elapsed_s": 0.0}
    stage, step = 1, 0
    opt_state = None
    ckpt = state_dir / "state.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        if st["args"]["seed"] != args.seed:
            raise SystemExit(f"{ckpt} was trained with seed {st['args']['seed']}; use --fresh")
        model.load_state_dict(st["model"])
        head.load_state_dict(st["head"])
        stage, step, log, opt_state = st["stage"], st["step"], st["log"], st["opt"]
        print(f"resumed from {ckpt}: stage {stage} step {step}", flush=True)
    elapsed0, cpu0 = log["elapsed_s"], log.get("cpu_s", 0.0)
    t0, c0 = time.time(), time.process_time()

    def elapsed():
        return elapsed0 + time.time() - t0

    def cpu():
        return cpu0 + time.process_time() - c0

    def checkpoint(opt):
        log["elapsed_s"], log["cpu_s"] = elapsed(), cpu()
        save_state(state_dir, model=model.state_dict(), head=head.state_dict(),
                   opt=None if opt is None else opt.state_dict(),
                   stage=stage, step=step, log=log, args=vars(args) | {"out": str(out)})

    model.train()
    # ---- stage 1: vision tower + attribute head
    if stage == 1:
        params = list(model.model.vision_tower.parameters()) + list(head.parameters())
        opt = adamw(params, args.stage1_lr, opt_state)
        bar = tqdm(total=args.stage1_steps, initial=step, desc="stage 1 (vision)", mininterval=5)
        while step < args.stage1_steps:
            set_lr(opt, lr_at(step, args.stage1_steps, args.stage1_lr, 100))
            pairs = synthetic.generate_with_attributes("train", n=args.stage1_batch, seed=args.seed + 1000,
                                                       start=step * args.stage1_batch)
            rows, attrs = zip(*pairs)
            logits = head(vision_feats(model, enc.pixels([r["image_1"] for r in rows])))
            t = attr_targets(attrs)
            loss = sum(nn.functional.cross_entropy(logits[k], t[k], ignore_index=-100)
                       for k in ATTR_HEADS if (t[k] != -100).any())
            optimizer_step(opt, loss, params, bar)
            step += 1
            if step % args.eval_every == 0 or step == args.stage1_steps:
                acc = evaluate_attrs(model, head, enc, val_pairs)
                log["stage1"].append({"step": step, "elapsed_s": round(elapsed(), 1), "cpu_s": round(cpu(), 1),
                                      "loss": round(loss.item(), 4),
                                      "attr_acc": {k: round(v, 3) for k, v in summarize_attrs(acc).items()}})
                tqdm.write(f"[stage 1] step {step} {elapsed():.0f}s loss {loss.item():.3f} attr acc "
                           + " ".join(f"{k}={v:.2f}" for k, v in summarize_attrs(acc).items()))
            if step % args.ckpt_every == 0 or step == args.stage1_steps:
                checkpoint(opt)
        bar.close()
        stage, step, opt_state = 2, 0, None
        checkpoint(None)

    # ---- stage 2: the whole VLM on the evaluation's prompts
    vision_params = list(model.model.vision_tower.parameters())
    vid = {id(p) for p in vision_params}
    other = [p for p in model.parameters() if id(p) not in vid]
    opt = adamw([{"params": vision_params, "scale": args.vision_lr_scale}, {"params": other, "scale": 1.0}],
                args.lr, opt_state)
    check = synthetic.generate_with_attributes("train", n=10, seed=args.seed)
    mixed = [open_variant(r, a) if i % 2 else (r, r["answer"]) for i, (r, a) in enumerate(check)]
    enc.verify([m[0] for m in mixed], [m[1] for m in mixed])
    bar = tqdm(total=args.stage2_steps, initial=step, desc="stage 2 (VLM)", mininterval=5)
    n_open = int(round(args.batch * args.open_frac))
    while step < args.stage2_steps:
        set_lr(opt, lr_at(step, args.stage2_steps, args.lr, 200))
        pairs = synthetic.generate_with_attributes("train", n=args.batch, seed=args.seed, start=step * args.batch)
        samples, answers = [], []
        for j, (r, a) in enumerate(pairs):
            if j < n_open:
                r, ans = open_variant(r, a)
            else:
                ans = r["answer"]
            samples.append(r)
            answers.append(ans)
        b = enc(samples, answers)
        outp = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                     pixel_values=b["pixel_values"], labels=b["labels"])
        optimizer_step(opt, outp.loss, model.parameters(), bar)
        step += 1
        if step % args.eval_every == 0 or step == args.stage2_steps:
            acc, per = evaluate_letters(model, enc, val_rows[: args.eval_n])
            log["stage2"].append({"step": step, "elapsed_s": round(elapsed(), 1), "cpu_s": round(cpu(), 1),
                                  "loss": round(outp.loss.item(), 4),
                                  "val_acc": round(acc, 4), "n": args.eval_n})
            tqdm.write(f"[stage 2] step {step} {elapsed():.0f}s loss {outp.loss.item():.3f} "
                       f"val acc ({args.eval_n}) {acc:.3f} " + " ".join(f"{k}={v:.2f}" for k, v in per.items()))
        if step % args.ckpt_every == 0 or step == args.stage2_steps:
            checkpoint(opt)
    bar.close()

    acc, per = evaluate_letters(model, enc, val_rows)
    log["final"] = {"validation_accuracy": acc, "per_subject": per, "n": len(val_rows)}
    log["elapsed_s"], log["cpu_s"] = round(elapsed(), 1), round(cpu(), 1)
    log["threads"] = torch.get_num_threads()
    print(f"final validation accuracy ({len(val_rows)}): {acc:.4f} {per}  total {elapsed():.0f}s wall, {cpu():.0f}s CPU", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    if not args.keep_state:  # the package ships demo/**: never leave an 18 MB checkpoint in it
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"saved to {out}", flush=True)


if __name__ == "__main__":
    main()
