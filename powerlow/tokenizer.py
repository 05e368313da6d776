"""Tokenizer: HF `tokenizers` BPE, built from GGUF metadata or read from tokenizer.json; chat templates."""
from __future__ import annotations

from pathlib import Path

from .errors import PowerlowError

# llama.cpp's pre-tokenizer names -> how the text is split before BPE
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# qwen2: the same but one digit per piece (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2), so "12345" is five tokens
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_PRE_TYPES = ("default", "gpt2", "gpt-2", "smollm", "llama-bpe", "llama3", "qwen2")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in ("default", "gpt2", "gpt-2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "qwen2"):
        split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        return pt.Sequence([pt.Split(Regex(split), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise PowerlowError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(_PRE_TYPES)}); "
                        "convert from the Hugging Face folder, whose tokenizer.json is used as is")


def tokenizer_json_from_gguf(reader, path: Path) -> str:
    """Build a HF tokenizer.json equivalent to the GGUF's vocabulary: byte-level BPE (tokenizer.ggml.model
    "gpt2") or SentencePiece with scores and byte fallback ("llama": Llama 1/2, Mistral, Gemma)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, processors

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    model = field("tokenizer.ggml.model")
    if model == "llama":
        return _spm_tokenizer_json(field, path)
    if model != "gpt2":
        raise PowerlowError(f"{path}: GGUF tokenizer model {model!r} is not supported (powerlow builds byte-level BPE, "
                            "'gpt2', and SentencePiece, 'llama'); convert from the Hugging Face folder instead")
    tokens = field("tokenizer.ggml.tokens")
    merges = field("tokenizer.ggml.merges") or []
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens:
        raise PowerlowError(f"{path}: GGUF has no tokenizer.ggml.tokens; cannot build the tokenizer")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens are matched whole in the text, as llama.cpp does with special parsing
    added = [AddedToken(tokens[i], special=(types[i] == 3), normalized=False)
             for i in range(len(tokens)) if types[i] in (3, 4)]
    tok.add_tokens(added)
    bos = field("tokenizer.ggml.bos_token_id")
    if field("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], int(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges that make BPE reproduce llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm).

    llama.cpp starts from the UTF-8 characters and repeatedly merges the adjacent pair whose concatenation is
    a token of the highest score, the leftmost pair on ties. Hugging Face's BPE merges the pair of lowest rank,
    leftmost on ties: so every split of a normal token into two tokens is a merge, ranked by the token's score
    (highest first). Exact whenever distinct tokens have distinct scores (as in Llama/Gemma vocabularies);
    two different tokens of one score are ranked by id here, where llama.cpp would take the leftmost."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, t in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED) or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            ia, ib = vocab.get(a), vocab.get(b)
            if ia is not None and ib is not None and types[ia] in (NORMAL, USER_DEFINED) and types[ib] in (NORMAL, USER_DEFINED):
                merges.append((-float(scores[i]), i, k, a, b))
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def _spm_tokenizer_json(field, path: Path) -> str:
    """SentencePiece vocabulary (tokens, scores, types with <0xNN> byte tokens) as HF BPE with byte fallback;
    spaces become "▁", with a leading one when tokenizer.ggml.add_space_prefix (default true; Gemma: false)
    as llama.cpp adds it before each piece of text that starts the input or follows a special token."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, processors

    tokens = field("tokenizer.ggml.tokens")
    if not tokens:
        raise PowerlowError(f"{path}: GGUF has no tokenizer.ggml.tokens; cannot build the tokenizer")
    scores = field("tokenizer.ggml.scores")
    types = field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if scores is None or len(scores) != len(tokens) or len(types) != len(tokens):
        raise PowerlowError(f"{path}: SentencePiece vocabulary needs one score and one type per token "
                            f"({len(tokens)} tokens, {0 if scores is None else len(scores)} scores, {len(types)} types)")
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = field("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    prefix = bool(field("tokenizer.ggml.add_space_prefix", True))
    norm = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence(norm + [normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.add_tokens([AddedToken(tokens[i], special=(types[i] == CONTROL), normalized=False)
                    for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)])
    _post_processor(tok, field, tokens, processors, default_bos=True)
    return tok.to_str()


def _post_processor(tok, field, tokens, processors, *, default_bos: bool) -> None:
    bos = field("tokenizer.ggml.bos_token_id")
    if field("tokenizer.ggml.add_bos_token", default_bos) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], int(bos))])


class Tokenizer:
    """Text <-> token ids, plus the model's chat template."""

    def __init__(self, tokenizer_json: str, *, chat_template: str | None = None,
                 bos_id: int | None = None, eos_ids: tuple[int, ...] = ()):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:      # tokenizers raises a bare Exception on bad JSON
            raise PowerlowError(f"the tokenizer (tokenizer.json) is not a valid tokenizer ({e}); re-convert the model") from None
        self.chat_template = chat_template
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: Path, **kw) -> "Tokenizer":
        return cls(Path(path).read_text(), **kw)

    @classmethod
    def of_model(cls, model_dir: Path, manifest: dict, cfg) -> "Tokenizer":
        """A model dir's tokenizer with its chat template and special ids (cfg: its arch.ModelConfig)."""
        return cls.from_file(Path(model_dir) / "tokenizer.json", chat_template=manifest.get("chat_template"),
                             bos_id=cfg.bos_id, eos_ids=cfg.eos_ids)

    def encode(self, text: str, *, add_special: bool = True) -> list[int]:
        """Token ids; special tokens written in the text (e.g. ``<|im_start|>``) map to their ids."""
        return self._tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_str(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def vocab_fingerprint(self) -> int:
        """A hash of the id -> token-string map (two models can share token ids only if it is equal)."""
        import hashlib
        v = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        return int.from_bytes(hashlib.blake2b("\x00".join(t for t, _ in v).encode("utf-8", "surrogatepass"),
                                              digest_size=8).digest(), "little")

    def stop_ids(self) -> set[int]:
        """Ids that end generation: the model's EOS ids plus the chat end-of-turn token if it has one."""
        out = set(self.eos_ids)
        for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            i = self._tok.token_to_id(t)
            if i is not None:
                out.add(i)
        return out

    def apply_chat(self, prompt: str, *, system: str | None = None) -> str:
        """Format one user turn with the model's chat template, ready for the assistant's answer."""
        if not self.chat_template:
            raise PowerlowError("this model has no chat template; run without --chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise PowerlowError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        bos = self.token_str(self.bos_id) if self.bos_id is not None else ""
        eos = self.token_str(self.eos_ids[0]) if self.eos_ids else ""
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True,
                                                          bos_token=bos or "", eos_token=eos or "")


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences.

    O(1) per token: each push decodes only a short window (the last ``CONTEXT`` emitted ids, which give the
    decoder its context, e.g. a leading space, plus the ids not emitted yet) and emits what the window adds to its
    context's text; nothing grows with the length of the output."""
    CONTEXT = 4            # emitted ids kept as context for the next piece
    MAX_PENDING = 16       # ids held back at most (a real UTF-8 sequence spans at most 4 byte tokens)

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.context: list[int] = []
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(int(token_id))
        window = self.context + self.pending
        text = self.tok.decode(window)
        if text.endswith("\ufffd") and len(self.pending) < self.MAX_PENDING:
            return ""          # an incomplete UTF-8 sequence: wait for the ids that complete it
        piece = text[len(self.tok.decode(self.context)) if self.context else 0:]
        self.context = window[-self.CONTEXT:]
        self.pending = []
        return piece
