#!/usr/bin/env python3
"""Reference outputs of the tiny random LLaVA fixture with Q8_0 / Q4_0 language-model weights.

transformers (float32, eager attention, CPU) runs ``weights/tiny-random-llava`` with every weight
the engine loads in a block format replaced by what its ggml blocks stand for: the decoder's
q/k/v/o, gate/up/down projections and ``lm_head``, quantized and dequantized by ``gguf.quants``
(llama.cpp's gguf-py, independent of the engine). A weight whose rows are not whole blocks of
32 (the fixture's down_proj, 150 wide) stays f16 in the engine, so it is rounded to f16 here.
The vision tower and projector keep their float32 values (tests/parity.rs loads them in f32),
except in the ``q4_0_vision_q8_0`` variant (``--weights q4_0 --vision-weights q8_0``, the 7B
memory table's smallest row): there the vision tower's q/k/v/out and fc1/fc2 projections and the
projector's two linears are Q8_0 too (f16 where rows are not whole blocks), and the patch
embedding, which the engine keeps in f16 beside block formats, is rounded to f16.

For every recorded case (same input ids and pixel values as ``reference/cases.json``) it records
the first-step logits and 16 greedy tokens (EOS masked, as in make_tiny_llava.py), and the
smallest top-1/top-2 logit gap along the way, so a flaky token comparison would show.

Writes ``weights/tiny-random-llava/reference/quantized.safetensors``:
    case{i}.{q8_0,q4_0,q4_0_vision_q8_0}.first_logits   f32 [vocab]
    case{i}.{q8_0,q4_0,q4_0_vision_q8_0}.greedy_ids     i64 [16]
metadata: min gap per case and format, versions.

Regenerate with:  python scripts/quant_reference.py      (CPU, a few seconds)
"""

from __future__ import annotations

from llava_hf_common import versions  # first: sets the offline environment

import json
import re

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants
from safetensors.numpy import load_file, save_file
from transformers import LlavaForConditionalGeneration

from make_tiny_llava import NEW_TOKENS, OUT, REF, greedy_run

Q8_0, Q4_0 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0
# name: (language model format, vision tower and projector format or None for float32)
FORMATS = {"q8_0": (Q8_0, None), "q4_0": (Q4_0, None), "q4_0_vision_q8_0": (Q4_0, Q8_0)}
LINEAR = re.compile(r"(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight|lm_head\.weight)$")
VISION_LINEAR = re.compile(
    r"(vision_tower\..*layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|multi_modal_projector\.linear_[12])\.weight$"
)
PATCH_EMBEDDING = re.compile(r"vision_tower\..*patch_embedding\.weight$")


def dequantized(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray | None:
    """What ggml blocks of ``w`` stand for, or None where rows are not whole blocks of 32."""
    if w.shape[1] % 32 != 0:
        return None
    return quants.dequantize(quants.quantize(w, qtype), qtype).reshape(w.shape)


def weight_qtype(name: str, qtype, vision_qtype):
    """The block format ``name`` is stored in, or None if it keeps its float32 values."""
    if ("language_model" in name or name.startswith("lm_head")) and LINEAR.search(name):
        return qtype
    if vision_qtype is not None and VISION_LINEAR.search(name):
        return vision_qtype
    return None


def quantized_model(qtype, vision_qtype) -> tuple[LlavaForConditionalGeneration, list[str]]:
    model = LlavaForConditionalGeneration.from_pretrained(OUT, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    kept_f16, quantized = [], 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach().numpy().astype(np.float32)
            fmt = weight_qtype(name, qtype, vision_qtype)
            if fmt is None:
                if vision_qtype is None or not PATCH_EMBEDDING.search(name):
                    continue
                deq = w.astype(np.float16).astype(np.float32)
            else:
                deq = dequantized(w, fmt)
                quantized += deq is not None
                if deq is None:
                    deq = w.astype(np.float16).astype(np.float32)
                    kept_f16.append(name)
            p.copy_(torch.from_numpy(np.ascontiguousarray(deq)))
    print(f"{quantized} weights in block formats, kept in f16: {kept_f16}")
    return model, kept_f16


def main() -> None:
    cases = json.loads((REF / "cases.json").read_text())
    eos = cases["special_token_ids"]["</s>"]
    pixels = load_file(str(REF / "reference.safetensors"))
    tensors, meta = {}, {"generator": "scripts/quant_reference.py", "versions": json.dumps(versions())}
    for fmt, (qtype, vision_qtype) in FORMATS.items():
        model, kept = quantized_model(qtype, vision_qtype)
        meta[f"{fmt}.kept_f16"] = json.dumps(kept)
        for i, case in enumerate(cases["cases"]):
            ids = torch.tensor([case["input_ids"]])
            pv = torch.from_numpy(pixels[f"case{i}.pixel_values"])[None]
            greedy, step_logits, gaps, _ = greedy_run(model, ids, pv, eos, NEW_TOKENS)
            tensors[f"case{i}.{fmt}.first_logits"] = step_logits[0].numpy().astype(np.float32)
            tensors[f"case{i}.{fmt}.greedy_ids"] = np.array(greedy, dtype=np.int64)
            meta[f"case{i}.{fmt}.min_gap"] = f"{min(gaps):.4f}"
            print(f"{fmt} case {i}: {greedy} min top-2 gap {min(gaps):.4f}")
    save_file(tensors, str(REF / "quantized.safetensors"), metadata=meta)
    print(f"wrote {REF / 'quantized.safetensors'}")


if __name__ == "__main__":
    main()
