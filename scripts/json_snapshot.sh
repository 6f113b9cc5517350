#!/usr/bin/env bash
# Record `llava-wgpu run --json` for the demo and parity models, pruned and unpruned, with the
# wall-clock fields removed, so two builds can be compared byte for byte:
#
#   scripts/json_snapshot.sh BIN OUT_DIR        # e.g. before and after a refactor
#   diff -r before/ after/                      # identical output = identical behaviour
#
# Timings (timings_ms, decode_tokens_per_second) are the only fields dropped; everything else
# (text, ids, logprobs, kept indices, token counts, KV-cache and memory bytes, flops) must match.
# --kept-overlay PNGs are recorded as well (as SHA-256 sums).
set -euo pipefail
bin=${1:?usage: json_snapshot.sh BIN OUT_DIR}
out=${2:?usage: json_snapshot.sh BIN OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"

strip_timings='del(.timings_ms, .decode_tokens_per_second)'

record() { # name, then run arguments
    local name=$1
    shift
    if "$bin" run --json "$@" 2>"$out/$name.stderr" | jq -S "$strip_timings" >"$out/$name.json"; then
        rm -f "$out/$name.stderr"
    else
        # Errors are behaviour too: keep the message (without the progress bar).
        grep '^error' "$out/$name.stderr" >"$out/$name.error" || true
        rm -f "$out/$name.stderr" "$out/$name.json"
    fi
}

demo=weights/tiny-llava-shapes
for i in 1 2 3; do
    q=$(sed -n "${i}p" $demo/examples.jsonl | jq -r .question)
    for method in none star fastv fastervlm vispruner random; do
        record "demo-ex$i-$method" --model $demo --image $demo/example$i.png --prompt "$q" \
            -n 6 --logprobs 2 --prune $method
    done
done
record demo-star-overlay --model $demo --image $demo/example1.png --prompt "Which shape is green?" \
    -n 2 --kept-overlay "$out/demo-star-overlay.png"
record demo-star-cls --model $demo --image $demo/example2.png --prompt "Which shape is green?" \
    -n 4 --prune star --stage1-score cls --keep 30 --stage1-keep 120 --stage2-layer 1
record demo-sampled --model $demo --image $demo/example3.png --prompt "What is in the image?" \
    -n 8 --temperature 0.8 --top-p 0.9 --seed 7 --ignore-eos
record demo-bad-keep --model $demo --image $demo/example1.png --prompt "x" --keep 500

parity=weights/tiny-random-llava
ref=$parity/reference
jq -r '.cases[] | "\(.image)\t\(.prompt)"' $ref/cases.json | {
    n=0
    while IFS=$'\t' read -r image prompt; do
        for weights in f32 f16; do
            for method in none star fastv vispruner; do
                record "parity-case$n-$weights-$method" --model $parity --image "$ref/$image" \
                    --prompt "$prompt" -n 5 --logprobs 3 --ignore-eos --weights $weights \
                    --prune $method
            done
        done
        n=$((n + 1))
    done
}
if [ -f "$out/demo-star-overlay.png" ]; then
    sha256sum "$out/demo-star-overlay.png" | cut -d' ' -f1 >"$out/demo-star-overlay.png.sha256"
    rm "$out/demo-star-overlay.png"
fi
echo "recorded $(ls "$out" | wc -l) files in $out"
