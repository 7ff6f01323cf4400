"""The tokenizer inside a GGUF file, from the model's tokenizer.json: byte-level BPE (GPT-2 style, the
tokenizers of the models this project builds and of Qwen, OLMoE, DeepSeek, GPT-OSS), as llama.cpp's "gpt2"
tokenizer model.

llama.cpp does not run tokenizer.json's pre-tokenizer: it picks a built-in regex set by the name in
`tokenizer.ggml.pre`. `pre_tokenizer_name` maps the pre-tokenizers we can recognise exactly to that name (facts of
llama.cpp's src/llama-vocab.cpp) and refuses the others rather than writing a file that tokenizes differently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .source import ExportError

# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# tokenizer.json Split patterns -> llama.cpp pre-tokenizer names that run the same regex
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
# o200k (GPT-4o's, and GPT-OSS's): as llama.cpp's src/llama-vocab.cpp quotes it from tokenizer.json
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PATTERNS = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", GPT4O_REGEX: "gpt-4o"}


@dataclass
class Vocab:
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    chat_template: str | None


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or an ExportError naming what it is."""
    def is_gpt2_bytelevel(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if pre and is_gpt2_bytelevel(pre):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and is_gpt2_bytelevel(steps[1]):
        return "smollm"  # each digit alone, then GPT-2's regex
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex", True):
        name = SPLIT_PATTERNS.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise ExportError(f"export --format gguf: the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one this "
                      "exporter maps to a llama.cpp pre-tokenizer (it knows GPT-2's byte-level regex, SmolLM's digits "
                      "+ GPT-2, Llama 3's, Qwen 2's and GPT-4o's (o200k) split regexes); llama.cpp would tokenize "
                      "text differently")


def read_vocab(tokenizer: dict, directory: Path, n_vocab: int) -> Vocab:
    """The vocabulary of tokenizer.json padded to the model's embedding rows (`n_vocab`), with the special tokens
    of tokenizer_config.json."""
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"export --format gguf: the tokenizer is {model.get('type')}"
                          f"{' with byte fallback' if model.get('byte_fallback') else ''}; this exporter writes "
                          "byte-level BPE tokenizers (GPT-2 style) only")
    pre = pre_tokenizer_name(tokenizer.get("pre_tokenizer"))
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tokenizer.get("added_tokens", [])}
    size = max([n_vocab, *(i + 1 for i in by_id), *(i + 1 for i in added)])
    if size > n_vocab:
        raise ExportError(f"export --format gguf: the tokenizer has ids up to {size - 1}, but the model embeds "
                          f"{n_vocab} tokens")
    tokens, types = [], []
    for i in range(size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(NORMAL)
        else:  # embedding rows past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}

    def special(name: str) -> int | None:
        tok = cfg.get(name)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return ids.get(tok) if tok is not None else None

    return Vocab(pre, tokens, types, merges, special("bos_token"), special("eos_token"), special("unk_token"),
                 special("pad_token"), _adds_bos(tokenizer, special("bos_token")), cfg.get("chat_template"))


def _adds_bos(tokenizer: dict, bos: int | None) -> bool:
    """Does the tokenizer put BOS in front of a single text? (its post-processor's template names it)"""
    post = tokenizer.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in steps:
        for item in p.get("single", []) if p.get("type") == "TemplateProcessing" else []:
            sp = item.get("SpecialToken")
            if sp is not None:
                return bos is not None and (p.get("special_tokens", {}).get(sp["id"], {}).get("ids") or [None])[0] == bos
    return False


def write_vocab(w, v: Vocab) -> None:
    """`w`: a gguf.GGUFWriter."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    for value, add in ((v.bos, w.add_bos_token_id), (v.eos, w.add_eos_token_id), (v.unk, w.add_unk_token_id),
                       (v.pad, w.add_pad_token_id)):
        if value is not None:
            add(value)
    w.add_add_bos_token(v.add_bos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)
