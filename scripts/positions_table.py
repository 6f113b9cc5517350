"""Compare two `llava-wgpu eval --json` runs that differ only in `--positions`.

Usage: python3 scripts/positions_table.py ORIGINAL.json CONTIGUOUS.json

For every (method, budget) row present in both, prints a Markdown table with each run's accuracy
and 95% interval (as `eval` computed them), and the paired comparison over the same questions:
the questions only `original` answered / only `contiguous` answered, and the exact two-sided
McNemar p-value (a binomial test on the discordant pairs). Numbers come from the runs' own
per-question `outcomes` strings; nothing is re-run.
"""

import json
import math
import sys


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b and c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def rows(path: str) -> dict:
    report = json.load(open(path))
    return {(r["method"], r["budget"]): r for r in report["rows"]}, report["positions"]


def main() -> None:
    (orig, p1), (cont, p2) = rows(sys.argv[1]), rows(sys.argv[2])
    assert (p1, p2) == ("original", "contiguous"), (p1, p2)
    print("| method | kept | original | contiguous | only original / only contiguous, McNemar p |")
    print("|---|---|---|---|---|")
    for key in orig:
        if key not in cont:
            continue
        a, b = orig[key], cont[key]
        wins = sum(x == "1" and y == "0" for x, y in zip(a["outcomes"], b["outcomes"]))
        losses = sum(x == "0" and y == "1" for x, y in zip(a["outcomes"], b["outcomes"]))
        ci = lambda r: f"{r['accuracy'] * 100:.1f}% ({r['accuracy_ci95']['low'] * 100:.1f}–{r['accuracy_ci95']['high'] * 100:.1f})"
        print(f"| {key[0]} | {a['mean_visual_tokens']:.0f} ({key[1] * 100:.0f}%) | {ci(a)} | {ci(b)} | "
              f"{wins} / {losses}, p = {mcnemar(wins, losses):.2g} |")


if __name__ == "__main__":
    main()
