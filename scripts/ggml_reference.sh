#!/usr/bin/env bash
# Record reference quantization blocks from ggml's own C code into tests/fixture/ggml_blocks.safetensors.
#
# Usage: scripts/ggml_reference.sh [LLAMA_CPP_OR_GGML_SOURCE] [BUILD_DIR]
#   LLAMA_CPP_OR_GGML_SOURCE  a llama.cpp tree (with ggml/ inside) or a ggml tree; default: the
#                             llama.cpp vendored in the llama-cpp-python 0.3.36 sdist, extracted at
#                             /work/ref/llama_cpp_python-0.3.36/vendor/llama.cpp
#   BUILD_DIR                 where ggml is built, outside the repo; default
#                             /tmp/ggml_reference_build
#
# What it does:
#   1. configures the source tree in BUILD_DIR/ggml (a llama.cpp tree from its top with
#      everything but ggml switched off) and builds ggml's CPU library there (target ggml, which
#      is ggml-base + ggml-cpu; Release, GGML_NATIVE=OFF, shared libraries);
#   2. compiles scripts/ggml_reference/record_blocks.c against it;
#   3. writes the seeded input rows (scripts/ggml_reference/pack_fixture.py input);
#   4. runs record_blocks, which quantizes the rows to q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k
#      q5_k q6_k bf16 f16 with ggml_quantize_chunk(..., imatrix = NULL) exactly as llama-quantize
#      does without an importance matrix, and dequantizes them with ggml's to_float;
#   5. packs everything into tests/fixture/ggml_blocks.safetensors, adds gguf-py's dequantization
#      of the same blocks, and prints how ggml and gguf-py agree (pack_fixture.py pack).
# Needs cmake, a C/C++ compiler and python with numpy, safetensors and gguf (gguf-py).
#
# How long: about 40 s on 2 cores for the ggml build (seconds when BUILD_DIR is already
# built), a few seconds for the rest. The fixture's tensors depend only on the source tree and
# the seed (the quantizers are plain C on IEEE f32, built without FMA contraction; see below).
set -euo pipefail

SRC=$(realpath "${1:-/work/ref/llama_cpp_python-0.3.36/vendor/llama.cpp}")
BUILD=$(realpath -m "${2:-/tmp/ggml_reference_build}")
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}

if [ -f "$SRC/ggml/CMakeLists.txt" ]; then GGML_SRC=$SRC/ggml; else GGML_SRC=$SRC; fi
grep -q 'project("ggml"' "$GGML_SRC/CMakeLists.txt" || { echo "no ggml source at $SRC" >&2; exit 1; }

mkdir -p "$BUILD"
start=$SECONDS
if [ "$GGML_SRC" = "$SRC" ]; then
    CONFIG=(-S "$SRC" -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF)
else
    # A llama.cpp tree is configured from its top (a vendored ggml/ may lack files its
    # standalone configure needs, e.g. ggml.pc.in in the llama-cpp-python sdist); only the
    # ggml target is built.
    CONFIG=(-S "$SRC" -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
            -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF)
fi
# -ffp-contract=off: GCC's default for gnu11 fuses a*b+c into FMA where the target has one
# (aarch64; x86-64 ggml-base is built without FMA either way), and that changes some Q2_K, Q4_K
# and Q5_K bytes (make_qkx2_quants); off matches x86 llama-quantize builds.
cmake "${CONFIG[@]}" -B "$BUILD/ggml" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=OFF -DCMAKE_C_FLAGS=-ffp-contract=off > "$BUILD/cmake.log"
cmake --build "$BUILD/ggml" -j "$JOBS" --target ggml > "$BUILD/build.log"
LIB=$(dirname "$(find "$BUILD/ggml" -name 'libggml-base.so' | head -1)")
echo "ggml built in $LIB ($((SECONDS - start)) s)"

cc -std=c11 -O2 -Wall -Wextra -I"$GGML_SRC/include" "$HERE/ggml_reference/record_blocks.c" \
    -L"$LIB" -lggml -lggml-base -Wl,-rpath,"$LIB" -lm -o "$BUILD/record_blocks"

WORK=$BUILD/work
rm -rf "$WORK" && mkdir -p "$WORK"
ROWS=$("$PYTHON" "$HERE/ggml_reference/pack_fixture.py" input "$WORK")
"$BUILD/record_blocks" "$WORK/input.f32" "$ROWS" "$WORK" | tee "$WORK/record.txt"
"$PYTHON" "$HERE/ggml_reference/pack_fixture.py" pack "$WORK" "$SRC"
echo "done in $((SECONDS - start)) s"
