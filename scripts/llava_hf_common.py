"""What the two checkpoint-writing scripts share (make_tiny_llava.py: the random parity fixture;
train_tiny_llava.py: the trained demo model): offline settings, the LLaMA-style BPE tokenizer, the
LLaVA processor and the classic llava-hf processor files.

Import this module before transformers: it switches the Hugging Face libraries to offline mode
(nothing is ever downloaded) and quiets them.
"""

from __future__ import annotations

import os

for _key, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("TRANSFORMERS_VERBOSITY", "error"),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
):
    os.environ.setdefault(_key, _value)

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlavaConfig, LlavaProcessor, PreTrainedTokenizerFast  # noqa: E402

try:  # transformers >= 5: the PIL backend has its own class; CLIPImageProcessor is torchvision
    from transformers import CLIPImageProcessorPil as PilClipImageProcessor
except ImportError:  # transformers 4.x: CLIPImageProcessor is the slow PIL one
    from transformers import CLIPImageProcessor as PilClipImageProcessor

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# llava-hf's chat template: "USER: <image>\n{text} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def versions() -> dict:
    """The package versions a checkpoint was written with (recorded next to it)."""
    return {
        "python": sys.version.split()[0],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "torchvision_installed": importlib.util.find_spec("torchvision") is not None,
    }


def llava_config(vision, text, image_id: int, image_tokens: int) -> LlavaConfig:
    """LLaVA-1.5's wiring around a CLIP vision config and a LLaMA text config: layer -2 features without
    CLS, GELU projector with biases, untied lm_head."""
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def build_llama_bpe(corpus: list[str], train_vocab: int) -> Tokenizer:
    """A LLaMA-style BPE trained on `corpus`: Metaspace (prepend first), byte fallback, ids 0..2 =
    <unk> <s> </s>, 3..258 = the bytes, then the trained pieces, then <image> and <pad> last.
    `train_vocab` is the trainer's vocabulary (alphabet + merges) before the bytes and specials."""
    # 1. Train the merges (words split on spaces during training, as sentencepiece does).
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=train_vocab, special_tokens=[], show_progress=False)
    trainer_tok.train_from_iterator(corpus, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    trained_vocab = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    # 2. Rebuild with LLaMA's id layout.
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in trained_vocab:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.add_special_tokens([AddedToken("<pad>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    return tok


def make_hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def make_processor(hf_tok, image_size: int, patch_size: int) -> LlavaProcessor:
    """llava-hf's processor: PIL bicubic resize of the shortest edge, centre crop, CLIP normalisation."""
    image_processor = PilClipImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=PIL.Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=hf_tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token (llava-hf sets this too)
        chat_template=CHAT_TEMPLATE,
    )


def save_processor_files(out: Path, processor: LlavaProcessor, raw_tok: Tokenizer, image_size: int) -> list[str]:
    """Write the processor the way a downloaded llava-hf checkpoint has it: transformers' own files,
    tokenizer.json, the classic preprocessor_config.json (written explicitly, so it does not depend on
    the transformers version) and the chat template as .json and .jinja. Returns the names transformers
    wrote itself."""
    processor.save_pretrained(out)
    written_by_transformers = sorted(p.name for p in out.iterdir() if p.is_file())
    if not (out / "tokenizer.json").exists():
        raw_tok.save(str(out / "tokenizer.json"))
    preprocessor_config = {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "processor_class": "LlavaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config, indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    if not (out / "chat_template.jinja").exists():
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return written_by_transformers


def load_fixture(directory: Path):
    """A llava-hf checkpoint for a reference script, reproducibly: f32, eager attention (its
    probabilities are read), one thread and deterministic kernels (bit-reproducible CPU
    reductions, as make_tiny_llava.py). Returns (model, processor, tokenizer)."""
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = LlavaForConditionalGeneration.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model, AutoProcessor.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def write_reference(doc: dict, tensors: dict, json_path: Path, tensors_path: Path) -> None:
    """A reference script's outputs: `doc` as indented JSON, `tensors` as safetensors (sorted
    by name, so a rerun writes the same bytes), both readable by everyone (mode 644)."""
    from safetensors.torch import save_file

    json_path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    save_file(dict(sorted(tensors.items())), str(tensors_path), metadata={"format": "pt"})
    for path in (json_path, tensors_path):
        os.chmod(path, 0o644)
