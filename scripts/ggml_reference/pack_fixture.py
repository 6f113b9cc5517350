#!/usr/bin/env python3
"""Input rows for, and packing of, tests/fixture/ggml_blocks.safetensors (run by scripts/ggml_reference.sh).

    pack_fixture.py input WORKDIR          write WORKDIR/input.f32 (R x 512 f32) and print R
    pack_fixture.py pack WORKDIR SRC_TREE  pack record_blocks' outputs in WORKDIR into the fixture

record_blocks.c quantizes the rows with ggml's own C code (ggml_quantize_chunk without an
importance matrix, as llama-quantize does) and dequantizes them with ggml's to_float. Here the
blocks are also dequantized with ``gguf.quants.dequantize`` (gguf-py, an independent numpy
implementation) and the two dequantizations are compared. The fixture holds:

    input        f32 [R, 512]
    <type>       u8  [R, bytes per row]   ggml's blocks, row-major
    <type>_ggml  f32 [R, 512]             ggml's dequantization of <type>
    <type>_gguf  f32 [R, 512]             gguf.quants.dequantize of <type>

for <type> in q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k bf16 f16, and metadata naming the
llama.cpp source (llama-cpp-python sdist version, llama.cpp commit, ggml version/commit), the
gguf-py and numpy versions and the seed.

Rows (R = 25 of 512 = two superblocks of 256). Rows 0-15, seeded random: normal at sigma 1 (2),
0.02 (2, weight-like) and 250; uniform in +-1 and +-0.05; heavy-tailed (2, Cauchy * 0.05 clipped
to +-1000); Student t (3 dof); per-block scales (2, each block of 32 gets its own log-normal
scale, so K-quant sub-block scales differ a lot); all-positive (|normal|, uniform [0.2, 1.2]);
all-negative (-|normal|, uniform [-3, -1]). Rows 16-24: 18 hand-made superblocks, two per row, in
this order: all zeros; 1e-3 with one 6e4; N(0, 0.01) with one -300; constant 0.75; constant
-1.25; linspace(-1, 3) times 3e-3 (Q8_0 and Q4_K/Q5_K/Q6_K super-block scales subnormal in
f16), times 6e-5 (every f16 scale subnormal, Q6_K's the smallest one, 2^-24), times 1e-7 (every
scale zero, so everything dequantizes to 0; F16 values subnormal) and times 1e-30 (tiny but
normal f32; F16 values zero); N(0, 0.05) with four outliers (+-8, +-20); a ramp
linspace(-1, 1); a ramp linspace(-2, 6); exact .5 ties for Q8_0, Q4_0, Q5_0, Q4_1 and Q5_1 (the
block max is chosen so that the scale is 1); blocks of 32 whose largest magnitude is negative,
positive, or both (Q4_0/Q5_0 keep the sign of the first largest magnitude); blocks of 32 that
alternate between all zeros and N(0, 1) (K-quant sub-blocks with zero scale); blocks of 32 that
are each constant at a different value; uniform in +-6e4 (near f16's max); f16 and bf16
round-to-nearest-even ties (1 + odd * 2^-11, 1 + odd * 2^-8, alternating sign).
f32 subnormal inputs and values beyond f16's range are left out: there ggml computes 1/d = inf
or stores inf scales, and its integer cast of inf/NaN is undefined behaviour in C.

Regenerate with: scripts/ggml_reference.sh   (tensor bytes are deterministic; safetensors writes
the metadata keys in no fixed order)
"""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants
from safetensors.numpy import save_file

K = 512
SEED = 20240
TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "bf16", "f16"]
QTYPE = {name: T[name.upper()] for name in TYPES}
OUT = Path(__file__).resolve().parents[2] / "tests/fixture/ggml_blocks.safetensors"


def random_rows(rng: np.random.Generator) -> list[np.ndarray]:
    rows = []
    rows += list(rng.normal(0, 1.0, (2, K)))
    rows += list(rng.normal(0, 0.02, (2, K)))
    rows += list(rng.normal(0, 250.0, (1, K)))
    rows += list(rng.uniform(-1, 1, (1, K)))
    rows += list(rng.uniform(-0.05, 0.05, (1, K)))
    rows += list(np.clip(rng.standard_cauchy((2, K)) * 0.05, -1000, 1000))
    rows += list(rng.standard_t(3, (1, K)))
    rows += list(rng.normal(0, 1, (2, K)) * np.repeat(rng.lognormal(-2, 2, (2, K // 32)), 32, axis=1))
    rows += list(np.abs(rng.normal(0, 0.5, (1, K))))
    rows += list(rng.uniform(0.2, 1.2, (1, K)))
    rows += list(-np.abs(rng.normal(0, 0.5, (1, K))))
    rows += list(rng.uniform(-3, -1, (1, K)))
    return rows


def ties_block() -> np.ndarray:
    """Eight blocks of 32 whose scale is exactly 1 and whose values are k + 0.5."""
    half = np.arange(32, dtype=np.float32) + np.float32(0.5)
    q8 = half - 16
    q8[0] = 127.0  # Q8_0: d = amax / 127 = 1, x * 1 lands on .5 for roundf
    q4 = (np.arange(32) % 16 - np.float32(7.5)).astype(np.float32)
    q4[0] = -8.0  # Q4_0: d = max / -8 = 1, x + 8.5 is an integer
    q5 = (np.arange(32) - np.float32(15.5)).astype(np.float32)
    q5[0] = -16.0  # Q5_0: d = max / -16 = 1
    q41 = (np.arange(32) % 15 + np.float32(0.5)).astype(np.float32)
    q41[0], q41[1] = 0.0, 15.0  # Q4_1: min 0, max 15, d = 1
    q51 = (np.arange(32) % 31 + np.float32(0.5)).astype(np.float32)
    q51[0], q51[1] = 0.0, 31.0  # Q5_1: min 0, max 31, d = 1
    return np.concatenate([q8, -q8, q4, -q4, q5, -q5, q41, q51])


def sign_block() -> np.ndarray:
    """Blocks of 32 whose largest magnitude is negative, positive, or both (first one wins)."""
    neg = np.linspace(-1, 0.5, 32, dtype=np.float32)
    pos = np.linspace(-0.5, 1, 32, dtype=np.float32)
    tie = np.linspace(-2, 2, 32, dtype=np.float32)
    tie[0], tie[31] = 2.0, -2.0
    tie2 = -tie
    return np.concatenate([neg, pos, tie, tie2, 10 * neg, 0.1 * pos, 10 * tie, 0.1 * tie2])


def edge_rows(rng: np.random.Generator) -> list[np.ndarray]:
    """Hand-made superblocks of 256, paired into rows of 512."""
    sb = []
    sb.append(np.zeros(256))
    spike = np.full(256, 1e-3)
    spike[77] = 6.0e4
    sb.append(spike)
    spike2 = rng.normal(0, 0.01, 256)
    spike2[200] = -300.0
    sb.append(spike2)
    sb.append(np.full(256, 0.75))
    sb.append(np.full(256, -1.25))
    for scale in [3e-3, 6e-5, 1e-7, 1e-30]:
        sb.append(np.linspace(-1, 3, 256) * scale)
    outliers = rng.normal(0, 0.05, 256)
    outliers[[3, 90, 130, 255]] = [8.0, -20.0, 20.0, -8.0]
    sb.append(outliers)
    sb.append(np.linspace(-1, 1, 256))
    sb.append(np.linspace(-2, 6, 256))
    sb.append(ties_block())
    sb.append(sign_block())
    alternating = rng.normal(0, 1, 256)
    alternating.reshape(8, 32)[::2] = 0.0
    sb.append(alternating)
    sb.append(np.repeat(np.array([0.5, -0.25, 3.0, 0.0, -7.0, 1e-3, 100.0, -0.125]), 32))
    sb.append(rng.uniform(-6e4, 6e4, 256))
    odd = np.arange(128) * 2 + 1
    sign = np.where(np.arange(128) % 2, -1.0, 1.0)
    sb.append(np.concatenate([sign * (1 + odd * 2.0**-11), sign * (1 + odd * 2.0**-8)]))
    assert len(sb) % 2 == 0
    return [np.concatenate(sb[i:i + 2]) for i in range(0, len(sb), 2)]


def make_input() -> np.ndarray:
    rng = np.random.default_rng(SEED)
    rows = np.stack(random_rows(rng) + edge_rows(rng)).astype(np.float32)
    tiny = (rows != 0) & (np.abs(rows) < np.finfo(np.float32).tiny)
    assert not tiny.any() and np.abs(rows).max() < 65504, "f32 subnormal or beyond f16's range"
    return rows


def source_info(src: Path) -> dict[str, str]:
    """Where the llama.cpp tree came from: an enclosing sdist's PKG-INFO and the git commit, if any."""
    meta = {"llama_cpp_source": src.name}
    for parent in [src, *src.parents][:4]:
        if (parent / "PKG-INFO").exists():
            lines = (parent / "PKG-INFO").read_text().splitlines()[:5]
            fields = dict(line.split(": ", 1) for line in lines if ": " in line)
            where = src.relative_to(parent)
            meta["source_package"] = f"{fields.get('Name')} {fields.get('Version')} sdist, {where}"
            break
    git = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        meta["llama_cpp_commit"] = git.stdout.strip()
    return meta


def compare(name: str, a: np.ndarray, b: np.ndarray) -> str:
    same = np.array_equal(a.view(np.uint32), b.view(np.uint32))
    diff = np.abs(a.astype(np.float64) - b).max()
    return (f"{name:5s} ggml vs gguf-py dequantization: {'bit-identical' if same else 'DIFFERENT'}, "
            f"max abs diff {diff:.3g}, {int((a != b).sum())} of {a.size} values differ")


def gguf_quantize_check(rows: np.ndarray, name: str, ggml_bytes: np.ndarray) -> str:
    """Does gguf-py quantize this type, and does it give ggml's bytes?"""
    try:
        ours = quants.quantize(rows, QTYPE[name])
    except NotImplementedError as e:
        return f"{name:5s} gguf-py quantize: not implemented ({type(e).__name__})"
    ours = np.ascontiguousarray(ours).view(np.uint8).reshape(ggml_bytes.shape)
    _, type_size = GGML_QUANT_SIZES[QTYPE[name]]
    blocks = (ours != ggml_bytes).reshape(rows.shape[0], -1, type_size).any(-1)
    bad_rows = sorted(set(np.nonzero(blocks)[0].tolist()))
    unit = "values" if type_size == 2 else "blocks"
    return (f"{name:5s} gguf-py quantize: {int(blocks.sum())} of {blocks.size} {unit} differ from ggml"
            + (f" (rows {bad_rows})" if bad_rows else ""))


def pack(work: Path, src: Path) -> None:
    rows = np.fromfile(work / "input.f32", np.float32).reshape(-1, K)
    assert np.array_equal(rows, make_input()), "input.f32 is not this script's input"
    info = dict(line.split(" ", 1) for line in (work / "record.txt").read_text().splitlines()
                if line.startswith("ggml_"))
    tensors = {"input": rows}
    report = []
    for name in TYPES:
        blocks = np.fromfile(work / f"{name}.bin", np.uint8).reshape(rows.shape[0], -1)
        deq_ggml = np.fromfile(work / f"{name}_ggml.bin", np.float32).reshape(rows.shape)
        deq_gguf = quants.dequantize(blocks, QTYPE[name]).astype(np.float32).reshape(rows.shape)
        tensors[name] = blocks
        tensors[f"{name}_ggml"] = deq_ggml
        tensors[f"{name}_gguf"] = deq_gguf
        report.append(compare(name, deq_ggml, deq_gguf))
    report += [gguf_quantize_check(rows, name, tensors[name]) for name in TYPES]
    meta = {"generator": "scripts/ggml_reference.sh (record_blocks.c, pack_fixture.py)",
            **source_info(src), "ggml_version": info.get("ggml_version", "?"),
            "ggml_commit": info.get("ggml_commit", "?"), "gguf": version("gguf"),
            "numpy": np.__version__, "seed": str(SEED)}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(OUT), metadata=meta)
    print("\n".join(report))
    print(f"metadata: {meta}")
    print(f"{OUT}: {rows.shape[0]} rows of {K}, {OUT.stat().st_size} bytes")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "input":
        rows = make_input()
        rows.tofile(Path(sys.argv[2]) / "input.f32")
        print(rows.shape[0])
    elif len(sys.argv) == 4 and sys.argv[1] == "pack":
        pack(Path(sys.argv[2]), Path(sys.argv[3]).resolve())
    else:
        sys.exit(__doc__.split("\n\n")[1])


if __name__ == "__main__":
    main()
