// Quantize rows of f32 with ggml's own C code and write the blocks and ggml's dequantization.
//
// Usage: record_blocks INPUT.f32 ROWS OUTDIR
//   INPUT.f32   ROWS x 512 little-endian f32, row-major (written by pack_fixture.py)
//   writes OUTDIR/<type>.bin (the blocks, ROWS x bytes per row) and OUTDIR/<type>_ggml.bin (f32)
//   and prints "ggml_version <v>" / "ggml_commit <c>" / one line per type to stdout.
//
// Each type is quantized as llama-quantize does it without an importance matrix:
// llama_tensor_quantize_impl (src/llama-quant.cpp) calls
// ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix) with imatrix = NULL, and in
// ggml/src/ggml-quants.c quantize_q4_0 .. quantize_q6_K then take their `!quant_weights` branch,
// which is exactly quantize_row_<type>_ref(src, dst, nrow * n_per_row) (quantize_q8_0 always
// calls quantize_row_q8_0_ref). F16 goes through ggml_fp32_to_fp16_row (the scalar
// GGML_FP32_TO_FP16 of ggml-impl.h) and BF16 through ggml_fp32_to_bf16_row_ref (ggml.c).
// All of these live in ggml-base; the CPU backend's SIMD code is not involved.
// Rows are independent, so quantizing all rows in one chunk gives the same bytes as
// llama-quantize's per-thread chunks.
//
// The dequantization is ggml_get_type_traits(type)->to_float (dequantize_row_<type> in
// ggml-quants.c, ggml_fp16_to_fp32_row / ggml_bf16_to_fp32_row in ggml.c).

#include "ggml.h"

#include <stdio.h>
#include <stdlib.h>

#define N_PER_ROW 512

static const struct { enum ggml_type type; const char * name; } TYPES[] = {
    {GGML_TYPE_Q4_0, "q4_0"}, {GGML_TYPE_Q4_1, "q4_1"}, {GGML_TYPE_Q5_0, "q5_0"},
    {GGML_TYPE_Q5_1, "q5_1"}, {GGML_TYPE_Q8_0, "q8_0"}, {GGML_TYPE_Q2_K, "q2_k"},
    {GGML_TYPE_Q3_K, "q3_k"}, {GGML_TYPE_Q4_K, "q4_k"}, {GGML_TYPE_Q5_K, "q5_k"},
    {GGML_TYPE_Q6_K, "q6_k"}, {GGML_TYPE_BF16, "bf16"}, {GGML_TYPE_F16, "f16"},
};

static void write_file(const char * dir, const char * name, const char * suffix,
                       const void * data, size_t nbytes) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s%s.bin", dir, name, suffix);
    FILE * f = fopen(path, "wb");
    if (!f || fwrite(data, 1, nbytes, f) != nbytes || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s INPUT.f32 ROWS OUTDIR\n", argv[0]);
        return 2;
    }
    const int64_t nrows = atoll(argv[2]);
    const int64_t n = nrows * N_PER_ROW;

    float * src = malloc(n * sizeof(float));
    FILE * f = fopen(argv[1], "rb");
    if (!f || fread(src, sizeof(float), n, f) != (size_t) n) {
        fprintf(stderr, "cannot read %lld f32 from %s\n", (long long) n, argv[1]);
        return 1;
    }
    fclose(f);

    printf("ggml_version %s\nggml_commit %s\n", ggml_version(), ggml_commit());

    float * deq = malloc(n * sizeof(float));
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++) {
        const enum ggml_type type = TYPES[i].type;
        const size_t row_size = ggml_row_size(type, N_PER_ROW);
        void * dst = malloc(nrows * row_size);

        const size_t written = ggml_quantize_chunk(type, src, dst, 0, nrows, N_PER_ROW, NULL);
        if (written != nrows * row_size) {
            fprintf(stderr, "%s: wrote %zu bytes, expected %zu\n", TYPES[i].name, written, nrows * row_size);
            return 1;
        }
        ggml_get_type_traits(type)->to_float(dst, deq, n);

        // llama-quantize rejects tensors whose blocks fail this check (inf/NaN scales or values).
        int n_valid = 0;
        for (int64_t r = 0; r < nrows; r++) {
            n_valid += ggml_validate_row_data(type, (const char *) dst + r * row_size, row_size);
        }
        printf("%s row_size %zu rows_valid %d/%lld\n", TYPES[i].name, row_size, n_valid, (long long) nrows);

        write_file(argv[3], TYPES[i].name, "", dst, nrows * row_size);
        write_file(argv[3], TYPES[i].name, "_ggml", deq, n * sizeof(float));
        free(dst);
    }
    free(deq);
    free(src);
    return 0;
}
