#!/usr/bin/env python3
"""Deterministic synthetic visual question answering data ("shapes VQA") for the trained tiny LLaVA.

Every example is a function of one integer seed, so the training set, the validation set the trainer
watches and the held-out test set are disjoint seed ranges of the same generator:

    TRAIN seeds       0 .. 9_999_999        (one image, several questions per image)
    HELDOUT seeds     10_000_000 + i        (one image, one question; never used by the trainer)
    VALID seeds       20_000_000 + i        (monitoring during training only)

Images: 112 x 112 RGB (drawn at 4x and box-filtered down, so edges are anti-aliased), 2-5 shapes
(circle, square, triangle, star, cross) in distinct colours (red, green, blue, yellow, purple, orange,
white) at random positions and sizes (18-30 px) on a muted background (solid, linear gradient, some with
mild noise). Shapes never overlap and every shape's centre lies clearly inside one quadrant (at least
10 px from both midlines), so "which corner" always has one right answer.

Question types (the held-out set cycles through the types and, inside a type, through its answers, so
both are exactly balanced; training images get one question of every type the scene allows):

    color_of_shape   What color is the star?                  -> purple   (asked only if unique)
    shape_of_color   What shape is the red object?            -> circle
    count_all        How many shapes are there?               -> three    (two .. five)
    count_shape      How many squares are there?              -> zero     (zero .. three, rarely four)
    presence         Is there a blue triangle?                -> yes / no (50/50, hard negatives)
    quadrant         Where is the green cross?                -> top left / top right / bottom left / bottom right
    quadrant_color   What color is the shape in the top right?-> yellow   (asked only if it holds one shape)

Answers are one or two lowercase words; compare with `normalize_answer` (lowercase, punctuation
dropped, whitespace collapsed).

Write a held-out set for `llava-wgpu eval` (JSONL of {"image", "question", "answer", "type", "seed"}
with image paths relative to the JSONL file, plus the PNGs):

    python scripts/vqa_data.py heldout --out data/shapes-heldout --n 700
    python scripts/vqa_data.py samples --out /tmp/shapes-samples --n 8     # look at some training images

Pure Python + Pillow + numpy; output is byte-identical for the same Pillow / numpy versions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 112
SUPERSAMPLE = 4
MIN_SIZE, MAX_SIZE = 18, 30  # shape bounding-box side in output pixels
MIDLINE_CLEARANCE = 10  # every shape centre is at least this far from both midlines
GAP = 3  # minimum distance between two shapes' bounding boxes

TRAIN_SEED_LIMIT = 10_000_000  # training images use seeds 0 .. TRAIN_SEED_LIMIT-1
HELDOUT_SEED_BASE = 10_000_000  # held-out test set (eval JSONL, accuracy in the README)
VALID_SEED_BASE = 20_000_000  # validation set watched during training

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (40, 90, 245),
    "yellow": (245, 225, 40),
    "purple": (155, 60, 220),
    "orange": (255, 140, 20),
    "white": (245, 245, 245),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle", "star", "cross"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
QTYPES = ["color_of_shape", "shape_of_color", "count_all", "count_shape", "presence", "quadrant", "quadrant_color"]

TEMPLATES: dict[str, list[str]] = {
    "color_of_shape": ["What color is the {shape}?", "Which color does the {shape} have?"],
    "shape_of_color": ["What shape is the {color} object?", "Which shape is {color}?"],
    "count_all": ["How many shapes are there?", "How many objects are in the image?"],
    "count_shape": ["How many {shapes} are there?", "How many {shapes} can you see?"],
    "presence": ["Is there {a} {color} {shape}?", "Do you see {a} {color} {shape}?"],
    "quadrant": ["Where is the {color} {shape}?", "In which corner is the {color} {shape}?"],
    "quadrant_color": ["What color is the shape in the {quadrant}?", "What color is the object in the {quadrant}?"],
}


@dataclass
class Obj:
    shape: str
    color: str
    cx: float  # centre, output pixels
    cy: float
    size: float  # bounding-box side, output pixels
    rgb: tuple[int, int, int]

    @property
    def quadrant(self) -> str:
        return ("top" if self.cy < IMAGE_SIZE / 2 else "bottom") + " " + ("left" if self.cx < IMAGE_SIZE / 2 else "right")

    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass
class Scene:
    objects: list[Obj]
    background: dict = field(default_factory=dict)


@dataclass
class Example:
    seed: int
    image: Image.Image
    qas: list[dict]  # {"type", "question", "answer"}
    scene: Scene


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace ("Top-Left." -> "top left")."""
    s = re.sub(r"[^a-z0-9 ]+", " ", s.lower().replace("</s>", " "))
    return " ".join(s.split())


# ----------------------------------------------------------------------------- scenes


def _muted(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation background colour (grey level 15-115 with a small tint)."""
    g = rng.uniform(15, 115)
    return tuple(int(min(135, max(0, g + rng.uniform(-22, 22)))) for _ in range(3))


def _place(rng: random.Random, n: int, lo: int = MIN_SIZE, hi: int = MAX_SIZE) -> list[tuple[float, float, float]] | None:
    placed: list[tuple[float, float, float]] = []
    mid = IMAGE_SIZE / 2
    for _ in range(n):
        for attempt in range(300):
            s = float(rng.randint(lo, hi if attempt < 150 else (lo + hi) // 2))
            h = s / 2
            cx = rng.uniform(h + 2, IMAGE_SIZE - h - 2)
            cy = rng.uniform(h + 2, IMAGE_SIZE - h - 2)
            clear = max(MIDLINE_CLEARANCE, h - 4)
            if abs(cx - mid) < clear or abs(cy - mid) < clear:
                continue
            if all(abs(cx - x) >= h + t / 2 + GAP or abs(cy - y) >= h + t / 2 + GAP for x, y, t in placed):
                placed.append((cx, cy, s))
                break
        else:
            return None
    return placed


def sample_scene(rng: random.Random, min_objects: int = 2, max_objects: int = 5, easy: bool = False) -> Scene:
    """`easy` (training curriculum only): larger shapes (30-44 px) on solid backgrounds without noise."""
    lo, hi = (30, 44) if easy else (MIN_SIZE, MAX_SIZE)
    while True:
        n = rng.randint(min_objects, max_objects)
        colors = rng.sample(COLOR_NAMES, n)
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        if n >= 2 and rng.random() < 0.4:  # a repeated shape, so "how many <shape>s" also gets answers two / three
            dom = rng.choice(SHAPES)
            for i in rng.sample(range(n), rng.randint(2, min(3, n))):
                shapes[i] = dom
        pos = _place(rng, n, lo, hi)
        if pos is not None:
            break
    objs = []
    for (cx, cy, s), shape, color in zip(pos, shapes, colors):
        rgb = tuple(int(min(255, max(0, c + rng.randint(-12, 12)))) for c in COLORS[color])
        objs.append(Obj(shape, color, cx, cy, s, rgb))
    kind = rng.choice(["solid", "gradient", "gradient"])
    bg = {"kind": kind, "c0": _muted(rng), "c1": _muted(rng), "angle": rng.uniform(0, 2 * math.pi),
          "noise": rng.choice([0.0, 0.0, rng.uniform(3, 9)]), "noise_seed": rng.getrandbits(63)}
    if easy:
        bg.update(kind="solid", noise=0.0)
    return Scene(objs, bg)


def _star(cx, cy, r_out, r_in):
    pts = []
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        r = r_out if k % 2 == 0 else r_in
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw_shapes(img: Image.Image, scene: Scene, fills: list) -> None:
    """Draw every object of `scene` on `img` (SUPERSAMPLE x the output size), object i filled with fills[i]."""
    d = ImageDraw.Draw(img)
    for o, fill in zip(scene.objects, fills):
        k = SUPERSAMPLE
        cx, cy, h = o.cx * k, o.cy * k, o.size * k / 2
        if o.shape == "circle":
            d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "square":
            q = h * 0.86  # similar area to the circle
            d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
        elif o.shape == "triangle":
            d.polygon([(cx - h, cy + h * 0.85), (cx, cy - h), (cx + h, cy + h * 0.85)], fill=fill)
        elif o.shape == "star":
            d.polygon(_star(cx, cy + h * 0.08, h * 1.05, h * 0.45), fill=fill)
        elif o.shape == "cross":
            w = h * 0.36
            d.rectangle([cx - h, cy - w, cx + h, cy + w], fill=fill)
            d.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
        else:
            raise ValueError(o.shape)


def patch_coverage(scene: Scene, patch: int) -> np.ndarray:
    """[objects, rows, cols] fraction of every patch x patch cell of the image covered by each object (from the
    same supersampled drawing as `render`); the trainer uses it for the vision tower's per-patch labels."""
    S = IMAGE_SIZE * SUPERSAMPLE
    grid = IMAGE_SIZE // patch
    out = np.zeros((len(scene.objects), grid, grid))
    ids = Image.new("L", (S, S), 0)
    _draw_shapes(ids, scene, list(range(1, len(scene.objects) + 1)))
    a = np.asarray(ids)[: grid * patch * SUPERSAMPLE, : grid * patch * SUPERSAMPLE]
    cell = patch * SUPERSAMPLE
    blocks = a.reshape(grid, cell, grid, cell)
    for i in range(len(scene.objects)):
        out[i] = (blocks == i + 1).mean(axis=(1, 3))
    return out


def render(scene: Scene) -> Image.Image:
    S = IMAGE_SIZE * SUPERSAMPLE
    bg = scene.background
    c0, c1 = np.array(bg["c0"], np.float64), np.array(bg["c1"], np.float64)
    if bg["kind"] == "solid":
        arr = np.broadcast_to(c0, (S, S, 3)).copy()
    else:
        u = np.linspace(-1.0, 1.0, S)
        t = (math.cos(bg["angle"]) * u[None, :] + math.sin(bg["angle"]) * u[:, None]) / math.sqrt(2) * 0.5 + 0.5
        arr = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    _draw_shapes(img, scene, [o.rgb for o in scene.objects])
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    if bg["noise"] > 0:
        nrng = np.random.default_rng(bg["noise_seed"])
        a = np.asarray(img).astype(np.float64) + nrng.normal(0.0, bg["noise"], (IMAGE_SIZE, IMAGE_SIZE, 1))
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
    return img


# ----------------------------------------------------------------------------- questions


def ask(rng: random.Random, scene: Scene, qtype: str) -> dict | None:
    """One question of `qtype` about `scene`, answers spread as evenly as the scene allows; None if not askable."""
    objs = scene.objects
    tpl = rng.choice(TEMPLATES[qtype])
    counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    if qtype == "color_of_shape":
        unique = [o for o in objs if counts[o.shape] == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        q, a = tpl.format(shape=o.shape), o.color
    elif qtype == "shape_of_color":
        o = rng.choice(objs)
        q, a = tpl.format(color=o.color), o.shape
    elif qtype == "count_all":
        q, a = tpl, NUMBERS[len(objs)]
    elif qtype == "count_shape":
        value = rng.choice(sorted(set(counts.values())))
        s = rng.choice([s for s in SHAPES if counts[s] == value])
        q, a = tpl.format(shapes=PLURAL[s]), NUMBERS[value]
    elif qtype == "presence":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            o = rng.choice(objs)
            color, shape, a = o.color, o.shape, "yes"
        else:
            r = rng.random()
            if r < 0.4:  # a colour that is there, on another shape
                cands = [(o.color, s) for o in objs for s in SHAPES if (o.color, s) not in present]
            elif r < 0.8:  # a shape that is there, in another colour
                cands = [(c, o.shape) for o in objs for c in COLOR_NAMES if (c, o.shape) not in present]
            else:
                cands = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
            color, shape = rng.choice(sorted(set(cands)))
            a = "no"
        q = tpl.format(a="an" if color[0] in "aeiou" else "a", color=color, shape=shape)
    elif qtype == "quadrant":
        quad = rng.choice(sorted({o.quadrant for o in objs}, key=QUADRANTS.index))
        o = rng.choice([o for o in objs if o.quadrant == quad])
        q, a = tpl.format(color=o.color, shape=o.shape), quad
    elif qtype == "quadrant_color":
        single = [qd for qd in QUADRANTS if sum(o.quadrant == qd for o in objs) == 1]
        if not single:
            return None
        quad = rng.choice(single)
        o = next(o for o in objs if o.quadrant == quad)
        q, a = tpl.format(quadrant=quad), o.color
    else:
        raise ValueError(qtype)
    return {"type": qtype, "question": q, "answer": a}


_SUBJECT_WORDS = set(COLOR_NAMES) | set(SHAPES) | set(PLURAL.values()) | {"top", "bottom", "left", "right"}


def _subject(question: str) -> str:
    """The colour / shape / corner words of a question: what it asks about, without the template."""
    return " ".join(w for w in normalize_answer(question).split() if w in _SUBJECT_WORDS)


def train_example(seed: int, qtypes: list[str] | None = None, min_objects: int = 2, max_objects: int = 5,
                  easy: bool = False, per_type: int = 1) -> Example:
    """A training image with up to `per_type` distinct questions of each type in `qtypes` (default: all types)
    that the scene allows. A curriculum may ask for fewer objects (e.g. 1-2) or easy scenes (large shapes, solid
    background) early in training; evaluation scenes always have 2-5 objects of normal size on normal
    backgrounds."""
    if not 0 <= seed < TRAIN_SEED_LIMIT:
        raise ValueError(f"training seed {seed} outside [0, {TRAIN_SEED_LIMIT})")
    rng = random.Random(seed)
    scene = sample_scene(rng, min_objects, max_objects, easy)
    qas: list[dict] = []
    for t in qtypes or QTYPES:
        seen: set[str] = set()
        for _ in range(per_type):
            qa = ask(rng, scene, t)
            key = _subject(qa["question"]) if qa is not None else ""
            if qa is not None and key not in seen:  # one question per subject, whatever the template
                seen.add(key)
                qas.append(qa)
    return Example(seed, render(scene), qas, scene)


# the answers a held-out question of each type is balanced over (count_shape: "four" is too rare to force)
ANSWERS: dict[str, list[str]] = {
    "color_of_shape": COLOR_NAMES,
    "shape_of_color": SHAPES,
    "count_all": NUMBERS[2:6],
    "count_shape": NUMBERS[0:4],
    "presence": ["yes", "no"],
    "quadrant": QUADRANTS,
    "quadrant_color": COLOR_NAMES,
}


def single_example(seed: int, qtype: str, target: str | None = None) -> Example:
    """One image and one question of `qtype` whose answer is `target` (default: drawn uniformly from
    ANSWERS[qtype]); scenes are redrawn until the question has that answer, so no answer prior beats chance."""
    rng = random.Random(seed)
    if target is None:
        target = rng.choice(ANSWERS[qtype])
    while True:
        scene = sample_scene(rng)
        qa = ask(rng, scene, qtype)
        if qa is not None and qa["answer"] == target:
            return Example(seed, render(scene), [qa], scene)


def eval_examples(n: int, base: int = HELDOUT_SEED_BASE) -> list[Example]:
    """The held-out (or, with base=VALID_SEED_BASE, validation) set: example i has seed base+i, type
    QTYPES[i % 7] and answer ANSWERS[type][(i // 7) % len(ANSWERS[type])] (types and answers exactly balanced)."""
    out = []
    for i in range(n):
        qtype = QTYPES[i % len(QTYPES)]
        answers = ANSWERS[qtype]
        out.append(single_example(base + i, qtype, answers[(i // len(QTYPES)) % len(answers)]))
    return out


def write_heldout(out: Path, n: int, base: int = HELDOUT_SEED_BASE, name: str = "heldout.jsonl") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    lines = []
    for i, ex in enumerate(eval_examples(n, base)):
        rel = f"images/{i:05d}.png"
        ex.image.save(out / rel, format="PNG", optimize=False)
        qa = ex.qas[0]
        lines.append(json.dumps({"image": rel, "question": qa["question"], "answer": qa["answer"],
                                 "type": qa["type"], "seed": ex.seed}))
    path = out / name
    path.write_text("\n".join(lines) + "\n")
    return path


def corpus() -> list[str]:
    """Every question template with every filler, and every answer (for training the tokenizer)."""
    lines = []
    fills = dict(shape=SHAPES, color=COLOR_NAMES, shapes=list(PLURAL.values()), quadrant=QUADRANTS, a=["a", "an"])
    for qtype, tpls in TEMPLATES.items():
        for tpl in tpls:
            keys = re.findall(r"{(\w+)}", tpl)
            combos = [{}]
            for k in keys:
                combos = [dict(c, **{k: v}) for c in combos for v in fills[k]]
            lines += [tpl.format(**c) for c in combos]
    answers = COLOR_NAMES + SHAPES + NUMBERS + QUADRANTS + ["yes", "no"]
    lines += [f"ASSISTANT: {a}" for a in answers] * 20 + ["USER: ASSISTANT:"] * 50
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("heldout", help="write the held-out JSONL + PNGs")
    h.add_argument("--out", type=Path, default=Path("data/shapes-heldout"))
    h.add_argument("--n", type=int, default=700)
    h.add_argument("--base", type=int, default=HELDOUT_SEED_BASE)
    s = sub.add_parser("samples", help="write a few training images with their questions")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--start", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "heldout":
        if args.base < TRAIN_SEED_LIMIT:
            raise SystemExit(f"--base {args.base} overlaps the training seeds [0, {TRAIN_SEED_LIMIT})")
        path = write_heldout(args.out, args.n, args.base)
        print(f"wrote {path} ({args.n} examples, seeds {args.base}..{args.base + args.n - 1})")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        for i in range(args.start, args.start + args.n):
            ex = train_example(i)
            ex.image.save(args.out / f"train_{i:05d}.png")
            print(f"train_{i:05d}.png", [(o.color, o.shape, o.quadrant) for o in ex.scene.objects])
            for qa in ex.qas:
                print(f"   [{qa['type']}] {qa['question']} -> {qa['answer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
