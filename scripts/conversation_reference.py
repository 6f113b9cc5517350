#!/usr/bin/env python3
"""Record what a 3-turn LLaVA conversation with STAR pruning must compute, on the tiny random LLaVA-1.5 fixture.

Why: the Rust engine keeps a conversation's KV cache between turns (src/generate/session.rs) and prunes each image in
the turn that first prefills it (docs/pruning.md). This script pins that behaviour down independently, in PyTorch
with transformers' own modules (float32, eager attention, CPU), and writes

    weights/tiny-random-llava/reference/conversation.json               (documents every field)
    weights/tiny-random-llava/reference/conversation_logits.safetensors (turn{t}.first_logits, float32 [vocab])

The conversation (greedy, EOS masked, 4 new tokens per turn; the last generated token is never fed back):

    turn 0: USER "What is this?"
    turn 1: ... ASSISTANT "Fine."  USER <case0 image> "Describe it."
    turn 2: ... ASSISTANT "Sure."  USER <case1 image> <case2 image> "Compare them."

The rule, as the engine applies it (implemented literally below):

* Rendering: llava-hf's template (`USER: ` + one `<image>\\n` per image + text + ` `, `ASSISTANT: ` + text + ` `, then
  `ASSISTANT:`), tokenized with BOS; each `<image>` id is a placeholder in these RAW ids and becomes that image's N1
  rows in the prompt the language model sees (the EXPANDED ids; a row's RoPE position is its index there).
* Reuse: the session holds the last turn's raw prompt + the fed generated ids and their KV cache. prefix =
  min(common prefix with the new raw ids, len(new) - 1), cut back to a held image's placeholder if that image differs
  or if the prompt that scored its stage 2 is not kept whole (its raw length > prefix). Every layer's cache keeps the
  prefix's text rows plus, per held image, N1 rows below layer K and its stage-2 survivors from layer K on.
* New rows (after the prefix, each new image's N1 projected rows in place of its placeholder) are prefilled on top of
  the cache at positions continuing the unpruned numbering.
* STAR stage 1, per image: top-N1 of its 36 patches by the attention they receive in the CLIP layer whose output is
  the feature layer (mean over heads and all queries), rows gathered before the projector.
* STAR stage 2, in a turn with new images: at 0-based layer K-1 every key is scored by the mean over heads and over
  the new rows after the turn's last new image of its attention probability (softmax over all cached + new keys,
  causal); the image rows of the turn's new images are ranked together and the top N2 x (number of new images) kept,
  with every non-image row; the rest are dropped before layer K, the survivors keep their positions, and layers >= K
  cache only them. Images of earlier turns are never re-scored. Ties go to the lower (earlier) row everywhere.

Checks (the script stops if one fails): the rendering equals the checkpoint's chat_template.jinja (jinja2) and the
processor's own expansion; pixel values and stage-1 selections equal the fixture's recorded single-turn references;
turn 0 equals transformers' forward; an unpruned run of the same session machinery equals one full transformers forward
(pixel_values, 36 tokens per image) of each whole turn prompt; every STAR turn equals a single cache-free pass over the
whole turn prompt (+ fed generated ids) with the same rows dropped at layer K; kept rows keep their positions; the
per-layer KV row counts follow the rule.

Run:  python scripts/conversation_reference.py      (CPU, float32, a few seconds)
"""

from __future__ import annotations

# first: sets the offline environment before transformers loads
from llava_hf_common import load_fixture, versions, write_reference

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jinja2.sandbox
import torch
from PIL import Image
from safetensors.torch import load_file

import make_tiny_llava as v15  # clip_layer_scores, topk_keep, boundary_gap, LayerKV, splice_embeds, lm_*, pick

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "weights" / "tiny-random-llava"
REF = FIXTURE / "reference"
OUT_JSON = REF / "conversation.json"
OUT_LOGITS = REF / "conversation_logits.safetensors"
SCRIPT = "scripts/conversation_reference.py"

IMAGES = ["case0_square84.png", "case1_square200.png", "case2_wide97x61.png"]  # files in reference/
NEW_TOKENS = 4  # G: generated per turn; the first G-1 are fed back and stay in the session
K = 2  # 1-based: scores from 0-based layer K-1, rows dropped before 0-based layer K
N1_DEFAULT, N2_DEFAULT = 32, 12
N1_CANDIDATES = [30, 31, 33, 28]
N2_CANDIDATES = [10, 11, 13, 14, 9]
SAFE_GAP_REL = 1e-3  # a selection whose relative top-k boundary gap is below this counts as a near-tie
HF_TOL_TEXT = 1e-5  # turn 0 (no image) vs transformers
HF_TOL = 1e-4  # cache path vs one full forward (different summation lengths)

# The messages of each turn: role, text and indices into IMAGES (a user message renders its images first).
Q0 = {"role": "user", "text": "What is this?", "images": []}
A0 = {"role": "assistant", "text": "Fine.", "images": []}
Q1 = {"role": "user", "text": "Describe it.", "images": [0]}
A1 = {"role": "assistant", "text": "Sure.", "images": []}
Q2 = {"role": "user", "text": "Compare them.", "images": [1, 2]}
TURNS = [[Q0], [Q0, A0, Q1], [Q0, A0, Q1, A1, Q2]]


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- rendering


def render(messages: list[dict]) -> str:
    """llava-hf's chat template written out: what the engine's template produces for these messages."""
    parts = [f"{m['role'].upper()}: " + "<image>\n" * len(m["images"]) + m["text"] + " " for m in messages]
    return "".join(parts) + "ASSISTANT:"


def hf_content(messages: list[dict]) -> list[dict]:
    """The same messages as transformers' content lists (images first, then the text)."""
    return [{"role": m["role"], "content": [{"type": "image"}] * len(m["images"]) + [{"type": "text", "text": m["text"]}]}
            for m in messages]


def render_jinja(template_text: str, messages: list[dict]) -> str:
    """The checkpoint's chat_template.jinja rendered the way transformers renders chat templates."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template_text).render(messages=hf_content(messages), add_generation_prompt=True)


def expand(raw: list[int], image_id: int, rows: int) -> list[int]:
    """The prompt as it enters the language model: every placeholder becomes `rows` image ids."""
    out = []
    for t in raw:
        out.extend([image_id] * rows if t == image_id else [t])
    return out


# ----------------------------------------------------------------------------- images


@dataclass
class Vision:
    """One image's budget-independent vision outputs."""
    pixel_values: torch.Tensor  # [3, 84, 84]
    scores: torch.Tensor  # [37] CLIP attention received (CLS key at 0)
    sel: torch.Tensor  # [37, 64] CLIP hidden_states[vision_feature_layer]


def load_vision(model, processor, files: list[str]) -> list[Vision]:
    out = []
    for f in files:
        img = Image.open(REF / f)
        pv = processor.image_processor(img, return_tensors="pt")["pixel_values"][0].float()
        scores, _, sel, _ = v15.clip_layer_scores(model, pv)
        out.append(Vision(pv, scores, sel))
    return out


def stage1(model, vis: Vision, n1: int | None):
    """STAR stage 1 for one image: (kept patch indices ascending, projector output of those rows, relative gap).
    n1 None means no pruning: all 36 patches, like transformers."""
    n0 = vis.sel.shape[0] - 1
    kept = list(range(n0)) if n1 is None else v15.topk_keep(vis.scores[1:], n1)
    with torch.no_grad():
        feats = model.model.multi_modal_projector(vis.sel[1:][kept])  # gathered BEFORE the projector
    gap = None if n1 is None else v15.boundary_gap(vis.scores[1:], n1)["rel"]
    return kept, feats, gap


# ----------------------------------------------------------------------------- language model on a cache


def truncate_cache(cache: v15.LayerKV, rows: list[int]) -> None:
    """Keep the first rows[l] cached rows of layer l (rows are in prompt order, so this is a prefix cut)."""
    for l, n in enumerate(rows):
        k, v = cache.kv[l]
        assert k.shape[-2] >= n
        cache.kv[l] = (k[..., :n, :], v[..., :n, :])


@torch.no_grad()
def prefill_on_cache(model, embeds: torch.Tensor, positions: list[int], cache: v15.LayerKV, choose=None):
    """Prefill `embeds` [n, D] at `positions` on top of `cache` with transformers' own decoder-layer modules.

    Like make_tiny_llava.lm_prefill, but each layer may already hold cached rows (a different number per layer): the
    mask lets every new row see all cached rows and the new rows up to itself. With `choose` (a callable on the
    attention probabilities [H, n, cached + n] of 0-based layer K-1 returning the local new rows to keep, ascending),
    the other new rows leave the hidden state entering layer K; the kept ones keep their positions.
    Returns (logits of the remaining rows, kept local rows or None, positions of the remaining rows)."""
    lm = model.model.language_model
    x = embeds[None]
    pos = torch.tensor([positions])
    kept, prev_probs = None, None
    for li, layer in enumerate(lm.layers):
        if choose is not None and li == K:
            kept = list(choose(prev_probs))
            assert kept == sorted(set(kept))
            x, pos = x[:, kept], pos[:, kept]
        n = x.shape[1]
        c = 0 if cache.kv[li] is None else cache.kv[li][0].shape[-2]
        mask = torch.zeros(n, c + n)
        mask[:, c:] = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)  # as transformers' eager mask
        grabbed = []
        hook = layer.self_attn.register_forward_hook(lambda m, a, o: grabbed.append(o[1]))
        x = layer(x, attention_mask=mask[None, None], position_ids=pos, past_key_values=cache, use_cache=True,
                  position_embeddings=lm.rotary_emb(x, pos))
        hook.remove()
        prev_probs = grabbed[0][0]
        assert prev_probs.shape[-1] == c + n
    return model.lm_head(lm.norm(x))[0].float(), kept, pos[0].tolist()


# ----------------------------------------------------------------------------- the session


@dataclass
class HeldImage:
    """An image whose rows the session's cache holds (mirrors the engine's HeldImage)."""
    image: int  # index into IMAGES
    placeholder: int  # index of its placeholder in the session's raw ids
    rows: int  # N1: rows in layers < K
    kept_local: list[int]  # its rows (0..N1-1) kept from layer K on
    scored_until: int | None  # raw length of the prompt that scored its stage 2 (None: no stage 2)

    def rows_in_layer(self, layer: int) -> int:
        return len(self.kept_local) if self.scored_until is not None and layer >= K else self.rows


@dataclass
class Session:
    raw: list[int] = field(default_factory=list)
    images: list[HeldImage] = field(default_factory=list)
    cache: v15.LayerKV | None = None


def reuse(session: Session, raw: list[int], conv_images: list[int]) -> tuple[int, list[HeldImage]]:
    """(raw ids reused, held images reused): the engine's Session::reuse, literally."""
    if not session.raw:
        return 0, []
    common = 0
    for a, b in zip(raw, session.raw):
        if a != b:
            break
        common += 1
    prefix = min(common, len(raw) - 1)
    held = []
    for j, im in enumerate(session.images):
        if im.placeholder >= prefix:
            break
        same = j < len(conv_images) and conv_images[j] == im.image
        scored_text_kept = im.scored_until is None or im.scored_until <= prefix
        if not same or not scored_text_kept:
            prefix = im.placeholder
            break
        held.append(im)
    return prefix, held


@dataclass
class Budgets:
    n1: int
    n2: int


@torch.no_grad()
def run_turn(model, ctx: dict, session: Session, messages: list[dict], budgets: Budgets | None) -> dict:
    """One turn of the conversation on `session` (updated in place); budgets None = no pruning at all."""
    image_id, n_layers = ctx["image_id"], ctx["n_layers"]
    n1 = ctx["n0"] if budgets is None else budgets.n1
    raw = ctx["tok"](render(messages)).input_ids
    placeholders = [i for i, t in enumerate(raw) if t == image_id]
    conv_images = [i for m in messages for i in m["images"]]
    assert len(placeholders) == len(conv_images)
    prompt = expand(raw, image_id, n1)

    # ---- what the session's cache serves
    prefix, held = reuse(session, raw, conv_images)
    assert [h.placeholder for h in held] == placeholders[:len(held)]
    reused = prefix + len(held) * (n1 - 1)  # expanded rows of the prefix (the first new row's position)
    cache = session.cache if prefix > 0 else v15.LayerKV(n_layers)
    if prefix > 0:
        text_rows = prefix - len(held)
        truncate_cache(cache, [text_rows + sum(h.rows_in_layer(l) for h in held) for l in range(n_layers)])

    # ---- the new rows: the rest of the prompt, each new image's stage-1 rows in place of its placeholder
    new_imgs = list(range(len(held), len(conv_images)))  # indices into conv_images
    new_ids = prompt[reused:]
    n_new = len(new_ids)
    spans = []  # per new image: its local rows
    records, feats = [], []
    for j in new_imgs:
        start = placeholders[j] + j * (n1 - 1) - reused
        spans.append(list(range(start, start + n1)))
        kept1, f, gap1 = stage1(model, ctx["vision"][conv_images[j]], None if budgets is None else n1)
        feats.append(f)
        records.append({"image": conv_images[j], "stage1_kept": kept1, "stage1_gap_rel": gap1})
    assert all(new_ids[r] == image_id for s in spans for r in s) and new_ids.count(image_id) == n1 * len(spans)
    embeds = v15.splice_embeds(model, new_ids, torch.cat(feats) if feats else torch.zeros(0, ctx["hidden"]), image_id)
    positions = list(range(reused, reused + n_new))  # the unpruned numbering continues

    # ---- stage 2 over the turn's new images, ranked together
    stage2 = {}
    choose = None
    if budgets is not None and spans:
        cand = [r for s in spans for r in s]
        queries = list(range(spans[-1][-1] + 1, n_new))  # the new rows after the turn's last new image
        assert queries, "stage 2 needs text after the last image"
        budget = budgets.n2 * len(spans)

        def choose(P):
            cached = P.shape[-1] - n_new  # keys: cached rows of layer K-1, then the new rows
            s = P[:, queries][:, :, [cached + r for r in cand]].double().mean(dim=(0, 1)).float()
            kept_c = v15.topk_keep(s, budget)
            stage2.update(scores=s, kept_c=kept_c, gap=v15.boundary_gap(s, budget)["rel"],
                          rows=([reused + r for r in queries], [reused + r for r in cand]))
            keep = set(range(n_new)) - set(cand) | {cand[c] for c in kept_c}
            return sorted(keep)

    logits, kept_rows, kept_pos = prefill_on_cache(model, embeds, positions, cache, choose)
    if choose is not None:
        assert kept_pos == [positions[r] for r in kept_rows], "kept rows must keep their original positions"
    kv_rows = cache.rows()

    # ---- per new image: stage-2 survivors, as its local rows and as original patch indices
    new_held = []
    for m, (j, rec) in enumerate(zip(new_imgs, records)):
        # candidate c is row c % N1 of the turn's new image c // N1 (candidates are the images' rows in order)
        local = list(range(n1)) if choose is None else [c - m * n1 for c in stage2["kept_c"] if c // n1 == m]
        if choose is not None:
            rec["stage2_kept"] = [rec["stage1_kept"][l] for l in local]
            assert sorted(rec["stage2_kept"]) == rec["stage2_kept"]
        scored_until = len(raw) if choose is not None else None
        new_held.append(HeldImage(conv_images[j], placeholders[j], n1, local, scored_until))
    all_held = held + new_held
    text_rows = len(raw) - len(all_held)
    expect = [text_rows + sum(h.rows_in_layer(l) for h in all_held) for l in range(n_layers)]
    assert kv_rows == expect, (kv_rows, expect)

    # ---- greedy decode (EOS masked) on the pruned cache, continuing after the expanded prompt
    gen, step_logits, gaps = v15.lm_decode(model, cache, logits[-1], len(prompt), NEW_TOKENS, ctx["eos_id"])
    assert cache.rows() == [r + NEW_TOKENS - 1 for r in kv_rows]
    session.raw = raw + gen[:NEW_TOKENS - 1]
    session.images = all_held
    session.cache = cache
    return dict(raw=raw, prompt=prompt, reused_raw=prefix, reused_tokens=reused, held=[h.image for h in held],
                generated=gen, step_logits=step_logits, gaps=gaps, new_images=records,
                stage2_gap=stage2.get("gap"), stage2=stage2, kv_rows=kv_rows, all_held=all_held, n_new=n_new)


def run_conversation(model, ctx: dict, budgets: Budgets | None) -> list[dict]:
    session = Session()
    return [run_turn(model, ctx, session, messages, budgets) for messages in TURNS]


def selection_gaps(turns: list[dict]) -> dict[str, float]:
    """Every stage-1 and stage-2 relative boundary gap of the scenario, by selection."""
    g = {f"turn{t}.image{im['image']}.stage1": im["stage1_gap_rel"] for t, tr in enumerate(turns)
         for im in tr["new_images"]}
    g.update({f"turn{t}.stage2": tr["stage2_gap"] for t, tr in enumerate(turns) if tr["stage2_gap"] is not None})
    return g


# ----------------------------------------------------------------------------- cross-checks


@torch.no_grad()
def hf_first_logits(model, processor, messages: list[dict], ctx: dict) -> torch.Tensor:
    """transformers' full forward of a whole turn prompt (36 tokens per image, expanded by its processor)."""
    text = render(messages)
    imgs = [Image.open(REF / IMAGES[i]) for m in messages for i in m["images"]]
    inp = processor(images=imgs or None, text=text, return_tensors="pt")
    ids = inp["input_ids"][0].tolist()
    assert ids == expand(ctx["tok"](text).input_ids, ctx["image_id"], ctx["n0"]), "processor expansion differs"
    kw = {}
    if imgs:
        assert inp["pixel_values"].shape[0] == len(imgs)
        for pv, i in zip(inp["pixel_values"], [i for m in messages for i in m["images"]]):
            assert torch.equal(pv.float(), ctx["vision"][i].pixel_values)
        kw["pixel_values"] = inp["pixel_values"]
    return model(input_ids=inp["input_ids"], **kw).logits[0, -1].float()


@torch.no_grad()
def one_pass(model, ctx: dict, turn: dict, budgets: Budgets):
    """The whole turn prompt + fed generated ids in one cache-free pass, dropping at layer K exactly the image rows
    the session dropped (earlier turns' images and this turn's): (logits of the last prompt row and the fed rows,
    this turn's stage-2 scores recomputed from the pass's layer K-1 attention, or None). Layer K-1 precedes every
    drop, so its probabilities for this turn's rows are what the cached prefill saw."""
    n1, image_id = budgets.n1, ctx["image_id"]
    feats, drop = [], set()
    starts = [i for i, t in enumerate(turn["prompt"]) if t == image_id][::n1]
    for h, start in zip(turn["all_held"], starts):
        vis = ctx["vision"][h.image]
        feats.append(stage1(model, vis, n1)[1])
        if h.scored_until is not None:
            drop |= {start + l for l in range(n1)} - {start + l for l in h.kept_local}
    ids = turn["prompt"] + turn["generated"][:-1]
    e = v15.splice_embeds(model, ids, torch.cat(feats) if feats else torch.zeros(0, ctx["hidden"]), image_id)
    keep = [r for r in range(len(ids)) if r not in drop]
    scores = {}

    def choose(P):
        if turn["stage2"]:
            queries, cand = turn["stage2"]["rows"]
            scores["s"] = P[:, queries][:, :, cand].double().mean(dim=(0, 1)).float()
        return keep

    logits, _, pos = prefill_on_cache(model, e, list(range(len(ids))), v15.LayerKV(ctx["n_layers"]), choose)
    assert pos == keep and pos[-NEW_TOKENS:] == list(range(len(turn["prompt"]) - 1, len(ids)))
    return logits[-NEW_TOKENS:], scores.get("s")


# ----------------------------------------------------------------------------- main


def main() -> int:
    t0 = time.time()
    model, processor, tok = load_fixture(FIXTURE)
    cfg = model.config
    vc, tc = cfg.vision_config, cfg.text_config
    n0 = (vc.image_size // vc.patch_size) ** 2
    assert n0 == 36 and cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert tc.num_hidden_layers > K, "stage 2 at K needs layers after it"
    eos_id = tc.eos_token_id
    ctx = dict(tok=tok, image_id=cfg.image_token_index, eos_id=eos_id, n0=n0, n_layers=tc.num_hidden_layers,
               hidden=tc.hidden_size)
    ctx["vision"] = load_vision(model, processor, IMAGES)
    checks = {}

    # ---- rendering: ours == the checkpoint's jinja template == the processor's chat template; BOS first
    template_text = (FIXTURE / "chat_template.jinja").read_text()
    for messages in TURNS:
        text = render(messages)
        assert text == render_jinja(template_text, messages), (text, render_jinja(template_text, messages))
        assert text == processor.apply_chat_template(hf_content(messages), add_generation_prompt=True, tokenize=False)
        assert tok(text).input_ids[0] == tok.bos_token_id
    assert render(TURNS[1]) == "USER: What is this? ASSISTANT: Fine. USER: <image>\nDescribe it. ASSISTANT:"
    checks["rendering"] = "render() == chat_template.jinja (jinja2, add_generation_prompt) == processor template"

    # ---- the fixture's single-turn references: same pixel values, same stage-1 selection at its N1
    cases = json.loads((REF / "cases.json").read_text())
    recorded = load_file(str(REF / "reference.safetensors"))
    by_file = {c["image"]: c for c in cases["cases"]}
    for f, vis in zip(IMAGES, ctx["vision"]):
        i = by_file[f]["case"]
        assert torch.equal(vis.pixel_values, recorded[f"case{i}.pixel_values"]), f
        assert torch.equal(vis.scores, recorded[f"case{i}.clip_attention_scores"]), f
        fixture_n1 = cases["pruning_budgets"]["N1"]
        assert stage1(model, vis, fixture_n1)[0] == by_file[f]["stage1_kept"], f
    checks["fixture_pixel_values_and_clip_scores_equal"] = True
    checks["fixture_stage1_kept_equal_at_its_N1"] = cases["pruning_budgets"]["N1"]

    # ---- budgets: the defaults unless some selection of the scenario has a near-tie at its boundary
    order = ([(N1_DEFAULT, N2_DEFAULT)] + [(N1_DEFAULT, n2) for n2 in N2_CANDIDATES]
             + [(n1, N2_DEFAULT) for n1 in N1_CANDIDATES] + [(n1, n2) for n1 in N1_CANDIDATES for n2 in N2_CANDIDATES])
    tried, chosen = [], None
    for n1, n2 in order:
        turns = run_conversation(model, ctx, Budgets(n1, n2))
        gaps = selection_gaps(turns)
        worst = min(gaps.values())
        ties = {k: float(f"{v:.6e}") for k, v in gaps.items() if v < SAFE_GAP_REL}
        tried.append({"stage1_keep": n1, "keep": n2, "min_gap_rel": float(f"{worst:.6e}"), "near_ties": ties})
        log(f"budgets N1 {n1} N2 {n2}: smallest relative boundary gap {worst:.3e}, near-ties {ties}")
        if worst >= SAFE_GAP_REL:
            chosen = (Budgets(n1, n2), turns)
            break
    if chosen is None:
        raise SystemExit("no candidate budgets without a near-tie")
    budgets, turns = chosen

    # ---- session invariants the scenario relies on
    for t, turn in enumerate(turns):
        assert t == 0 or turn["reused_raw"] > 0, "follow-ups reuse the session"
        assert turn["held"] == [i for m in TURNS[t] for i in m["images"]][:len(turn["held"])]
        if t > 0:  # every image of earlier turns is held: the prefix keeps the prompt that scored it
            assert turn["held"] == [i for m in TURNS[t - 1] for i in m["images"]]
            assert turn["reused_raw"] >= len(turns[t - 1]["raw"]), "earlier images must stay held"

    # ---- turn 0 (text only) == transformers on the raw ids
    with torch.no_grad():
        hf0 = model(input_ids=torch.tensor([turns[0]["raw"]])).logits[0, -1].float()
    d = float((hf0 - turns[0]["step_logits"][0]).abs().max())
    assert d < HF_TOL_TEXT, d
    checks["turn0_vs_transformers_first_logits_max_abs_diff"] = d

    # ---- the same session machinery without pruning == one full transformers forward per turn
    plain = run_conversation(model, ctx, None)
    for t in (1, 2):
        hf = hf_first_logits(model, processor, TURNS[t], ctx)
        d = float((hf - plain[t]["step_logits"][0]).abs().max())
        assert d < HF_TOL, (t, d)
        checks[f"turn{t}_unpruned_cache_vs_transformers_full_forward_first_logits_max_abs_diff"] = d
        checks[f"turn{t}_unpruned_reused_raw"] = plain[t]["reused_raw"]

    # ---- every STAR turn == one cache-free pass with the same rows dropped (checks cache cut and positions)
    for t, turn in enumerate(turns):
        ref, s2 = one_pass(model, ctx, turn, budgets)
        d = float((ref - turn["step_logits"]).abs().max())
        assert d < HF_TOL, (t, d)
        if s2 is not None:  # the stage-2 scores on the cache == those of the cache-free pass (same kept set)
            ds = float((s2 - turn["stage2"]["scores"]).abs().max())
            assert ds < 1e-6 and v15.topk_keep(s2, len(turn["stage2"]["kept_c"])) == turn["stage2"]["kept_c"], ds
            checks[f"turn{t}_stage2_scores_cache_vs_one_pass_max_abs_diff"] = ds
        masked = ref.clone()
        masked[:, eos_id] = -float("inf")
        assert masked.argmax(dim=1).tolist() == turn["generated"]
        checks[f"turn{t}_star_cache_vs_one_pass_step_logits_max_abs_diff"] = d
    # ---- not asserted, for whoever compares against an engine running f16 weights: the same scenario with every
    # weight rounded to f16 (kept sets and generated ids the same or not)
    model16 = copy.deepcopy(model)
    with torch.no_grad():
        for p in model16.parameters():
            p.copy_(p.half().float())
    ctx16 = dict(ctx, vision=load_vision(model16, processor, IMAGES))
    turns16 = run_conversation(model16, ctx16, budgets)
    kept_sets = lambda tr: [(x["stage1_kept"], x["stage2_kept"]) for t in tr for x in t["new_images"]]  # noqa: E731
    checks["f16_weights_same_kept_sets"] = kept_sets(turns) == kept_sets(turns16)
    checks["f16_weights_same_generated_ids"] = all(a["generated"] == b["generated"] for a, b in zip(turns, turns16))
    checks["f16_weights_first_logits_max_abs_diff"] = max(
        float((a["step_logits"][0] - b["step_logits"][0]).abs().max()) for a, b in zip(turns, turns16))
    checks["kept_rows_keep_original_positions"] = True
    checks["kv_rows_per_layer_follow_rule"] = True

    # ---- outputs
    logits_out, turns_json = {}, []
    for t, turn in enumerate(turns):
        first = turn["step_logits"][0].float().contiguous()
        logits_out[f"turn{t}.first_logits"] = first
        top = torch.topk(first, 10)
        turns_json.append({
            "messages": TURNS[t],
            "rendered": render(TURNS[t]),
            "raw_ids": turn["raw"],
            "prompt_ids": turn["prompt"],
            "reused_raw": turn["reused_raw"],
            "reused_tokens": turn["reused_tokens"],
            "held_images": turn["held"],
            "generated_ids": turn["generated"],
            "generated_text": tok.decode(turn["generated"], skip_special_tokens=True),
            "min_top2_gap": round(min(turn["gaps"]), 6),
            "first_logits_top": [[int(i), float(v)] for i, v in zip(top.indices, top.values)],
            "first_logits_l2": float(first.double().norm()),
            "new_images": [{k: v for k, v in im.items()} for im in turn["new_images"]],
            "stage2_gap_rel": turn["stage2_gap"],
            "kv_rows_per_layer": turn["kv_rows"],
        })
    n1, n2 = budgets.n1, budgets.n2
    doc = {
        "description": (
            "Expected behaviour of a 3-turn conversation with STAR two-stage visual-token pruning on the tiny random "
            "LLaVA-1.5 fixture, each image pruned in the turn that first prefills it; computed in PyTorch with "
            "transformers' own modules (float32, eager attention, CPU). Rule: render with llava-hf's template "
            "(USER: + '<image>\\n' per image + text + ' ', ASSISTANT: + text + ' ', ending 'ASSISTANT:'), tokenize "
            "with BOS (raw_ids: one <image> id per image); prompt_ids replace each placeholder by the image's N1 rows "
            "(a row's RoPE position is its index there). Greedy, EOS masked, max_new_tokens per turn; the last token "
            "is not fed back, so the session holds raw_ids + the first max_new_tokens-1 generated ids and their KV "
            "cache. Next turn: prefix = min(common prefix of raw ids, len - 1), cut to a held image's placeholder if "
            "the image differs or the prompt that scored its stage 2 (that turn's raw length) is not kept whole; "
            "each layer keeps the prefix's text rows and per held image its N1 rows below layer K, its stage-2 "
            "survivors from layer K on. New rows are prefilled on that cache at positions continuing the unpruned "
            "numbering. Stage 1 per image: top-N1 of 36 patches by CLIP layer-3 attention received (mean over heads "
            "and queries), gathered before the projector. Stage 2 in a turn with new images: at 0-based layer K-1, "
            "each key's mean attention probability over heads and the new rows after the turn's last new image "
            "(softmax over all cached + new keys); the new images' rows ranked together, top N2 x new images kept "
            "with every non-image row, the rest dropped before layer K; survivors keep their positions; earlier "
            "images are not re-scored. Ties to the lower row; kept lists ascending."),
        "script": SCRIPT,
        "versions": versions(),
        "prune": {"method": "star", "stage1_keep": n1, "keep": n2, "stage2_layer": K},
        "budget_choice": {
            "defaults": {"stage1_keep": N1_DEFAULT, "keep": N2_DEFAULT},
            "rule": f"first of {[(a, b) for a, b in order]} (stage1_keep, keep) whose stage-1 and stage-2 relative "
                    f"boundary gaps ((kth - next) / |kth|) are all >= {SAFE_GAP_REL:g}",
            "tried": tried,
        },
        "max_new_tokens": NEW_TOKENS,
        "images": IMAGES,
        "fields": {
            "messages": "role, text, images (indices into images); a user message renders its images first",
            "raw_ids": "tokenizer ids of the rendered text (BOS first), one <image> id per image",
            "prompt_ids": "raw_ids with each <image> expanded to stage1_keep image ids (the LM's input)",
            "reused_raw / reused_tokens": "raw ids / prompt rows served by the session's cache (0 on turn 0); the "
                                          "first new row's position is reused_tokens",
            "held_images": "images whose rows came from the session's cache",
            "generated_ids": "the max_new_tokens greedy ids (EOS masked); min_top2_gap: smallest top-1/top-2 gap",
            "first_logits_top": "the 10 largest logits of the last prompt row [id, logit]; the whole row is "
                                "turn{t}.first_logits in conversation_logits.safetensors",
            "first_logits_l2": "L2 norm of the whole first logits row",
            "new_images": "images first prefilled this turn: stage1_kept (patch indices ascending), stage2_kept "
                          "(original patch indices ascending; the new images share the budget keep x count), "
                          "stage1_gap_rel (relative gap at the stage-1 boundary)",
            "stage2_gap_rel": "relative gap at the joint stage-2 boundary (null: no new image, no stage 2)",
            "kv_rows_per_layer": "rows each decoder layer's cache holds after this turn's prefill (before decoding)",
        },
        "turns": turns_json,
        "checks": checks,
    }
    write_reference(doc, logits_out, OUT_JSON, OUT_LOGITS)

    log(f"budgets: N1 {n1}, N2 {n2}, K {K}")
    for t, tj in enumerate(turns_json):
        log(f"turn {t}: raw {len(tj['raw_ids'])} prompt {len(tj['prompt_ids'])} reused {tj['reused_raw']}/"
            f"{tj['reused_tokens']} held {tj['held_images']} -> {tj['generated_ids']} ({tj['generated_text']!r}) "
            f"kv {tj['kv_rows_per_layer']} stage2 gap {tj['stage2_gap_rel']}")
        for im in tj["new_images"]:
            log(f"  image {im['image']}: stage1 gap {im['stage1_gap_rel']:.3e} stage2 kept {im['stage2_kept']}")
    log("checks:", json.dumps(checks))
    log(f"wrote {OUT_JSON.relative_to(REPO)} and {OUT_LOGITS.relative_to(REPO)} ({time.time() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
