#!/usr/bin/env python3
"""GGUF test fixtures made from the shipped safetensors fixtures the way llama.cpp's tools make them, and
transformers reference outputs for them.

Writes, relative to the repository root (each pair directory holds exactly one text GGUF and one mmproj GGUF,
named as llama.cpp's converters name them):

    weights/tiny-random-llava/gguf/f32/     ggml-model-f32.gguf     mmproj-model-f32.gguf
    weights/tiny-random-llava/gguf/f16/     ggml-model-f16.gguf     mmproj-model-f16.gguf
    weights/tiny-random-llava/gguf/q8_0/    ggml-model-q8_0.gguf    mmproj-model-f16.gguf
    weights/tiny-random-llava/gguf/q4_k_m/  ggml-model-q4_k_m.gguf  mmproj-model-f16.gguf
    weights/tiny-random-llava-next/gguf/f16/  ggml-model-f16.gguf   mmproj-model-f16.gguf   (LLaVA-NeXT, vicuna)
    weights/tiny-llava-shapes/gguf/q4_k_m/  ggml-model-q4_k_m.gguf  mmproj-model-f16.gguf   (the trained demo model)
    weights/<model>/gguf/reference.safetensors + cases.json   (one pair per model, keys "case{i}.{variant}.*")

Text GGUF (``ggml-model-*.gguf``): what ``convert_hf_to_gguf.py <checkpoint> --outtype {f32,f16,q8_0}`` writes
for a llava-hf checkpoint (class ``LlamaModel``): general.architecture "llama", the ``language_model.*`` tensors
renamed (token_embd, blk.N.attn_q, ..., output), Q and K rows permuted from HF's rotate-half order to ggml's
interleaved RoPE pairs (``permute``, heads = num_key_value_heads for K), 1-D tensors and ``*_norm.weight`` in F32,
the other weights in the outtype (q8_0 through gguf-py's numpy quantizer, F16 where a row is not whole blocks of
32), the same ``general.*`` / ``llama.*`` keys with the same GGUF value types and order, the tokenizer arrays and
``gguf.SpecialVocab``'s keys (special ids, add_bos/add_sep, ``tokenizer.chat_template`` from the checkpoint
directory's chat template). ``q4_k_m`` is the f16 text file run through the real ``llama-quantize <f16> <out>
Q4_K_M`` (no imatrix), as users make it. The NeXT checkpoint's text part is converted the same way (the route
llama.cpp's docs/multimodal/llava.md recommends, converting the language model with convert_hf_to_gguf.py).

One deliberate difference from convert_hf_to_gguf.py: the token scores. These checkpoints ship only
tokenizer.json (a byte-fallback BPE), so the converter would go through ``gguf.LlamaHfVocab``, which writes score
-1000 for every token; llama.cpp's SPM tokenizer merges the adjacent pair whose concatenation is the token with
the highest score, so equal scores degenerate to "leftmost pair first" and llama.cpp would tokenize differently
from the tokenizer the model was trained with. Instead the scores are those a SentencePiece BPE model of the same
vocabulary has (as if the checkpoint shipped a tokenizer.model):

* a token created by a merge scores minus the merge's 1-based rank in tokenizer.json's ``merges`` (the first
  merge -1, the last -n_merges), so the highest score pops first exactly when HF's BPE would apply that merge
  first (ties: both pick the leftmost pair);
* single characters score below every merge: -(n_merges + 1 + k) for the k-th one in id order (SentencePiece's
  BPE trainer appends the required characters after the merged pieces, continuing the -index sequence);
* ``<unk>`` / ``<s>`` / ``</s>`` and the 256 ``<0xXX>`` byte tokens score 0 (SentencePiece's value for
  control, unknown and byte pieces); added tokens beyond the base vocabulary (``<image>``, ``<pad>``) -1000, the
  value convert_hf_to_gguf.py writes for added tokens.

The values for single characters, bytes and specials never take part in merging: llama.cpp only queues a pair of
adjacent symbols (UTF-8 characters or merged runs of them) whose concatenation is a token, which is never a
single character, and no piece of these vocabularies concatenates to a byte or special token's text. Token types
are exactly the converter's (LlamaHfVocab): BYTE for ``<0xXX>``, CONTROL for the tokenizer's special ids
(including ``<unk>``, which a tokenizer.model conversion would mark UNKNOWN), NORMAL otherwise; added tokens are
CONTROL when special, else USER_DEFINED. The one way llama.cpp can still differ from HF's BPE: it merges any two
adjacent pieces whose concatenation is a token, while HF only applies the listed merges; the script measures how
often that changes the ids (``tokenization_check`` in cases.json).

mmproj GGUF (``mmproj-model-*.gguf``): what the legacy ``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py
-m vit --llava-projector vit/llava.projector --clip-model-is-vision [--use-f32]`` writes after
``llava_surgery_v2.py -C`` split the checkpoint (llama.cpp's docs/multimodal/llava.md llava-1.6 recipe; the
surgery script handles 1.5 checkpoints too): general.architecture "clip", the clip.* keys in the converter's order and types,
``clip.vision.block_count`` = num_hidden_layers - 1 (the converter drops the last CLIP layer; no feature_layer key
because the vit config has no vision_feature_layer), no post_ln, ``clip.use_gelu`` false (quick_gelu), projector
tensors first (mm.0 / mm.2 from multi_modal_projector.linear_1 / linear_2, always F16 weights and F32 biases, then
``model.image_newline`` F32 for NeXT), then the vision tensors in CLIPVisionModel's state_dict order with the
converter's swapped names (mlp.fc1 -> ffn_down, mlp.fc2 -> ffn_up), the 4-D patch embedding always F16, and for
f16 the 2-D weights F16 and everything else F32 (``--use-f32``: all F32 but the patch embedding and the projector
weights). general.name is the checkpoint directory's name (the converter uses the vit directory's name when its
config has no ``_name_or_path``); image_mean / image_std come from the checkpoint's processor (the CLIP values).
The NeXT vit config carries the llava-1.6 keys of the config_vit.json the recipe downloads: image_grid_pinpoints
(flattened; clip.cpp reads each pair as (width, height), so HF's [height, width] pairs are written swapped),
mm_patch_merge_type "spatial_unpad" and image_aspect_ratio "anyres". Tensor names follow the converter under the
transformers it pins (4.57: CLIPVisionModel keys "vision_model.*"; under transformers 5 the unmodified legacy
converter cannot run, as CLIPVisionModel lost its ``vision_model`` attribute).

References (transformers, float32, eager attention, CPU; keys in reference.safetensors ``case{i}.{variant}.*``,
documented in cases.json): per pair variant and case the llama.cpp-style prompt ids (BOS + the text before the
image, the image run, the text after it tokenized as a separate fragment so it starts with "▁" -- recorded from
``llama-tokenize`` on the variant's own text GGUF), the projector output, the first logits and 16 greedy tokens
(EOS masked out, as the other references do), computed by transformers fed the GGUF files' own tensors
(dequantized with gguf-py, Q/K rows permuted back, ffn names swapped back). LLaVA-1.5 pixels are LLaVA's
expand2square (mean colour) followed by the CLIP processor, plus one centre-crop (unpadded) case for ``--no-pad``;
NeXT pixels are the anyres processor's. Pixel values already in the model's reference/reference.safetensors
(checked equal) are not stored again: each case in cases.json names the file and key of its pixels. For
tiny-random-llava f32 it also records what llama.cpp's two known LLaVA bugs compute (one vision layer short;
class token after the patches, see cases.json) and both together. The greedy top-1/top-2 gaps of every step are
in cases.json (``top2_gaps``): some steps are close to ties (the prompts and pixels differ from the seed-searched
ones of the original fixtures), so a token comparison should look at them.

Needs llama.cpp's ``llama-quantize`` and ``llama-tokenize`` (made with llama.cpp commit 0c1e570, the tree vendored
in llama-cpp-python 0.3.36; cases.json records the version used):

    python scripts/gguf_fixtures.py --llama-bin /path/to/llama.cpp/build/bin      (or LLAMA_CPP_BIN=...)

Optionally ``--llama-cpp-src /path/to/llama.cpp`` also runs the real convert_hf_to_gguf.py and legacy
convert_image_encoder_to_gguf.py (on temporary copies, the latter with a shim exposing transformers 4's
``CLIPVisionModel.vision_model``) and checks that every written file equals theirs except tokenizer.ggml.scores.
It also loads each text file with libllama (compiled against that tree, if a C compiler is around) and checks
its text-only logits against transformers'. Python packages: scripts/requirements.txt plus gguf (gguf-py 0.19);
no torchvision. CPU only: about 15 s, about 1.5 min with --llama-cpp-src.
Deterministic: rerunning produces byte-identical files with the same package and llama.cpp versions.
"""

from __future__ import annotations

# first: sets the offline environment before transformers loads
from llava_hf_common import versions

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, TokenType
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

import make_tiny_llava as base  # expand2square, to_rgb_like_processor, vision_outputs, synthetic corpus
import make_tiny_llava_next as nxt  # vision_and_features (packed anyres features)

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights"
NEW_TOKENS = 16

# pair directory -> (text outtype, mmproj type); text outtype "q4_k_m" = llama-quantize of the f16 text file
MODELS = {
    "tiny-random-llava": dict(
        kind="llava",
        pairs={"f32": ("f32", "f32"), "f16": ("f16", "f16"), "q8_0": ("q8_0", "f16"), "q4_k_m": ("q4_k_m", "f16")},
        no_pad_case=2,  # the 97x61 image: padding and centre-cropping differ
        bugs_variant="f32",
    ),
    "tiny-random-llava-next": dict(kind="next", pairs={"f16": ("f16", "f16")}),
    "tiny-llava-shapes": dict(
        kind="llava",
        pairs={"q4_k_m": ("q4_k_m", "f16")},
        # 0-based lines of examples.jsonl: all three images, five question types; among each image's questions
        # those whose 16 EOS-masked greedy steps keep the largest top-1/top-2 gaps (after the one-word answer the
        # trained model wants EOS, and what it says instead is close to a tie for many questions)
        examples=[3, 5, 8, 9, 14],
    ),
}
TEXT_FTYPE = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
TEXT_QTYPE = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- llama.cpp tools


class LlamaTools:
    """llama-quantize and llama-tokenize from a llama.cpp build directory."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        for exe in ("llama-quantize", "llama-tokenize"):
            if not (bin_dir / exe).is_file():
                raise SystemExit(f"{bin_dir / exe} not found: pass --llama-bin (a llama.cpp build's bin directory)")
        self.env = dict(os.environ)
        self.env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(bin_dir)] + ([self.env["LD_LIBRARY_PATH"]] if self.env.get("LD_LIBRARY_PATH") else []))

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=self.env, check=False)

    def version(self) -> str:
        out = self.run(self.bin / "llama-tokenize", "--version")
        lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")]
        return lines[0] if lines else "unknown"

    def quantize(self, src: Path, dst: Path, ftype: str) -> None:
        out = self.run(self.bin / "llama-quantize", src, dst, ftype)
        if out.returncode != 0:
            raise RuntimeError(f"llama-quantize failed:\n{out.stdout}\n{out.stderr}")

    def tokenize(self, model: Path, text: str, bos: bool) -> list[int]:
        """llama.cpp's ids for `text` (one llama_tokenize call, parse_special on, as llama-mtmd-cli does)."""
        with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
            f.write(text.encode("utf-8"))
        try:
            args = ["-m", model, "-f", f.name, "--ids", "--no-escape", "--log-disable"] + ([] if bos else ["--no-bos"])
            out = self.run(self.bin / "llama-tokenize", *args)
        finally:
            os.unlink(f.name)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
        if out.returncode != 0 or len(lines) != 1:
            raise RuntimeError(f"llama-tokenize failed on {model}:\n{out.stdout}\n{out.stderr}")
        return json.loads(lines[0])


# ----------------------------------------------------------------------------- text GGUF


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order within each head -> ggml's interleaved pairs: row h*hd + 2j + a of the result
    is row h*hd + a*hd/2 + j of `w` (what the converter's LlamaModel.permute does)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_rows."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llava-hf language-model names (without "language_model.") -> GGUF names
TEXT_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
TEXT_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)$")


def text_gguf_name(hf: str) -> str:
    if hf in TEXT_GLOBAL_NAMES:
        return TEXT_GLOBAL_NAMES[hf]
    m = LAYER_KEY.match(hf)
    if not m or m.group(2) not in TEXT_LAYER_NAMES:
        raise KeyError(f"no GGUF name for language-model tensor {hf}")
    return f"blk.{m.group(1)}.{TEXT_LAYER_NAMES[m.group(2)]}"


def text_hf_name(gg: str) -> str:
    """GGUF name -> checkpoint key (llava-hf layout, with "language_model.")."""
    for hf, name in TEXT_GLOBAL_NAMES.items():
        if name == gg:
            return "language_model." + hf
    m = re.match(r"blk\.(\d+)\.(.+)$", gg)
    for hf, name in TEXT_LAYER_NAMES.items():
        if m and name == m.group(2):
            return f"language_model.model.layers.{m.group(1)}.{hf}"
    raise KeyError(gg)


def load_config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def tokenizer_vocab(ckpt: Path, scores: str = "spm-bpe") -> tuple[list[str], list[float], list[int], dict]:
    """Tokens, scores and types in id order (see the module docstring). scores="llamahf" gives the converter's
    own -1000 everywhere (only used to measure what those scores would tokenize)."""
    tj = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    assert model["type"] == "BPE" and model.get("byte_fallback") and tj["decoder"]["type"] == "Sequence"
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    rank = {}
    for r, (a, b) in enumerate(merges, start=1):
        assert a + b not in rank, f"two merges make {a + b!r}"
        rank[a + b] = r
    # the tokenizer as transformers loads it (what gguf.LlamaHfVocab asks for the special ids and added tokens)
    hf = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    n_base = hf.vocab_size
    special_ids = set(hf.all_special_ids)
    specials = {t: hf.get_vocab()[t] for t in hf.all_special_tokens}
    by_id = {i: t for t, i in hf.get_vocab().items()}
    added = sorted((i, t) for t, i in hf.get_added_vocab().items() if i >= n_base)
    assert [i for i, _ in added] == list(range(n_base, n_base + len(added))), added

    tokens, out_scores, types = [], [], []
    n_single = 0
    for i in range(n_base):
        t = by_id[i]
        if BYTE_TOKEN.fullmatch(t):
            typ, score = TokenType.BYTE, 0.0
        elif i in special_ids:
            typ, score = TokenType.CONTROL, 0.0
        else:
            typ = TokenType.NORMAL
            if t in rank:
                score = -float(rank[t])
            else:
                assert len(t) == 1, f"token {t!r} is neither a single character nor made by a merge"
                score = -float(len(merges) + 1 + n_single)
                n_single += 1
        tokens.append(t)
        out_scores.append(score)
        types.append(int(typ))
    for i, t in added:
        if t in specials:
            typ = TokenType.CONTROL if specials[t] in special_ids else TokenType.NORMAL
        else:
            typ = TokenType.USER_DEFINED
        tokens.append(t)
        out_scores.append(-1000.0)
        types.append(int(typ))
    # scores of non-merge tokens never matter: no two pieces concatenate to a byte, special or added token
    vocab = set(tokens)
    for t, typ in zip(tokens, types):
        if typ != TokenType.NORMAL:
            assert not any(t[:k] in vocab and t[k:] in vocab for k in range(1, len(t))), t
    if scores == "llamahf":
        out_scores = [-1000.0] * len(tokens)
    info = dict(n_base=n_base, n_merges=len(merges), n_single_chars=n_single, n_added=len(added))
    return tokens, out_scores, types, info


def text_tensors(ckpt: Path, cfg: dict):
    """(GGUF name, numpy array in the checkpoint dtype) in the converter's order (the checkpoint's key order)."""
    tc = cfg["text_config"]
    n_head, n_kv = tc["num_attention_heads"], tc.get("num_key_value_heads", tc["num_attention_heads"])
    with safe_open(ckpt / "model.safetensors", framework="np") as f:
        for key in f.keys():
            if not key.startswith("language_model."):
                continue  # vision tower, projector, image_newline: the mmproj's
            hf = key[len("language_model."):]
            w = f.get_tensor(key)
            if hf.endswith("self_attn.q_proj.weight"):
                w = permute_rows(w, n_head)
            elif hf.endswith("self_attn.k_proj.weight"):
                w = permute_rows(w, n_kv)
            yield text_gguf_name(hf), w


def write_text_gguf(ckpt: Path, path: Path, outtype: str, scores: str = "spm-bpe") -> None:
    """convert_hf_to_gguf.py --outtype {f32,f16,q8_0} for a llava-hf LLaMA (see the module docstring)."""
    cfg = load_config(ckpt)
    tc = cfg["text_config"]
    w = GGUFWriter(None, "llama")
    for name, data in text_tensors(ckpt, cfg):
        qtype = QT.F32 if data.ndim <= 1 or name.endswith("_norm.weight") else TEXT_QTYPE[outtype]
        try:
            q = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # rows not whole blocks: the converter falls back to F16
            qtype = QT.F16
            q = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, q, raw_dtype=qtype)

    # general.* as the converter's prepare_metadata writes them
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, ckpt, None, total)
    if meta.name is None:
        meta.name = ckpt.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    # llama.* (TextModel.set_gguf_parameters, then LlamaModel's additions)
    rope = tc.get("rope_parameters") or {}
    w.add_block_count(tc["num_hidden_layers"])
    w.add_context_length(tc["max_position_embeddings"])
    w.add_embedding_length(tc["hidden_size"])
    w.add_feed_forward_length(tc["intermediate_size"])
    w.add_head_count(tc["num_attention_heads"])
    w.add_head_count_kv(tc["num_key_value_heads"])
    assert rope.get("rope_type", "default") == "default", rope
    w.add_rope_freq_base(rope.get("rope_theta", tc.get("rope_theta")))
    w.add_layer_norm_rms_eps(tc["rms_norm_eps"])
    head_dim = tc.get("head_dim")
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(TEXT_FTYPE[outtype])
    w.add_vocab_size(tc["vocab_size"])
    w.add_rope_dimension_count(head_dim if head_dim is not None else tc["hidden_size"] // tc["num_attention_heads"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # tokenizer.* (_set_vocab_llama_hf with our scores, then SpecialVocab)
    tokens, token_scores, types, _ = tokenizer_vocab(ckpt, scores)
    assert len(tokens) == tc["vocab_size"], (len(tokens), tc["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([t.encode("utf-8") for t in tokens])
    w.add_token_scores(token_scores)
    w.add_token_types(types)
    gguf.SpecialVocab(ckpt, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- mmproj GGUF

VISION_PARTS = [  # HF CLIPVisionModel name piece -> legacy converter name piece, applied to "vision_model.*"
    ("vision_model.", "v."),
    ("embeddings.class_embedding", "class_embd"),
    ("embeddings.patch_embedding", "patch_embd"),
    ("embeddings.position_embedding", "position_embd"),
    ("pre_layrnorm", "pre_ln"),
    ("encoder.layers.", "blk."),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.out_proj", "attn_out"),
    ("layer_norm1", "ln1"),
    ("layer_norm2", "ln2"),
    ("mlp.fc1", "ffn_down"),  # sic: the legacy converter swaps the FFN names (clip.cpp swaps them back by shape)
    ("mlp.fc2", "ffn_up"),
]
PROJECTOR_NAMES = {
    "multi_modal_projector.linear_1.weight": "mm.0.weight",
    "multi_modal_projector.linear_1.bias": "mm.0.bias",
    "multi_modal_projector.linear_2.weight": "mm.2.weight",
    "multi_modal_projector.linear_2.bias": "mm.2.bias",
    "image_newline": "model.image_newline",
}


def vision_gguf_name(key: str) -> str:
    out = key
    for a, b in VISION_PARTS:
        out = out.replace(a, b)
    assert out.startswith("v.") and "_proj" not in out and "embedding" not in out, key
    return out


def vision_source_key(key: str, keys: set[str]) -> str:
    """Checkpoint key of CLIPVisionModel (transformers 4 naming) tensor `key` ("vision_model.X")."""
    for cand in ("vision_tower." + key, "vision_tower." + key[len("vision_model."):]):
        if cand in keys:
            return cand
    raise KeyError(key)


def vision_state_keys(vc: dict) -> list[str]:
    """CLIPVisionModel's state_dict keys in module order, with transformers 4's "vision_model." prefix."""
    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig(**vc))
    keys = [k for k in model.state_dict().keys() if not k.endswith("position_ids")]
    return [k if k.startswith("vision_model.") else "vision_model." + k for k in keys]


def vit_config(cfg: dict, kind: str) -> dict:
    """The vit/config.json of the recipe: the CLIP vision config, for NeXT with the llava-1.6 keys."""
    vc = dict(cfg["vision_config"])
    if kind == "next":
        vc["image_grid_pinpoints"] = [[w, h] for h, w in cfg["image_grid_pinpoints"]]  # HF [h, w] -> [w, h]
        vc["image_aspect_ratio"] = "anyres"
        vc["mm_patch_merge_type"] = "spatial_unpad"
    return vc


def image_mean_std(ckpt: Path) -> tuple[list[float], list[float]]:
    pc = json.loads((ckpt / "processor_config.json").read_text())["image_processor"]
    return [float(x) for x in pc["image_mean"]], [float(x) for x in pc["image_std"]]


def write_mmproj(ckpt: Path, path: Path, kind: str, use_f32: bool) -> None:
    """convert_image_encoder_to_gguf.py --clip-model-is-vision --llava-projector ... [--use-f32]."""
    cfg = load_config(ckpt)
    vc = vit_config(cfg, kind)
    ftype = 0 if use_f32 else 1
    w = GGUFWriter(None, "clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_file_type(ftype)
    w.add_name(ckpt.name)
    w.add_description("image encoder for LLaVA")
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", vc["image_size"])
    w.add_uint32("clip.vision.patch_size", vc["patch_size"])
    w.add_uint32("clip.vision.embedding_length", vc["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", vc["intermediate_size"])
    w.add_uint32("clip.vision.projection_dim", vc["projection_dim"])
    w.add_uint32("clip.vision.attention.head_count", vc["num_attention_heads"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", vc["layer_norm_eps"])
    n_stored = vc["num_hidden_layers"] - 1  # the converter drops the last layer (no feature_layer in the config)
    w.add_uint32("clip.vision.block_count", n_stored)
    if "image_grid_pinpoints" in vc:
        w.add_array("clip.vision.image_grid_pinpoints", [int(p) for pair in vc["image_grid_pinpoints"] for p in pair])
    if "image_aspect_ratio" in vc:
        w.add_string("clip.vision.image_aspect_ratio", vc["image_aspect_ratio"])
    if "mm_patch_merge_type" in vc:
        w.add_string("clip.vision.mm_patch_merge_type", vc["mm_patch_merge_type"])
    mean, std = image_mean_std(ckpt)
    w.add_array("clip.vision.image_mean", mean)
    w.add_array("clip.vision.image_std", std)
    w.add_bool("clip.use_gelu", vc["hidden_act"] == "gelu")

    with safe_open(ckpt / "model.safetensors", framework="np") as f:
        keys = list(f.keys())
        # llava.projector: the projector tensors in checkpoint order, then image_newline, as float32
        proj = [k for k in keys if k.startswith("multi_modal_projector.")] + [k for k in keys if k == "image_newline"]
        for k in proj:
            data = np.squeeze(f.get_tensor(k).astype(np.float32))
            data = data.astype(np.float16) if data.ndim in (2, 4) else data
            w.add_tensor(PROJECTOR_NAMES[k], data)
        # the vision tower without its last layer and post_layernorm
        drop = f"vision_model.encoder.layers.{vc['num_hidden_layers'] - 1}."
        keyset = set(keys)
        for k in vision_state_keys(vc):
            if k.startswith(drop) or k.startswith("vision_model.post_layernorm."):
                continue
            data = np.squeeze(f.get_tensor(vision_source_key(k, keyset)))
            name = vision_gguf_name(k)
            if data.ndim == 4:
                data = data.astype(np.float16)
            elif not use_f32:
                data = data.astype(np.float16 if name.endswith(".weight") and data.ndim == 2 else np.float32)
            else:
                data = data.astype(np.float32)
            w.add_tensor(name, data)

    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- reading GGUF back


def describe_gguf(path: Path) -> dict:
    """Keys with their GGUF value types (arrays: type and length) and tensor type counts."""
    r = GGUFReader(path)
    keys = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        types = [GGUFValueType(t).name for t in field.types]
        if field.types[0] == GGUFValueType.ARRAY:
            n = len(field.data)
            keys[name] = {"type": f"{types[0]}[{types[-1]}]", "len": n, "head": field.contents()[:8]}
        else:
            v = field.contents()
            if isinstance(v, str) and len(v) > 80:
                v = v[:77] + "..."
            if isinstance(v, float):
                v = float(np.float32(v))
            keys[name] = {"type": types[0], "value": v}
    tensor_types: dict[str, int] = {}
    for t in r.tensors:
        tensor_types[t.tensor_type.name] = tensor_types.get(t.tensor_type.name, 0) + 1
    return {"keys": keys, "tensor_types": tensor_types, "n_tensors": len(r.tensors),
            "tensors": {t.name: [t.tensor_type.name, [int(x) for x in t.shape]] for t in r.tensors}}


def gguf_arrays(path: Path) -> dict[str, tuple[np.ndarray, QT]]:
    """Every tensor of a GGUF file as float32 in numpy (PyTorch) order, dequantized by gguf-py, with its type."""
    r = GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        a = np.array(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), dtype=np.float32, copy=True)
        out[t.name] = (a, QT(t.tensor_type))
    return out


def verify_text(path: Path, ckpt: Path, outtype: str, tools: LlamaTools) -> None:
    cfg = load_config(ckpt)
    tc = cfg["text_config"]
    d = describe_gguf(path)
    k = d["keys"]
    assert k["general.architecture"]["value"] == "llama"
    expect_u32 = ["llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                  "llama.attention.head_count", "llama.attention.head_count_kv", "general.file_type",
                  "llama.vocab_size", "llama.rope.dimension_count", "general.quantization_version",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]
    for key in expect_u32:
        assert k[key]["type"] == "UINT32", (key, k[key])
    assert k["llama.rope.freq_base"]["type"] == "FLOAT32"
    assert k["tokenizer.ggml.scores"]["type"] == "ARRAY[FLOAT32]"
    assert k["tokenizer.ggml.token_type"]["type"] == "ARRAY[INT32]"
    assert k["tokenizer.ggml.tokens"]["len"] == tc["vocab_size"]
    assert k["llama.block_count"]["value"] == tc["num_hidden_layers"]
    want_ftype = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}[outtype]
    assert k["general.file_type"]["value"] == want_ftype, k["general.file_type"]
    assert d["n_tensors"] == 2 + 1 + 9 * tc["num_hidden_layers"], d["n_tensors"]
    for name, (typ, _) in d["tensors"].items():
        if name.endswith("_norm.weight"):
            assert typ == "F32", (name, typ)
    ids = tools.tokenize(path, "USER: hello", bos=True)  # llama.cpp loads the vocabulary
    assert ids[0] == 1, ids


def verify_mmproj(path: Path, ckpt: Path, kind: str, use_f32: bool) -> None:
    vc = vit_config(load_config(ckpt), kind)
    d = describe_gguf(path)
    k = d["keys"]
    assert k["general.architecture"]["value"] == "clip"
    assert k["clip.projector_type"]["value"] == "mlp"
    assert k["clip.vision.block_count"] == {"type": "UINT32", "value": vc["num_hidden_layers"] - 1}
    assert k["clip.vision.attention.layer_norm_epsilon"]["type"] == "FLOAT32"
    assert k["clip.vision.image_mean"]["type"] == "ARRAY[FLOAT32]"
    assert k["clip.use_gelu"] == {"type": "BOOL", "value": False}
    assert k["general.file_type"]["value"] == (0 if use_f32 else 1)
    t = d["tensors"]
    n = vc["num_hidden_layers"] - 1
    assert f"v.blk.{n - 1}.ffn_down.weight" in t and f"v.blk.{n}.ln1.weight" not in t
    assert not any(name.startswith("v.post_ln") for name in t)
    assert t["v.patch_embd.weight"][0] == "F16" and len(t["v.patch_embd.weight"][1]) == 4
    assert t["mm.0.weight"][0] == "F16" and t["mm.0.bias"][0] == "F32"
    # fc1 [ff, d] is stored as ffn_down: ne = [d, ff]
    assert t["v.blk.0.ffn_down.weight"][1] == [vc["hidden_size"], vc["intermediate_size"]]
    if kind == "next":
        assert k["clip.vision.image_grid_pinpoints"]["type"] == "ARRAY[INT32]"
        assert k["clip.vision.mm_patch_merge_type"]["value"] == "spatial_unpad"
        assert k["clip.vision.image_aspect_ratio"]["value"] == "anyres"
        assert t["model.image_newline"][0] == "F32"


# ----------------------------------------------------------------------------- transformers from GGUF


def hf_tensors_from_gguf(text_path: Path, mmproj_path: Path, ckpt: Path) -> dict[str, tuple[np.ndarray, QT]]:
    """Checkpoint-keyed float32 tensors that the two GGUF files stand for (Q/K un-permuted, FFN names swapped
    back, projector and newline renamed back), with the type each is stored in."""
    cfg = load_config(ckpt)
    tc = cfg["text_config"]
    with safe_open(ckpt / "model.safetensors", framework="np") as f:
        keys = set(f.keys())
    out = {}
    for name, (a, qtype) in gguf_arrays(text_path).items():
        if name.endswith("attn_q.weight"):
            a = unpermute_rows(a, tc["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            a = unpermute_rows(a, tc["num_key_value_heads"])
        out[text_hf_name(name)] = (np.ascontiguousarray(a), qtype)
    inv_proj = {v: k for k, v in PROJECTOR_NAMES.items()}
    vision = {vision_gguf_name(k): k for k in vision_state_keys(cfg["vision_config"])}
    for name, (a, qtype) in gguf_arrays(mmproj_path).items():
        out[inv_proj[name] if name in inv_proj else vision_source_key(vision[name], keys)] = (a, qtype)
    return out


def load_hf_model(text_path: Path, mmproj_path: Path, ckpt: Path, kind: str, tmp: Path):
    """transformers' model with every tensor the GGUF pair stores replaced by the pair's values. Returns the
    model and the checkpoint keys the pair does not store (the dropped CLIP layer and post_layernorm, unused)."""
    orig = load_file(str(ckpt / "model.safetensors"))
    gg = hf_tensors_from_gguf(text_path, mmproj_path, ckpt)
    assert set(gg) <= set(orig), set(gg) - set(orig)
    merged = {}
    for k, v in orig.items():
        if k in gg:
            a, qtype = gg[k]
            assert tuple(a.shape) == tuple(v.shape), (k, a.shape, v.shape)
            if qtype in (QT.F32, QT.F16):  # float files store the checkpoint's values (rounded to f16 for F16)
                want = v.float().numpy()
                assert np.array_equal(a, want if qtype == QT.F32 else want.astype(np.float16).astype(np.float32)), k
            merged[k] = torch.from_numpy(a)
        else:
            merged[k] = v.float()
    missing = sorted(set(orig) - set(gg))
    d = tmp / f"hf-{ckpt.name}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    shutil.copy(ckpt / "config.json", d / "config.json")
    save_file(merged, str(d / "model.safetensors"), metadata={"format": "pt"})
    cls = LlavaNextForConditionalGeneration if kind == "next" else LlavaForConditionalGeneration
    model = cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    return model, missing, gg


# ----------------------------------------------------------------------------- references


@torch.no_grad()
def greedy(model, input_ids: list[int], eos_id: int, steps: int = NEW_TOKENS, **vision):
    """Greedy decoding with the KV cache, EOS masked out: (ids, first logits, top-1/top-2 gaps, first EOS step)."""
    ids_t = torch.tensor([input_ids])
    attn = torch.ones_like(ids_t)
    out = model(input_ids=ids_t, attention_mask=attn, use_cache=True, **vision)
    logits, past = out.logits[0, -1].float(), out.past_key_values
    first, ids, gaps, first_eos = logits.clone(), [], [], None
    for step in range(steps):
        raw = torch.topk(logits, 2)
        masked = logits.clone()
        masked[eos_id] = -float("inf")
        top = torch.topk(masked, 2)
        gaps.append(min(float(raw.values[0] - raw.values[1]), float(top.values[0] - top.values[1])))
        if first_eos is None and int(raw.indices[0]) == eos_id:
            first_eos = step
        ids.append(int(top.indices[0]))
        if step + 1 == steps:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(input_ids=torch.tensor([[ids[-1]]]), attention_mask=attn, past_key_values=past, use_cache=True)
        logits, past = out.logits[0, -1].float(), out.past_key_values
    return ids, first, gaps, first_eos


@torch.no_grad()
def spliced_first_logits(model, input_ids: list[int], feats: torch.Tensor, image_id: int) -> torch.Tensor:
    ids = torch.tensor(input_ids)
    e = model.get_input_embeddings()(ids).clone()
    assert int((ids == image_id).sum()) == feats.shape[0]
    e[ids == image_id] = feats.to(e.dtype)
    return model(inputs_embeds=e[None]).logits[0, -1].float()


@torch.no_grad()
def clip_run(model, pv: torch.Tensor, n_layers: int, cls_last: bool) -> torch.Tensor:
    """The CLIP tower by hand: [CLS, patches] (or [patches, CLS], as llama.cpp's graph builds it) plus position
    embeddings 0..N in that order, pre-LN, then `n_layers` encoder layers. Returns [N+1, d]."""
    vt = model.model.vision_tower
    vm = vt.vision_model if hasattr(vt, "vision_model") else vt
    emb = vm.embeddings
    patches = emb.patch_embedding(pv[None]).flatten(2).transpose(1, 2)[0]
    cls = emb.class_embedding[None]
    x = torch.cat([patches, cls] if cls_last else [cls, patches], dim=0)
    x = x + emb.position_embedding.weight[: x.shape[0]]
    x = vm.pre_layrnorm(x[None])
    for layer in vm.encoder.layers[:n_layers]:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    return x[0]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def model_cases(name: str, spec: dict, ckpt: Path) -> list[dict]:
    """The images and prompts of a model's cases, with llama.cpp's text split around the image."""
    out = []
    if "examples" in spec:
        lines = [json.loads(x) for x in (ckpt / "examples.jsonl").read_text().splitlines() if x.strip()]
        for i, line in enumerate(spec["examples"]):
            ex = lines[line]
            out.append(dict(case=i, image=ex["image"], prompt=ex["question"], source=f"examples.jsonl line {line + 1}",
                            templated=f"USER: <image>\n{ex['question']} ASSISTANT:", answer=ex["answer"]))
    else:
        ref = json.loads((ckpt / "reference" / "cases.json").read_text())
        for c in ref["cases"]:
            out.append(dict(case=c["case"], image="reference/" + c["image"], prompt=c["prompt"],
                            source=f"reference/cases.json case {c['case']}", templated=c["templated_prompt"],
                            image_tokens_hf=c.get("image_tokens")))
    for c in out:
        before, after = c["templated"].split("<image>")
        c["text_before"], c["text_after"] = before, after
    return out


def tokenization_check(tools: LlamaTools, gguf_path: Path, gguf_llamahf: Path, ckpt: Path,
                       fragments: list[str]) -> dict:
    """llama-tokenize on the GGUF vs the HF tokenizer with legacy=True semantics (each fragment gets its own
    "▁" prefix, as SentencePiece does after a special token): how many fragments get different ids. The
    fragments go through llama-tokenize in one call, joined by "</s>" (a special token, so each fragment is
    tokenized on its own with its space prefix)."""
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    eos = 2
    hf = [tok.encode(" " + f, add_special_tokens=False).ids for f in fragments]
    for f, ids in zip(fragments, hf):
        if not f.startswith(" "):
            assert ids == tok.encode(f, add_special_tokens=False).ids
    joined = "</s>".join(fragments)

    def split(ids):
        parts, cur = [], []
        for t in ids:
            if t == eos:
                parts.append(cur)
                cur = []
            else:
                cur.append(t)
        return parts + [cur]

    res = {}
    for label, path in (("gguf", gguf_path), ("converter_default_scores", gguf_llamahf)):
        got = split(tools.tokenize(path, joined, bos=False))
        assert len(got) == len(fragments)
        bad = [i for i, (a, b) in enumerate(zip(got, hf)) if a != b]
        res[label] = {"fragments": len(fragments), "differ": len(bad),
                      "examples": [{"text": fragments[i], "llama_cpp": got[i], "hf": hf[i]} for i in bad[:3]]}
    return res


def build_model(name: str, spec: dict, tools: LlamaTools, tmp: Path, timings: dict) -> dict:
    t0 = time.time()
    ckpt = WEIGHTS / name
    out = ckpt / "gguf"
    kind = spec["kind"]
    cfg = load_config(ckpt)
    image_id = cfg["image_token_index"]
    eos_id = cfg["text_config"]["eos_token_id"]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()

    # ---- GGUF files
    f16_tmp = tmp / f"{name}-f16.gguf"
    files = {}
    for variant, (ttype, mtype) in spec["pairs"].items():
        d = out / variant
        text = d / f"ggml-model-{ttype}.gguf"
        mm = d / f"mmproj-model-{mtype}.gguf"
        if ttype == "q4_k_m":
            write_text_gguf(ckpt, f16_tmp, "f16")
            d.mkdir(parents=True, exist_ok=True)
            tools.quantize(f16_tmp, text, "Q4_K_M")
        else:
            write_text_gguf(ckpt, text, ttype)
        write_mmproj(ckpt, mm, kind, use_f32=(mtype == "f32"))
        verify_text(text, ckpt, ttype, tools)
        verify_mmproj(mm, ckpt, kind, use_f32=(mtype == "f32"))
        assert sorted(p.name for p in d.iterdir()) == sorted([text.name, mm.name])
        files[variant] = dict(text=f"{variant}/{text.name}", mmproj=f"{variant}/{mm.name}",
                              text_bytes=text.stat().st_size, mmproj_bytes=mm.stat().st_size,
                              text_gguf=describe_gguf(text), mmproj_gguf=describe_gguf(mm))
        log(f"{name}/{variant}: {text.name} {text.stat().st_size} B "
            f"{files[variant]['text_gguf']['tensor_types']}, {mm.name} {mm.stat().st_size} B "
            f"{files[variant]['mmproj_gguf']['tensor_types']}")
    timings[f"{name}: gguf files"] = time.time() - t0

    # ---- cases: images, pixel values, llama.cpp ids
    processor = AutoProcessor.from_pretrained(ckpt)
    ip = processor.image_processor
    assert type(ip).__name__.endswith("Pil"), f"need the PIL image processor, got {type(ip).__name__}"
    cases = model_cases(name, spec, ckpt)
    old_ref = ckpt / "reference" / "reference.safetensors"
    old = load_file(str(old_ref)) if old_ref.exists() else {}
    bg = tuple(int(x * 255) for x in image_mean_std(ckpt)[0])
    tensors: dict[str, torch.Tensor] = {}
    vis_args, no_pad_pixels = {}, {}

    def pixels(i: int, label: str, pv: torch.Tensor, old_key: str, how: str) -> dict:
        """Where a case's pixel values are stored: the existing reference/reference.safetensors when it already
        holds exactly these values (checked), else this directory's reference.safetensors."""
        if old_key in old:
            assert torch.equal(pv, old[old_key]), old_key
            return {"file": "reference/reference.safetensors", "key": old_key, "how": how}
        tensors[f"case{i}.{label}"] = pv
        return {"file": "gguf/reference.safetensors", "key": f"case{i}.{label}", "how": how}

    for c in cases:
        i = c["case"]
        img = Image.open(ckpt / c["image"])
        img.load()
        c["image_size"] = list(img.size)
        c["image_mode"] = img.mode
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": c["prompt"]}]}]
        assert processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False) == c["templated"]
        hf_inputs = processor(images=img, text=c["templated"], return_tensors="pt")
        n_image = int((hf_inputs["input_ids"][0] == image_id).sum())
        if kind == "llava":
            sq = base.expand2square(base.to_rgb_like_processor(img), bg)
            pv = torch.from_numpy(np.asarray(ip(sq)["pixel_values"][0])).float()
            vis_args[i] = dict(pixel_values=pv[None])
            c["pixel_values"] = pixels(i, "pixel_values", pv, f"case{i}.pixel_values_pad_square",
                                       "LLaVA's expand2square with the mean colour, then the CLIP processor")
            if spec.get("no_pad_case") == i:
                pv_crop = hf_inputs["pixel_values"][0].float()
                no_pad_pixels[i] = pv_crop
                c["pixel_values_no_pad"] = pixels(i, "pixel_values_no_pad", pv_crop, f"case{i}.pixel_values",
                                                  "the CLIP processor alone (resize shortest edge, centre crop)")
        else:
            pv = hf_inputs["pixel_values"][0].float()
            assert n_image == c["image_tokens_hf"]
            vis_args[i] = dict(pixel_values=pv[None], image_sizes=hf_inputs["image_sizes"])
            c["image_sizes_hw"] = hf_inputs["image_sizes"][0].tolist()
            c["pixel_values"] = pixels(i, "pixel_values", pv, f"case{i}.pixel_values",
                                       "the anyres processor's views [V, 3, H, W] (base view first, then the crops)")
        c["image_tokens"] = n_image

    # ---- per variant: llama.cpp ids, transformers fed the pair's tensors
    t1 = time.time()
    bugs_info = {}
    for variant, (ttype, mtype) in spec["pairs"].items():
        text = out / files[variant]["text"]
        mm = out / files[variant]["mmproj"]
        model, missing, gg = load_hf_model(text, mm, ckpt, kind, tmp)
        files[variant]["not_stored"] = missing
        for c in cases:
            i = c["case"]
            before = tools.tokenize(text, c["text_before"], bos=True)
            after = tools.tokenize(text, c["text_after"], bos=False)
            input_ids = before + [image_id] * c["image_tokens"] + after
            if "input_ids" in c:
                assert c["input_ids"] == input_ids, "variants of one model tokenize differently"
            c.update(ids_before=before, ids_after=after, input_ids=input_ids, image_token_start=len(before))
            ids, first, gaps, first_eos = greedy(model, input_ids, eos_id, **vis_args[i])
            if kind == "llava":
                _, feats = base.vision_outputs(model, vis_args[i]["pixel_values"])
            else:
                feats = nxt.vision_and_features(model, {"pv": vis_args[i]["pixel_values"][0],
                                                        "image_sizes": vis_args[i]["image_sizes"]})[4]
            spliced = spliced_first_logits(model, input_ids, feats, image_id)
            assert float((spliced - first).abs().max()) < 1e-4
            key = f"case{i}.{variant}"
            tensors[f"{key}.first_logits"] = first
            tensors[f"{key}.image_features"] = feats.float()
            tensors[f"{key}.greedy_ids"] = torch.tensor(ids, dtype=torch.int64)
            tensors[f"{key}.input_ids"] = torch.tensor(input_ids, dtype=torch.int64)
            c.setdefault("variants", {})[variant] = dict(
                greedy_ids=ids, greedy_text=processor.tokenizer.decode(ids, skip_special_tokens=True),
                min_top2_gap=round(min(gaps), 6), top2_gaps=[round(g, 6) for g in gaps],
                unconstrained_eos_step=first_eos)
            if i in no_pad_pixels:
                pv = no_pad_pixels[i][None]
                _, feats_np = base.vision_outputs(model, pv)
                _, first_np, gaps_np, _ = greedy(model, input_ids, eos_id, steps=1, pixel_values=pv)
                tensors[f"{key}.first_logits_no_pad"] = first_np
                tensors[f"{key}.image_features_no_pad"] = feats_np.float()
                c["variants"][variant]["no_pad_first_top2_gap"] = round(gaps_np[0], 6)
                c["variants"][variant]["no_pad_first_logits_rel_l2_vs_padded"] = round(rel_l2(first_np, first), 6)
            log(f"{name} case{i} {variant}: {len(before)}+{c['image_tokens']}+{len(after)} tokens, greedy {ids} "
                f"min top-2 gap {min(gaps):.3f}")
        if spec.get("bugs_variant") == variant:
            bugs_info = llamacpp_bug_references(model, cases, vis_args, tensors, variant, image_id, mm)
        del model
    timings[f"{name}: references"] = time.time() - t1

    # ---- tokenization: llama-tokenize vs HF (legacy=True) on the cases and more text
    first_variant = next(iter(spec["pairs"]))
    main_text = out / files[first_variant]["text"]
    llamahf = tmp / f"{name}-llamahf-scores.gguf"
    write_text_gguf(ckpt, llamahf, "f32", scores="llamahf")
    frags_cases = [f for c in cases for f in (c["text_before"], c["text_after"])]
    checks = {"cases": tokenization_check(tools, main_text, llamahf, ckpt, frags_cases)}
    if name == "tiny-llava-shapes":
        ex = [json.loads(x) for x in (ckpt / "examples.jsonl").read_text().splitlines() if x.strip()]
        frags = [f"\n{e['question']} ASSISTANT:" for e in ex] + [e["answer"] for e in ex] + ["USER: "]
        checks["examples_jsonl"] = tokenization_check(tools, main_text, llamahf, ckpt, frags)
        held = WEIGHTS / "shapes-heldout" / "heldout.jsonl"
        if held.exists():
            hx = [json.loads(x) for x in held.read_text().splitlines() if x.strip()]
            frags = [f"\n{e['question']} ASSISTANT:" for e in hx] + sorted({e["answer"] for e in hx})
            checks["shapes_heldout_jsonl"] = tokenization_check(tools, main_text, llamahf, ckpt, frags)
    else:
        corpus = base.synthetic_corpus()  # the sentences the tokenizer was trained on
        checks["training_corpus"] = tokenization_check(tools, main_text, llamahf, ckpt, corpus)
    for label, chk in checks.items():
        log(f"{name} tokenization [{label}]: GGUF differs from HF on {chk['gguf']['differ']}/{chk['gguf']['fragments']}"
            f" fragments; with the converter's -1000 scores on {chk['converter_default_scores']['differ']}")

    # ---- pieces and the json
    vocab_tokens, _, _, vinfo = tokenizer_vocab(ckpt)
    for c in cases:
        c["pieces_before"] = [vocab_tokens[t] for t in c["ids_before"]]
        c["pieces_after"] = [vocab_tokens[t] for t in c["ids_after"]]
        c["image_token_end"] = c["image_token_start"] + c["image_tokens"]
        c["num_prompt_tokens"] = len(c["input_ids"])
        c.pop("image_tokens_hf", None)
    save_file(dict(sorted((k, v.contiguous()) for k, v in tensors.items())), str(out / "reference.safetensors"),
              metadata={"format": "pt"})
    meta = {
        "description": f"GGUF pairs of weights/{name} made as llama.cpp's tools make them, and transformers "
                       "references computed from the pairs' own tensors (float32, eager attention, CPU).",
        "generator": "scripts/gguf_fixtures.py",
        "versions": versions(),
        "gguf_py": _gguf_version(),
        "llama_cpp": tools.version(),
        "image_token_id": image_id,
        "eos_token_id": eos_id,
        "new_tokens": NEW_TOKENS,
        "eos_handling": "EOS masked out (logit -inf) at every step: exactly 16 tokens",
        "prompt": "llama.cpp's layout (mtmd): BOS + the text before <image> (one llama_tokenize call), the image "
                  "rows, then the text after <image> tokenized as a separate fragment (so it starts with '▁'); "
                  "ids recorded from llama-tokenize on each variant's text GGUF. input_ids has the image run "
                  "expanded with image_token_id at image_token_start .. image_token_end.",
        "weights": "transformers fed the GGUF pair's tensors: dequantized with gguf.quants.dequantize, Q/K rows "
                   "un-permuted to HF's order, ffn_down/ffn_up renamed back to fc1/fc2; the CLIP layer the "
                   "mmproj does not store (the last) and post_layernorm are unused by LLaVA's layer -2 features",
        "pixel_values": "LLaVA-1.5: expand2square with the mean colour, then the CLIP processor (PIL); NeXT: the "
                        "anyres processor (PIL), no padding",
        "tokenizer_scores": {
            "rule": "merge-made token: -(1-based rank of its merge in tokenizer.json); single characters: "
                    "-(n_merges + 1 + k), k-th in id order; <unk> <s> </s> and <0xXX>: 0; added tokens: -1000",
            **vinfo,
        },
        "tokenization_check": {
            "what": "fragments whose llama-tokenize ids (on the GGUF, and on the same file with the converter's "
                    "-1000 scores) differ from the HF tokenizer's with legacy=True semantics (a '▁' prefix per "
                    "fragment)",
            **checks,
        },
        "files": files,
        "tensors": {
            "case{i}.pixel_values": "f32 pixels fed to the vision tower, where cases[i].pixel_values.file says (the "
                                    "existing reference's tensors are not duplicated)",
            "case{i}.{variant}.input_ids": "i64, same as cases[i].input_ids",
            "case{i}.{variant}.image_features": "f32 [image tokens, d] projector output spliced at the image rows "
                                                "(NeXT: packed, base view + unpadded grid + image_newline per row)",
            "case{i}.{variant}.first_logits": "f32 [vocab] logits of the last prompt position",
            "case{i}.{variant}.greedy_ids": "i64 [16] greedy tokens, EOS masked",
            **({"case{i}.pixel_values_no_pad": "f32, resize + centre crop without padding (one case; see "
                                               "cases[i].pixel_values_no_pad for the file)",
                "case{i}.{variant}.first_logits_no_pad": "first logits with pixel_values_no_pad, same input_ids",
                "case{i}.{variant}.image_features_no_pad": "projector output for pixel_values_no_pad"}
               if spec.get("no_pad_case") is not None else {}),
            **({"case{i}.llamacpp_22_layers.{image_features,first_logits}": bugs_info.get("doc_layers"),
                "case{i}.llamacpp_cls_last.{image_features,first_logits}": bugs_info.get("doc_cls"),
                "case{i}.llamacpp_both.{image_features,first_logits}": bugs_info.get("doc_both")}
               if bugs_info else {}),
        },
        **({"llamacpp_bugs": bugs_info} if bugs_info else {}),
        "min_top2_gap": {v: round(min(c["variants"][v]["min_top2_gap"] for c in cases), 6) for v in spec["pairs"]},
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    timings[f"{name}: total"] = time.time() - t0
    return meta


def _gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # noqa: BLE001
        return "unknown"


@torch.no_grad()
def llamacpp_bug_references(model, cases, vis_args, tensors, variant, image_id, mmproj: Path) -> dict:
    """What llama.cpp's LLaVA graph computes with its two known bugs (transformers' modules, by hand):
    (a) one vision layer short: the graph runs n_layer - 1 of the mmproj's n_layer stored layers (the converter
        already dropped one; llava-1.5-7b: 22 of 23) and takes that output;
    (b) the class token concatenated after the patches with positions 0..N in that order (patch i gets position
        embedding i instead of i+1, CLS gets N), and the projector fed rows 1..N (patches 1..N-1 and the CLS
        output; patch 0 dropped), as clip.cpp's `patches` input i+1 selects;
    and both together (what the unfixed graph does)."""
    n_stored = int(GGUFReader(mmproj).fields["clip.vision.block_count"].contents())
    proj = model.model.multi_modal_projector
    out = {"n_stored_layers": n_stored, "rel_l2_first_logits": {}, "rel_l2_image_features": {}, "same_first_token": {}}
    for c in cases:
        i = c["case"]
        pv = vis_args[i]["pixel_values"][0]
        ref_feats = tensors[f"case{i}.{variant}.image_features"]
        ref_logits = tensors[f"case{i}.{variant}.first_logits"]
        # the hand-written tower reproduces transformers' features first
        ok = proj(clip_run(model, pv, n_stored, cls_last=False)[1:])
        assert float((ok - ref_feats).abs().max()) < 1e-5
        for label, n, cls_last in (("llamacpp_22_layers", n_stored - 1, False), ("llamacpp_cls_last", n_stored, True),
                                   ("llamacpp_both", n_stored - 1, True)):
            feats = proj(clip_run(model, pv, n, cls_last)[1:])
            logits = spliced_first_logits(model, c["input_ids"], feats, image_id)
            tensors[f"case{i}.{label}.image_features"] = feats.float()
            tensors[f"case{i}.{label}.first_logits"] = logits
            out["rel_l2_first_logits"].setdefault(label, []).append(round(rel_l2(logits, ref_logits), 6))
            out["rel_l2_image_features"].setdefault(label, []).append(round(rel_l2(feats, ref_feats), 6))
            same_top1 = int(logits.argmax()) == int(ref_logits.argmax())
            out["same_first_token"].setdefault(label, []).append(same_top1)
    for label in out["rel_l2_first_logits"]:
        log(f"{label}: rel-L2 of first_logits vs the reference per case {out['rel_l2_first_logits'][label]}, "
            f"image_features {out['rel_l2_image_features'][label]}, same first token {out['same_first_token'][label]}")
    out["doc_layers"] = (f"features after {n_stored - 1} of the {n_stored} stored CLIP layers (llama.cpp runs "
                         "n_layer - 1), CLS first, correct positions; first_logits with the same input_ids")
    out["doc_cls"] = (f"{n_stored} layers, [patches..., CLS] + position embeddings 0..N, projector on rows 1..N "
                      "(patches 1..N-1 and the CLS output)")
    out["doc_both"] = f"both bugs: {n_stored - 1} layers and CLS last (what the unfixed llama.cpp graph computes)"
    return out


# ----------------------------------------------------------------------------- optional: the real converters


SHIM = r"""
import runpy, sys, torch, transformers
_CLIPVisionModel = transformers.CLIPVisionModel
transformers = sys.modules["transformers"]  # the lazy module replaced itself on first use
class _V4(torch.nn.Module):  # transformers 4's CLIPVisionModel layout: .vision_model
    def __init__(self, inner):
        super().__init__()
        self.vision_model = inner
    @classmethod
    def from_pretrained(cls, d, **kw):
        import safetensors.torch as st, json, os
        cfg = transformers.CLIPVisionConfig(**json.load(open(os.path.join(d, "config.json"))))
        inner = _CLIPVisionModel(cfg)
        sd = torch.load(os.path.join(d, "pytorch_model.bin"))
        missing, unexpected = inner.load_state_dict({k[len("vision_model."):]: v for k, v in sd.items()}, strict=False)
        assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
        return cls(inner)
transformers.CLIPVisionModel = _V4
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def cross_check(src: Path, tmp: Path, tools: LlamaTools) -> None:
    """Run llama.cpp's own converters on temporary copies and compare every file with ours (all keys but
    tokenizer.ggml.scores, all tensor bytes); then load every text file with libllama (if a C compiler is
    around) and compare its text-only logits with transformers'."""
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    shim = tmp / "legacy_shim.py"
    shim.write_text(SHIM)
    for name, spec in MODELS.items():
        ckpt = WEIGHTS / name
        cfg = load_config(ckpt)
        # text: convert_hf_to_gguf.py (NeXT: give text_config an architecture it knows, as a user must)
        work = tmp / "xc" / name
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        for p in ckpt.iterdir():
            if p.is_file():
                shutil.copy(p, work / p.name)
        if spec["kind"] == "next":
            c2 = dict(cfg)
            c2["text_config"] = dict(cfg["text_config"], architectures=["LlamaForCausalLM"])
            (work / "config.json").write_text(json.dumps(c2, indent=2))
        for variant, (ttype, mtype) in spec["pairs"].items():
            theirs = tmp / "xc" / f"{name}-{ttype}.gguf"
            outtype = "f16" if ttype == "q4_k_m" else ttype
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(work), "--outtype", outtype,
                            "--outfile", str(theirs)], env=env, check=True, capture_output=True)
            how = "convert_hf_to_gguf.py"
            if ttype == "q4_k_m":
                tools.quantize(theirs, theirs.with_suffix(".q4_k_m.gguf"), "Q4_K_M")
                theirs = theirs.with_suffix(".q4_k_m.gguf")
                how += " + llama-quantize"
            compare_gguf(ckpt / "gguf" / variant / f"ggml-model-{ttype}.gguf", theirs, ignore={"tokenizer.ggml.scores"})
            log(f"cross-check {name} {variant} text: equal to {how} except tokenizer.ggml.scores")
        # mmproj: llava_surgery_v2's outputs, then the legacy converter
        vit = tmp / "xc" / "vit" / name
        if vit.exists():
            shutil.rmtree(vit)
        vit.mkdir(parents=True)
        (vit / "config.json").write_text(json.dumps(vit_config(cfg, spec["kind"]), indent=2))
        sd = load_file(str(ckpt / "model.safetensors"))
        clip = {}
        keyset = set(sd)
        for k in vision_state_keys(cfg["vision_config"]):
            clip[k] = sd[vision_source_key(k, keyset)]
        torch.save(clip, vit / "pytorch_model.bin")
        torch.save({k: sd[k].float() for k in sorted(sd) if k.startswith("multi_modal_projector.")}
                   | ({"image_newline": sd["image_newline"].float()} if "image_newline" in sd else {}),
                   vit / "llava.projector")
        for mtype in sorted({m for _, m in spec["pairs"].values()}):
            outdir = tmp / "xc" / "mm" / name / mtype
            outdir.mkdir(parents=True, exist_ok=True)
            args = [sys.executable, str(shim), str(src / "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"),
                    "-m", str(vit), "--llava-projector", str(vit / "llava.projector"), "--output-dir", str(outdir),
                    "--clip-model-is-vision"] + (["--use-f32"] if mtype == "f32" else [])
            r = subprocess.run(args, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(r.stdout[-3000:] + r.stderr[-3000:])
            variant = next(v for v, (_, m) in spec["pairs"].items() if m == mtype)
            compare_gguf(ckpt / "gguf" / variant / f"mmproj-model-{mtype}.gguf", outdir / f"mmproj-model-{mtype}.gguf",
                         ignore=set())
            log(f"cross-check {name} mmproj-{mtype}: equal to convert_image_encoder_to_gguf.py")


    libllama_check(src, tmp, tools)


EVAL_C = r"""
// decode the ids given on the command line with libllama (CPU), print the last position's logits
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char ** argv) {
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) return 2;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512; cp.n_batch = 512; cp.n_threads = 1; cp.n_threads_batch = 1;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) return 3;
    int n = argc - 2;
    llama_token * ids = malloc(sizeof(llama_token) * n);
    for (int i = 0; i < n; i++) ids[i] = atoi(argv[i + 2]);
    if (llama_decode(ctx, llama_batch_get_one(ids, n))) return 4;
    const float * logits = llama_get_logits_ith(ctx, -1);
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (int i = 0; i < n_vocab; i++) printf("%.9g\n", logits[i]);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
"""


def libllama_check(src: Path, tmp: Path, tools: LlamaTools) -> None:
    """llama.cpp's loader accepts every text GGUF, and its logits for the cases' text (no image) are close to
    transformers' on the same weights (not equal: llama.cpp keeps an f16 KV cache and quantizes activations to
    Q8 for quantized matmuls)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log("libllama check skipped: no C compiler")
        return
    (tmp / "eval.c").write_text(EVAL_C)
    exe = tmp / "llama_eval"
    subprocess.run([cc, "-O1", "-o", str(exe), str(tmp / "eval.c"), f"-I{src / 'include'}",
                    f"-I{src / 'ggml' / 'include'}", f"-L{tools.bin}", "-lllama", "-lggml", "-lggml-base"], check=True)
    for name, spec in MODELS.items():
        ckpt = WEIGHTS / name
        meta = json.loads((ckpt / "gguf" / "cases.json").read_text())
        for variant, f in meta["files"].items():
            model, _, _ = load_hf_model(ckpt / "gguf" / f["text"], ckpt / "gguf" / f["mmproj"], ckpt, spec["kind"], tmp)
            worst, same = 0.0, 0
            for c in meta["cases"]:
                ids = c["ids_before"] + c["ids_after"]
                r = tools.run(exe, ckpt / "gguf" / f["text"], *[str(t) for t in ids])
                if r.returncode != 0:
                    raise RuntimeError(f"libllama failed on {f['text']} ({r.returncode}): {r.stderr[-2000:]}")
                got = torch.tensor([float(x) for x in r.stdout.split()])
                with torch.no_grad():
                    want = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                worst = max(worst, rel_l2(got, want))
                same += int(got.argmax()) == int(want.argmax())
            assert worst < 0.05, (name, variant, worst)
            log(f"libllama {name} {variant}: loads; text-only logits rel-L2 vs transformers <= {worst:.2e}, "
                f"same argmax {same}/{len(meta['cases'])}")


def compare_gguf(ours: Path, theirs: Path, ignore: set[str]) -> None:
    a, b = GGUFReader(ours), GGUFReader(theirs)
    ka = [k for k in a.fields if k not in ignore]
    kb = [k for k in b.fields if k not in ignore]
    assert ka == kb, (ours, [k for k in ka if k not in kb], [k for k in kb if k not in ka])
    for k in ka:
        fa, fb = a.fields[k], b.fields[k]
        assert list(fa.types) == list(fb.types), (k, fa.types, fb.types)
        va, vb = fa.contents(), fb.contents()
        assert va == vb, (ours, k, str(va)[:200], str(vb)[:200])
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors], ours
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and list(ta.shape) == list(tb.shape), (ta.name, ta.tensor_type, tb.tensor_type)
        assert np.array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8)), ta.name
    if not ignore:
        assert ours.read_bytes() == theirs.read_bytes(), ours


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"),
                    help="llama.cpp build directory with llama-quantize and llama-tokenize (env LLAMA_CPP_BIN)")
    ap.add_argument("--llama-cpp-src", type=Path, default=None,
                    help="optional llama.cpp source tree: also compare with its own converters")
    ap.add_argument("--model", choices=sorted(MODELS), action="append", help="only these models (default: all)")
    args = ap.parse_args()
    if args.llama_bin is None:
        found = shutil.which("llama-quantize")
        if not found:
            raise SystemExit("pass --llama-bin DIR (llama.cpp's build/bin) or set LLAMA_CPP_BIN")
        args.llama_bin = Path(found).parent
    tools = LlamaTools(args.llama_bin)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    timings: dict[str, float] = {}
    log("versions:", json.dumps(versions()), "llama.cpp:", tools.version())
    with tempfile.TemporaryDirectory(prefix="gguf_fixtures_") as td:
        tmp = Path(td)
        for name in args.model or list(MODELS):
            build_model(name, MODELS[name], tools, tmp, timings)
        if args.llama_cpp_src is not None:
            t1 = time.time()
            cross_check(args.llama_cpp_src, tmp, tools)
            timings["cross-check with llama.cpp's converters"] = time.time() - t1
    total = 0
    for name in args.model or list(MODELS):
        for p in sorted((WEIGHTS / name / "gguf").rglob("*")):
            if p.is_file():
                total += p.stat().st_size
                log(f"  {p.relative_to(REPO)}  {p.stat().st_size} bytes")
    log(f"total {total} bytes")
    for k, v in timings.items():
        log(f"  {k}: {v:.1f}s")
    log(f"run time {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
