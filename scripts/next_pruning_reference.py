#!/usr/bin/env python3
"""Record transformers-computed references for stage-2 visual-token pruning (STAR stage 2 and FastV) on the tiny
random LLaVA-NeXT fixture (weights/tiny-random-llava-next, vicuna / LLaMA decoder).

Why: the Rust engine prunes NeXT's packed image rows (base view, then the unpadded crop grid with an `image_newline`
row after every grid row) inside the language model. These files pin down what it must compute, per case of the
fixture's reference/cases.json:

    fastv  no stage 1 (the unpruned prompt); at K = 2 keep the N2 patch rows with the most attention from the last
           prompt row in 0-based decoder layer K-1.
    star   STAR stage 1 per view (the fixture's stage1_input_ids / stage1_kept_per_view), then at K = 2 keep the N2
           patch rows with the most attention from the text rows after the image, in 0-based layer K-1.

Newline rows are never candidates, dropped or counted (their score is recorded but unused): candidates are the patch
rows only, ties go to the lower row, the kept rows stay in prompt order with their original RoPE positions, and every
newline and non-image row is kept. One N2 serves every case and both methods, chosen (choose_n2) so that the top-N2
boundary is clearly separated and the pruned greedy runs have no near-tied steps. The
drop runs through transformers' own decoder-layer modules (make_tiny_llava.lm_prefill, exactly the LLaVA-1.5
fixture's convention), then 8 greedy tokens (EOS masked) are decoded on the pruned KV cache, continuing at the prompt
length.

Writes weights/tiny-random-llava-next/reference/pruning.safetensors and pruning.json (which documents every field).
Nothing else of the fixture is touched; make_tiny_llava_next.py is only imported (its main() does not run).

Checks (the script stops if one fails): recomputed image features equal the recorded ones; stage-2 scores from the
manual path equal transformers' own attention probabilities and, for the unpruned prompt, the fixture's recorded
fastv/text_image_scores_layer{K-1}; a drop that keeps every row reproduces the recorded first logits and greedy ids;
the KV-cache decode equals a one-pass forward of prompt + generated tokens with the same drop.

Run:  python scripts/next_pruning_reference.py      (CPU, float32, eager attention, about 30 s)
"""

from __future__ import annotations

# first: sets the offline environment before transformers loads
from llava_hf_common import versions

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import LlavaNextForConditionalGeneration

import make_tiny_llava as v15  # lm_prefill, lm_decode, LayerKV, text_visual_scores, topk_keep, boundary_gap, ...
import make_tiny_llava_next as nx  # geometry, manual_pack, vision_and_features

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "weights" / "tiny-random-llava-next"
REF = FIXTURE / "reference"
GENERATOR = "scripts/next_pruning_reference.py"

K = 2  # 1-based: scores from 0-based layer K-1, rows dropped from the hidden state entering 0-based layer K
NEW_TOKENS = 8
N2_DEFAULT = 8
N2_CANDIDATES = list(range(4, 17))  # at most 20, the fewest patch rows a case has after stage 1 (case 3)
SAFE_GAP_REL = 1e-3
MIN_GREEDY_GAP = nx.MIN_GAP  # 0.15, the fixture's own seed criterion for greedy top-1/top-2 gaps
CHECK_TOL = 1e-5  # manual path vs transformers / the recorded references (observed: exactly 0)
DECODE_TOL = 1e-4  # KV-cache decode vs one-pass forward (different summation lengths)
METHODS = ("fastv", "star")


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- image-row layout


def image_row_layout(cj: dict, kept_per_view=None) -> list:
    """What each packed image row is: {"view": v, "index": i} for a patch (i on that view's 4x4 grid), None for an
    image_newline. Base view first, then each unpadded row of the crops' combined grid, left to right, then its
    newline; with kept_per_view (stage 1) only kept patches appear, every grid row still ends with a newline."""
    keep = (lambda v, i: True) if kept_per_view is None else (lambda v, i: i in kept_per_view[v])
    g, (gr, gc) = nx.GRID, cj["crop_grid_rows_cols"]
    rows = [{"view": 0, "index": i} for i in range(nx.PATCHES_PER_VIEW) if keep(0, i)]
    for y in range(*cj["unpadded_rows"]):
        for x in range(*cj["unpadded_cols"]):
            view, idx = 1 + (y // g) * gc + x // g, (y % g) * g + x % g
            if keep(view, idx):
                rows.append({"view": view, "index": idx})
        rows.append(None)
    return rows


@torch.no_grad()
def case_prompts(model, cj: dict, ref: dict, image_id: int) -> dict:
    """Per method: (prompt ids, spliced embeddings [L, D], row layout), features recomputed with transformers and
    checked against reference.safetensors."""
    i = cj["case"]
    w, h = cj["image_size"]
    cs = {"pv": ref[f"case{i}.pixel_values"], "image_sizes": torch.tensor([[h, w]])}
    _, clip_scores, _, per_view, feats = nx.vision_and_features(model, cs)
    assert torch.equal(feats, ref[f"case{i}.image_features"]), f"case{i}: packed features differ"
    kept1 = [nx.topk_keep(clip_scores[v, 1:], cj["stage1_keep_per_view"]) for v in range(per_view.shape[0])]
    assert kept1 == cj["stage1_kept_per_view"], f"case{i}: stage-1 kept sets differ"
    newline = model.model.image_newline.detach().numpy()
    feats1 = torch.from_numpy(nx.manual_pack(per_view.numpy(), *cj["crop_grid_rows_cols"], (h, w), newline, kept1))
    assert torch.equal(feats1, ref[f"case{i}.stage1_image_features"]), f"case{i}: stage-1 features differ"
    out = {}
    for method, ids, f, rows in (("fastv", cj["input_ids"], feats, image_row_layout(cj)),
                                 ("star", cj["stage1_input_ids"], feats1, image_row_layout(cj, kept1))):
        assert len(rows) == f.shape[0]
        nl = torch.from_numpy(newline)
        assert all(torch.equal(f[j], nl) for j, r in enumerate(rows) if r is None), "newline rows misplaced"
        out[method] = (ids, v15.splice_embeds(model, ids, f, image_id), rows)
    return out


# ----------------------------------------------------------------------------- scoring and selection


def stage2_scores(P: torch.Tensor, start: int, n_img: int, method: str) -> torch.Tensor:
    """[n_img] f32 scores of every image row (newlines included) from one layer's probabilities [H, L, L]:
    STAR = mean over heads and the rows after the image, FastV = mean over heads of the last row."""
    text, last = v15.text_visual_scores(P, start, n_img)
    return text if method == "star" else last


def patch_rows(rows: list) -> list[int]:
    return [j for j, r in enumerate(rows) if r is not None]


def select_rows(scores: torch.Tensor, rows: list, n2: int) -> list[int]:
    """Top n2 patch rows by score (ties to the lower row) plus every newline row, ascending."""
    cand = patch_rows(rows)
    top = v15.topk_keep(scores[cand], n2)
    return sorted([cand[t] for t in top] + [j for j, r in enumerate(rows) if r is None])


def candidate_gaps(scores: torch.Tensor, rows: list) -> dict:
    """Relative boundary gap of the patch-row scores for every candidate N2."""
    return v15.rel_gaps(scores[patch_rows(rows)], N2_CANDIDATES)


def choose_n2(worst: dict[str, dict[int, float]], greedy: dict[int, float]) -> int:
    """One N2 for every case and both methods: among the candidates whose relative boundary gap is >= SAFE_GAP_REL
    in every case and method and whose pruned greedy runs never have a top-1/top-2 logit gap below MIN_GREEDY_GAP,
    the one with the largest smallest boundary gap (ties to the one nearest N2_DEFAULT).
    worst: {method: {n2: smallest relative boundary gap over the cases}}; greedy: {n2: smallest top-2 gap}."""
    joint = {k: min(w[k] for w in worst.values()) for k in N2_CANDIDATES}
    ok = [k for k in N2_CANDIDATES if joint[k] >= SAFE_GAP_REL and greedy[k] >= MIN_GREEDY_GAP]
    if not ok:
        raise SystemExit(f"no N2 in {N2_CANDIDATES} is safe: boundary gaps {joint}, greedy gaps {greedy}")
    return max(ok, key=lambda k: (joint[k], -abs(k - N2_DEFAULT), -k))


# ----------------------------------------------------------------------------- runs


@torch.no_grad()
def layer_probs(model, embeds, start: int, n_img: int):
    """Unpruned prefill: (layer K-1 probabilities [H, L, L] of the manual path, its last-row logits, the same
    probabilities from transformers' own LlamaModel forward)."""
    logits, probs, _, _ = v15.lm_prefill(model, embeds, start, n_img)
    hf = model.model.language_model(inputs_embeds=embeds[None], output_attentions=True).attentions[K - 1][0]
    return probs[K - 1], logits[-1], hf


@torch.no_grad()
def pruned_run(model, embeds, ids: list[int], start: int, rows: list, keep, eos_id: int) -> dict:
    """Prefill with the drop before layer K (keep: callable on layer K-1's probabilities, or a row list), then
    greedy on the pruned cache from position len(ids); cross-checked against a one-pass forward without cache."""
    cache = v15.LayerKV(len(model.model.language_model.layers))
    logits, _, kept, pos = v15.lm_prefill(model, embeds, start, len(rows), drop_layer=K, keep=keep, cache=cache)
    kv_rows = cache.rows()  # before decoding appends to it
    ids_out, steps, gaps = v15.lm_decode(model, cache, logits[-1], len(ids), NEW_TOKENS, eos_id)
    full = torch.cat([embeds, model.model.language_model.embed_tokens(torch.tensor(ids_out[:-1]))], 0)
    nc_logits, _, _, nc_pos = v15.lm_prefill(model, full, start, len(rows), drop_layer=K, keep=kept)
    assert nc_pos[-NEW_TOKENS:] == list(range(len(ids) - 1, len(ids) + NEW_TOKENS - 1))
    cache_vs_full = float((nc_logits[-NEW_TOKENS:] - steps).abs().max())
    assert cache_vs_full < DECODE_TOL, cache_vs_full
    return dict(first=logits[-1], kept=kept, positions=pos, greedy=ids_out, min_top2_gap=min(gaps),
                kv_rows=kv_rows, cache_vs_full=cache_vs_full)


@torch.no_grad()
def keep_all_check(model, embeds, ids, start, rows, ref_first, ref_greedy, eos_id) -> float:
    """A drop that keeps every image row reproduces transformers' unpruned first logits and greedy ids."""
    r = pruned_run(model, embeds, ids, start, rows, list(range(len(rows))), eos_id)
    diff = float((r["first"] - ref_first).abs().max())
    assert diff < CHECK_TOL, diff
    assert r["greedy"] == ref_greedy[:NEW_TOKENS], (r["greedy"], ref_greedy)
    return diff


@torch.no_grad()
def candidate_greedy_gaps(model, cases: list, prompts: list, scores: list, eos_id: int) -> dict[int, float]:
    """Per candidate N2: the smallest top-1/top-2 logit gap of the pruned greedy runs over every case and method."""
    out = {}
    for k in N2_CANDIDATES:
        gaps = []
        for cj, p, sc in zip(cases, prompts, scores):
            for method, (ids, embeds, rows) in p.items():
                cache = v15.LayerKV(len(model.model.language_model.layers))
                keep = select_rows(sc[method]["scores"], rows, k)
                logits, _, _, _ = v15.lm_prefill(model, embeds, cj["image_token_start"], len(rows), drop_layer=K,
                                                 keep=keep, cache=cache)
                gaps += v15.lm_decode(model, cache, logits[-1], len(ids), NEW_TOKENS, eos_id)[2]
        out[k] = min(gaps)
    return out


# ----------------------------------------------------------------------------- per case


@torch.no_grad()
def case_scores(model, cj: dict, prompts: dict, ref: dict, eos_id: int) -> dict:
    """Per method: layer K-1 scores of its (unpruned by stage 2) prompt and the checks behind them."""
    i, start = cj["case"], cj["image_token_start"]
    refs = {"fastv": (ref[f"case{i}.first_logits"], cj["greedy_ids"]),
            "star": (ref[f"case{i}.stage1_first_logits"], cj["stage1_greedy_ids"])}
    out = {}
    for method, (ids, embeds, rows) in prompts.items():
        P, last_logits, P_hf = layer_probs(model, embeds, start, len(rows))
        scores = stage2_scores(P, start, len(rows), method)
        checks = {
            "scores_manual_vs_transformers_max_abs_diff":
                float((scores - stage2_scores(P_hf, start, len(rows), method)).abs().max()),
            "unpruned_manual_vs_recorded_first_logits_max_abs_diff": float((last_logits - refs[method][0]).abs().max()),
            "keep_all_vs_recorded_first_logits_max_abs_diff":
                keep_all_check(model, embeds, ids, start, rows, *refs[method], eos_id),
        }
        if method == "fastv":  # the unpruned prompt: the fixture recorded both reductions of layer K-1
            for m, key in (("fastv", "fastv_image_scores"), ("star", "text_image_scores")):
                d = float((stage2_scores(P, start, len(rows), m) - ref[f"case{i}.{key}_layer{K - 1}"]).abs().max())
                checks[f"{m}_scores_vs_recorded_{key}_layer{K - 1}_max_abs_diff"] = d
        assert max(checks.values()) < CHECK_TOL, checks
        out[method] = {"scores": scores, "checks": checks}
    return out


def method_json(r: dict, rows: list, n2: int, scores: torch.Tensor, ids: list[int], tok) -> dict:
    """One method's pruning.json entry (FIELD_DOCS describes the fields)."""
    cand = patch_rows(rows)
    gap = v15.boundary_gap(scores[cand], n2)
    kept_local = r["kept"]
    return {
        "prompt_tokens": len(ids), "image_rows": len(rows), "patch_rows": len(cand),
        "newline_rows": [j for j, x in enumerate(rows) if x is None],
        "n2": n2, "kept_rows": kept_local, "kept_patches": [rows[j] for j in kept_local if rows[j] is not None],
        "boundary_gap_rel": gap["rel"], "boundary_gap": gap,
        "positions_after_drop": r["positions"], "kv_rows_per_layer_after_prefill": r["kv_rows"],
        "greedy_ids": r["greedy"], "greedy_text": tok.decode(r["greedy"], skip_special_tokens=True),
        "min_top2_gap": round(r["min_top2_gap"], 6),
        "checks": {"kv_cache_decode_vs_one_pass_max_abs_diff": r["cache_vs_full"]},
    }


def run_case(model, cj: dict, prompts: dict, sc: dict, n2: int, eos_id: int, tok, tensors: dict) -> dict:
    """Both pruned runs of one case: tensors go into `tensors`, the JSON entry is returned."""
    i, start = cj["case"], cj["image_token_start"]
    out = {"case": i, "image": cj["image"], "image_token_start": start}
    for method, (ids, embeds, rows) in prompts.items():
        scores = sc[method]["scores"]
        holder = {}

        def keep(P):
            holder["scores"] = stage2_scores(P, start, len(rows), method)
            return select_rows(holder["scores"], rows, n2)

        r = pruned_run(model, embeds, ids, start, rows, keep, eos_id)
        assert torch.equal(holder["scores"], scores)
        assert r["kept"] == select_rows(scores, rows, n2)
        j = method_json(r, rows, n2, scores, ids, tok)
        j["checks"].update(sc[method]["checks"])
        out[method] = j
        tensors[f"case{i}.{method}_first_logits"] = r["first"].float().contiguous()
        tensors[f"case{i}.{method}_stage2_scores"] = scores.float().contiguous()
        log(f"case{i} {method}: N2 {n2} of {j['patch_rows']}, gap {j['boundary_gap_rel']:.3e}, "
            f"kept {[(p['view'], p['index']) for p in j['kept_patches']]}, greedy {r['greedy']}")
    return out


# ----------------------------------------------------------------------------- output

FIELD_DOCS = {
    "case": "index into cases.json's cases", "image_token_start": "position of the first image row in both prompts",
    "prompt_tokens": "prompt length entering the language model (fastv: input_ids; star: stage1_input_ids); "
                     "decoding starts at this position",
    "image_rows": "number of <image> rows of that prompt (patches + newlines)",
    "patch_rows": "stage-2 candidates: image rows that are patches (newlines excluded)",
    "newline_rows": "positions among the image rows (0-based from image_token_start) of the image_newline rows",
    "n2": "patch rows kept by stage 2",
    "kept_rows": "positions among the image rows that survive the drop, ascending, newline rows included",
    "kept_patches": "the kept patch rows in prompt order as {view, index}: view 0 = base view, 1.. = crops in raster "
                    "order; index on that view's 4x4 patch grid (raster order), not the stage-1-local index",
    "boundary_gap_rel": "(s_N2 - s_N2+1) / s_N2 over the sorted patch-row scores: how safe an exact kept-set "
                        "comparison is",
    "boundary_gap": "the same with the two scores and the absolute gap",
    "positions_after_drop": "RoPE positions of the rows entering layer K (the survivors keep their original ones)",
    "kv_rows_per_layer_after_prefill": "K/V rows per decoder layer after the prefill (all rows below K)",
    "greedy_ids": f"{NEW_TOKENS} greedy tokens after the pruned prefill, decoded on its KV cache at positions "
                  "prompt_tokens, prompt_tokens+1, ...; EOS masked (logit -inf) at every step",
    "greedy_text": "greedy_ids decoded by the fixture's tokenizer (skip special tokens)",
    "min_top2_gap": "smallest top-1/top-2 logit gap over the greedy steps (raw and EOS-masked); not seed-searched",
    "checks": "self-checks of this script (all max abs diffs; the script asserts them)",
}
TENSOR_DOCS = {
    "case{i}.fastv_stage2_scores": "[image rows of input_ids] f32: unpruned prefill, 0-based layer K-1, mean over the "
                                   "4 query heads of the last prompt row's causal softmax probability to each image "
                                   "row. Newline rows carry the same reduction but are never candidates (equals "
                                   "reference.safetensors fastv_image_scores_layer{K-1})",
    "case{i}.star_stage2_scores": "[image rows of stage1_input_ids] f32: the stage-1 prompt's prefill, layer K-1, "
                                  "mean over heads and over every row after the last image row (the text after "
                                  "the image) of the probability to each image row; newline rows as for FastV",
    "case{i}.fastv_first_logits": "[vocab] f32 logits of the last prompt row with the FastV drop before layer K",
    "case{i}.star_first_logits": "[vocab] f32 logits of the last prompt row of the stage-1 prompt with the STAR "
                                 "stage-2 drop before layer K",
}


def write_outputs(tensors: dict, cases: list, n2: int, worst: dict, greedy: dict) -> None:
    save_file(dict(sorted(tensors.items())), str(REF / "pruning.safetensors"), metadata={"format": "pt"})
    meta = {
        "description": "Stage-2 visual-token pruning references (FastV, STAR stage 1 + stage 2) for the tiny random "
                       "LLaVA-NeXT fixture, computed with transformers' own decoder layers (float32, eager "
                       "attention, CPU). Tensors in pruning.safetensors as case{i}.<name>.",
        "generator": GENERATOR, "versions": versions(), "K": K,
        "K_meaning": "1-based: scores from the attention probabilities of 0-based decoder layer K-1; the dropped rows "
                     "are removed from the hidden state entering 0-based layer K",
        "n2": {m: n2 for m in METHODS}, "n2_candidates": N2_CANDIDATES, "n2_default": N2_DEFAULT,
        "n2_rule": f"one N2 for every case and both methods: among the candidates whose relative boundary gap is >= "
                   f"{SAFE_GAP_REL:g} in every case and method and whose pruned greedy runs (all cases and methods) "
                   f"keep every top-1/top-2 logit gap >= {MIN_GREEDY_GAP:g}, the one with the largest smallest "
                   f"boundary gap (ties nearest {N2_DEFAULT})",
        "worst_boundary_gap_rel_per_candidate": {m: {str(k): float(f"{g:.6e}") for k, g in t.items()}
                                                 for m, t in worst.items()},
        "worst_greedy_top2_gap_per_candidate": {str(k): round(g, 6) for k, g in greedy.items()},
        "min_boundary_gap_rel": {m: worst[m][n2] for m in METHODS},
        "methods": {
            "fastv": "no stage 1: the prompt is cases.json input_ids; score = last prompt row (mean over heads)",
            "star": "STAR stage 1 per view (cases.json stage1_kept_per_view; the prompt is stage1_input_ids with "
                    "reference.safetensors stage1_image_features), then stage 2 scored by the text rows after the "
                    "image (mean over heads and rows)",
        },
        "selection": "candidates are the patch rows only; top N2 by score (f32 values), ties to the lower row; kept "
                     "rows = those plus every newline row, in prompt order; every non-image row is kept",
        "eos_handling": "EOS masked out (logit -inf) at every step: exactly 8 tokens",
        "new_tokens": NEW_TOKENS, "fields": FIELD_DOCS, "tensors": TENSOR_DOCS, "cases": cases,
    }
    (REF / "pruning.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    meta = json.loads((REF / "cases.json").read_text())
    ref = load_file(str(REF / "reference.safetensors"))
    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    model = LlavaNextForConditionalGeneration.from_pretrained(FIXTURE, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    image_id, eos_id = meta["image_token_id"], meta["special_token_ids"]["</s>"]

    prompts = [case_prompts(model, cj, ref, image_id) for cj in meta["cases"]]
    scores = [case_scores(model, cj, p, ref, eos_id) for cj, p in zip(meta["cases"], prompts)]
    gaps = {m: [candidate_gaps(sc[m]["scores"], p[m][2]) for sc, p in zip(scores, prompts)] for m in METHODS}
    worst = {m: {k: min(g[str(k)] for g in gaps[m]) for k in N2_CANDIDATES} for m in METHODS}
    greedy = candidate_greedy_gaps(model, meta["cases"], prompts, scores, eos_id)
    n2 = choose_n2(worst, greedy)
    log(f"K {K}, N2 {n2}: worst boundary gap {[worst[m][n2] for m in METHODS]}, greedy top-2 gap {greedy[n2]:.4f}")

    tensors, cases = {}, []
    for cj, p, sc in zip(meta["cases"], prompts, scores):
        cases.append(run_case(model, cj, p, sc, n2, eos_id, tok, tensors))
    write_outputs(tensors, cases, n2, worst, greedy)
    log(f"wrote {REF / 'pruning.safetensors'} ({len(tensors)} tensors) and {REF / 'pruning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
