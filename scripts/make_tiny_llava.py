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

At the end the saved directory is reloaded with ``from_pretrained`` and checked to reproduce the
references; the raw ``tokenizer.json`` (as the Rust ``tokenizers`` crate reads it) is checked to
give the same ids; and an independent float64 re-implementation of the forward pass, reading
``model.safetensors`` directly, is checked against transformers.

Regenerate with:  python scripts/make_tiny_llava.py     (CPU only, well under a minute)
Pinned versions:  scripts/requirements.txt  (do not install torchvision, see DESIGN.md)
Output is deterministic: rerunning produces byte-identical files with the same package versions.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import copy
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import safetensors
import tokenizers
import torch
import transformers
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

try:  # transformers >= 5: the PIL backend has its own class; CLIPImageProcessor is torchvision
    from transformers import CLIPImageProcessorPil as PilClipImageProcessor
except ImportError:  # transformers 4.x: CLIPImageProcessor is the slow PIL one
    from transformers import CLIPImageProcessor as PilClipImageProcessor

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

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

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
    """LLaMA-style BPE: Metaspace(prepend first), byte fallback, ids 0..2 = <unk> <s> </s>, 3..258 = bytes."""
    corpus = synthetic_corpus()
    meta = dict(replacement="\u2581", prepend_scheme="first", split=False)

    # 1. Train the merges (words split on spaces during training, as sentencepiece does).
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=TRAIN_VOCAB, special_tokens=[], show_progress=False)
    trainer_tok.train_from_iterator(corpus, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    trained_vocab = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    # 2. Rebuild with LLaMA's id layout.
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in trained_vocab:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(**meta)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.add_special_tokens([AddedToken("<pad>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return tok


def make_hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return hf


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
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=NUM_PATCHES,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    return cfg


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


# ----------------------------------------------------------------------------- main


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "torchvision_installed": importlib.util.find_spec("torchvision") is not None,
    }


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
    image_processor = PilClipImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=PIL.Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=hf_tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token (llava-hf sets this too)
        chat_template=CHAT_TEMPLATE,
    )

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

    # ---- save model, processor, extra files
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    written_by_transformers = sorted(p.name for p in out.iterdir() if p.is_file())
    log("transformers wrote:", written_by_transformers)
    if not (out / "tokenizer.json").exists():
        raw_tok.save(str(out / "tokenizer.json"))
    preprocessor_config = {
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": IMAGE_SIZE},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config, indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    if not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)

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
        },
        "cases": case_json,
    }
    (ref / "cases.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    total = time.time() - t_start
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
