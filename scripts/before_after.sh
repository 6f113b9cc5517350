#!/usr/bin/env bash
# Before/after on one machine, alternating: the README's "Before and after" tables.
#
#   scripts/before_after.sh OLD_BINARY NEW_BINARY OUT_DIR
#
# Build the two commits first, each in its own worktree and target directory, e.g.
#   git worktree add /tmp/before 9a9f5dd && (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target cargo build --release)
# then run from the repository root (the demo model in weights/ is read by both). Writes, per
# binary: the demo request's wall times (demo_wall.txt) and --json outputs, two
# `bench --preset small` runs and one `bench --preset llava-1.5-7b --weights q4_0 --layers 2`
# run (about 6 minutes each on a 2-core machine with lavapipe).
set -euo pipefail
old=$1 new=$2 out=$3
mkdir -p "$out"
image=weights/tiny-llava-shapes/example1.png
prompt="Which color does the cross have?"
# One untimed run each: the second-run figures (caches warm) are the ones compared.
for b in old new; do "${!b}" run --image $image --prompt "$prompt" >/dev/null 2>&1; done
for i in 1 2 3 4 5; do
  for b in old new; do
    /usr/bin/time -f "$b wall %e" "${!b}" run --image $image --prompt "$prompt" \
      2>>"$out/demo_wall.txt" >/dev/null
    "${!b}" run --image $image --prompt "$prompt" --json 2>/dev/null >"$out/demo_${b}_$i.json"
  done
done
for i in 1 2; do
  for b in old new; do
    "${!b}" bench --preset small --warmup 1 --repeats 2 --only 'star N1=518 N2=64' --json \
      2>/dev/null >"$out/small_${b}_$i.json"
  done
done
for b in old new; do
  "${!b}" bench --preset llava-1.5-7b --weights q4_0 --layers 2 --json 2>/dev/null \
    >"$out/7b_${b}.json"
done
echo "written to $out"
