#!/usr/bin/env python3
"""Build the tiny random LLaVA-1.5 test fixture and its Hugging Face reference outputs.

Writes ``weights/tiny-random-llava/`` (relative to the repository root) in the llava-hf layout:

    config.json, generation_config.json, model.safetensors (float32, ~1.9 MB)
    tokenizer.json, tokenizer_config.json, (special_tokens_map.json if transformers writes it)
    processor_config.json (what transformers 5.x writes), preprocessor_config.json (written
    explicitly in the classic llava-hf form), chat_template.json + chat_template.jinja
    README.md
    reference/  test images (PNG), reference.safetensors, cases.json

Everything is built locally, nothing is downloaded:

* Tokenizer: a LLaMA-style BPE (Metaspace "\u2581" with prepend_scheme "first", byte fallback
  with the 256 ``<0xXX>`` tokens at ids 3..258, decoder Replace/ByteFallback/Fuse/Strip) trained
  with the ``tokenizers`` library on synthetic English sentences generated here. Special tokens
  ``<unk>`` = 0, ``<s>`` = 1 (BOS, added by the TemplateProcessing post-processor "<s> $A"),
  ``</s>`` = 2 (EOS), ``<image>`` and ``<pad>`` as the last two ids (like llava-hf's 32000/32001).
* Model: ``LlavaForConditionalGeneration`` (CLIP vision tower 84px / patch 14 / 5 layers / width 64,
  LLaMA text model 4 layers / width 64 / GQA 4:2 / MLP 150), weights drawn from a seeded normal
  distribution with scales chosen so that activations and logits are well spread.  Seeds are
  searched deterministically (starting at BASE_SEED) until every greedy step of every reference
  case has a top-1/top-2 logit gap >= MIN_GAP and >= F16_MARGIN times the logit change caused by
  rounding all weights to f16 (so token-parity tests do not flake), each case's 16 tokens are not
  a one-token loop, and plain greedy decoding would not stop at EOS within the 16 steps.
* Processor: ``LlavaProcessor`` with the PIL ``CLIPImageProcessorPil`` (never the torchvision
  one), shortest edge 84, centre crop 84, bicubic, CLIP mean/std.
* Reference cases: deterministic PIL test images (square, larger square, wide, tall grayscale,
  RGBA) and prompts; for each case the processor's pixel values (also with LLaVA's expand2square
  padding), input ids, the selected CLIP hidden state, the projector output, the first logits row
  and 16 greedy tokens (EOS masked out), run in float32 with eager attention on the CPU.
* Visual-token pruning references (docs/pruning.md): CLIP layer-3 attention scores (all rows / CLS row), the unpruned
  prefill's text->visual scores of LLaMA layers 0..2 (text rows / last row), stage-1-only (transformers with N1
  <image> tokens fed the projector output of the kept patches), STAR stage 1 + stage 2 at K = 2 and FastV, the
  last two through transformers' own decoder-layer modules with the visual rows dropped before layer K and the
  survivors keeping their RoPE positions (checked bit-for-bit against transformers without the drop). Budgets
  default to N1 = 32, N2 = 8 and move to the nearest candidates whose top-k boundary gaps are safe in every case.

At the end the saved directory is reloaded with ``from_pretrained`` and checked to reproduce the
references; the raw ``tokenizer.json`` (as the Rust ``tokenizers`` crate reads it) is checked to
give the same ids; and an independent float64 re-implementation of the forward pass, reading
``model.safetensors`` directly, is checked against transformers.

Regenerate with:  python scripts/make_tiny_llava.py     (CPU only, well under a minute)
Pinned versions:  scripts/requirements.txt  (do not install torchvision: with it transformers 5 switches to a
                  torchvision image processor whose bicubic differs from PIL's)
Output is deterministic: rerunning produces byte-identical files with the same package versions.
"""

from __future__ import annotations

# first: sets the offline environment before transformers loads
from llava_hf_common import CLIP_MEAN, CLIP_STD, build_llama_bpe, llava_config, make_hf_tokenizer, make_processor, save_processor_files, versions

import argparse
import copy
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

try:
    from transformers import LlavaImageProcessorPil as PilLlavaImageProcessor
except ImportError:
    PilLlavaImageProcessor = None

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "weights" / "tiny-random-llava"
REF = OUT / "reference"

# ----------------------------------------------------------------------------- constants

IMAGE_SIZE = 84
PATCH_SIZE = 14
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 36
NEW_TOKENS = 16
# Seed search criteria, for every greedy step of every case:
MIN_GAP = 0.15  # top-1/top-2 logit gap (of the raw logits and of the EOS-masked logits)
F16_MARGIN = 8.0  # gap >= F16_MARGIN x (max |logit change| when every weight is rounded to f16)
MIN_DISTINCT = 6  # at least this many distinct ids among each case's 16 greedy tokens (no 1-token loops)
# and the plain greedy run never picks EOS within the 16 steps (so greedy_ids == ordinary greedy output).
# The search from 1000 with transformers 5.23 / torch 2.15 first succeeded at 1501; starting there keeps
# regeneration fast. With other versions the search simply continues from here.
BASE_SEED = 1501
MAX_SEED_TRIES = 2000
LOGIT_STD = 8.0  # target standard deviation of the logits (lm_head scale)
ROPE_THETA = 5000.0  # deliberately not the LLaMA default (10000)
RMS_NORM_EPS = 1e-5  # deliberately not the LlamaConfig default (1e-6)
TRAIN_VOCAB = 400  # BPE trainer vocabulary (alphabet + merges), before bytes and specials

CASES = [
    dict(file="case0_square84.png", size=(84, 84), mode="RGB", prompt="What is this?"),
    dict(
        file="case1_square200.png",
        size=(200, 200),
        mode="RGB",
        prompt="Describe the colors and the shapes in this picture.",
    ),
    dict(file="case2_wide97x61.png", size=(97, 61), mode="RGB", prompt="Is there a red circle?"),
    dict(
        file="case3_tall50x130_gray.png",
        size=(50, 130),
        mode="L",
        prompt="How many small shapes can you see on the left side of the image?",
    ),
    dict(file="case4_rgba120x90.png", size=(120, 90), mode="RGBA", prompt="What color is the caf\u00e9 sign?"),
]


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- tokenizer

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "brown", "pink", "dark",
          "light", "bright", "pale"]
SHAPES = ["circle", "square", "triangle", "line", "star", "rectangle", "dot", "ring", "cross", "box", "shape",
          "blob", "stripe", "curve"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle", "near the corner",
          "above the line", "below the box", "next to the circle", "behind the square", "in the center"]
NOUNS = ["picture", "image", "photo", "scene", "drawing", "painting", "sign", "background", "pattern", "gradient"]
SIZES = ["small", "large", "big", "tiny", "thin", "wide", "tall", "round", "soft", "sharp"]
QWORDS = ["What", "Which", "Where", "How many", "Is there", "Are there", "Can you see", "Does the", "Why is"]
NUMS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "0", "1", "2", "3", "4", "5",
        "6", "7", "8", "9", "12", "36", "84"]


def synthetic_corpus(n: int = 600) -> list[str]:
    """Deterministic English-ish sentences about images, colours and shapes (ASCII only, no newlines)."""
    rng = random.Random(1234)
    c = lambda xs: rng.choice(xs)  # noqa: E731
    patterns = [
        lambda: f"The {c(SIZES)} {c(COLORS)} {c(SHAPES)} is {c(PLACES)} of the {c(NOUNS)}.",
        lambda: f"{c(QWORDS)} {c(COLORS)} {c(SHAPES)}s in this {c(NOUNS)}?",
        lambda: f"There are {c(NUMS)} {c(COLORS)} {c(SHAPES)}s {c(PLACES)}.",
        lambda: f"USER: {c(QWORDS)} the {c(SHAPES)} {c(PLACES)}? ASSISTANT: It is {c(COLORS)}.",
        lambda: f"I can see a {c(SIZES)} {c(SHAPES)} and a {c(COLORS)} {c(SHAPES)} {c(PLACES)}.",
        lambda: f"This {c(NOUNS)} shows {c(NUMS)} {c(SHAPES)}s, mostly {c(COLORS)} and {c(COLORS)}.",
        lambda: f"Describe the {c(NOUNS)}: a {c(COLORS)} {c(SHAPES)} with a {c(SIZES)} {c(COLORS)} border.",
        lambda: f"Yes, there is a {c(COLORS)} {c(SHAPES)}; no, it is not {c(SIZES)}!",
        lambda: f"How many {c(SHAPES)}s can you see {c(PLACES)} of the {c(NOUNS)}? About {c(NUMS)}.",
        lambda: f"The colors are {c(COLORS)}, {c(COLORS)} and {c(COLORS)} (mostly {c(COLORS)}).",
        lambda: f"What is this? It looks like a {c(SIZES)} {c(NOUNS)} of a {c(SHAPES)}.",
        lambda: f"Is the {c(NOUNS)} {c(COLORS)} or {c(COLORS)}? The {c(SHAPES)} is {c(COLORS)}.",
    ]
    return [rng.choice(patterns)() for _ in range(n)]


def build_tokenizer() -> Tokenizer:
    return build_llama_bpe(synthetic_corpus(), TRAIN_VOCAB)


# ----------------------------------------------------------------------------- images


def make_image(idx: int, size: tuple[int, int], mode: str) -> Image.Image:
    """Gradient + filled shapes + noise, deterministic per case index."""
    w, h = size
    rng = np.random.default_rng(100 + idx)
    x = np.linspace(0.0, 1.0, w)[None, :]
    y = np.linspace(0.0, 1.0, h)[:, None]
    c0, c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    arr = (c0[None, None] * (1 - x[..., None]) * (1 - y[..., None]) + c1[None, None] * x[..., None]
           + c2[None, None] * y[..., None] * (1 - x[..., None]))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for k in range(4):
        x0, y0 = int(rng.integers(0, max(1, w - 8))), int(rng.integers(0, max(1, h - 8)))
        x1 = min(w - 1, x0 + int(rng.integers(6, max(7, w // 2))))
        y1 = min(h - 1, y0 + int(rng.integers(6, max(7, h // 2))))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if k % 3 == 0:
            d.ellipse([x0, y0, x1, y1], fill=col)
        elif k % 3 == 1:
            d.rectangle([x0, y0, x1, y1], fill=col)
        else:
            d.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=col)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3)).astype(np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        alpha = np.full((h, w), 255, np.uint8)
        alpha[:, : w // 3] = np.linspace(0, 255, h, dtype=np.float64)[:, None].astype(np.uint8)  # soft edge
        alpha[h // 4 : h // 2, w // 2 : w // 2 + w // 5] = 0  # fully transparent hole
        img = Image.fromarray(np.dstack([np.asarray(img), alpha]), "RGBA")
    return img


def expand2square(img: Image.Image, background) -> Image.Image:
    """LLaVA's pad-to-square (llava/mm_utils.py): centred paste on a square of the mean colour."""
    w, h = img.size
    if w == h:
        return img
    if w > h:
        out = Image.new(img.mode, (w, w), background)
        out.paste(img, (0, (w - h) // 2))
    else:
        out = Image.new(img.mode, (h, h), background)
        out.paste(img, ((h - w) // 2, 0))
    return out


def to_rgb_like_processor(img: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb, as the installed version does it (5.x composites alpha onto white)."""
    from transformers.image_transforms import convert_to_rgb

    try:
        return Image.fromarray(convert_to_rgb(img, return_numpy=True))
    except TypeError:  # transformers 4.x signature
        return convert_to_rgb(img)


# ----------------------------------------------------------------------------- model


def build_config(vocab_size: int, image_id: int, pad_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=5,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=150,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        hidden_act="silu",
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_id,
        attention_bias=False,
        mlp_bias=False,
    )
    return llava_config(vision, text, image_id, NUM_PATCHES)


def randomize(model: torch.nn.Module, seed: int, quiet_ids: dict[int, float]) -> None:
    """Seeded normal init with scales that keep every stage well spread (parameters in name order).

    `quiet_ids` maps token ids to a factor for their lm_head row: the byte-fallback and the special
    tokens other than EOS are made less likely so greedy text is mostly ordinary pieces."""
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.text_config.hidden_size
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            n = torch.randn(p.shape, generator=g, dtype=torch.float64)
            leaf = name.split(".")[-2] if name.count(".") else name
            if name.endswith("lm_head.weight"):
                v = n * (LOGIT_STD / math.sqrt(hidden))
                for tid, f in quiet_ids.items():
                    v[tid] *= f
            elif name.endswith("embed_tokens.weight") or name.endswith("class_embedding"):
                v = n
            elif name.endswith("position_embedding.weight"):
                v = n * 0.5
            elif "norm" in leaf or "layrnorm" in leaf:  # LayerNorm / RMSNorm
                v = 1.0 + 0.1 * n if name.endswith("weight") else 0.1 * n
            elif name.endswith("bias"):
                v = 0.05 * n
            elif name.endswith("weight") and p.dim() >= 2:
                fan_in = p[0].numel()
                v = n / math.sqrt(fan_in)
            else:
                raise RuntimeError(f"no init rule for {name} {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))


@torch.no_grad()
def greedy_run(model, input_ids, pixel_values, eos_id: int, steps: int = NEW_TOKENS):
    """Greedy decoding with the KV cache; EOS is masked out so exactly `steps` tokens come out."""
    attn = torch.ones_like(input_ids)
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attn, use_cache=True)
    logits = out.logits[0, -1].float()
    past = out.past_key_values
    ids, step_logits, gaps = [], [], []
    first_eos = None
    for step in range(steps):
        step_logits.append(logits.clone())
        raw_top = torch.topk(logits, 3)
        masked = logits.clone()
        masked[eos_id] = -float("inf")
        m_top = torch.topk(masked, 2)
        gaps.append(min(float(raw_top.values[0] - raw_top.values[1]), float(m_top.values[0] - m_top.values[1])))
        if first_eos is None and int(raw_top.indices[0]) == eos_id:
            first_eos = step
        nxt = int(m_top.indices[0])
        ids.append(nxt)
        if step + 1 == steps:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(input_ids=torch.tensor([[nxt]]), attention_mask=attn, past_key_values=past, use_cache=True)
        logits = out.logits[0, -1].float()
        past = out.past_key_values
    return ids, torch.stack(step_logits), gaps, first_eos


@torch.no_grad()
def teacher_forced_logits(model, prompt_ids: list[int], new_ids: list[int], pixel_values) -> torch.Tensor:
    """Logits [len(new_ids), vocab] that chose each of new_ids, from one full forward (no cache)."""
    seq = torch.tensor([prompt_ids + new_ids[:-1]])
    return model(input_ids=seq, pixel_values=pixel_values[None]).logits[0, -len(new_ids):].float()


@torch.no_grad()
def vision_outputs(model, pixel_values):
    """(selected CLIP hidden state incl. CLS [37,64], projector output [36,64])."""
    layer = model.config.vision_feature_layer
    vt = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    hs = vt(pixel_values, output_hidden_states=True).hidden_states
    sel = hs[layer][0]
    feats = model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=layer, vision_feature_select_strategy="default"
    )
    if hasattr(feats, "pooler_output"):
        feats = feats.pooler_output
    if isinstance(feats, (list, tuple)):
        feats = feats[0]
    feats = feats.reshape(-1, feats.shape[-1])
    return sel, feats


# ----------------------------------------------------------------------------- independent reference


def manual_forward(st: dict[str, torch.Tensor], cfg: dict, pixel_values: torch.Tensor, input_ids: list[int]):
    """Float64 re-implementation of LLaVA-1.5 straight from model.safetensors (no transformers code)."""

    def get(*names):
        for nm in names:
            if nm in st:
                return st[nm].double()
        raise KeyError(names)

    def vt(suffix):  # vision tower key, both layouts
        return get(f"model.vision_tower.{suffix}", f"model.vision_tower.vision_model.{suffix}",
                   f"vision_tower.vision_model.{suffix}", f"vision_tower.{suffix}")

    def lm(suffix):
        return get(f"model.language_model.{suffix}", f"language_model.model.{suffix}")

    def proj(suffix):
        return get(f"model.multi_modal_projector.{suffix}", f"multi_modal_projector.{suffix}")

    vc, tc = cfg["vision_config"], cfg["text_config"]
    ln = lambda x, w, b, eps: torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, eps)  # noqa: E731

    # --- CLIP
    px = pixel_values.double()[None]
    patches = torch.nn.functional.conv2d(px, vt("embeddings.patch_embedding.weight"), stride=vc["patch_size"])
    patches = patches.flatten(2).transpose(1, 2)[0]  # [36, D]
    x = torch.cat([vt("embeddings.class_embedding")[None], patches], 0) + vt("embeddings.position_embedding.weight")
    x = ln(x, vt("pre_layrnorm.weight"), vt("pre_layrnorm.bias"), vc["layer_norm_eps"])
    hidden = [x]
    H = vc["num_attention_heads"]
    for i in range(vc["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        h = ln(x, vt(p + "layer_norm1.weight"), vt(p + "layer_norm1.bias"), vc["layer_norm_eps"])
        q = h @ vt(p + "self_attn.q_proj.weight").T + vt(p + "self_attn.q_proj.bias")
        k = h @ vt(p + "self_attn.k_proj.weight").T + vt(p + "self_attn.k_proj.bias")
        v = h @ vt(p + "self_attn.v_proj.weight").T + vt(p + "self_attn.v_proj.bias")
        n, d = q.shape
        hd = d // H
        q, k, v = (t.view(n, H, hd).transpose(0, 1) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ v
        a = a.transpose(0, 1).reshape(n, d)
        x = x + a @ vt(p + "self_attn.out_proj.weight").T + vt(p + "self_attn.out_proj.bias")
        h = ln(x, vt(p + "layer_norm2.weight"), vt(p + "layer_norm2.bias"), vc["layer_norm_eps"])
        h = h @ vt(p + "mlp.fc1.weight").T + vt(p + "mlp.fc1.bias")
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        x = x + h @ vt(p + "mlp.fc2.weight").T + vt(p + "mlp.fc2.bias")
        hidden.append(x)
    sel = hidden[cfg["vision_feature_layer"]]
    f = sel[1:]
    f = f @ proj("linear_1.weight").T + proj("linear_1.bias")
    f = torch.nn.functional.gelu(f)  # exact erf
    f = f @ proj("linear_2.weight").T + proj("linear_2.bias")

    # --- LLaMA
    emb = lm("embed_tokens.weight")
    ids = torch.tensor(input_ids)
    x = emb[ids].clone()
    x[ids == cfg["image_token_index"]] = f
    n, d = x.shape
    H, KV = tc["num_attention_heads"], tc["num_key_value_heads"]
    hd = d // H
    theta = tc.get("rope_parameters", {}).get("rope_theta", tc.get("rope_theta", 10000.0))
    eps = tc["rms_norm_eps"]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):  # [heads, n, hd], rotate_half convention
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    rms = lambda t, w: t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps) * w  # noqa: E731
    mask = torch.full((n, n), -float("inf"), dtype=torch.float64).triu(1)
    for i in range(tc["num_hidden_layers"]):
        p = f"layers.{i}."
        h = rms(x, lm(p + "input_layernorm.weight"))
        q = (h @ lm(p + "self_attn.q_proj.weight").T).view(n, H, hd).transpose(0, 1)
        k = (h @ lm(p + "self_attn.k_proj.weight").T).view(n, KV, hd).transpose(0, 1)
        v = (h @ lm(p + "self_attn.v_proj.weight").T).view(n, KV, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        rep = H // KV
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)  # head h uses kv head h // rep
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ v
        x = x + a.transpose(0, 1).reshape(n, d) @ lm(p + "self_attn.o_proj.weight").T
        h = rms(x, lm(p + "post_attention_layernorm.weight"))
        g = h @ lm(p + "mlp.gate_proj.weight").T
        u = h @ lm(p + "mlp.up_proj.weight").T
        x = x + (torch.nn.functional.silu(g) * u) @ lm(p + "mlp.down_proj.weight").T
    x = rms(x, lm("norm.weight"))
    head = get("lm_head.weight", "language_model.lm_head.weight")
    return sel, f, x[-1] @ head.T


# ----------------------------------------------------------------------------- visual-token pruning references
# The contract is the project's pruning specification (docs/pruning.md, summarised in cases.json["pruning"]): scores, tie
# rule (lower index wins), raster-order kept lists, original RoPE positions after the stage-2 drop.

N1_DEFAULT = 32  # STAR stage 1 budget: floor(36 * (1 - 0.1))
N2_DEFAULT = 8  # final budget (STAR stage 2 and FastV)
STAGE2_K = 2  # 1-based: scores from 0-based layer K-1, rows dropped from the hidden state entering layer K
STAGE1_NEW_TOKENS = 16
STAR_NEW_TOKENS = 8
N1_CANDIDATES = list(range(30, 35))
N2_CANDIDATES = list(range(6, 13))
NEAR_TIE_REL = 1e-4  # relative boundary gap below which an exact kept-set comparison with the engine may flake
SAFE_GAP_REL = 1e-3  # relative boundary gap a budget needs to be listed as safe


def topk_keep(scores: torch.Tensor, k: int) -> list[int]:
    """Top-k indices by score, ties to the lower index, returned in ascending (raster) order."""
    s = scores.double().tolist()
    return sorted(sorted(range(len(s)), key=lambda j: (-s[j], j))[:k])


def boundary_gap(scores: torch.Tensor, k: int) -> dict:
    """Gap between the k-th and (k+1)-th largest score (absolute and relative to the k-th)."""
    s = sorted(scores.double().tolist(), reverse=True)
    a, b = s[k - 1], s[k]
    return {"k": k, "kth_score": float(f"{a:.9e}"), "next_score": float(f"{b:.9e}"),
            "abs": float(f"{a - b:.6e}"), "rel": float(f"{(a - b) / abs(a):.6e}")}


def rel_gaps(scores: torch.Tensor, ks) -> dict:
    return {str(k): boundary_gap(scores, k)["rel"] for k in ks}


def clip_layer_scores(model, pixel_values: torch.Tensor):
    """(attention-received scores [37], CLS-row scores [37], selected hidden state [37,64]) of the CLIP layer whose
    output is hidden_states[vision_feature_layer] (layer 3 here: hidden_states[0] is the embedding output)."""
    vt = model.model.vision_tower
    with torch.no_grad():
        out = vt(pixel_values[None], output_hidden_states=True, output_attentions=True)
    layer = len(out.hidden_states) + model.config.vision_feature_layer - 1  # 6 - 2 - 1 = 3
    P = out.attentions[layer][0]  # [heads, 37 queries, 37 keys], float32 softmax rows
    return (P.double().mean(dim=(0, 1)).float(), P[:, 0, :].double().mean(dim=0).float(),
            out.hidden_states[model.config.vision_feature_layer][0], layer)


def text_visual_scores(P: torch.Tensor, vis_start: int, n_vis: int):
    """From one layer's attention probabilities [heads, L, L]: (mean over heads and over every row after the last
    image token, last row only), each [n_vis] over the visual keys."""
    vis = slice(vis_start, vis_start + n_vis)
    return (P[:, vis_start + n_vis:, vis].double().mean(dim=(0, 1)).float(),
            P[:, -1, vis].double().mean(dim=0).float())


class LayerKV:
    """Minimal per-layer KV cache: update() is the only method LlamaAttention calls. Layers may hold different
    numbers of rows (layers >= K keep only the stage-2 survivors)."""

    def __init__(self, n_layers: int):
        self.kv = [None] * n_layers

    def update(self, k, v, layer_idx, *args, **kwargs):
        if self.kv[layer_idx] is not None:
            k = torch.cat([self.kv[layer_idx][0], k], dim=-2)
            v = torch.cat([self.kv[layer_idx][1], v], dim=-2)
        self.kv[layer_idx] = (k, v)
        return k, v

    def rows(self) -> list[int]:
        return [kv[0].shape[-2] for kv in self.kv]


def splice_embeds(model, input_ids: list[int], feats: torch.Tensor, image_id: int) -> torch.Tensor:
    """Token embeddings with the <image> rows replaced by `feats` (what LlavaModel's masked_scatter does)."""
    ids = torch.tensor(input_ids)
    with torch.no_grad():
        e = model.model.language_model.embed_tokens(ids).clone()
    assert int((ids == image_id).sum()) == feats.shape[0]
    e[ids == image_id] = feats
    return e


@torch.no_grad()
def lm_prefill(model, embeds, vis_start, n_vis, drop_layer=None, keep=None, cache=None):
    """Prefill the LLaMA stack on embeds [L, D] with transformers' own decoder-layer modules (float32, eager).

    With drop_layer set, `keep` (a callable on the attention probabilities [H, L, L] of layer drop_layer-1, or a
    fixed list) gives the local visual indices 0..n_vis-1 that survive: the other visual rows are removed from the
    hidden state entering layer drop_layer (every non-visual row stays, kept rows stay in order), the causal mask is
    rebuilt over the compacted sequence and the survivors keep their original RoPE positions.
    Returns (logits of every remaining row, per-layer attention probabilities, kept local indices, positions)."""
    lm = model.model.language_model
    x = embeds[None]
    pos = torch.arange(x.shape[1])[None]
    probs, kept = [], None
    for li, layer in enumerate(lm.layers):
        if drop_layer is not None and li == drop_layer:
            kept = list(keep(probs[li - 1]) if callable(keep) else keep)
            rows = (list(range(vis_start)) + [vis_start + j for j in kept]
                    + list(range(vis_start + n_vis, x.shape[1])))
            x, pos = x[:, rows], pos[:, rows]
        n = x.shape[1]
        mask = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]  # as transformers' eager mask
        grabbed = []
        hook = layer.self_attn.register_forward_hook(lambda m, a, o: grabbed.append(o[1]))
        x = layer(x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=cache is not None,
                  position_embeddings=lm.rotary_emb(x, pos))
        hook.remove()
        probs.append(grabbed[0][0])
    return model.lm_head(lm.norm(x))[0].float(), probs, kept, pos[0].tolist()


def pick(logits: torch.Tensor, eos_id: int):
    """Greedy choice with EOS masked (as greedy_run): (id, top-1/top-2 gap of raw and masked logits)."""
    raw_top = torch.topk(logits, 2)
    masked = logits.clone()
    masked[eos_id] = -float("inf")
    m_top = torch.topk(masked, 2)
    gap = min(float(raw_top.values[0] - raw_top.values[1]), float(m_top.values[0] - m_top.values[1]))
    return int(m_top.indices[0]), gap


@torch.no_grad()
def lm_decode(model, cache: LayerKV, logits: torch.Tensor, first_pos: int, steps: int, eos_id: int):
    """Greedy decode on a prefilled LayerKV; the token generated at step s is fed at position first_pos + s."""
    lm = model.model.language_model
    ids, step_logits, gaps = [], [], []
    for s in range(steps):
        step_logits.append(logits)
        nxt, gap = pick(logits, eos_id)
        ids.append(nxt)
        gaps.append(gap)
        if s + 1 == steps:
            break
        x = lm.embed_tokens(torch.tensor([[nxt]]))
        pos = torch.tensor([[first_pos + s]])
        for layer in lm.layers:
            x = layer(x, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
                      position_embeddings=lm.rotary_emb(x, pos))
        logits = model.lm_head(lm.norm(x))[0, -1].float()
    return ids, torch.stack(step_logits), gaps


@torch.no_grad()
def hf_greedy_mm(model, input_ids: list[int], feats: torch.Tensor, eos_id: int, steps: int):
    """transformers' own LlavaForConditionalGeneration on input_ids whose <image> tokens take the precomputed
    projector output `feats` (mm_encoder_outputs), then greedy with its KV cache, EOS masked like greedy_run."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ids_t = torch.tensor([input_ids])
    attn = torch.ones_like(ids_t)
    out = model(input_ids=ids_t, attention_mask=attn, use_cache=True, output_attentions=True,
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[feats])})
    attentions = [a[0] for a in out.attentions]
    logits, past = out.logits[0, -1].float(), out.past_key_values
    ids, step_logits, gaps = [], [], []
    for s in range(steps):
        step_logits.append(logits)
        nxt, gap = pick(logits, eos_id)
        ids.append(nxt)
        gaps.append(gap)
        if s + 1 == steps:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(input_ids=torch.tensor([[nxt]]), attention_mask=attn, past_key_values=past, use_cache=True)
        logits, past = out.logits[0, -1].float(), out.past_key_values
    return ids, torch.stack(step_logits), gaps, attentions


@torch.no_grad()
def pruning_scores(model, cs: dict, image_id: int) -> dict:
    """Budget-independent scores of one case: CLIP layer scores and the unpruned prefill's text->visual scores."""
    attn_scores, cls_scores, sel, clip_layer = clip_layer_scores(model, cs["pv"])
    ids = cs["input_ids"]
    start = ids.index(image_id)
    out = model(input_ids=torch.tensor([ids]), pixel_values=cs["pv"][None], output_attentions=True)
    tv, last = {}, {}
    for l in range(STAGE2_K + 1):  # 0-based layers 0, 1, 2 (K = 1, 2, 3)
        tv[l], last[l] = text_visual_scores(out.attentions[l][0], start, NUM_PATCHES)
    return dict(clip_attention=attn_scores, clip_cls=cls_scores, sel=sel, clip_layer=clip_layer, start=start,
                text_visual=tv, fastv=last, hf_logits=out.logits[0, -1].float())


@torch.no_grad()
def stage1_inputs(model, cs: dict, sc: dict, n1: int, image_id: int):
    kept1 = topk_keep(sc["clip_attention"][1:], n1)
    feats1 = model.model.multi_modal_projector(sc["sel"][1:][kept1])  # select rows BEFORE the projector
    ids = cs["input_ids"]
    s = sc["start"]
    ids1 = ids[:s] + [image_id] * n1 + ids[s + NUM_PATCHES:]
    return kept1, feats1, ids1


@torch.no_grad()
def pruning_case(model, cs: dict, sc: dict, n1: int, n2: int, eos_id: int, image_id: int) -> dict:
    """Stage-1-only (HF), STAR (stage 1 + stage 2 at K) and FastV references for one case and one budget pair."""
    start, K = sc["start"], STAGE2_K
    r = {}
    # --- stage 1 only: transformers itself with 32 <image> tokens fed the projector output of the kept patches
    kept1, feats1, ids1 = stage1_inputs(model, cs, sc, n1, image_id)
    L1 = len(ids1)
    s1_ids, s1_logits, s1_gaps, s1_attn = hf_greedy_mm(model, ids1, feats1, eos_id, STAGE1_NEW_TOKENS)
    r.update(kept1=kept1, feats1=feats1, ids1=ids1, s1_ids=s1_ids, s1_logits=s1_logits, s1_gaps=s1_gaps)
    # the manual path on the same sequence without stage 2 agrees with transformers (logits and greedy tokens)
    e1 = splice_embeds(model, ids1, feats1, image_id)
    cache = LayerKV(len(model.model.language_model.layers))
    m_logits, m_probs, _, _ = lm_prefill(model, e1, start, n1, cache=cache)
    m_ids, m_steps, _ = lm_decode(model, cache, m_logits[-1], L1, STAGE1_NEW_TOKENS, eos_id)
    assert m_ids == s1_ids, (m_ids, s1_ids)
    r["check_stage1_manual_vs_hf"] = float((m_steps - s1_logits).abs().max())
    r["check_stage1_attn_manual_vs_hf"] = max(float((a - b).abs().max()) for a, b in zip(m_probs, s1_attn))

    # --- STAR: stage 1 as above, then keep n2 of the n1 visual rows before 0-based layer K
    holder = {}

    def star_keep(P):
        holder["scores"] = text_visual_scores(P, start, n1)[0]
        return topk_keep(holder["scores"], n2)

    cache = LayerKV(len(model.model.language_model.layers))
    st_logits, st_probs, kept_local, st_pos = lm_prefill(model, e1, start, n1, drop_layer=K, keep=star_keep,
                                                         cache=cache)
    prefill_rows = cache.rows()  # K/V rows per layer after the prefill: N1 visual rows below K, N2 from K on
    assert prefill_rows == [L1] * K + [L1 - (n1 - n2)] * (len(prefill_rows) - K), prefill_rows
    assert st_pos == list(range(start)) + [start + j for j in kept_local] + list(range(start + n1, L1))
    # the scores the drop used are those of the stage-1 prefill's layer K-1 attention (== transformers' own)
    hf_scores = text_visual_scores(s1_attn[K - 1], start, n1)[0]
    r["check_star_scores_vs_hf"] = float((hf_scores - holder["scores"]).abs().max())
    st_ids, st_steps, st_gaps = lm_decode(model, cache, st_logits[-1], L1, STAR_NEW_TOKENS, eos_id)
    # no-cache cross-check: the prompt plus the generated tokens in one pass, same drop, same positions
    e_full = torch.cat([e1, model.model.language_model.embed_tokens(torch.tensor(st_ids[:-1]))], 0)
    nc_logits, _, _, nc_pos = lm_prefill(model, e_full, start, n1, drop_layer=K, keep=kept_local)
    assert nc_pos[-STAR_NEW_TOKENS:] == list(range(L1 - 1, L1 + STAR_NEW_TOKENS - 1))
    r["check_star_cache_vs_full"] = float((nc_logits[-STAR_NEW_TOKENS:] - st_steps).abs().max())
    r.update(star_scores=holder["scores"], star_kept_local=kept_local, star_kept=[kept1[j] for j in kept_local],
             star_first=st_logits[-1], star_ids=st_ids, star_gaps=st_gaps, star_kv_rows=prefill_rows)

    # --- FastV: no stage 1, last-row scores of layer K-1 of the unpruned prefill, keep n2 of 36 before layer K
    e0 = splice_embeds(model, cs["input_ids"], model.model.multi_modal_projector(sc["sel"][1:]), image_id)
    holder = {}

    def fastv_keep(P):
        holder["scores"] = text_visual_scores(P, start, NUM_PATCHES)[1]
        return topk_keep(holder["scores"], n2)

    fv_logits, _, fv_kept, _ = lm_prefill(model, e0, start, NUM_PATCHES, drop_layer=K, keep=fastv_keep)
    assert fv_kept == topk_keep(sc["fastv"][K - 1], n2), "FastV kept set differs between manual and HF attention"
    r["check_fastv_scores_vs_hf"] = float((holder["scores"] - sc["fastv"][K - 1]).abs().max())
    r.update(fastv_kept=fv_kept, fastv_first=fv_logits[-1])
    return r


@torch.no_grad()
def check_manual_lm(model, cs: dict, sc: dict, ref_first: torch.Tensor, ref_steps: torch.Tensor, ref_ids, eos_id,
                    image_id) -> dict:
    """The manual prefill/decode path without pruning reproduces transformers (first logits, 16 greedy steps), and
    a stage-2 drop that keeps every visual token is bit-for-bit the unpruned path."""
    e0 = splice_embeds(model, cs["input_ids"], model.model.multi_modal_projector(sc["sel"][1:]), image_id)
    cache = LayerKV(len(model.model.language_model.layers))
    logits, _, _, _ = lm_prefill(model, e0, sc["start"], NUM_PATCHES, cache=cache)
    ids, steps, _ = lm_decode(model, cache, logits[-1], len(cs["input_ids"]), NEW_TOKENS, eos_id)
    assert ids == ref_ids, (ids, ref_ids)
    first = float((logits[-1] - ref_first).abs().max())
    assert first < 1e-5, first
    decode = float((steps - ref_steps).abs().max())
    assert decode < 1e-4, decode
    all_logits, _, _, _ = lm_prefill(model, e0, sc["start"], NUM_PATCHES, drop_layer=STAGE2_K,
                                     keep=range(NUM_PATCHES))
    assert torch.equal(all_logits, logits), "keep-all stage 2 is not identical to the unpruned path"
    return {"first": first, "decode": decode}


def choose_budget(default: int, candidates: list[int], gaps_per_case: list[dict]) -> tuple[int, list[int]]:
    """The default if every case's relative boundary gap there is >= SAFE_GAP_REL, else the nearest candidate that
    is safe for every case (a tie in distance goes to the larger worst-case gap); the default if none is safe."""
    worst = {k: min(g[str(k)] for g in gaps_per_case) for k in candidates}
    safe = [k for k in candidates if worst[k] >= SAFE_GAP_REL]
    if default in safe or not safe:
        return default, safe
    return min(safe, key=lambda k: (abs(k - default), -worst[k], k)), safe


@torch.no_grad()
def star_stage2_scores(model, cs: dict, sc: dict, n1: int, image_id: int) -> torch.Tensor:
    kept1, feats1, ids1 = stage1_inputs(model, cs, sc, n1, image_id)
    _, probs, _, _ = lm_prefill(model, splice_embeds(model, ids1, feats1, image_id), sc["start"], n1)
    return text_visual_scores(probs[STAGE2_K - 1], sc["start"], n1)[0]


def pruning_references(model, cases: list[dict], case_json: list[dict], tensors: dict, eos_id: int, image_id: int,
                       hf_tok, check_f16: bool = True):
    """Reference data for visual-token pruning (docs/pruning.md): scores, budgets, kept sets and logits.

    Returns (new tensors, per-case JSON additions, top-level JSON additions)."""
    K = STAGE2_K
    scores, manual_checks = [], []
    for cs, cj in zip(cases, case_json):
        i = cs["idx"]
        sc = pruning_scores(model, cs, image_id)
        assert torch.equal(sc["sel"], tensors[f"case{i}.vision_layer_features"])
        assert float((sc["hf_logits"] - tensors[f"case{i}.first_logits"]).abs().max()) < 1e-5
        manual_checks.append(check_manual_lm(model, cs, sc, tensors[f"case{i}.first_logits"],
                                             tensors[f"case{i}.greedy_logits"], cj["greedy_ids"], eos_id, image_id))
        scores.append(sc)

    # ---- budgets: the defaults unless some case has a near-tie at the selection boundary
    g1 = [rel_gaps(sc["clip_attention"][1:], N1_CANDIDATES) for sc in scores]
    n1, safe1 = choose_budget(N1_DEFAULT, N1_CANDIDATES, g1)
    s2 = [star_stage2_scores(model, cs, sc, n1, image_id) for cs, sc in zip(cases, scores)]
    g_star = [rel_gaps(s, N2_CANDIDATES) for s in s2]
    g_fastv = [rel_gaps(sc["fastv"][K - 1], N2_CANDIDATES) for sc in scores]
    g_cls = [rel_gaps(sc["clip_cls"][1:], N2_CANDIDATES) for sc in scores]
    n2, safe2 = choose_budget(N2_DEFAULT, N2_CANDIDATES,
                              [{k: min(a[k], b[k]) for k in a} for a, b in zip(g_star, g_fastv)])
    # near-ties at the default budgets (stage 2 scores with the default N1)
    s2_default = s2 if n1 == N1_DEFAULT else [star_stage2_scores(model, cs, sc, N1_DEFAULT, image_id)
                                              for cs, sc in zip(cases, scores)]
    default_ties = []
    for cs, sc, s in zip(cases, scores, s2_default):
        for name, vec, k in (("stage1", sc["clip_attention"][1:], N1_DEFAULT), ("star_stage2", s, N2_DEFAULT),
                             ("fastv", sc["fastv"][K - 1], N2_DEFAULT), ("clip_cls", sc["clip_cls"][1:], N2_DEFAULT)):
            g = boundary_gap(vec, k)
            if g["rel"] < NEAR_TIE_REL:
                default_ties.append({"case": cs["idx"], "selection": name, **g})
    log(f"pruning budgets: N1 {n1} (safe for all cases: {safe1}), N2 {n2} (safe for all cases: {safe2}), K {K}; "
        f"near-ties at the defaults N1={N1_DEFAULT}/N2={N2_DEFAULT}: {default_ties}")

    model16 = None
    if check_f16:  # the engine's default weight format: do the kept sets survive f16-rounded weights?
        model16 = copy.deepcopy(model)
        with torch.no_grad():
            for p in model16.parameters():
                p.copy_(p.half().float())

    new_t, new_j = {}, []
    mins = {"stage1": [], "star_stage2": [], "fastv": [], "clip_cls": []}
    for cs, sc, s2i, mc in zip(cases, scores, s2, manual_checks):
        i, start = cs["idx"], sc["start"]
        r = pruning_case(model, cs, sc, n1, n2, eos_id, image_id)
        assert torch.equal(r["star_scores"], s2i)
        L, L1 = len(cs["input_ids"]), len(r["ids1"])
        new_t[f"case{i}.clip_attention_scores"] = sc["clip_attention"].contiguous()
        new_t[f"case{i}.clip_cls_scores"] = sc["clip_cls"].contiguous()
        for l in range(K + 1):
            new_t[f"case{i}.text_visual_scores_layer{l}"] = sc["text_visual"][l].contiguous()
            new_t[f"case{i}.fastv_scores_layer{l}"] = sc["fastv"][l].contiguous()
        new_t[f"case{i}.stage1_image_features"] = r["feats1"].float().contiguous()
        new_t[f"case{i}.stage1_first_logits"] = r["s1_logits"][0].clone().contiguous()
        new_t[f"case{i}.star_stage2_scores"] = r["star_scores"].contiguous()
        new_t[f"case{i}.star_first_logits"] = r["star_first"].clone().contiguous()
        new_t[f"case{i}.fastv_first_logits"] = r["fastv_first"].clone().contiguous()
        gaps = {"stage1": boundary_gap(sc["clip_attention"][1:], n1),
                "star_stage2": boundary_gap(r["star_scores"], n2),
                "fastv": boundary_gap(sc["fastv"][K - 1], n2),
                "clip_cls": boundary_gap(sc["clip_cls"][1:], n2)}
        for k2, g in gaps.items():
            mins[k2].append(g["rel"])
        table = {"stage1": g1[i], "star_stage2": g_star[i], "fastv": g_fastv[i], "clip_cls": g_cls[i]}
        j = {
            "image_token_end": start + NUM_PATCHES,
            "text_after_image_rows": [start + NUM_PATCHES, L],
            "stage1_kept": r["kept1"],
            "stage1_num_prompt_tokens": L1,
            "stage1_input_ids": r["ids1"],
            "stage1_greedy_ids": r["s1_ids"],
            "stage1_greedy_text": hf_tok.decode(r["s1_ids"], skip_special_tokens=True),
            "stage1_min_top2_gap": round(min(r["s1_gaps"]), 6),
            "stage1_boundary_gap": gaps["stage1"],
            "stage1_safe_budgets": [k for k in N1_CANDIDATES if g1[i][str(k)] >= SAFE_GAP_REL],
            "star_text_after_image_rows": [start + n1, L1],
            "star_stage2_kept_local": r["star_kept_local"],
            "star_stage2_kept": r["star_kept"],
            "star_positions_after_drop": list(range(start)) + [start + j2 for j2 in r["star_kept_local"]]
                                         + list(range(start + n1, L1)),
            "star_kv_rows_per_layer_after_prefill": r["star_kv_rows"],
            "star_greedy_ids": r["star_ids"],
            "star_greedy_text": hf_tok.decode(r["star_ids"], skip_special_tokens=True),
            "star_min_top2_gap": round(min(r["star_gaps"]), 6),
            "star_stage2_boundary_gap": gaps["star_stage2"],
            "star_stage2_safe_budgets": [k for k in N2_CANDIDATES if g_star[i][str(k)] >= SAFE_GAP_REL],
            "fastv_kept": r["fastv_kept"],
            "fastv_boundary_gap": gaps["fastv"],
            "fastv_safe_budgets": [k for k in N2_CANDIDATES if g_fastv[i][str(k)] >= SAFE_GAP_REL],
            "clip_cls_kept": topk_keep(sc["clip_cls"][1:], n2),
            "clip_cls_boundary_gap": gaps["clip_cls"],
            "clip_cls_safe_budgets": [k for k in N2_CANDIDATES if g_cls[i][str(k)] >= SAFE_GAP_REL],
            "boundary_gaps_rel": table,
            "pruning_self_checks": {
                "manual_unpruned_vs_hf_first_logits_max_abs_diff": mc["first"],
                "manual_unpruned_vs_hf_greedy_logits_max_abs_diff": mc["decode"],
                "manual_stage1_vs_hf_greedy_logits_max_abs_diff": r["check_stage1_manual_vs_hf"],
                "manual_stage1_vs_hf_attention_max_abs_diff": r["check_stage1_attn_manual_vs_hf"],
                "star_stage2_scores_vs_hf_attention_max_abs_diff": r["check_star_scores_vs_hf"],
                "star_kv_cache_vs_full_forward_max_abs_diff": round(r["check_star_cache_vs_full"], 9),
                "fastv_scores_manual_vs_hf_max_abs_diff": r["check_fastv_scores_vs_hf"],
            },
        }
        if model16 is not None:
            sc16 = pruning_scores(model16, cs, image_id)
            r16 = pruning_case(model16, cs, sc16, n1, n2, eos_id, image_id)
            j["pruning_f16_weights_check"] = {
                "stage1_kept_same": r16["kept1"] == r["kept1"],
                "star_stage2_kept_same": r16["star_kept"] == r["star_kept"],
                "fastv_kept_same": r16["fastv_kept"] == r["fastv_kept"],
                "clip_cls_kept_same": topk_keep(sc16["clip_cls"][1:], n2) == j["clip_cls_kept"],
                "stage1_greedy_ids_same": r16["s1_ids"] == r["s1_ids"],
                "star_greedy_ids_same": r16["star_ids"] == r["star_ids"],
                "max_abs_score_change": {
                    "clip_attention": float(f"{float((sc16['clip_attention'] - sc['clip_attention']).abs().max()):.3e}"),
                    "clip_cls": float(f"{float((sc16['clip_cls'] - sc['clip_cls']).abs().max()):.3e}"),
                    "star_stage2": float(f"{float((r16['star_scores'] - r['star_scores']).abs().max()):.3e}"),
                    "fastv": float(f"{float((sc16['fastv'][K - 1] - sc['fastv'][K - 1]).abs().max()):.3e}"),
                },
            }
        new_j.append(j)
        log(f"case{i}: stage1 kept {len(r['kept1'])} -> ids {r['s1_ids']}; STAR stage 2 kept {r['star_kept']} "
            f"-> ids {r['star_ids']}; FastV kept {r['fastv_kept']}; gaps "
            + ", ".join(f"{k2} {g['rel']:.2e}" for k2, g in gaps.items()))

    top = {
        "stage2_layer_K": K,
        "pruning_budgets": {"N1": n1, "N2": n2, "K": K},
        "pruning": {
            "spec": "STAR.md (visual-token pruning contract of llava-wgpu): top-k by score, ties to the lower index, "
                    "kept indices ascending (raster order); stage 1 scores the attention of the CLIP layer whose output "
                    "is hidden_states[vision_feature_layer] (layer 3 of 5 here), stage 2 / FastV score 0-based layer "
                    "K-1 and drop before 0-based layer K; survivors keep their RoPE positions; decoding continues at "
                    "the stage-1 prompt length.",
            "clip_scored_layer": scores[0]["clip_layer"],
            "default_budgets": {"N1": N1_DEFAULT, "N2": N2_DEFAULT, "K": K},
            "chosen_budgets": {"N1": n1, "N2": n2, "K": K},
            "budget_rule": f"N1 from {N1_CANDIDATES}, N2 from {N2_CANDIDATES}: the default if every case's relative "
                           f"boundary gap (k-th minus (k+1)-th score, over the k-th) is >= {SAFE_GAP_REL:g} for every "
                           "selection that uses it (stage 1 for N1; STAR stage 2 and FastV for N2), else the nearest "
                           "candidate that is (ties: larger worst-case gap). The engine computes the scores in f32 "
                           f"with another summation order, so gaps below ~{NEAR_TIE_REL:g} would make exact kept-set "
                           "comparisons flaky.",
            "n1_safe_for_all_cases": safe1,
            "n2_safe_for_all_cases": safe2,
            "near_ties_at_default_budgets": default_ties,
            "min_boundary_gap_rel": {k2: float(f"{min(v2):.6e}") for k2, v2 in mins.items()},
            "near_tie_rel_threshold": NEAR_TIE_REL,
            "safe_gap_rel_threshold": SAFE_GAP_REL,
            "stage1_new_tokens": STAGE1_NEW_TOKENS,
            "star_new_tokens": STAR_NEW_TOKENS,
            "score_precision": "probabilities from transformers' eager attention in float32; means taken in float64 "
                               "and stored as float32; kept sets are top-k of the stored float32 values",
            "greedy": "EOS masked like greedy_ids; the *_min_top2_gap fields are not part of the seed search "
                      "(the seed only guarantees the unpruned trajectories)",
            "f16_weights_check": "pruning_f16_weights_check: the same pipeline with every weight rounded to f16 "
                                 "(the engine's default weight format); kept sets / greedy ids equal or not",
        },
    }
    return new_t, new_j, top


PRUNING_TENSOR_DOCS = {
    "clip_attention_scores": "[37] f32 STAR stage 1 score: CLIP layer 3 (the layer whose output is hidden_states[-2]) "
                             "attention probabilities, mean over the 4 heads and all 37 query rows, per key j "
                             "(j = 0 is the CLS key, dropped by the engine; patch p is j = p + 1)",
    "clip_cls_scores": "[37] f32 FasterVLM / --stage1-score cls: the same layer, mean over heads of the CLS query row",
    "text_visual_scores_layer{l}": "[36] f32 (l = 0, 1, 2 = K-1 for K = 1, 2, 3) unpruned prefill, LLaMA layer l: "
                                   "mean over the 4 query heads and the rows after the last image token "
                                   "(text_after_image_rows) of the causal softmax probability to each visual position",
    "fastv_scores_layer{l}": "[36] f32 as text_visual_scores_layer{l} but the last prompt row only (FastV)",
    "stage1_image_features": "[N1,64] f32 projector output of the N1 kept patches (rows of hidden_states[-2][1:] "
                             "selected before the projector), spliced at the N1 <image> positions of stage1_input_ids",
    "stage1_first_logits": "[vocab] f32 stage-1-only pruning (N1 kept by clip_attention_scores): transformers' logits "
                           "of the last prompt position; stage1_greedy_ids in cases.json",
    "star_stage2_scores": "[N1] f32 STAR stage 2 score: text->visual scores (as text_visual_scores) of 0-based layer "
                          "K-1 = 1 inside the stage-1-pruned prefill, per stage-1 visual token (local index)",
    "star_first_logits": "[vocab] f32 STAR (stage 1 N1, then keep N2 before layer K = 2, original positions): logits "
                         "of the last prompt row; star_greedy_ids in cases.json",
    "fastv_first_logits": "[vocab] f32 FastV (no stage 1; keep N2 of 36 by fastv_scores_layer1 before layer 2, "
                          "original positions): logits of the last prompt row",
}


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    out, ref = args.out, args.out / "reference"
    t_start = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # bit-reproducible CPU reductions
    torch.use_deterministic_algorithms(True)
    v = versions()
    log("versions:", json.dumps(v))
    if v["torchvision_installed"]:
        log("WARNING: torchvision is installed; this script forces the PIL image processor anyway")

    if out.exists():
        shutil.rmtree(out)
    ref.mkdir(parents=True)

    # ---- tokenizer
    raw_tok = build_tokenizer()
    hf_tok = make_hf_tokenizer(raw_tok)
    vocab_size = len(hf_tok)
    ids_of = {t: raw_tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")}
    image_id, eos_id, pad_id, bos_id = ids_of["<image>"], ids_of["</s>"], ids_of["<pad>"], ids_of["<s>"]
    assert (ids_of["<unk>"], bos_id, eos_id) == (0, 1, 2)
    assert image_id == vocab_size - 2 and pad_id == vocab_size - 1, ids_of
    assert raw_tok.get_vocab_size(with_added_tokens=True) == vocab_size
    probe = "USER: <image>\nWhat is this? ASSISTANT:"
    enc = raw_tok.encode(probe)
    assert enc.ids[0] == bos_id and enc.ids.count(image_id) == 1, enc.tokens
    assert raw_tok.decode(enc.ids, skip_special_tokens=False) == "<s> " + probe, raw_tok.decode(enc.ids, False)
    assert raw_tok.decode(enc.ids[1:], skip_special_tokens=False) == probe
    assert hf_tok(probe).input_ids == enc.ids
    log(f"tokenizer: vocab {vocab_size}, special ids {ids_of}")
    log(f"  probe tokens: {enc.tokens}")

    # ---- processor
    processor = make_processor(hf_tok, IMAGE_SIZE, PATCH_SIZE)
    image_processor = processor.image_processor

    # ---- images and processor outputs (model independent)
    bg = tuple(int(x * 255) for x in CLIP_MEAN)
    cases = []
    for i, c in enumerate(CASES):
        img = make_image(i, c["size"], c["mode"])
        img.save(ref / c["file"], format="PNG", optimize=False)
        img = Image.open(ref / c["file"])
        img.load()
        assert img.mode == c["mode"] and img.size == c["size"]
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": c["prompt"]}]}]
        templated = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        expected = f"USER: <image>\n{c['prompt']} ASSISTANT:"
        assert templated == expected, (templated, expected)
        inputs = processor(images=img, text=templated, return_tensors="pt")
        input_ids = inputs["input_ids"][0].tolist()
        assert input_ids.count(image_id) == NUM_PATCHES, input_ids.count(image_id)
        assert input_ids[0] == bos_id
        # the Rust side sees tokenizer.json with one <image>, expanded by the engine
        raw_ids = raw_tok.encode(templated).ids
        k = raw_ids.index(image_id)
        assert raw_ids[:k] + [image_id] * NUM_PATCHES + raw_ids[k + 1 :] == input_ids
        pv = inputs["pixel_values"][0].float()
        assert tuple(pv.shape) == (3, IMAGE_SIZE, IMAGE_SIZE)

        sq = expand2square(to_rgb_like_processor(img), bg)
        pv_sq = torch.from_numpy(np.asarray(image_processor(sq)["pixel_values"][0])).float()
        if PilLlavaImageProcessor is not None:  # cross-check against transformers' own pad-to-square
            lp = PilLlavaImageProcessor(**{k2: getattr(image_processor, k2) for k2 in (
                "size", "crop_size", "resample", "image_mean", "image_std", "rescale_factor")}, do_pad=True)
            alt = torch.from_numpy(np.asarray(lp(img)["pixel_values"][0])).float()
            assert torch.equal(alt, pv_sq), (alt - pv_sq).abs().max()
        extra = {}
        if img.mode == "RGBA":  # what transformers 4.x / original LLaVA do: drop alpha
            extra["pixel_values_alpha_dropped"] = torch.from_numpy(
                np.asarray(image_processor(img.convert("RGB"), do_convert_rgb=False)["pixel_values"][0])).float()
        w, h = c["size"]
        s = IMAGE_SIZE / min(w, h)
        resized = (IMAGE_SIZE, int(h * s)) if w <= h else (int(w * s), IMAGE_SIZE)
        cases.append(dict(idx=i, c=c, img=img, templated=templated, input_ids=input_ids,
                          pv=pv, pv_sq=pv_sq, extra=extra, resized=resized, raw_ids=raw_ids))
        log(f"case{i}: {c['file']} {c['mode']} {w}x{h} -> resized {resized[0]}x{resized[1]}, "
            f"{len(input_ids)} prompt tokens")

    # ---- model: search seeds until every greedy step is decisive
    cfg = build_config(vocab_size, image_id, pad_id)
    model = LlavaForConditionalGeneration(cfg).float().eval()
    model.set_attn_implementation("eager")
    quiet = {b: 0.5 for b in range(3, 259)}
    quiet.update({t: 0.25 for t in (0, bos_id, image_id, pad_id)})
    chosen = None
    t_search = time.time()
    model16 = copy.deepcopy(model)
    for tries in range(MAX_SEED_TRIES):
        seed = BASE_SEED + tries
        randomize(model, seed, quiet)
        worst, worst_ratio, why = float("inf"), float("inf"), ""
        results = []
        for cs in cases:
            ids, step_logits, gaps, first_eos = greedy_run(
                model, torch.tensor([cs["input_ids"]]), cs["pv"][None], eos_id)
            worst = min(worst, min(gaps))
            results.append([ids, step_logits, gaps, first_eos])
            if min(gaps) < MIN_GAP:
                why = f"gap {min(gaps):.3f}"
            elif len(set(ids)) < MIN_DISTINCT:
                why = f"only {len(set(ids))} distinct tokens"
            elif first_eos is not None:
                why = f"plain greedy would stop at EOS (step {first_eos})"
            if why:
                break
        if not why:
            # robustness: the same trajectories with every weight rounded to f16 (what the engine stores)
            with torch.no_grad():
                for p16, p32 in zip(model16.parameters(), model.parameters()):
                    p16.copy_(p32.half().float())
            for cs, res in zip(cases, results):
                ids, step_logits, gaps = res[0], res[1], res[2]
                l16 = teacher_forced_logits(model16, cs["input_ids"], ids, cs["pv"])
                err = (l16 - step_logits).abs().amax(dim=1)
                masked = l16.clone()
                masked[:, eos_id] = -float("inf")
                same = masked.argmax(dim=1).tolist() == ids
                ratio = min(g / max(float(e), 1e-9) for g, e in zip(gaps, err))
                worst_ratio = min(worst_ratio, ratio if same else 0.0)
                res.append([float(e) for e in err])
            if worst_ratio < F16_MARGIN:
                why = f"gap / f16 error {worst_ratio:.2f}"
        log(f"  seed {seed}: " + (f"rejected ({why})" if why else
                                  f"OK, min top-2 gap {worst:.4f}, min gap / f16 error {worst_ratio:.2f}"))
        if not why:
            chosen = (seed, results, worst, worst_ratio)
            break
    if chosen is None:
        raise SystemExit(f"no seed in [{BASE_SEED}, {BASE_SEED + MAX_SEED_TRIES}) meets the fixture criteria")
    seed, results, worst, worst_ratio = chosen
    log(f"chosen seed {seed} after {tries + 1} tries ({time.time() - t_search:.1f}s), min top-2 gap {worst:.4f}, "
        f"min gap / f16-weight logit error {worst_ratio:.2f}")

    # ---- reference tensors
    tensors: dict[str, torch.Tensor] = {}
    case_json = []
    for cs, (ids, step_logits, gaps, first_eos, f16_err) in zip(cases, results):
        i = cs["idx"]
        sel, feats = vision_outputs(model, cs["pv"][None])
        assert tuple(sel.shape) == (NUM_PATCHES + 1, 64) and tuple(feats.shape) == (NUM_PATCHES, 64)
        # the projector output really is what gets spliced in (hook on the projector)
        grabbed = []
        hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: grabbed.append(o))
        with torch.no_grad():
            full = model(input_ids=torch.tensor([cs["input_ids"]]), pixel_values=cs["pv"][None]).logits[0].float()
        hook.remove()
        assert torch.equal(grabbed[0].reshape(-1, 64), feats)
        assert torch.allclose(full[-1], step_logits[0], atol=1e-4), (full[-1] - step_logits[0]).abs().max()
        # no-cache check of every decode step's logits
        nc = teacher_forced_logits(model, cs["input_ids"], ids, cs["pv"])
        cache_err = float((nc - step_logits).abs().max())
        assert cache_err < 1e-3, cache_err
        # transformers' own generate agrees (min_new_tokens masks EOS exactly like greedy_run)
        with torch.no_grad():
            gen = model.generate(input_ids=torch.tensor([cs["input_ids"]]), pixel_values=cs["pv"][None],
                                 attention_mask=torch.ones(1, len(cs["input_ids"]), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=eos_id, pad_token_id=pad_id)
        gen_ids = gen[0, len(cs["input_ids"]):].tolist()
        assert gen_ids == ids, (gen_ids, ids)

        tensors[f"case{i}.pixel_values"] = cs["pv"].contiguous()
        tensors[f"case{i}.pixel_values_pad_square"] = cs["pv_sq"].contiguous()
        for k2, t in cs["extra"].items():
            tensors[f"case{i}.{k2}"] = t.contiguous()
        tensors[f"case{i}.vision_layer_features"] = sel.float().contiguous()
        tensors[f"case{i}.image_features"] = feats.float().contiguous()
        tensors[f"case{i}.first_logits"] = step_logits[0].clone().contiguous()
        tensors[f"case{i}.greedy_logits"] = step_logits.contiguous()
        text = hf_tok.decode(ids, skip_special_tokens=True)
        c = cs["c"]
        case_json.append({
            "case": i,
            "image": c["file"],
            "image_size": list(c["size"]),
            "image_mode": c["mode"],
            "resized_before_crop": list(cs["resized"]),
            "prompt": c["prompt"],
            "templated_prompt": cs["templated"],
            "tokenizer_ids_unexpanded": cs["raw_ids"],
            "input_ids": cs["input_ids"],
            "num_prompt_tokens": len(cs["input_ids"]),
            "image_token_start": cs["input_ids"].index(image_id),
            "greedy_ids": ids,
            "greedy_text": text,
            "greedy_tokens": hf_tok.convert_ids_to_tokens(ids),
            "eos_handling": "EOS masked out (logit set to -inf) at every step, i.e. argmax over all ids except "
                            f"{eos_id}; exactly {NEW_TOKENS} tokens (== generate(min_new_tokens={NEW_TOKENS}, "
                            f"max_new_tokens={NEW_TOKENS}, do_sample=False)). "
                            + ("EOS is never the argmax in these steps, so this is also plain greedy output."
                               if first_eos is None else
                               f"Plain greedy (EOS not masked) would stop at step {first_eos}."),
            "unconstrained_eos_step": first_eos,
            "unconstrained_hits_eos": first_eos is not None,
            "min_top2_gap": round(min(gaps), 6),
            "top2_gaps": [round(g, 6) for g in gaps],
            "first_logits_std": round(float(step_logits[0].std()), 4),
            "f16_weight_max_logit_err": [round(e, 6) for e in f16_err],
            "min_gap_over_f16_err": round(min(g / e for g, e in zip(gaps, f16_err)), 3),
            "kv_cache_vs_full_forward_max_abs_diff": cache_err,
        })
        log(f"case{i}: greedy {ids}  text={text!r}  min gap {min(gaps):.3f}  eos@{first_eos}")

    # ---- visual-token pruning references (STAR stage 1 / stage 2, FastV, FasterVLM scores): only adds tensors
    t_prune = time.time()
    pr_tensors, pr_json, pr_top = pruning_references(model, cases, case_json, tensors, eos_id, image_id, hf_tok)
    assert not set(pr_tensors) & set(tensors)
    tensors.update(pr_tensors)
    for cj, extra in zip(case_json, pr_json):
        assert not set(extra) & set(cj)
        cj.update(extra)
    log(f"pruning references: {len(pr_tensors)} tensors ({time.time() - t_prune:.1f}s)")

    # ---- save model, processor, extra files
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out, safe_serialization=True)
    written_by_transformers = save_processor_files(out, processor, raw_tok, IMAGE_SIZE)
    log("transformers wrote:", written_by_transformers)

    # a single metadata entry: safetensors writes the metadata map in hash order (not reproducible)
    save_file(dict(sorted(tensors.items())), str(ref / "reference.safetensors"), metadata={"format": "pt"})

    # ---- verification: reload everything from disk
    t_verify = time.time()
    model2 = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    proc2 = AutoProcessor.from_pretrained(out)
    ip2 = proc2.image_processor
    log(f"reloaded processor: {type(proc2).__name__}, image processor {type(ip2).__name__} "
        f"(backend {getattr(ip2, 'backend', '?')}), tokenizer {type(proc2.tokenizer).__name__}")
    on_disk = load_file(str(out / "model.safetensors"))
    sd = {k: t.float() for k, t in model.state_dict().items()}
    sd2 = model2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    disk_cfg = json.loads((out / "config.json").read_text())
    max_manual = {"vision": 0.0, "projector": 0.0, "logits": 0.0}
    for cs, cj in zip(cases, case_json):
        i = cs["idx"]
        img = Image.open(ref / cs["c"]["file"])
        inp2 = proc2(images=img, text=cs["templated"], return_tensors="pt")
        assert inp2["input_ids"][0].tolist() == cs["input_ids"], "reloaded processor ids differ"
        assert torch.equal(inp2["pixel_values"][0].float(), cs["pv"]), "reloaded processor pixels differ"
        with torch.no_grad():
            l2 = model2(input_ids=inp2["input_ids"], pixel_values=inp2["pixel_values"]).logits[0, -1].float()
        d = float((l2 - tensors[f"case{i}.first_logits"]).abs().max())
        assert d < 1e-4, f"case{i}: reloaded first_logits differ by {d}"
        ids2, _, _, _ = greedy_run(model2, inp2["input_ids"], inp2["pixel_values"], eos_id)
        assert ids2 == cj["greedy_ids"]
        tj = Tokenizer.from_file(str(out / "tokenizer.json"))  # what the Rust tokenizers crate reads
        assert tj.encode(cs["templated"]).ids == cs["raw_ids"]
        assert tj.decode(cj["greedy_ids"]) == cj["greedy_text"]
        sel_m, feat_m, logit_m = manual_forward(on_disk, disk_cfg, cs["pv"], cs["input_ids"])
        max_manual["vision"] = max(max_manual["vision"], float((sel_m - tensors[f"case{i}.vision_layer_features"]).abs().max()))
        max_manual["projector"] = max(max_manual["projector"], float((feat_m - tensors[f"case{i}.image_features"]).abs().max()))
        max_manual["logits"] = max(max_manual["logits"], float((logit_m - tensors[f"case{i}.first_logits"]).abs().max()))
    assert max(max_manual.values()) < 2e-3, max_manual
    # the pruning references again from the reloaded model (same kept sets, ids and tensors)
    on_disk_ref = load_file(str(ref / "reference.safetensors"))
    pr2_tensors, pr2_json, pr2_top = pruning_references(model2, cases, case_json, on_disk_ref, eos_id, image_id,
                                                        proc2.tokenizer, check_f16=False)
    assert pr2_top == pr_top
    for k2, t in pr2_tensors.items():
        assert torch.equal(t, on_disk_ref[k2]), k2
    for a, b in zip(pr_json, pr2_json):
        assert {k2: v2 for k2, v2 in a.items() if k2 != "pruning_f16_weights_check"} == b
    log(f"verify: reload OK, tokenizer.json OK, float64 re-implementation max abs diff {max_manual} "
        f"({time.time() - t_verify:.1f}s)")

    # ---- key layout report
    keys = sorted(on_disk)
    layout = {
        "vision_tower_prefix": "model.vision_tower.vision_model." if any(k.startswith("model.vision_tower.vision_model.") for k in keys)
        else "model.vision_tower." if any(k.startswith("model.vision_tower.") for k in keys)
        else "vision_tower.vision_model." if any(k.startswith("vision_tower.vision_model.") for k in keys)
        else "vision_tower.",
        "language_model_prefix": "model.language_model." if any(k.startswith("model.language_model.") for k in keys)
        else "language_model.model.",
        "projector_prefix": "model.multi_modal_projector." if any(k.startswith("model.multi_modal_projector.") for k in keys)
        else "multi_modal_projector.",
        "lm_head": [k for k in keys if "lm_head" in k],
        "num_tensors": len(keys),
        "dtypes": sorted({str(t.dtype) for t in on_disk.values()}),
    }
    log("model.safetensors keys:")
    for k in keys:
        log(f"  {k} {list(on_disk[k].shape)}")
    log("key layout:", json.dumps(layout))

    meta = {
        "description": "Reference outputs of the tiny random LLaVA-1.5 fixture, computed with HF transformers "
                       "(float32, eager attention, CPU). Tensors in reference.safetensors as case{i}.<name>.",
        "generator": "scripts/make_tiny_llava.py",
        "versions": v,
        "seed": seed,
        "min_top2_gap_required": MIN_GAP,
        "min_gap_over_f16_err_required": F16_MARGIN,
        "min_distinct_greedy_tokens_required": MIN_DISTINCT,
        "min_gap_over_f16_err": round(worst_ratio, 3),
        "min_top2_gap": round(worst, 6),
        "new_tokens": NEW_TOKENS,
        "special_token_ids": ids_of,
        "vocab_size": vocab_size,
        "image_token_id": image_id,
        "image_seq_length": NUM_PATCHES,
        "rope_theta": ROPE_THETA,
        "rms_norm_eps": RMS_NORM_EPS,
        "key_layout": layout,
        "image_processor": {
            "class": type(image_processor).__name__,
            "shortest_edge": IMAGE_SIZE, "crop": [IMAGE_SIZE, IMAGE_SIZE], "resample": "bicubic (PIL, on 8-bit RGB)",
            "resize_rule": "shorter side -> 84, longer side int(long * 84 / short) (truncated), then centre crop "
                           "top=(H-84)//2, left=(W-84)//2; rescale 1/255; (x - mean) / std",
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
            "rgb_conversion": "transformers convert_to_rgb: images with alpha (or PNG transparency) are "
                              "alpha-composited onto white (transformers 5.x); 4.x and original LLaVA "
                              "(Image.convert('RGB')) drop alpha instead -> case{i}.pixel_values_alpha_dropped",
            "pad_square_background": list(bg),
            "pad_square_rule": "LLaVA expand2square after RGB conversion: square side max(W,H), image pasted "
                               "at ((side-W)//2, (side-H)//2), then the same resize/crop/normalise",
        },
        **pr_top,
        "tensors": {
            "pixel_values": "[3,84,84] f32 processor output",
            "pixel_values_pad_square": "[3,84,84] f32, expand2square with the mean colour, then processed",
            "pixel_values_alpha_dropped": "[3,84,84] f32, RGBA case only: alpha dropped instead of composited",
            "vision_layer_features": "[37,64] f32 CLIP hidden_states[vision_feature_layer=-2] incl. CLS (row 0); "
                                     "hidden_states[0] is the pre_layrnorm output, so this is encoder layer 3's output",
            "image_features": "[36,64] f32 projector output (CLS dropped), spliced at the <image> positions",
            "first_logits": "[vocab] f32 logits of the last prompt position",
            "greedy_logits": "[16,vocab] f32 logits from which greedy token t was chosen (row 0 == first_logits), "
                             "computed with the KV cache",
            **PRUNING_TENSOR_DOCS,
        },
        "cases": case_json,
    }
    (ref / "cases.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    total = time.time() - t_start
    pb = pr_top["pruning_budgets"]
    ties_txt = "".join(f" (here {t['selection']} case {t['case']}: relative gap {t['rel']:.1e} at k = {t['k']})"
                       for t in pr_top["pruning"]["near_ties_at_default_budgets"])
    gaps_txt = ", ".join(f"{k2} {v2:.1e}" for k2, v2 in pr_top["pruning"]["min_boundary_gap_rel"].items())
    readme = f"""# tiny-random-llava

A tiny **randomly initialised** LLaVA-1.5 (`LlavaForConditionalGeneration`) in the llava-hf layout, used
as the end-to-end parity fixture for llava-wgpu. Its outputs are meaningless; what matters is that they
are exactly what Hugging Face transformers computes. Everything is generated locally (no hub download).

Regenerate (deterministic: byte-identical output with the same package versions; CPU, ~15 s):

    pip install -r scripts/requirements.txt    # no torchvision!
    python scripts/make_tiny_llava.py

Versions used: transformers {v['transformers']}, torch {v['torch']}, tokenizers {v['tokenizers']},
safetensors {v['safetensors']}, Pillow {v['pillow']}, numpy {v['numpy']}, Python {v['python']}.

## Model

- Vision: CLIP ViT, image 84, patch 14 (36 patches + CLS), width 64, MLP 128, 4 heads, 5 layers,
  quick_gelu, LayerNorm eps 1e-5. Feature layer -2, strategy "default" (CLS dropped).
- Projector: linear 64->64, exact-erf GELU, linear 64->64 (with biases).
- Text: LLaMA, width 64, MLP 150, 4 heads / 2 KV heads (GQA), 4 layers, RMSNorm eps {RMS_NORM_EPS},
  rope_theta {ROPE_THETA:g}, max positions 512, vocab {vocab_size}, untied lm_head.
- Weights float32; seeded normal init (seed {seed}) scaled so logits have std ~{LOGIT_STD:g}. The seed was
  searched so that at every greedy step of every reference case the top-1/top-2 logit gap is >= {MIN_GAP}
  (actual minimum {worst:.3f}) and >= {F16_MARGIN:g}x the logit change caused by rounding all weights to
  f16 (actual minimum {worst_ratio:.1f}x), each case's 16 tokens contain >= {MIN_DISTINCT} distinct ids,
  and plain greedy decoding never picks EOS within 16 steps (so `greedy_ids` is also the ordinary
  greedy output with EOS stopping and max 16 new tokens).
- Tensor keys: vision `{layout['vision_tower_prefix']}*`, text `{layout['language_model_prefix']}*`,
  projector `{layout['projector_prefix']}*`, head `{', '.join(layout['lm_head'])}`.

## Tokenizer

LLaMA-style BPE trained on synthetic sentences: Metaspace (`\u2581`, prepend first), byte fallback
(`<0x00>`..`<0xFF>` = ids 3..258), `<unk>`=0, `<s>`=1 (BOS, added by the post-processor), `</s>`=2
(EOS), `<image>`={image_id}, `<pad>`={pad_id}. Chat template: `USER: <image>\\n{{prompt}} ASSISTANT:`;
the processor expands `<image>` to 36 tokens.

## reference/

Test images (PNG) and `reference.safetensors` + `cases.json`: per case the pixel values (also with
LLaVA's pad-to-square), input ids, CLIP layer -2 features, projector output, first logits row, the
logits of each of the 16 greedy steps and the 16 greedy tokens (EOS masked out, which with this seed
never changes the choice). See `cases.json` for the exact conventions. Note that transformers 5.x
alpha-composites RGBA images onto white (case 4); `case4.pixel_values_alpha_dropped` holds the
4.x / original-LLaVA behaviour (alpha dropped) for comparison.

### Visual-token pruning (STAR, FastV, FasterVLM)

Budgets N1 = {pb['N1']}, N2 = {pb['N2']}, K = {pb['K']} (`pruning_budgets` in `cases.json`). The defaults
N1 = {N1_DEFAULT}, N2 = {N2_DEFAULT} are kept unless some case has a near-tie at the top-k boundary{ties_txt}; see
`pruning.near_ties_at_default_budgets` and the per-case `*_boundary_gap` / `*_safe_budgets`. Per case:
`clip_attention_scores` / `clip_cls_scores` [37] (CLIP layer 3, CLS key at index 0),
`text_visual_scores_layer{{0,1,2}}` / `fastv_scores_layer{{0,1,2}}` [36] (unpruned prefill), the stage-1-only
reference (`stage1_kept`, `stage1_image_features`, `stage1_first_logits`, `stage1_greedy_ids`), STAR stage 1 +
stage 2 at K (`star_stage2_scores`, `star_stage2_kept[_local]`, `star_first_logits`, 8 `star_greedy_ids`;
survivors keep their RoPE positions, decoding continues at the stage-1 prompt length) and FastV
(`fastv_kept`, `fastv_first_logits`). Smallest relative boundary gaps: {gaps_txt}.
"""
    (out / "README.md").write_text(readme)

    log("files:")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            log(f"  {p.relative_to(out)}  {p.stat().st_size} bytes")
    log(f"total size {sum(p.stat().st_size for p in out.rglob('*') if p.is_file())} bytes, "
        f"run time {total:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
