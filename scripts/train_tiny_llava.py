#!/usr/bin/env python3
"""Train the tiny LLaVA-1.5 demo model ("tiny-llava-shapes") from scratch on synthetic shapes VQA.

Writes ``weights/tiny-llava-shapes/`` (relative to the repository root) in the llava-hf layout, float16:
config.json, generation_config.json, model.safetensors, tokenizer.json (+ tokenizer_config.json),
processor_config.json, preprocessor_config.json (classic llava-hf form, written explicitly),
chat_template.json/.jinja, example images + examples.jsonl, training_log.json and README.md.

Model (LLaVA-1.5 structure, ``LlavaForConditionalGeneration``):

* Vision: CLIP ViT, image 112, patch 8 -> 14 x 14 = 196 visual tokens (+ CLS), quick_gelu, pre-LN.
  ``vision_feature_layer = -2`` and strategy "default" (CLS dropped), exactly as LLaVA-1.5, so the last
  encoder layer is never run by LLaVA; it is kept (at its initial values) only so the checkpoint has the
  usual shape. Training skips it too.
* Projector: linear -> exact-erf GELU -> linear (with biases).
* Text: LLaMA with grouped-query attention (kv heads < heads), RMSNorm, SiLU MLP, RoPE, untied lm_head.
* Tokenizer: its own LLaMA-style BPE (Metaspace, byte fallback, <unk>=0 <s>=1 </s>=2, <image>, <pad> last),
  trained here on the question/answer vocabulary of scripts/vqa_data.py.
* Chat format: ``USER: <image>\\n{question} ASSISTANT: {answer}</s>``; the loss is on the answer tokens
  and the closing </s> only.

Data: scripts/vqa_data.py. Training images use seeds 0 .. steps*batch-1 (< 10_000_000), each with one
question of every type the scene allows; the validation set watched during training uses seeds 20_000_000+;
the held-out test set (seeds 10_000_000+) is only touched once, after training, by the reloaded f16 model.

Three things make this learn within the budget (measured in 1-4 minute probes on this CPU):

* Vision pre-training on per-patch labels (--vision-steps, then --patch-loss-weight during end-to-end training):
  a linear probe on the selected CLIP rows predicts, for every 8x8 patch, the shape and the colour of the
  object covering most of it (vqa_data.patch_coverage). With the answer tokens as the only signal, a first
  full run learned counting and location (~90%) but shape identity and colour-shape binding stayed at chance
  (0.20-0.25 after 35k images); 200 probe steps with the dense labels reach ~82% per-patch shape accuracy.

* Initialisation: transformers' default (every weight N(0, 0.02^2)) leaves the path from the image tokens to
  the answer so weak that even "what colour is the only object" stays at chance for hundreds of steps, although
  the random CLIP features already encode it linearly. `init_weights` uses N(0, 1/fan_in) with residual
  outputs scaled by 1/sqrt(2 L), token embeddings N(0, 1): the same probe reaches ~90% in ~100 steps.
* Curriculum (--curriculum): the first 5% of steps show one large shape on a solid background, then 1-2 large
  shapes, 1-3 and 2-4 normal shapes; from 22% of the run on, the evaluation distribution (2-5 shapes).

Packing (what makes this fit the CPU budget): all questions about one image share one sequence
``<s> USER: <image>x196 | seg_1 | seg_2 | ...`` where seg_j = ``\\n{q_j} ASSISTANT: {a_j}</s>``. A block
attention mask lets every segment see the shared prefix and itself only, and every segment's position ids
restart where a single-question prompt would have them, so the loss is exactly the sum of the
single-question losses (checked against transformers' own forward at start-up) at a fraction of the cost.

Accuracy: greedy decoding (transformers ``generate``, do_sample=False, max 6 new tokens, stop at </s>) of the
reloaded float16 checkpoint computed in float32, answer normalised with vqa_data.normalize_answer, exact match.

Full run (default: 2 threads; 500 vision steps of 32 images, then 2400 steps of 12 images with up to 4
questions of each type per image; bf16 autocast; about 50 minutes in all on a 2-core Sapphire Rapids CPU with
AMX; the model's README records the real numbers):

    python scripts/train_tiny_llava.py
    python scripts/vqa_data.py heldout --out data/shapes-heldout --n 700   # the same held-out set as JSONL

Smoke run (about 30 seconds, writes to /tmp/tiny-llava-shapes-quick):

    python scripts/train_tiny_llava.py --quick --threads 1

Reproducible: fixed seeds everywhere; bit-identical for the same package versions, thread count and CPU
kind (bf16 autocast uses AMX/AVX-512 kernels when the CPU has them, see --amp).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# first: sets the offline environment before transformers loads
from llava_hf_common import CLIP_MEAN, CLIP_STD, build_llama_bpe, llava_config, make_hf_tokenizer, make_processor, save_processor_files, versions  # noqa: E402

import argparse
import json
import math
import random
import shutil
import time

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import vqa_data  # noqa: E402  (scripts/ is on sys.path, see above)

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "weights" / "tiny-llava-shapes"
QUICK_OUT = Path("/tmp/tiny-llava-shapes-quick")

IMAGE_SIZE = vqa_data.IMAGE_SIZE  # 112
PATCH_SIZE = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 196
TRAIN_VOCAB = 220  # BPE trainer vocabulary (alphabet + merges), before the 256 bytes and the specials
MAX_SIZE_BYTES = 25 * 1000 * 1000
# Chosen so the whole script fits the 60-minute budget on the 2-core CPU: a step of 12 images (about 15 questions
# each, ~420-token packed sequences) takes ~1.05 s with bf16 autocast, a vision step ~0.55 s; with the validation
# passes and the final held-out evaluation (~4 min) about 50 minutes. (16 images x 2600 steps took ~70.)
DEFAULT_STEPS = 2400
DEFAULT_BATCH = 12
DEFAULT_VISION_STEPS = 500
VISION_SEED_BASE = 5_000_000  # vision pre-training images: training seeds 5_000_000 + i (the VQA steps use 0 ..)

def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- prompts and model


def prompt_text(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


# ----------------------------------------------------------------------------- model


def build_config(args, vocab_size: int, image_id: int, pad_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=args.vision_hidden,
        intermediate_size=args.vision_hidden * 4,
        num_attention_heads=args.vision_heads,
        num_hidden_layers=args.vision_layers,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=args.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.text_hidden,
        intermediate_size=args.text_mlp,
        num_attention_heads=args.text_heads,
        num_key_value_heads=args.text_kv_heads,
        num_hidden_layers=args.text_layers,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_id,
        attention_bias=False,
        mlp_bias=False,
    )
    return llava_config(vision, text, image_id, NUM_PATCHES)


@torch.no_grad()
def init_weights(model, seed: int, embed_std: float, head_gain: float) -> None:
    """Seeded, width-aware initialisation (transformers' fixed std 0.02 learns the image pathway much more
    slowly): every linear / conv weight ~ N(0, 1/fan_in), residual-branch outputs (CLIP out_proj and fc2, LLaMA
    o_proj and down_proj) further scaled by 1/sqrt(2 * layers), biases 0, norms 1; token embeddings
    ~ N(0, embed_std^2); lm_head ~ N(0, (head_gain^2)/d). CLIP class / position embeddings keep N(0, 0.02^2).
    Parameters are drawn in sorted-name order from one generator, so the result depends only on the seed."""
    g = torch.Generator().manual_seed(seed)
    nv = model.config.vision_config.num_hidden_layers
    nt = model.config.text_config.num_hidden_layers
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        def randn(std):
            return torch.randn(p.shape, generator=g, dtype=torch.float32) * std
        if name.endswith("lm_head.weight"):
            v = randn(head_gain / math.sqrt(p.shape[1]))
        elif name.endswith("embed_tokens.weight"):
            v = randn(embed_std)
        elif name.endswith("class_embedding") or name.endswith("position_embedding.weight"):
            v = randn(0.02)
        elif "norm" in name or "layrnorm" in name:
            v = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
        elif name.endswith("bias"):
            v = torch.zeros_like(p)
        elif p.dim() >= 2:
            fan_in = p[0].numel()
            v = randn(1.0 / math.sqrt(fan_in))
            if name.endswith(("out_proj.weight", "fc2.weight")):
                v /= math.sqrt(2 * nv)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                v /= math.sqrt(2 * nt)
        else:
            raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
        p.copy_(v)


class Packer:
    """Turns examples (image + several QAs) into packed training batches (see the module docstring)."""

    def __init__(self, raw_tok: Tokenizer, image_id: int, eos_id: int, pad_id: int):
        self.tok, self.image_id, self.eos_id, self.pad_id = raw_tok, image_id, eos_id, pad_id
        self.cache: dict[tuple[str, str], tuple[list[int], int]] = {}
        probe = raw_tok.encode(prompt_text("x")).ids
        k = probe.index(image_id)
        self.prefix = probe[:k]  # <s> USER : (space)
        self.p0 = len(self.prefix)
        self.P = self.p0 + NUM_PATCHES  # rows before the first segment
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def segment(self, q: str, a: str) -> tuple[list[int], int]:
        """(segment ids after <image>, index in the segment of the first answer token)."""
        key = (q, a)
        if key not in self.cache:
            prompt = self.tok.encode(prompt_text(q)).ids
            full = self.tok.encode(f"{prompt_text(q)} {a}").ids + [self.eos_id]
            assert full[: len(prompt)] == prompt, (q, a)
            k = prompt.index(self.image_id)
            assert prompt[:k] == self.prefix and prompt.count(self.image_id) == 1
            self.cache[key] = (full[k + 1:], len(prompt) - k - 1)
        return self.cache[key]

    def pixels(self, img: Image.Image) -> torch.Tensor:
        """What the CLIP processor does to a 112 x 112 RGB image (no resize / crop needed)."""
        x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    def batch(self, examples: list, label_threshold: float | None = None) -> dict:
        B = len(examples)
        seqs, segids, poss, tgt_rows, tgt_ids, tgt_types = [], [], [], [], [], []
        for b, ex in enumerate(examples):
            ids = list(self.prefix) + [self.image_id] * NUM_PATCHES
            sid = [0] * len(ids)
            pos = list(range(len(ids)))
            for j, qa in enumerate(ex.qas):
                seg, a0 = self.segment(qa["question"], qa["answer"])
                start = len(ids)
                ids += seg
                sid += [j + 1] * len(seg)
                pos += list(range(self.P, self.P + len(seg)))
                for t in range(a0, len(seg)):  # row start+t-1 predicts seg[t]
                    tgt_rows.append((b, start + t - 1))
                    tgt_ids.append(seg[t])
                    tgt_types.append((b, j))
            seqs.append(ids)
            segids.append(sid)
            poss.append(pos)
        T = max(len(s) for s in seqs)
        ids_t = torch.full((B, T), self.pad_id, dtype=torch.long)
        sid_t = torch.full((B, T), -1, dtype=torch.long)
        pos_t = torch.zeros((B, T), dtype=torch.long)
        for b in range(B):
            n = len(seqs[b])
            ids_t[b, :n] = torch.tensor(seqs[b])
            sid_t[b, :n] = torch.tensor(segids[b])
            pos_t[b, :n] = torch.tensor(poss[b])
        ar = torch.arange(T)
        causal = ar[None, :] <= ar[:, None]  # [q, k]
        same = (sid_t[:, None, :] == 0) | (sid_t[:, None, :] == sid_t[:, :, None])  # [B, q, k]
        allowed = (causal[None] & same)[:, None]  # [B, 1, q, k]
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)  # additive
        pix = torch.stack([self.pixels(ex.image) for ex in examples])
        out = dict(ids=ids_t, pos=pos_t, mask=mask, pixels=pix,
                   rows=torch.tensor(tgt_rows, dtype=torch.long).view(-1, 2),
                   targets=torch.tensor(tgt_ids, dtype=torch.long), owners=tgt_types)
        if label_threshold is not None:
            out["patch_labels"] = torch.stack([patch_labels(ex.scene, label_threshold) for ex in examples])
        return out


def clip_patch_rows(model, pixels: torch.Tensor) -> torch.Tensor:
    """The features LLaVA selects [B, 196, D_vision]: CLIP embeddings, pre-LN, layers 0..L-2
    (hidden_states[-2]), CLS dropped."""
    vt = model.model.vision_tower
    h = vt.pre_layrnorm(vt.embeddings(pixels))
    layers = vt.encoder.layers
    n_run = len(layers) + 1 + model.config.vision_feature_layer  # hidden_states index -2 -> L-1 layers
    for layer in layers[:n_run]:
        h = layer(h, None)
    return h[:, 1:]


class PatchHead(torch.nn.Module):
    """Training-only linear probe on the selected CLIP rows: for every patch, the shape and the colour of the
    object that covers it (class 0: background). Not part of the checkpoint.

    Why: with only the answer tokens as signal, a ViT trained from scratch learned counting and location but not
    shape identity (shape / colour binding stayed at chance after 35k images). Dense per-patch labels give 196
    targets per image instead of a handful and make every patch feature say what it belongs to, which is what
    the decoder's attention then has to look up."""

    GRID = IMAGE_SIZE // PATCH_SIZE

    def __init__(self, width: int):
        super().__init__()
        self.sizes = [1 + len(vqa_data.SHAPES), 1 + len(vqa_data.COLOR_NAMES), self.GRID, self.GRID]
        self.proj = torch.nn.Linear(width, sum(self.sizes))

    def loss(self, rows: torch.Tensor, labels: torch.Tensor, background_weight: float) -> tuple[torch.Tensor, dict]:
        """labels [B, 196, 4]: shape class, colour class (0 = background), patch row, patch column. The row /
        column targets keep where a patch is in its feature (the decoder needs it for the corner questions)."""
        out = self.proj(rows).float()
        shape_logits, color_logits, row_logits, col_logits = torch.split(out, self.sizes, dim=-1)
        ce = torch.nn.functional.cross_entropy
        ns, nc = self.sizes[0], self.sizes[1]
        ws = torch.tensor([background_weight] + [1.0] * (ns - 1))
        wc = torch.tensor([background_weight] + [1.0] * (nc - 1))
        shape_t, color_t = labels[..., 0], labels[..., 1]
        loss = ce(shape_logits.reshape(-1, ns), shape_t.reshape(-1), weight=ws) + ce(
            color_logits.reshape(-1, nc), color_t.reshape(-1), weight=wc)
        loss = loss + 0.5 * (ce(row_logits.reshape(-1, self.GRID), labels[..., 2].reshape(-1))
                             + ce(col_logits.reshape(-1, self.GRID), labels[..., 3].reshape(-1)))
        with torch.no_grad():
            fg = shape_t > 0
            acc = {"patch_shape": float((shape_logits.argmax(-1)[fg] == shape_t[fg]).float().mean()) if fg.any() else 0.0,
                   "patch_color": float((color_logits.argmax(-1)[fg] == color_t[fg]).float().mean()) if fg.any() else 0.0}
        return loss, acc


def patch_labels(scene, threshold: float) -> torch.Tensor:
    """[196, 4] per patch: (shape class, colour class) of the object covering the largest part of the patch if
    it covers at least `threshold` of it, else background (0, 0); then the patch's row and column."""
    cov = vqa_data.patch_coverage(scene, PATCH_SIZE).reshape(len(scene.objects), -1)
    out = torch.zeros((NUM_PATCHES, 4), dtype=torch.long)
    grid = IMAGE_SIZE // PATCH_SIZE
    out[:, 2] = torch.arange(NUM_PATCHES) // grid
    out[:, 3] = torch.arange(NUM_PATCHES) % grid
    best = torch.from_numpy(cov.argmax(0))
    covered = torch.from_numpy(cov.max(0) >= threshold)
    shape_of = torch.tensor([1 + vqa_data.SHAPES.index(o.shape) for o in scene.objects])
    color_of = torch.tensor([1 + vqa_data.COLOR_NAMES.index(o.color) for o in scene.objects])
    out[:, 0] = torch.where(covered, shape_of[best], 0)
    out[:, 1] = torch.where(covered, color_of[best], 0)
    return out


def vision_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Projector output [B, 196, D_text]."""
    return model.model.multi_modal_projector(clip_patch_rows(model, pixels))


def packed_logits(model, batch: dict, P0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n_targets, vocab] at the rows that predict answer tokens, the CLIP rows [B, 196, D_vision] the
    projector was given, for the per-patch loss)."""
    clip_rows = clip_patch_rows(model, batch["pixels"])
    feats = model.model.multi_modal_projector(clip_rows)
    lm = model.model.language_model
    emb = lm.embed_tokens(batch["ids"])
    x = torch.cat([emb[:, :P0], feats.to(emb.dtype), emb[:, P0 + NUM_PATCHES:]], dim=1)
    pos = batch["pos"]
    pe = lm.rotary_emb(x, pos)
    for layer in lm.layers:
        x = layer(x, attention_mask=batch["mask"], position_ids=pos, position_embeddings=pe)
    rows = batch["rows"]
    h = x[rows[:, 0], rows[:, 1]]
    return model.lm_head(lm.norm(h)).float(), clip_rows


def exact_match_by_owner(logits: torch.Tensor, batch: dict) -> dict:
    """Teacher-forced exact match per (example, question): every answer token and </s> is the argmax.
    This is exactly 'greedy decoding reproduces the answer and stops'."""
    ok = (logits.argmax(-1) == batch["targets"]).tolist()
    res: dict = {}
    for o, g in zip(batch["owners"], ok):
        res[o] = res.get(o, True) and g
    return res


@torch.no_grad()
def teacher_forced_eval(model, packer: Packer, examples: list, bs: int, amp) -> dict:
    model.eval()
    by_type: dict[str, list[int]] = {}
    for i in range(0, len(examples), bs):
        chunk = examples[i: i + bs]
        batch = packer.batch(chunk)
        with amp():
            logits, _ = packed_logits(model, batch, packer.p0)
        for (b, j), good in exact_match_by_owner(logits, batch).items():
            t = chunk[b].qas[j]["type"]
            by_type.setdefault(t, []).append(int(good))
    model.train()
    allv = [v for vs in by_type.values() for v in vs]
    return {"all": sum(allv) / max(1, len(allv)), **{t: sum(v) / len(v) for t, v in sorted(by_type.items())}}


@torch.no_grad()
def check_packing(model, packer: Packer, processor, eos_id: int) -> float:
    """The packed forward equals transformers' own forward of each single-question prompt + answer."""
    model.eval()
    ex = vqa_data.train_example(0)
    batch = packer.batch([ex])
    packed, _ = packed_logits(model, batch, packer.p0)
    ref_rows = []
    for q in ex.qas:
        text = f"{prompt_text(q['question'])} {q['answer']}</s>"
        inp = processor(images=ex.image, text=text, return_tensors="pt")
        assert torch.allclose(inp["pixel_values"][0].float(), packer.pixels(ex.image), atol=1e-5), "pixels differ"
        full = model(input_ids=inp["input_ids"], pixel_values=inp["pixel_values"]).logits[0].float()
        prompt_len = len(processor(images=ex.image, text=prompt_text(q["question"]))["input_ids"][0])
        assert inp["input_ids"][0, -1].item() == eos_id
        ref_rows.append(full[prompt_len - 1: -1])
    ref = torch.cat(ref_rows)
    model.train()
    assert ref.shape == packed.shape, (ref.shape, packed.shape)
    return float((ref - packed).abs().max())


# ----------------------------------------------------------------------------- final evaluation


@torch.no_grad()
def greedy_answer(model, processor, img: Image.Image, question: str, eos_id: int, pad_id: int,
                  max_new: int = 6) -> str:
    inp = processor(images=img, text=prompt_text(question), return_tensors="pt")
    out = model.generate(**inp, max_new_tokens=max_new, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)
    return processor.tokenizer.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True)


def heldout_accuracy(model, processor, examples, eos_id, pad_id) -> tuple[dict, list]:
    by_type: dict[str, list[int]] = {}
    wrong = []
    for ex in examples:
        qa = ex.qas[0]
        pred = greedy_answer(model, processor, ex.image, qa["question"], eos_id, pad_id)
        good = vqa_data.normalize_answer(pred) == vqa_data.normalize_answer(qa["answer"])
        by_type.setdefault(qa["type"], []).append(int(good))
        if not good:
            wrong.append({"seed": ex.seed, "type": qa["type"], "question": qa["question"], "answer": qa["answer"],
                          "predicted": pred})
    allv = [v for vs in by_type.values() for v in vs]
    acc = {"all": sum(allv) / len(allv), **{t: sum(by_type[t]) / len(by_type[t]) for t in vqa_data.QTYPES
                                           if t in by_type}}
    return acc, wrong


# ----------------------------------------------------------------------------- main


def pretrain_vision(model, patch_head: PatchHead, packer: Packer, args, steps: int, amp) -> list:
    """Stage 1: train the CLIP layers LLaVA uses (and the patch head) on per-patch shape / colour labels of
    1-5-object scenes (training seeds VISION_SEED_BASE + i); AdamW, warm-up then cosine decay to 10%."""
    vt = model.model.vision_tower
    params = list(vt.parameters()) + list(patch_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=args.weight_decay)
    warm = max(1, steps // 30)
    history = []
    t0 = time.time()
    for step in range(steps):
        seeds = range(VISION_SEED_BASE + step * args.vision_batch, VISION_SEED_BASE + (step + 1) * args.vision_batch)
        examples = [vqa_data.train_example(s, ["count_all"], min_objects=1, max_objects=5) for s in seeds]
        pixels = torch.stack([packer.pixels(ex.image) for ex in examples])
        labels = torch.stack([patch_labels(ex.scene, args.patch_label_threshold) for ex in examples])
        f = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        for g in opt.param_groups:
            g["lr"] = args.vision_lr * f
        with amp():
            rows = clip_patch_rows(model, pixels)
            loss, acc = patch_head.loss(rows, labels, args.patch_background_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({"step": step, "loss": round(float(loss.detach()), 5), **{k: round(v, 4) for k, v in acc.items()}})
        if step % 25 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"vision {step:4d}/{steps} patch loss {float(loss.detach()):.4f} shape acc {acc['patch_shape']:.3f} "
                f"colour acc {acc['patch_color']:.3f}  {el / (step + 1):.2f}s/step eta {el / (step + 1) * (steps - step - 1) / 60:.1f} min")
    return history


def cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def fmt_acc(acc: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"output directory (default {OUT}, --quick: {QUICK_OUT})")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS}, --quick: 30)")
    ap.add_argument("--batch", type=int, default=None, help=f"images per step (default {DEFAULT_BATCH}, --quick: 8)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2.5%% of --steps)")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0, help="model-initialisation seed")
    ap.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                    help="bf16 autocast for the training forward (auto: on when the CPU has AMX)")
    ap.add_argument("--valid-n", type=int, default=None, help="validation questions (default 140, --quick: 28)")
    ap.add_argument("--valid-every", type=int, default=500)
    ap.add_argument("--heldout-n", type=int, default=None, help="held-out test questions (default 700, --quick: 14)")
    ap.add_argument("--vision-hidden", type=int, default=192)
    ap.add_argument("--vision-heads", type=int, default=6)
    ap.add_argument("--vision-layers", type=int, default=5, help="CLIP layers (LLaVA runs all but the last)")
    ap.add_argument("--text-hidden", type=int, default=256)
    ap.add_argument("--text-mlp", type=int, default=704)
    ap.add_argument("--text-heads", type=int, default=8)
    ap.add_argument("--text-kv-heads", type=int, default=4)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--curriculum", default="0.05:1:1:easy,0.1:1:2:easy,0.15:1:3,0.22:2:4",
                    help="END:MIN:MAX[:easy],...: until END x steps, training scenes have MIN..MAX objects (with "
                         "':easy': larger shapes on solid backgrounds); afterwards 2..5 normal (empty: no curriculum)")
    ap.add_argument("--questions-per-type", type=int, default=4,
                    help="distinct questions of each type per training image (packed into one sequence)")
    ap.add_argument("--qtypes", default="", help="train on these question types only (comma list; for experiments)")
    ap.add_argument("--init", choices=["scaled", "hf"], default="scaled",
                    help="scaled: N(0, 1/fan_in) (see init_weights); hf: transformers' default (std 0.02)")
    ap.add_argument("--embed-std", type=float, default=1.0)
    ap.add_argument("--head-gain", type=float, default=0.5)
    ap.add_argument("--vision-steps", type=int, default=None,
                    help="vision-tower pre-training steps on per-patch shape / colour labels (default 700, --quick: 10)")
    ap.add_argument("--vision-batch", type=int, default=32, help="images per vision pre-training step")
    ap.add_argument("--vision-lr", type=float, default=2e-3)
    ap.add_argument("--patch-loss-weight", type=float, default=0.5,
                    help="weight of the per-patch loss during end-to-end training (0: answer loss only)")
    ap.add_argument("--patch-label-threshold", type=float, default=0.2,
                    help="a patch is labelled with the object covering the largest part of it if that is >= this")
    ap.add_argument("--patch-background-weight", type=float, default=0.2,
                    help="class weight of background patches in the per-patch loss")
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, small eval, output in /tmp")
    ap.add_argument("--time-steps", type=int, default=0,
                    help="only time this many training steps (after 2 warm-up steps) and exit, writing nothing")
    args = ap.parse_args()
    q = args.quick
    out = args.out or (QUICK_OUT if q else OUT)
    steps = args.steps or (30 if q else DEFAULT_STEPS)
    vision_steps = args.vision_steps if args.vision_steps is not None else (10 if q else DEFAULT_VISION_STEPS)
    bs = args.batch or (8 if q else DEFAULT_BATCH)
    warmup = args.warmup if args.warmup is not None else max(1, steps // 40)
    valid_n = args.valid_n or (28 if q else 140)
    heldout_n = args.heldout_n or (14 if q else 700)
    if steps * bs > VISION_SEED_BASE or VISION_SEED_BASE + vision_steps * args.vision_batch > vqa_data.TRAIN_SEED_LIMIT:
        raise SystemExit("steps * batch (or the vision pre-training images) exceed their training seed range")

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    v = versions()
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and cpu_has_amx())
    log("versions:", json.dumps(v))
    log(f"threads {args.threads}, steps {steps}, batch {bs} images, lr {args.lr}, warmup {warmup}, "
        f"bf16 autocast {use_bf16}, out {out}")
    if v["torchvision_installed"]:
        log("WARNING: torchvision is installed; this script forces the PIL image processor anyway")

    def amp():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16)

    # ---- tokenizer + processor
    raw_tok = build_llama_bpe(vqa_data.corpus(), TRAIN_VOCAB)
    hf_tok = make_hf_tokenizer(raw_tok)
    vocab_size = len(hf_tok)
    ids_of = {t: raw_tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")}
    image_id, eos_id, pad_id, bos_id = ids_of["<image>"], ids_of["</s>"], ids_of["<pad>"], ids_of["<s>"]
    assert (ids_of["<unk>"], bos_id, eos_id) == (0, 1, 2)
    assert image_id == vocab_size - 2 and pad_id == vocab_size - 1, ids_of
    probe = prompt_text("What color is the star?")
    enc = raw_tok.encode(probe)
    assert enc.ids[0] == bos_id and enc.ids.count(image_id) == 1, enc.tokens
    assert raw_tok.decode(enc.ids[1:], skip_special_tokens=False) == probe
    assert hf_tok(probe).input_ids == enc.ids
    answer_pieces = {a: raw_tok.encode(f" {a}", add_special_tokens=False).tokens
                     for a in sorted({a for vs in vqa_data.ANSWERS.values() for a in vs} | {"four", "five"})}
    log(f"tokenizer: vocab {vocab_size}, special ids {ids_of}")
    log(f"  probe tokens: {enc.tokens}")
    log(f"  answer pieces: {answer_pieces}")
    processor = make_processor(hf_tok, IMAGE_SIZE, PATCH_SIZE)
    packer = Packer(raw_tok, image_id, eos_id, pad_id)

    # ---- model
    cfg = build_config(args, vocab_size, image_id, pad_id)
    model = LlavaForConditionalGeneration(cfg).float()
    if args.init == "scaled":
        init_weights(model, args.seed, args.embed_std, args.head_gain)
    model.set_attn_implementation("eager")  # with bf16 autocast a little faster than sdpa on the CPU
    n_params = sum(p.numel() for p in model.parameters())
    vt_last = sum(p.numel() for p in model.model.vision_tower.encoder.layers[-1].parameters()) + sum(
        p.numel() for p in model.model.vision_tower.post_layernorm.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters ({n_params * 2 / 1e6:.1f} MB in f16; "
        f"{vt_last / 1e6:.2f} M of them in the unused last CLIP layer + post_layernorm)")
    err = check_packing(model, packer, processor, eos_id)
    log(f"packed forward vs transformers single-question forward: max |logit diff| {err:.2e}")
    assert err < 1e-4, err
    model.train()

    patch_head = PatchHead(cfg.vision_config.hidden_size)
    with torch.no_grad():  # seeded like the model, independent of it
        g = torch.Generator().manual_seed(args.seed + 1)
        patch_head.proj.weight.copy_(torch.randn(patch_head.proj.weight.shape, generator=g)
                                     / math.sqrt(cfg.vision_config.hidden_size))
        patch_head.proj.bias.zero_()
    vision_history = pretrain_vision(model, patch_head, packer, args, vision_steps, amp)

    decay, no_decay = [], []
    for name, p in list(model.named_parameters()) + [("patch_head." + n, p) for n, p in patch_head.named_parameters()]:
        (decay if p.dim() >= 2 and "position_embedding" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def train_step(step: int) -> tuple[float, float, float, int, float]:
        t0 = time.time()
        lo, hi, easy = curriculum(step)
        examples = [vqa_data.train_example(step * bs + i, qtypes, min_objects=lo, max_objects=hi, easy=easy,
                                           per_type=args.questions_per_type) for i in range(bs)]
        use_patch = args.patch_loss_weight > 0
        batch = packer.batch(examples, args.patch_label_threshold if use_patch else None)
        t_data = time.time() - t0
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with amp():
            logits, clip_rows = packed_logits(model, batch, packer.p0)
            if use_patch:
                patch_loss, patch_acc = patch_head.loss(clip_rows, batch["patch_labels"], args.patch_background_weight)
        loss = torch.nn.functional.cross_entropy(logits, batch["targets"])
        total = loss + args.patch_loss_weight * patch_loss if use_patch else loss
        if use_patch:
            patch_stats.update(loss=float(patch_loss), **patch_acc)
        opt.zero_grad(set_to_none=True)
        total.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(patch_head.parameters()), 1.0))
        opt.step()
        em = exact_match_by_owner(logits.detach(), batch)
        for (b, j), good in em.items():
            c = type_counts.setdefault(examples[b].qas[j]["type"], [0, 0])
            c[0] += int(good)
            c[1] += 1
        return float(loss.detach()), sum(em.values()) / len(em), t_data, batch["ids"].shape[1], gn

    type_counts: dict[str, list[int]] = {}
    patch_stats: dict[str, float] = {}
    qtypes = args.qtypes.split(",") if args.qtypes else None
    stages = []
    for st in filter(None, args.curriculum.split(",")):
        f = st.split(":")
        stages.append((float(f[0]), int(f[1]), int(f[2]), len(f) > 3 and f[3] == "easy"))

    def curriculum(step: int) -> tuple[int, int, bool]:
        """(min objects, max objects, easy) for the training images of this step: the first stage whose end
        fraction of the run is beyond the step; after the last stage the evaluation distribution (2-5, normal)."""
        for end, lo, hi, easy in stages:
            if step < end * steps:
                return lo, hi, easy
        return 2, 5, False

    if args.time_steps:
        times = []
        for s in range(args.time_steps + 2):
            t0 = time.time()
            loss, acc, t_data, T, gn = train_step(s)
            times.append(time.time() - t0)
            log(f"step {s}: {times[-1]:.2f}s (data {t_data:.2f}s, seq {T}) loss {loss:.3f}")
        mean = sum(times[2:]) / len(times[2:])
        log(f"TIMING threads={args.threads} batch={bs} bf16={use_bf16}: {mean:.3f} s/step "
            f"-> {steps} steps = {mean * steps / 60:.1f} min")
        return 0

    valid = vqa_data.eval_examples(valid_n, vqa_data.VALID_SEED_BASE)
    history = []
    t_train = time.time()
    loss_ema = acc_ema = None
    for step in range(steps):
        loss, acc, t_data, T, gn = train_step(step)
        loss_ema = loss if loss_ema is None else 0.95 * loss_ema + 0.05 * loss
        acc_ema = acc if acc_ema is None else 0.95 * acc_ema + 0.05 * acc
        if step % 10 == 0 or step == steps - 1:
            el = time.time() - t_train
            log(f"step {step:5d}/{steps} loss {loss:.4f} (ema {loss_ema:.4f}) train-EM {acc:.3f} (ema {acc_ema:.3f}) "
                f"lr {lr_at(step):.2e} |g| {gn:.2f} seq {T} data {t_data:.2f}s  {el / (step + 1):.2f}s/step "
                f"eta {el / (step + 1) * (steps - step - 1) / 60:.1f} min"
                + (f" | patch loss {patch_stats['loss']:.3f} shape {patch_stats['patch_shape']:.3f}" if patch_stats else ""))
        rec = {"step": step, "loss": round(loss, 5), "train_em": round(acc, 4),
               **{"patch_" + k if not k.startswith("patch") else k: round(x, 4) for k, x in patch_stats.items()}}
        if (step + 1) % 50 == 0:
            te = {t: c[0] / c[1] for t, c in sorted(type_counts.items())}
            type_counts.clear()
            rec["train_em_by_type_last50"] = {k: round(x, 4) for k, x in te.items()}
            log(f"  train EM by type, last 50 steps: {fmt_acc(te)}")
        if (step + 1) % args.valid_every == 0 or step == steps - 1:
            va = teacher_forced_eval(model, packer, valid, 32, amp)
            rec["valid"] = {k: round(x, 4) for k, x in va.items()}
            log(f"  validation (teacher-forced exact match, {valid_n} questions): {fmt_acc(va)}")
        history.append(rec)
    train_minutes = (time.time() - t_train) / 60
    log(f"training done in {train_minutes:.1f} min")

    # ---- save (float16, llava-hf layout)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.eval()
    model16 = model.half()
    model16.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model16.save_pretrained(out, safe_serialization=True)
    save_processor_files(out, processor, raw_tok, IMAGE_SIZE)

    # ---- reload from disk and evaluate on the held-out set (greedy decoding)
    t_eval = time.time()
    st = load_file(str(out / "model.safetensors"))
    dtypes = sorted({str(t.dtype) for t in st.values()})
    assert dtypes == ["torch.float16"], dtypes
    model2 = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    proc2 = AutoProcessor.from_pretrained(out)
    ip2 = proc2.image_processor
    log(f"reloaded: processor {type(proc2).__name__}, image processor {type(ip2).__name__} "
        f"(backend {getattr(ip2, 'backend', '?')}), tokenizer {type(proc2.tokenizer).__name__}")
    tj = Tokenizer.from_file(str(out / "tokenizer.json"))  # what the Rust tokenizers crate reads
    assert tj.encode(probe).ids == enc.ids
    heldout = vqa_data.eval_examples(heldout_n, vqa_data.HELDOUT_SEED_BASE)
    acc, wrong = heldout_accuracy(model2, proc2, heldout, eos_id, pad_id)
    eval_minutes = (time.time() - t_eval) / 60
    log(f"HELD-OUT ACCURACY ({heldout_n} questions, seeds {vqa_data.HELDOUT_SEED_BASE}.., greedy, f16 weights): "
        f"{fmt_acc(acc)}  ({eval_minutes:.1f} min)")
    for w in wrong[:12]:
        log(f"  wrong: {w}")

    # ---- example images (seeds 30_000_000+, outside every other range)
    examples_meta = []
    example_specs = [("color_of_shape", None), ("quadrant", None), ("count_all", None)]
    for i, (qtype, target) in enumerate(example_specs):
        ex = vqa_data.single_example(30_000_000 + i, qtype, target)
        name = f"example{i + 1}.png"
        ex.image.save(out / name, format="PNG", optimize=False)
        img = Image.open(out / name)
        qs = [vqa_data.ask(random.Random(40_000_000 + 10 * i + k), ex.scene, t) for k, t in enumerate(vqa_data.QTYPES)]
        for qa in [ex.qas[0]] + [x for x in qs if x is not None and x["type"] != qtype]:
            pred = greedy_answer(model2, proc2, img, qa["question"], eos_id, pad_id)
            examples_meta.append({"image": name, "question": qa["question"], "answer": qa["answer"],
                                  "type": qa["type"], "model_answer": pred})
    (out / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples_meta))

    total_minutes = (time.time() - t_start) / 60
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    run_info = {
        "versions": v, "args": {k: (str(x) if isinstance(x, Path) else x) for k, x in vars(args).items()},
        "steps": steps, "batch_images": bs, "vision_steps": vision_steps, "vision_history": vision_history, "warmup": warmup, "bf16_autocast": use_bf16,
        "parameters": n_params, "train_minutes": round(train_minutes, 2), "eval_minutes": round(eval_minutes, 2),
        "total_minutes": round(total_minutes, 2), "heldout_n": heldout_n, "heldout_accuracy": acc,
        "heldout_wrong": wrong[:50], "history": history,
    }
    (out / "training_log.json").write_text(json.dumps(run_info, indent=1) + "\n")
    write_readme(out, cfg, args, run_info, acc, examples_meta, vocab_size, ids_of, size)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log("files:")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            log(f"  {p.relative_to(out)}  {p.stat().st_size} bytes")
    log(f"total size {size} bytes ({size / 1e6:.2f} MB), total run time {total_minutes:.1f} min")
    assert size <= MAX_SIZE_BYTES, f"{out} is {size} bytes > {MAX_SIZE_BYTES}"
    log(f"FINAL held-out accuracy {acc['all']:.4f}")
    return 0


def write_readme(out: Path, cfg, args, info: dict, acc: dict, examples: list, vocab_size: int, ids_of: dict,
                 size: int) -> None:
    vc, tc = cfg.vision_config, cfg.text_config
    v = info["versions"]
    rows = "\n".join(f"| {t} | {acc[t] * 100:.1f}% |" for t in vqa_data.QTYPES if t in acc)
    ex_rows = "\n".join(f"| {e['image']} | {e['question']} | {e['answer']} | {e['model_answer']} |" for e in examples)
    readme = f"""# tiny-llava-shapes

A tiny LLaVA-1.5 (`LlavaForConditionalGeneration`, llava-hf layout, float16) **trained from scratch** on a
synthetic visual question answering task: pictures of 2-5 coloured shapes (circle, square, triangle, star,
cross; red, green, blue, yellow, purple, orange, white) on muted backgrounds, and questions whose answers
depend on specific regions of the image. It is the default model of llava-wgpu and the model the pruning
evaluation runs on. Everything is generated locally by `scripts/train_tiny_llava.py` (no downloads).

## Held-out accuracy

**{acc['all'] * 100:.1f}%** exact match on {info['heldout_n']} held-out questions (seeds 10,000,000 +
i, never used in training; types and answers balanced), greedy decoding of this f16 checkpoint (computed in
float32 by transformers), answers compared after `vqa_data.normalize_answer` (lowercase, punctuation dropped,
whitespace collapsed).

| question type | accuracy |
|---|---|
{rows}

The same set as a JSONL file + PNGs for `llava-wgpu eval`:

    python scripts/vqa_data.py heldout --out data/shapes-heldout --n {info['heldout_n']}

## Examples

| image | question | reference | model |
|---|---|---|---|
{ex_rows}

Prompt format: `USER: <image>\\n{{question}} ASSISTANT:`; the model answers with one or two words and `</s>`.

## Model

- Vision: CLIP ViT, image {vc.image_size}, patch {vc.patch_size} -> {NUM_PATCHES} visual tokens (+ CLS), width
  {vc.hidden_size}, MLP {vc.intermediate_size}, {vc.num_attention_heads} heads, {vc.num_hidden_layers} layers,
  quick_gelu, LayerNorm eps 1e-5. Feature layer -2, strategy "default" (CLS dropped): LLaVA runs layers
  0..{vc.num_hidden_layers - 2}; the last layer and `post_layernorm` are never used (left at their
  initial values, present only so the checkpoint has the usual shape).
- Projector: linear {vc.hidden_size}->{tc.hidden_size}, exact-erf GELU, linear {tc.hidden_size}->{tc.hidden_size}.
- Text: LLaMA, width {tc.hidden_size}, MLP {tc.intermediate_size}, {tc.num_attention_heads} heads /
  {tc.num_key_value_heads} KV heads (GQA), {tc.num_hidden_layers} layers, RMSNorm eps 1e-5, rope_theta 10000,
  vocab {vocab_size}, untied lm_head.
- {info['parameters'] / 1e6:.2f} M parameters, float16; directory size {size / 1e6:.1f} MB.
- Tokenizer: LLaMA-style BPE trained on the task's questions and answers (Metaspace, byte fallback at ids
  3..258), `<unk>`=0, `<s>`=1 (BOS), `</s>`=2 (EOS), `<image>`={ids_of['<image>']}, `<pad>`={ids_of['<pad>']}.
- Image preprocessing: the CLIP processor (PIL bicubic, shortest edge {IMAGE_SIZE}, centre crop {IMAGE_SIZE},
  CLIP mean / std). The training images are exactly {IMAGE_SIZE}x{IMAGE_SIZE}.

## Training

`python scripts/train_tiny_llava.py` (CPU, {args.threads} threads), in two stages.

1. Vision pre-training: {info['vision_steps']} AdamW steps of {args.vision_batch} images (1-5 shapes, lr
   {args.vision_lr}) train the CLIP layers LLaVA uses, through a linear probe on their output that predicts, for
   every patch, the shape and the colour of the object covering it (background patches weighted
   {args.patch_background_weight}); the probe also predicts each patch's row and column, so the features keep where a patch is; it is not part of the checkpoint. Without it, shape identity and the
   colour-shape binding stayed at chance: the answer tokens alone are too sparse a signal for a ViT trained
   from scratch.
2. End to end: {info['steps']} AdamW steps of
{info['batch_images']} images, each image with up to {args.questions_per_type} distinct questions of every type the scene allows, packed
into one sequence per image with a block attention mask (equivalent to separate single-question examples);
loss on the answer tokens and `</s>` only; width-aware initialisation (N(0, 1/fan_in), residual outputs
/ sqrt(2 L), token embeddings N(0, {args.embed_std:g})) instead of transformers' fixed 0.02; object-count
curriculum `{args.curriculum}` (END:MIN:MAX[:easy] stages, then 2-5 objects); lr {args.lr} with {info['warmup']} warm-up steps and cosine decay to
{args.min_lr_ratio} x; the per-patch loss kept at weight {args.patch_loss_weight}; weight decay
{args.weight_decay}; gradient clipping 1.0; bf16 autocast
{'on' if info['bf16_autocast'] else 'off'}. Training took {info['train_minutes']:.1f} min, the held-out
evaluation {info['eval_minutes']:.1f} min, the whole script {info['total_minutes']:.1f} min.
Loss and validation curves: `training_log.json`.

Versions: transformers {v['transformers']}, torch {v['torch']}, tokenizers {v['tokenizers']},
Pillow {v['pillow']}, numpy {v['numpy']}, Python {v['python']}.
"""
    (out / "README.md").write_text(readme)


if __name__ == "__main__":
    sys.exit(main())
