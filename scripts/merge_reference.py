#!/usr/bin/env python3
"""Record what a selection before the projector computes when it MERGES the patches it drops into the ones it keeps
(`--merge`, docs/pruning.md "Merging the dropped patches"), on the tiny random LLaVA-1.5 fixture, independently of the
Rust engine (PyTorch, transformers' own modules, float32, CPU).

The rule. A selection keeps patches k_0 < ... < k_{N-1} of the N0 = 36. Every dropped patch i joins the kept patch
whose CLIP layer -2 feature row (the rows LLaVA projects, CLS excluded) has the largest cosine similarity with its own,
cos(a, b) = a.b / (|a| |b|) in f64 (0 for a zero row); a tie goes to the earlier kept patch. Kept token j is then the
projector applied to the MEAN of the feature rows of its group (itself and the patches that joined it), at the RoPE
position of its own patch (original positions, docs/pruning.md "Positions").

Methods recorded per case of reference/cases.json (greedy, EOS masked like make_tiny_llava.pick, 8 new tokens):

    fastervlm_merge   the top N patches by the CLS row's attention, merged, original positions
    star_merge        STAR: stage 1 the top N1 by the attention received, merged; stage 2 at K keeps the top N2 by the
                      text rows' attention to the (merged) image rows; original positions

Writes weights/tiny-random-llava/reference/merge.json (budgets, kept sets, groups, greedy ids, checks, the smallest
margins) and merge_logits.safetensors (case{i}.{method}.first_logits, f32 [vocab]).

Budgets: FasterVLM N = 10, STAR N1 = 12, N2 = 6, K = 2, unless a case has a near-tie at a top-k boundary or between the
two most similar kept patches of a dropped patch (relative gap < 1e-3 at a boundary, < 2e-5 between similarities); then
the next candidates.

Checks (the script stops if one fails): (a) merging with every patch kept equals the unmerged selection (the groups
are single rows); (b) the merged prefill and decode equal transformers' LlavaForConditionalGeneration given the merged
projector rows (mm_encoder_outputs) and explicit position_ids within 1e-5 / 1e-4, and STAR's stage-2 scores equal those
from its output_attentions within 1e-6; (c) the cached decode equals one cache-free pass within 1e-4; (d) every dropped
patch is in exactly one group.

Run:  cd /work/main && python3 scripts/merge_reference.py      (CPU, float32, a few seconds)
"""

from __future__ import annotations

from llava_hf_common import load_fixture, versions, write_reference  # first: sets the offline environment

import copy
import json
import time

import torch
from safetensors.torch import load_file

import make_tiny_llava as v15
import positions_reference as pr

OUT_JSON = pr.REF / "merge.json"
OUT_LOGITS = pr.REF / "merge_logits.safetensors"
SCRIPT = "scripts/merge_reference.py"
CANDIDATES = [(10, 12, 6), (9, 12, 6), (11, 13, 6), (10, 14, 7), (8, 11, 5), (12, 15, 8)]  # (fastervlm N, N1, N2)
SAFE_GAP_REL = 1e-3  # top-k boundaries, as the other reference scripts
# Which kept patch a dropped one joins: cosines of this random model's rows sit close together, and the engine's f32
# Gram matrix moves a cosine by about 1e-6 (64-wide rows), so a relative gap of 2e-5 between the two best is safe.
SAFE_GROUP_GAP_REL = 2e-5


def cosine(rows: torch.Tensor) -> torch.Tensor:
    r = rows.double()
    norms = r.norm(dim=1)
    sim = (r @ r.T) / torch.outer(norms, norms)
    return torch.where(torch.outer(norms, norms) > 0, sim, torch.zeros_like(sim))


def merge_groups(rows: torch.Tensor, kept: list[int]) -> tuple[list[list[int]], float]:
    """Groups of `kept` over the feature rows [N0, D], and the smallest relative gap between a dropped patch's best and
    second-best kept similarity (a near-tie could fall the other way in f32)."""
    sim = cosine(rows)
    groups = [[k] for k in kept]
    smallest = float("inf")
    for i in range(rows.shape[0]):
        if i in kept:
            continue
        s = [float(sim[i, k]) for k in kept]
        best = max(range(len(kept)), key=lambda g: (s[g], -g))  # ties to the earlier kept patch
        groups[best].append(i)
        if len(kept) > 1:
            top = sorted(s, reverse=True)
            smallest = min(smallest, (top[0] - top[1]) / max(abs(top[0]), 1e-30))
    return groups, smallest


def merged_case(model, cs: pr.Case) -> pr.Case:
    """`cs` whose feats(model, kept) projects each kept patch's group mean instead of its own row."""
    merged = copy.copy(cs)
    rows = cs.sel[1:]

    def feats(model, kept):
        groups, _ = merge_groups(rows, kept)
        with torch.no_grad():
            return model.model.multi_modal_projector(torch.stack([rows[g].mean(0) for g in groups]))

    merged.feats = feats
    return merged


def gaps_for(model, cs: pr.Case, budgets, image_id: int) -> dict:
    n, n1, n2 = budgets
    rows = cs.sel[1:]
    kept_cls = v15.topk_keep(cs.cls_scores[1:], n)
    kept1 = v15.topk_keep(cs.attn_scores[1:], n1)
    s2 = pr.star_stage2_scores(model, merged_case(model, cs), kept1, image_id, original=True)
    return {
        "fastervlm_cls": v15.boundary_gap(cs.cls_scores[1:], n)["rel"],
        "fastervlm_groups": merge_groups(rows, kept_cls)[1],
        "stage1_attention": v15.boundary_gap(cs.attn_scores[1:], n1)["rel"],
        "stage1_groups": merge_groups(rows, kept1)[1],
        "star_stage2": v15.boundary_gap(s2, n2)["rel"],
    }


def check_case(model, cs: pr.Case, mc: pr.Case, r: dict, n1: int, eos_id: int, image_id: int) -> dict:
    c = {}
    fo, so = r["fo"], r["so"]
    # (a) every patch kept: the groups are single rows and the merge changes nothing
    all36 = list(range(cs.n0))
    a = pr.run_selection(model, mc, all36, cs.original_positions(all36), cs.L0, eos_id, image_id)
    b = pr.run_selection(model, cs, all36, cs.original_positions(all36), cs.L0, eos_id, image_id)
    assert torch.equal(a["first"], b["first"])
    # (b) against transformers given the merged rows and explicit positions
    hf, _ = pr.hf_mm(model, fo["ids"], mc.feats(model, r["kept"]), cs.original_positions(r["kept"]), cs.L0, fo["gen"])
    d = float((fo["first"] - hf[0]).abs().max())
    assert d < pr.TOL_FIRST, d
    c["b_fastervlm_merge_vs_hf_first_logits_max_abs_diff"] = d
    d = float((fo["steps"] - hf).abs().max())
    assert d < pr.TOL_DECODE and pr.pick_all(hf, eos_id) == fo["gen"], d
    c["b_fastervlm_merge_vs_hf_step_logits_max_abs_diff"] = d
    _, att = pr.hf_mm(model, so["ids"], mc.feats(model, so["kept1"]), so["pos1"], cs.L0, [0], output_attentions=True)
    s_hf = v15.text_visual_scores(att[pr.K - 1], cs.s, n1)[0]
    d = float((s_hf - so["scores"]).abs().max())
    assert d < 1e-6, d
    c["b_star_merge_stage2_scores_vs_hf_max_abs_diff"] = d
    # (c) cached decode against a cache-free pass
    for name, res in (("fastervlm_merge", fo), ("star_merge", so)):
        assert res["cache_vs_full"] < pr.TOL_DECODE, (name, res["cache_vs_full"])
        c[f"c_{name}_cache_vs_full_pass_max_abs_diff"] = res["cache_vs_full"]
    # (d) the groups partition the patches
    for kept in (r["kept"], so["kept1"]):
        groups, _ = merge_groups(cs.sel[1:], kept)
        assert sorted(i for g in groups for i in g) == all36
    return c


@torch.no_grad()
def main() -> int:
    t0 = time.time()
    model, processor, tok = load_fixture(pr.FIXTURE)
    cfg = model.config
    eos_id, image_id = cfg.text_config.eos_token_id, cfg.image_token_index
    n0 = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    fixture = json.loads((pr.REF / "cases.json").read_text())
    recorded = load_file(str(pr.REF / "reference.safetensors"))
    cases = [pr.Case(model, processor, cj, recorded, image_id, n0) for cj in fixture["cases"]]

    tried, chosen = [], None
    for budgets in CANDIDATES:
        gaps = {cs.idx: gaps_for(model, cs, budgets, image_id) for cs in cases}
        worst = min(v / (SAFE_GROUP_GAP_REL if k.endswith("_groups") else SAFE_GAP_REL) * SAFE_GAP_REL
                    for g in gaps.values() for k, v in g.items())
        tried.append({"fastervlm_keep": budgets[0], "N1": budgets[1], "N2": budgets[2],
                      "min_gap_scaled": float(f"{worst:.6e}")})
        pr.log(f"budgets {budgets}: smallest gap {worst:.3e} (relative, group gaps scaled to the 1e-3 bar)")
        if worst >= SAFE_GAP_REL:
            chosen = (budgets, gaps)
            break
    if chosen is None:
        raise SystemExit("no candidate budgets without a near-tie")
    (n, n1, n2), gaps = chosen

    tensors, cases_json = {}, []
    for cs in cases:
        mc = merged_case(model, cs)
        kept = v15.topk_keep(cs.cls_scores[1:], n)
        fo = pr.run_selection(model, mc, kept, cs.original_positions(kept), cs.L0, eos_id, image_id)
        so = pr.run_star(model, mc, n1, n2, eos_id, image_id, original=True)
        r = {"kept": kept, "fo": fo, "so": so}
        checks = check_case(model, cs, mc, r, n1, eos_id, image_id)
        tensors[f"case{cs.idx}.fastervlm_merge.first_logits"] = fo["first"].float().contiguous()
        tensors[f"case{cs.idx}.star_merge.first_logits"] = so["first"].float().contiguous()
        cases_json.append({
            "index": cs.idx,
            "image": cs.image,
            "methods": {
                "fastervlm_merge": {"kept": kept, "groups": merge_groups(cs.sel[1:], kept)[0],
                                    "generated_ids": fo["gen"], "first_top10": pr.top10(fo["first"])},
                "star_merge": {"stage1_kept": so["kept1"], "groups": merge_groups(cs.sel[1:], so["kept1"])[0],
                               "stage2_kept": so["kept2"], "generated_ids": so["gen"],
                               "first_top10": pr.top10(so["first"])},
            },
            "smallest_relative_gaps": gaps[cs.idx],
            "checks": checks,
        })
    doc = {
        "script": SCRIPT,
        "versions": versions(),
        "budgets": {"fastervlm_keep": n, "N1": n1, "N2": n2, "K": pr.K, "new_tokens": pr.NEW_TOKENS},
        "budgets_tried": tried,
        "rule": "dropped patch -> kept patch of largest f64 cosine of CLIP layer -2 rows (ties: earlier kept); "
                "kept token = projector(mean of its group's rows) at its own patch's position",
        "cases": cases_json,
        "seconds": round(time.time() - t0, 1),
    }
    write_reference(doc, tensors, OUT_JSON, OUT_LOGITS)
    pr.log(f"wrote {OUT_JSON} and {OUT_LOGITS} in {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
