#!/usr/bin/env python3
"""Record HF transformers' greedy answers to a question set, as the reference the engine's answers are
compared with (tests/trained_model.rs).

    python scripts/hf_answers.py --model weights/tiny-llava-shapes \\
        --questions weights/shapes-heldout/heldout.jsonl --out weights/shapes-heldout/hf_answers.jsonl

Reads JSONL lines {"image", "question", ...} (image paths relative to the file), loads the checkpoint with
transformers (float32 compute of the stored weights), prompts "USER: <image>\\n{question} ASSISTANT:"
through the checkpoint's own processor, decodes greedily (at most --max-new-tokens, stop at </s>) and
writes one line {"question_index", "image", "question", "hf_answer", "hf_ids"} per question.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llava_hf_common import versions  # noqa: E402  first: sets the offline environment

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--questions", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    lines = [json.loads(x) for x in args.questions.read_text().splitlines() if x.strip()]
    out = []
    correct = 0
    with torch.no_grad():
        for i, q in enumerate(lines):
            image = Image.open(args.questions.parent / q["image"])
            inputs = processor(images=image, text=f"USER: <image>\n{q['question']} ASSISTANT:", return_tensors="pt")
            ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)[0, inputs["input_ids"].shape[1]:].tolist()
            answer = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
            correct += int("answer" in q and answer.lower() == q["answer"].lower())
            out.append({"question_index": i, "image": q["image"], "question": q["question"], "hf_answer": answer,
                        "hf_ids": ids})
    args.out.write_text("".join(json.dumps(x) + "\n" for x in out))
    v = versions()
    print(f"wrote {args.out}: {len(out)} answers, {correct} equal to the reference answer "
          f"(transformers {v['transformers']}, torch {v['torch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
