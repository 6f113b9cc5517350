#!/usr/bin/env python3
"""Record llama.cpp's tokenization of GGUF vocabularies, for the engine's GGUF tokenizer tests.

The engine tokenizes with the vocabulary stored in a GGUF file and must give exactly the ids
llama.cpp gives. This script builds tiny vocabularies, writes them as GGUF files the way llama.cpp's
converter (convert_hf_to_gguf.py) would, and records what llama.cpp itself does with them. CI has
no Python: the Rust tests read only the committed outputs.

Writes tests/fixture/tokenizers/:

    spm.gguf        SentencePiece BPE (tokenizer.ggml.model "llama"), byte_fallback, trained here
                    on a generated corpus (LLaMA's trainer settings: identity normalization, dummy
                    prefix, split digits, whitespace-only pieces). Written as the converter's
                    sentencepiece path writes a llava-hf checkpoint (tokenizer.model plus spm_hf's
                    two files plus a config.json): the SentencePiece pieces with their scores and
                    types; then every entry of tokenizer_config.json's added_tokens_decoder --
                    `<unk>` 0, `<s>` 1, `</s>` 2, `<image>` 480, `<pad>` 481, all `special: true` as
                    in llava-hf -- becomes CONTROL with score -1000 (so no token is UNKNOWN); and
                    the ids up to config.json's vocab_size 488 (rounded up to a multiple of 8, like
                    llava-hf's 32064) are "[PAD{i}]", UNUSED, score -10000. No add_space_prefix
                    key (tokenizer_config.json has no add_prefix_space).
    spm_hf/         the same model as a transformers LlamaTokenizerFast with legacy=True
                    (tokenizer.json and tokenizer_config.json only; the latter written here in the
                    transformers 4 layout with "legacy": true and added_tokens_decoder, because
                    transformers 5 saves neither and a reload would silently be legacy=False).
    spm_flat.gguf   spm_hf (+ config.json) converted without tokenizer.model: the converter's
                    tokenizer.json-only fallback (gguf-py's LlamaHfVocab). Every score is -1000.0
                    (so llama.cpp merges the leftmost pair whose concatenation is a token), there
                    is no [PAD] padding (482 tokens), and `<image>` is USER_DEFINED: LlamaHfVocab
                    makes an added token CONTROL only if it is one of the tokenizer's named special
                    tokens (bos/eos/unk/pad), so llama.cpp splits `<image>` out of the text even
                    with parse_special off.
    bpe.gguf        byte-level BPE trained with `tokenizers` (tokenizer.ggml.model "gpt2"), with
                    pre "llama-bpe" (the LLaMA-3 regex). Tokens and types as the converter's
                    gpt2 path writes them (merges "a b", no scores); added tokens at the end:
                    `<s>` (BOS), `</s>` (EOS), `<pad>` (special, so CONTROL) and `<image>` (not
                    special, so USER_DEFINED: split out of text even without parse_special).
    bpe_default.gguf  the same with pre "default" (llama.cpp's four DEFAULT regexes).
    cases.json      per GGUF file and per text, the ids `llama-tokenize` prints (BOS added or not,
                    special tokens parsed or not); for the SPM files also the ids of the spm_hf
                    tokenizer (transformers, legacy=True); and llama.cpp's detokenization of a few
                    id sequences (llama_detokenize through llama-cpp-python's ctypes bindings,
                    because no llama.cpp tool detokenizes). Plus sizes, sha256 and versions.

llama-tokenize at this commit: special tokens are parsed by default and there is no
--parse-special flag (it is rejected; --no-parse-special turns parsing off); --no-bos passes
add_special=false, so it would drop an EOS too; -f reads the file verbatim (a trailing newline
survives) but still applies backslash escapes unless --no-escape; -p "" is refused ("must specify
one of: --stdin, --file or --prompt"), so the empty text goes through an empty file. Every id list is
also checked against llama_tokenize called directly through the bindings.

Each GGUF holds only general.architecture "llama", a few llama.* hyperparameters, general.name
and the tokenizer.* keys, and no tensors (llama-tokenize loads with vocab_only, which reads no
hyperparameter past general.name and no tensor; the converter's --vocab-only output has no
tensors either). Every tokenizer.* key is checked against the real converter's --vocab-only
output for the same source directory (for the BPE files with its pre-tokenizer hash lookup
replaced by the chosen name, as our toy vocabulary has no known hash); the script stops if any
differs. That check needs torch and is skipped, with a warning, where it is missing.

Regenerate (deterministic: the same bytes with the same versions; about a minute on a CPU):

    python scripts/tokenizer_fixtures.py [--llama-cpp DIR] [--bin DIR] [--llama-cpp-python DIR]

    --llama-cpp         llama.cpp source tree (its gguf-py and convert_hf_to_gguf.py are used)
                        default $LLAMA_CPP_DIR or /work/ref/llama_cpp_python-0.3.36/vendor/llama.cpp
    --bin               directory holding llama-tokenize and libllama.so
                        default $LLAMA_CPP_BIN or /work/ref/build/bin
    --llama-cpp-python  llama-cpp-python source tree (for llama_detokenize; skipped if absent)
                        default $LLAMA_CPP_PYTHON_DIR or /work/ref/llama_cpp_python-0.3.36

Needs: sentencepiece, protobuf, tokenizers, transformers (and torch for the converter check).
Recorded with llama.cpp commit 0c1e57098bba43ac29e6e3b677cdceebdd22334f; cases.json's "versions"
lists the rest.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import types
import warnings
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixture" / "tokenizers"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get(
    "LLAMA_CPP_DIR", "/work/ref/llama_cpp_python-0.3.36/vendor/llama.cpp")))
ap.add_argument("--bin", type=Path, default=Path(os.environ.get("LLAMA_CPP_BIN", "/work/ref/build/bin")))
ap.add_argument("--llama-cpp-python", type=Path, default=Path(os.environ.get(
    "LLAMA_CPP_PYTHON_DIR", "/work/ref/llama_cpp_python-0.3.36")))
ARGS = ap.parse_args()

# The converter's own gguf-py (the pip "gguf" of the same version number can differ from it, e.g. in
# how SpecialVocab weighs add_bos_token against the post-processor).
sys.path.insert(0, str(ARGS.llama_cpp / "gguf-py"))
import gguf  # noqa: E402
from gguf import TokenType  # noqa: E402

import sentencepiece as spm  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, LlamaTokenizerFast  # noqa: E402

transformers.logging.set_verbosity_error()
logging.getLogger("gguf").setLevel(logging.ERROR)   # SpecialVocab's "Unknown separator token" notes
warnings.filterwarnings("ignore")

LLAMA_TOKENIZE = ARGS.bin / "llama-tokenize"

SPM_VOCAB = 480            # SentencePiece pieces (256 bytes, 3 specials, characters, merges)
BPE_VOCAB = 400            # byte-level BPE: 256 bytes + merges, before the 4 added tokens
SEED = 20240611
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Tiny llama hyperparameters for config.json and the llama.* keys (nothing reads them for tokenizing).
HPARAMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)


# ------------------------------------------------------------------------------------------ corpus

WORDS = """the a an of to and in is it this that what which who where when why how there here
quick brown fox jumps over lazy dog cat sitting on table picture image photo shows show me describe
user assistant system chat between curious human artificial intelligence gives helpful detailed
polite answers questions answer question hello world tokenizer llama vocabulary merge piece byte
fallback model text number word sentence color red green blue yellow large small left right top
bottom circle square triangle shape count how many people car street building tree sky water
don't it's I'm we'll they're you've can't what's there's""".split()
NON_ASCII = ["café", "naïve", "über", "Müller", "résumé", "日本", "日本語", "東京", "straße", "Ωmega",
             "😀", "🚀", "niño", "façade", "señor", "Zürich", "crème", "brûlée", "ça"]
PUNCT = [",", ".", "!", "?", ":", ";", "(a)", "(b)", "-", "'s", "\"", "3.14", "$", "%", "...", "'", "/",
         "?!", "100", "2024"]


def documents(lines: list[str]) -> list[str]:
    """The lines joined into short multi-line documents (newline runs for the byte-level BPE)."""
    rng = random.Random(SEED + 1)
    docs = []
    for i in range(0, len(lines), 5):
        doc = lines[i]
        for line in lines[i + 1:i + 5]:
            doc += rng.choice(["\n", "\n", "\n\n", " \n", ".\n\n"]) + line
        docs.append(doc)
    return docs


def corpus() -> list[str]:
    """Deterministic lines: mostly English words, with digits, punctuation and some non-ASCII."""
    rng = random.Random(SEED)
    lines = []
    for _ in range(3000):
        words = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.72:
                w = rng.choice(WORDS)
            elif r < 0.80:
                w = str(rng.randint(0, 99999))
            elif r < 0.88:
                w = rng.choice(NON_ASCII)
            else:
                w = rng.choice(PUNCT)
            if rng.random() < 0.2:
                w = w.capitalize()
            words.append(w)
        sep = rng.choice([" "] * 6 + ["  ", "    "])
        lines.append(sep.join(words))
    return lines


# ------------------------------------------------------------------------------------------ models

def train_spm(lines: list[str]) -> bytes:
    """A SentencePiece BPE model with LLaMA's trainer settings; returns the serialized model."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=SPM_VOCAB,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, split_by_unicode_script=True, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, max_sentence_length=4192,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return buf.getvalue()


def llama_config(vocab_size: int, **ids) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32", **HPARAMS, **ids}


def added_token(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def make_spm_sources(model: bytes, work: Path) -> tuple[Path, Path]:
    """spm_hf (tokenizer.json + tokenizer_config.json) and the llava-hf-like source directory."""
    sp_dir = work / "sp_only"
    sp_dir.mkdir()
    (sp_dir / "tokenizer.model").write_bytes(model)
    tok = LlamaTokenizerFast.from_pretrained(str(sp_dir), legacy=True, add_bos_token=True, add_eos_token=False)
    assert tok.legacy and tok.vocab_size == SPM_VOCAB
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False),
                    AddedToken("<pad>", special=True, normalized=False)], special_tokens=True)
    saved = work / "saved"
    tok.save_pretrained(str(saved))

    hf = OUT / "spm_hf"
    if hf.exists():
        shutil.rmtree(hf)
    hf.mkdir(parents=True)
    shutil.copy(saved / "tokenizer.json", hf / "tokenizer.json")
    # transformers 5 saves neither `legacy` nor added_tokens_decoder; without `legacy` a reload
    # silently becomes legacy=False. Written here in the transformers 4 / llava-hf layout, which the
    # converter's sentencepiece path reads for the added tokens.
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]}
    assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": SPM_VOCAB, "<pad>": SPM_VOCAB + 1}, ids
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): added_token(t, True) for t, i in sorted(ids.items(), key=lambda x: x[1])},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 4096,
        "pad_token": "<pad>",
        "padding_side": "left",
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }
    (hf / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    src = work / "spm_src"            # llava-hf-like: tokenizer.model + tokenizer.json + configs
    src.mkdir()
    shutil.copy(sp_dir / "tokenizer.model", src)
    shutil.copy(hf / "tokenizer.json", src)
    shutil.copy(hf / "tokenizer_config.json", src)
    padded = (SPM_VOCAB + 2 + 7) // 8 * 8
    (src / "config.json").write_text(json.dumps(llama_config(padded, bos_token_id=1, eos_token_id=2), indent=2))

    flat = work / "spm_flat_src"      # the same checkpoint without tokenizer.model
    flat.mkdir()
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(hf / f, flat)
    (flat / "config.json").write_text(json.dumps(llama_config(SPM_VOCAB + 2, bos_token_id=1, eos_token_id=2), indent=2))
    return src, flat


def make_bpe_source(lines: list[str], work: Path) -> Path:
    """A byte-level BPE checkpoint (tokenizer.json, tokenizer_config.json, config.json)."""
    tk = Tokenizer(models.BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tk.train_from_iterator(documents(lines), trainer)
    assert tk.get_vocab_size() == BPE_VOCAB
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<s>", "</s>", "<pad>"]])
    tk.add_tokens([AddedToken("<image>", special=False, normalized=False)])
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])

    src = work / "bpe_src"
    src.mkdir()
    tk.save(str(src / "tokenizer.json"))
    n = tk.get_vocab_size(with_added_tokens=True)
    (src / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(tk.token_to_id(t)): added_token(t, t != "<image>")
                                 for t in ["<s>", "</s>", "<pad>", "<image>"]},
    }, indent=2))
    (src / "config.json").write_text(json.dumps(
        llama_config(n, bos_token_id=bos, eos_token_id=tk.token_to_id("</s>")), indent=2))
    return src


# ------------------------------------------------------------------------------------------ GGUF

def spm_vocab(src: Path) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types by the rules of the converter's sentencepiece path
    (TextModel._create_vocab_sentencepiece in llama.cpp's conversion/base.py)."""
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    n = json.loads((src / "config.json").read_text())["vocab_size"]
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types_ = [TokenType.UNUSED] * n
    for i in range(sp.vocab_size()):
        if sp.is_unknown(i):
            t = TokenType.UNKNOWN
        elif sp.is_control(i):
            t = TokenType.CONTROL
        elif sp.is_unused(i):
            t = TokenType.UNUSED
        elif sp.is_byte(i):
            t = TokenType.BYTE
        else:
            t = TokenType.NORMAL
        tokens[i], scores[i], types_[i] = sp.id_to_piece(i).encode(), sp.get_score(i), t
    config = json.loads((src / "tokenizer_config.json").read_text())
    for i, data in config["added_tokens_decoder"].items():
        i, text = int(i), data["content"]
        if data.get("special") or text == "<pad>":   # "<pad>" also "looks special" to the converter
            types_[i] = TokenType.CONTROL
        else:
            types_[i] = TokenType.USER_DEFINED
            text = text.replace("\u2581", " ")
        scores[i], tokens[i] = -1000.0, text.encode()
    return tokens, scores, [int(t) for t in types_]


def bpe_vocab(src: Path) -> tuple[list[str], list[int]]:
    """Tokens and types by the rules of the converter's gpt2 path (TextModel.get_vocab_base)."""
    tok = AutoTokenizer.from_pretrained(str(src))
    n = json.loads((src / "config.json").read_text())["vocab_size"]
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types_ = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types_.append(TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            if not decoder[i].normalized:
                t = tok.decode(tok.encode(t, add_special_tokens=False))
            if decoder[i].special or t == "<pad>":
                types_.append(TokenType.CONTROL)
            else:
                t = t.replace("\u2581", " ")
                types_.append(TokenType.USER_DEFINED)
        else:
            types_.append(TokenType.NORMAL)
        tokens.append(t)
    return tokens, [int(t) for t in types_]


def new_writer(path: Path, name: str, vocab_size: int) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name(name)
    w.add_context_length(HPARAMS["max_position_embeddings"])
    w.add_embedding_length(HPARAMS["hidden_size"])
    w.add_block_count(HPARAMS["num_hidden_layers"])
    w.add_feed_forward_length(HPARAMS["intermediate_size"])
    w.add_head_count(HPARAMS["num_attention_heads"])
    w.add_head_count_kv(HPARAMS["num_key_value_heads"])
    w.add_rope_freq_base(HPARAMS["rope_theta"])
    w.add_layer_norm_rms_eps(HPARAMS["rms_norm_eps"])
    w.add_vocab_size(vocab_size)
    w.add_rope_dimension_count(HPARAMS["hidden_size"] // HPARAMS["num_attention_heads"])
    return w


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def write_spm(src: Path, path: Path) -> None:
    tokens, scores, types_ = spm_vocab(src)
    w = new_writer(path, "llava-wgpu tokenizer fixture (SentencePiece BPE)", len(tokens))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types_)
    gguf.SpecialVocab(src, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    finish(w)


def write_spm_flat(src: Path, path: Path) -> None:
    vocab = gguf.LlamaHfVocab(src)
    tokens, scores, types_ = zip(*vocab.all_tokens())
    w = new_writer(path, "llava-wgpu tokenizer fixture (SentencePiece BPE, tokenizer.json only)", len(tokens))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types([int(t) for t in types_])
    gguf.SpecialVocab(src, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)
    finish(w)


def write_bpe(src: Path, path: Path, pre: str) -> None:
    tokens, types_ = bpe_vocab(src)
    w = new_writer(path, f"llava-wgpu tokenizer fixture (byte-level BPE, pre {pre})", len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types_)
    gguf.SpecialVocab(src, load_merges=True).add_to_gguf(w, quiet=True)
    finish(w)


def tokenizer_kv(path: Path) -> dict:
    """Every tokenizer.* key of a GGUF file, as Python values."""
    r = gguf.GGUFReader(str(path))
    out = {}
    for name, f in r.fields.items():
        if name.startswith("tokenizer."):
            out[name] = (f.types, f.contents())
    return out


CONVERT = r"""
import sys
sys.path.insert(0, {llama!r}); sys.path.insert(0, {gguf_py!r})
pre = {pre!r}
if pre is not None:
    import conversion.base as base
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", "--vocab-only", "--outfile", {out!r}, {src!r}]
convert_hf_to_gguf.main()
"""


def check_against_converter(src: Path, mine: Path, work: Path, pre: str | None = None) -> str:
    """Run the real converter (--vocab-only) on `src` and compare every tokenizer.* key with `mine`."""
    try:
        importlib.import_module("torch")
    except ImportError:
        print(f"warning: torch missing, {mine.name} not checked against convert_hf_to_gguf.py", file=sys.stderr)
        return "skipped (no torch)"
    out = work / f"converted-{mine.name}"
    code = CONVERT.format(llama=str(ARGS.llama_cpp), gguf_py=str(ARGS.llama_cpp / "gguf-py"), pre=pre,
                          out=str(out), src=str(src))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work)
    if res.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed on {src}:\n{res.stderr[-3000:]}")
    theirs, ours = tokenizer_kv(out), tokenizer_kv(mine)
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        sys.exit(f"{mine.name}: tokenizer keys differ from convert_hf_to_gguf.py --vocab-only: {diff}")
    return "tokenizer.* keys identical to convert_hf_to_gguf.py --vocab-only" + (
        f" (pre-tokenizer hash lookup replaced by {pre!r})" if pre else "")


# ------------------------------------------------------------------------------------------ texts

VICUNA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
          "What is shown in this image? ASSISTANT:")

TEXTS = [
    # empty and whitespace
    "", " ", "  ", "   ", "    ", "     ",
    "Hello", "Hello world", " Hello", "  Hello", "   Hello world", "     Hello",
    "a  b", "a   b", "a    b", "a     b", "trailing ", "trailing   ", " both ",
    "\t", "a\tb", "\ttab", " \t x", "\n", "\n\n", "\n\n\n", " \n", "\n ", "line1\nline2", "a\n\nb",
    "\r\n", "a\r\nb", "x \n y", "end.\n",
    # digits
    "0", "42", "12345678", "3.14159", "1,000,000", "2024-01-01", "x=1+2*3", "1234567890" * 3,
    # punctuation and case
    "Hello, world! How are you?", "(a) [b] {c} <d>", "...", "!!!", "?!?", "don't", "I'm we'll THEY'RE",
    "e-mail@example.com", "a\\b\\n", "\"quoted\"", "#$%&*+/=@^_`|~",
    "it's (a) and (b)", "x.\n\ny", "Hello!!! world?!", "$100 and 50% in 2024", "WE'LL DON'T", " 100",
    "MiXeD CaSe", "ALLCAPS", "camelCaseWord",
    # non-ASCII
    "café", "naïve résumé", "Straße", "Ω", "日本語", "東京は日本の首都です", "😀", "🚀 rocket",
    "👨\u200d👩\u200d👧", "e\u0301", "a\u0308o\u0308u\u0308", "Жж", "ø", "non\u00a0breaking", "\u3000x",
    "zürich Zürich", "\u2581", "\u2581hi",
    # special tokens
    "<image>", "<image>\n", "\n<image>", " <image>", "<image> ", "a<image>b", "a <image> b",
    "<image><image>", "<image>\n<image>", "<s>", "</s>", "<s>hello</s>", "hello</s>", " </s> ",
    "<s> <s>", "<pad>", "<pad><pad>x", "<unk>", "<image", "<<image>>", "<s>\n", "x\n</s>\n",
    # LLaVA prompts
    "USER: <image>\nWhat is this? ASSISTANT:",
    VICUNA,
    # long words
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 80, "thethethethethethethethethe", "vocabularyvocabularyvocabulary", "日本" * 12,
    "Ж" * 20,
]

# (bos, parse_special) variants recorded for every file and text; parse_special=false only where
# the text holds a special token's text (elsewhere it cannot change the ids)
VARIANTS = [(True, True), (False, True), (True, False)]
SPECIAL_TEXTS = ["<image>", "<pad>", "<s>", "</s>", "<unk>"]


def variants(text: str) -> list[tuple[bool, bool]]:
    return [(b, p) for b, p in VARIANTS if p or any(t in text for t in SPECIAL_TEXTS)]

# texts whose llama.cpp ids are also detokenized, and some hand-made id sequences below
DETOK_TEXTS = ["Hello world", " Hello", "  Hello", "USER: <image>\nWhat is this? ASSISTANT:", "a  b",
               "\n", "café 日本語 😀", "Жж", "<s>hello</s>", "<pad>", "trailing "]


def llama_tokenize(path: Path, text: str, bos: bool, parse_special: bool, tmp: Path) -> list[int]:
    """ids from llama-tokenize; the text goes through a file (read verbatim, --no-escape)."""
    tmp.write_bytes(text.encode())
    cmd = [str(LLAMA_TOKENIZE), "-m", str(path), "-f", str(tmp), "--ids", "--no-escape", "--log-disable"]
    if not parse_special:      # parsing special tokens is llama-tokenize's default; it has no --parse-special
        cmd.append("--no-parse-special")
    if not bos:
        cmd.append("--no-bos")
    res = subprocess.run(cmd, capture_output=True, env={**os.environ, "LD_LIBRARY_PATH": str(ARGS.bin)})
    if res.returncode != 0:
        raise RuntimeError(f"llama-tokenize failed on {path.name} {text!r}: {res.stderr.decode()[-2000:]}")
    lines = [ln for ln in res.stdout.decode().splitlines() if ln.startswith("[")]
    assert len(lines) == 1, res.stdout
    return json.loads(lines[0])


def hf_ids(tok, text: str, bos: bool, parse_special: bool) -> list[int]:
    return tok(text, add_special_tokens=bos, split_special_tokens=not parse_special)["input_ids"]


# ------------------------------------------------------------------------------------------ llama_detokenize

class LlamaLib:
    """llama.cpp's C API through llama-cpp-python's ctypes declarations (its package __init__ is not
    run: it would need extra packages). Loads vocab-only models."""

    def __init__(self):
        os.environ["LLAMA_CPP_LIB_PATH"] = str(ARGS.bin)
        pkg = types.ModuleType("llama_cpp")
        pkg.__path__ = [str(ARGS.llama_cpp_python / "llama_cpp")]
        sys.modules["llama_cpp"] = pkg
        self.L = importlib.import_module("llama_cpp.llama_cpp")
        self._log = self.L.llama_log_callback(lambda level, text, user: None)
        self.L.llama_log_set(self._log, ctypes.c_void_p())
        self.L.llama_backend_init()
        self.models = {}

    def vocab(self, path: Path):
        if path not in self.models:
            p = self.L.llama_model_default_params()
            p.vocab_only = True
            m = self.L.llama_model_load_from_file(str(path).encode(), p)
            assert m, path
            self.models[path] = (m, self.L.llama_model_get_vocab(m))
        return self.models[path][1]

    def tokenize(self, path: Path, text: str, add_special: bool, parse_special: bool) -> list[int]:
        b = text.encode()
        buf = (self.L.llama_token * (len(b) + 8))()
        n = self.L.llama_tokenize(self.vocab(path), b, len(b), buf, len(buf), add_special, parse_special)
        assert n >= 0
        return list(buf[:n])

    def detokenize(self, path: Path, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (self.L.llama_token * max(len(ids), 1))(*ids)
        buf = ctypes.create_string_buffer(4096)
        n = self.L.llama_detokenize(self.vocab(path), arr, len(ids), buf, len(buf), remove_special, unparse_special)
        assert n >= 0
        return buf.raw[:n]


# ------------------------------------------------------------------------------------------ main

def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def dump(doc: dict, path: Path) -> None:
    """JSON with one case per line (compact, diffable)."""
    parts = ["{"]
    keys = list(doc)
    for k in keys:
        v = doc[k]
        end = "," if k != keys[-1] else ""
        if isinstance(v, list):
            rows = [json.dumps(x, ensure_ascii=False, separators=(",", ":")) for x in v]
            parts.append(f"  {json.dumps(k)}: [\n    " + ",\n    ".join(rows) + f"\n  ]{end}")
        else:
            body = json.dumps(v, ensure_ascii=False, indent=2).replace("\n", "\n  ")
            parts.append(f"  {json.dumps(k)}: {body}{end}")
    parts.append("}")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def main() -> None:
    assert LLAMA_TOKENIZE.is_file(), LLAMA_TOKENIZE
    version_line = subprocess.run([str(LLAMA_TOKENIZE), "--version"], capture_output=True, text=True,
                                  env={**os.environ, "LD_LIBRARY_PATH": str(ARGS.bin)})
    version_line = (version_line.stdout + version_line.stderr).strip().splitlines()[0]
    assert LLAMA_CPP_COMMIT[:7] in version_line, version_line
    OUT.mkdir(parents=True, exist_ok=True)

    lines = corpus()
    with tempfile.TemporaryDirectory() as tmpdir:
        work = Path(tmpdir)
        model = train_spm(lines)
        assert model == train_spm(lines), "SentencePiece training is not deterministic"
        spm_src, flat_src = make_spm_sources(model, work)
        bpe_src = make_bpe_source(lines, work)

        files = {
            "spm.gguf": (lambda p: write_spm(spm_src, p), spm_src, None),
            "spm_flat.gguf": (lambda p: write_spm_flat(flat_src, p), flat_src, None),
            "bpe.gguf": (lambda p: write_bpe(bpe_src, p, "llama-bpe"), bpe_src, "llama-bpe"),
            "bpe_default.gguf": (lambda p: write_bpe(bpe_src, p, "default"), bpe_src, "default"),
        }
        checks = {}
        for name, (write, src, pre) in files.items():
            path = OUT / name
            if path.exists():
                path.unlink()
            write(path)
            checks[name] = check_against_converter(src, path, work, pre)

        hf = AutoTokenizer.from_pretrained(str(OUT / "spm_hf"))
        assert hf.legacy and str(hf._tokenizer.pre_tokenizer).find("prepend_scheme=always") >= 0

        lib = None
        if (ARGS.llama_cpp_python / "llama_cpp" / "llama_cpp.py").is_file():
            lib = LlamaLib()

        cases, disagreements = [], []
        tmp = work / "prompt.txt"
        for name in files:
            path = OUT / name
            for text in TEXTS:
                for bos, ps in variants(text):
                    ids = llama_tokenize(path, text, bos, ps, tmp)
                    if lib is not None:   # the library call llama-tokenize makes, as a cross-check
                        assert ids == lib.tokenize(path, text, bos, ps), (name, text, bos, ps)
                    case = {"file": name, "text": text, "bos": bos, "parse_special": ps, "llama_cpp_ids": ids,
                            "hf_legacy_ids": None}
                    if name.startswith("spm"):
                        case["hf_legacy_ids"] = hf_ids(hf, text, bos, ps)
                        if case["hf_legacy_ids"] != ids:
                            disagreements.append(case)
                    cases.append(case)

        detok = []
        if lib is not None:
            for name in files:
                path = OUT / name
                seqs = [("tokenize " + json.dumps(t, ensure_ascii=False),
                         llama_tokenize(path, t, True, True, tmp)) for t in DETOK_TEXTS]
                seqs.append(("tokenize \" Hello world\" without BOS", llama_tokenize(path, " Hello world", False, True, tmp)))
                seqs.append(("tokenize \"Hello world\" without BOS", llama_tokenize(path, "Hello world", False, True, tmp)))
                kv = tokenizer_kv(path)
                toks = kv["tokenizer.ggml.tokens"][1]
                ttypes = kv["tokenizer.ggml.token_type"][1]
                first = {t: ttypes.index(t) for t in sorted(set(ttypes))}
                seqs.append(("one token of each type, by first id: " + json.dumps(first), list(first.values())))
                if name.startswith("spm"):
                    c3 = toks.index("<0xC3>")
                    seqs.append(("a lone <0xC3> (invalid UTF-8)", [c3]))
                    seqs.append(("<0xC3> <0xA9> (é from bytes)", [c3, toks.index("<0xA9>")]))
                    seqs.append(("BOS BOS then tokens", [1, 1] + llama_tokenize(path, "Hi", False, True, tmp)))
                    seqs.append(("text, then BOS", llama_tokenize(path, "Hi", False, True, tmp) + [1]))
                for what, ids in seqs:
                    for rs in (False, True):
                        for us in (False, True):
                            raw = lib.detokenize(path, ids, rs, us)
                            entry = {"file": name, "what": what, "ids": ids, "remove_special": rs,
                                     "unparse_special": us}
                            try:
                                entry["text"] = raw.decode("utf-8")
                            except UnicodeDecodeError:
                                entry["text"] = None
                                entry["bytes_hex"] = raw.hex()
                            detok.append(entry)

    pyproject = (ARGS.llama_cpp / "gguf-py" / "pyproject.toml").read_text()
    gguf_py = next(ln.split('"')[1] for ln in pyproject.splitlines() if ln.startswith("version"))
    versions = {
        "llama.cpp": LLAMA_CPP_COMMIT,
        "llama-tokenize --version": version_line,
        "gguf-py": gguf_py + " (llama.cpp's gguf-py at that commit, not the pip package)",
        "sentencepiece": version("sentencepiece"),
        "protobuf": version("protobuf"),
        "tokenizers": version("tokenizers"),
        "transformers": version("transformers"),
        "llama-cpp-python (ctypes declarations, detokenize only)": ARGS.llama_cpp_python.name if lib else None,
        "python": sys.version.split()[0],
    }
    file_info = {}
    for name in files:
        p = OUT / name
        kv = tokenizer_kv(p)
        file_info[name] = {"bytes": p.stat().st_size, "sha256": sha256(p), "n_tokens": len(kv["tokenizer.ggml.tokens"][1]),
                           "pre": kv["tokenizer.ggml.pre"][1], "model": kv["tokenizer.ggml.model"][1],
                           "converter_check": checks[name]}
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        p = OUT / "spm_hf" / f
        file_info["spm_hf/" + f] = {"bytes": p.stat().st_size, "sha256": sha256(p)}

    doc = {
        "about": "Generated by scripts/tokenizer_fixtures.py (see its docstring). llama_cpp_ids: "
                 "llama-tokenize -m FILE -f TEXTFILE --ids --no-escape --log-disable [--no-bos] "
                 "[--no-parse-special]; bos=false passes --no-bos, which makes "
                 "add_special false (no EOS either). hf_legacy_ids: spm_hf loaded with AutoTokenizer "
                 "(legacy=True), tok(text, add_special_tokens=bos, split_special_tokens=not "
                 "parse_special); null for the BPE files. detokenize: llama_detokenize(vocab, ids, "
                 "remove_special, unparse_special) from libllama at the same commit; where the bytes are "
                 "not valid UTF-8, text is null and bytes_hex holds them. parse_special=false is "
                 "recorded only for texts that contain a special token's text.",
        "versions": versions,
        "files": file_info,
        "hf_disagreements": len(disagreements),
        "cases": cases,
        "detokenize": detok,
    }
    dump(doc, OUT / "cases.json")

    print(json.dumps(file_info, indent=1))
    print(f"{len(cases)} cases, {len(detok)} detokenizations; HF legacy disagrees with llama.cpp on {len(disagreements)}:")
    for c in disagreements:
        print(f"  {c['file']:14} bos={c['bos']:d} ps={c['parse_special']:d} {c['text']!r:50.50} "
              f"llama.cpp {c['llama_cpp_ids']}  hf {c['hf_legacy_ids']}")


if __name__ == "__main__":
    main()
