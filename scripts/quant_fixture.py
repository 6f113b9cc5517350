#!/usr/bin/env python3
"""Record ggml's Q8_0 and Q4_0 quantization of seeded random rows, as computed by ``gguf.quants``.

``gguf.quants`` (the ``gguf`` package from llama.cpp's gguf-py) is an implementation of ggml's
reference quantizers (``quantize_row_q8_0_ref``, ``quantize_row_q4_0_ref``) independent of the
engine's. tests/quant.rs quantizes the same rows with ``llava_wgpu::quant`` and compares the bytes
exactly, and compares its dequantization with ``gguf.quants.dequantize``.

Writes tests/fixture/quant_blocks.safetensors:

    input      f32 [R, K]        the rows (K = 96: three blocks of 32)
    q8_0       u8  [R, K/32*34]  ggml Q8_0 blocks (f16 scale, 32 int8), row-major
    q4_0       u8  [R, K/32*18]  ggml Q4_0 blocks (f16 scale, 16 bytes of nibbles)
    q8_0_deq   f32 [R, K]        gguf.quants.dequantize of q8_0
    q4_0_deq   f32 [R, K]        gguf.quants.dequantize of q4_0

Rows: random at several scales (normal, uniform, heavy-tailed), then edge cases in whole
blocks: all zeros, a single huge value among small ones, a negative max, a positive max (Q4_0
keeps the sign of the largest magnitude), equal-magnitude values of both signs (the first one
wins), tiny values whose f16 scale is subnormal or zero, values beyond f16's range of scales,
and exact .5 ties for both rounding rules. True f32 subnormal blocks are left out: there
1/d overflows to inf and ggml's integer cast of inf/NaN is undefined behaviour in C.

Regenerate with: python scripts/quant_fixture.py   (tensor bytes are deterministic; a second or so)
"""

import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants
from safetensors.numpy import save_file

K = 96
SEED = 11


def edge_rows() -> list[np.ndarray]:
    """Hand-made rows, each three blocks of 32."""
    blk = []
    zeros = np.zeros(32, np.float32)
    blk.append(zeros)
    spike = np.full(32, 1e-3, np.float32)
    spike[5] = 6.0e4
    blk.append(spike)
    neg = np.linspace(-1, 0.5, 32, dtype=np.float32)  # max magnitude is negative
    blk.append(neg)
    pos = np.linspace(-0.5, 1, 32, dtype=np.float32)  # max magnitude is positive
    blk.append(pos)
    tie = np.linspace(-2, 2, 32, dtype=np.float32)
    tie[0], tie[31] = 2.0, -2.0  # same magnitude, both signs: the first (positive) wins
    blk.append(tie)
    tie2 = tie.copy()
    tie2[0], tie2[31] = -2.0, 2.0
    blk.append(tie2)
    blk.append(np.linspace(-1e-6, 3e-6, 32, dtype=np.float32))  # f16 scale subnormal
    blk.append(np.linspace(-1e-9, 1e-9, 32, dtype=np.float32))  # f16 scale rounds to 0
    blk.append(np.linspace(-1e-30, 2e-30, 32, dtype=np.float32))  # tiny but normal f32
    blk.append(np.linspace(-1e7, 3e6, 32, dtype=np.float32))  # scale above f16 max: inf
    # Q8_0 ties: amax 127 gives d = 1 exactly, so x + 0.5 lands on .5 after x * (1/d).
    q8tie = (np.arange(32, dtype=np.float32) - 16) + np.float32(0.5)
    q8tie[0] = 127.0
    blk.append(q8tie)
    blk.append(-q8tie)
    # Q4_0 ties: max -8 gives d = 1, so x * 1 + 8.5 is an integer exactly for x = k + 0.5.
    q4tie = (np.arange(32, dtype=np.float32) % 16) - np.float32(7.5)
    q4tie[0] = -8.0
    blk.append(q4tie)
    q4tie2 = -q4tie
    blk.append(q4tie2)
    # Values that quantize to exactly 15 + 0.5 before the clamp in Q4_0 (x = -max).
    clamp = np.linspace(-3, 3, 32, dtype=np.float32)
    clamp[0] = 3.0
    blk.append(clamp)
    while len(blk) % 3:
        blk.append(np.ones(32, np.float32))
    return [np.concatenate(blk[i:i + 3]) for i in range(0, len(blk), 3)]


def random_rows(rng: np.random.Generator) -> list[np.ndarray]:
    rows = []
    for scale in [1.0, 0.02, 3e-3, 250.0]:
        rows += list(rng.normal(0, scale, (6, K)).astype(np.float32))
        rows += list(rng.uniform(-scale, scale, (4, K)).astype(np.float32))
    rows += list(rng.standard_cauchy((6, K)).astype(np.float32))  # heavy tails: outliers
    return rows


def main() -> None:
    rng = np.random.default_rng(SEED)
    # The scale-overflow block (f16 scale = inf, dequantized to inf/NaN) is intended.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    rows = np.stack(random_rows(rng) + edge_rows()).astype(np.float32)
    q8 = quants.quantize(rows, T.Q8_0)
    q4 = quants.quantize(rows, T.Q4_0)
    tensors = {
        "input": rows,
        "q8_0": q8,
        "q4_0": q4,
        "q8_0_deq": quants.dequantize(q8, T.Q8_0).astype(np.float32),
        "q4_0_deq": quants.dequantize(q4, T.Q4_0).astype(np.float32),
    }
    out = Path(__file__).resolve().parent.parent / "tests/fixture/quant_blocks.safetensors"
    meta = {"generator": "scripts/quant_fixture.py", "gguf": version("gguf"),
            "numpy": np.__version__, "seed": str(SEED)}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out), metadata=meta)
    print(f"{out}: {rows.shape[0]} rows of {K}, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
