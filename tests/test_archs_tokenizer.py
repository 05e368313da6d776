"""SentencePiece GGUF vocabularies (tokenizer.ggml.model "llama": scores, <0xNN> byte fallback) against a small
re-implementation of llama.cpp's SPM rule, and chat templates of Qwen and Gemma style."""
from __future__ import annotations

import numpy as np
import pytest

from powerlow.tokenizer import Tokenizer, tokenizer_json_from_gguf

SP = "\u2581"
CHARS = [SP, "a", "b", "c", "d", "e", "h", "l", "o", "r", "w"]
PIECES = [SP + "a", "ab", "abc", "bc", "cd", "he", "hel", "hell", "hello", SP + "hello", "lo", "wo", "wor", SP + "w",
          "aa", "aaa", "ll", "el", "or", "ld", SP + "wor", "bca", "ca", "ra"]
SPECIAL = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]


def _vocab(seed=0):
    rng = np.random.default_rng(seed)
    tokens = SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + CHARS + PIECES
    types = [2, 3, 3, 3, 3] + [6] * 256 + [1] * (len(CHARS) + len(PIECES))
    scores = [0.0] * (len(SPECIAL) + 256) + list(-rng.permutation(len(CHARS) + len(PIECES)).astype(float) - 1.0)
    return tokens, scores, types


def spm_reference(text: str, tokens, scores, types, prefix: bool) -> list[int]:
    """llama.cpp's SPM: merge the adjacent pair making the highest-score token, leftmost on ties; leftovers that
    are not tokens become their UTF-8 bytes."""
    vocab = {t: i for i, t in enumerate(tokens)}
    syms = list((" " + text if prefix else text).replace(" ", SP))
    while True:
        best = None
        for i in range(len(syms) - 1):
            j = vocab.get(syms[i] + syms[i + 1])
            if j is not None and types[j] == 1 and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        syms[i: i + 2] = [syms[i] + syms[i + 1]]
    out = []
    for s in syms:
        out += [vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode()]
    return out


def _gguf(path, tokens, scores, types, prefix):
    import gguf
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return gguf.GGUFReader(str(path))


@pytest.mark.parametrize("prefix", [True, False])
def test_spm_vocab_matches_llamacpp_rule(tmp_path, prefix):
    tokens, scores, types = _vocab()
    tok = Tokenizer(tokenizer_json_from_gguf(_gguf(tmp_path / "v.gguf", tokens, scores, types, prefix), tmp_path),
                    bos_id=1)
    rng = np.random.default_rng(1)
    alphabet = list("abcdehlorw") * 3 + [" ", " ", "z", "\u00e9", "\n"]
    texts = ["hello world", "abcabc", "aaaa", "aaa", " hello", "bcabca", "z\u00e9 abc"]
    texts += ["".join(rng.choice(alphabet, rng.integers(1, 25))) for _ in range(300)]
    for t in texts:
        assert tok.encode(t, add_special=False) == spm_reference(t, tokens, scores, types, prefix), t
        assert tok.decode(tok.encode(t, add_special=False)) == t
    assert tok.encode("hello")[0] == 1                              # add_bos_token
    # a control token written in the text is its id; the text after it gets the space prefix again
    ids = tok.encode("<start_of_turn>hello abc", add_special=False)
    assert ids == [3] + spm_reference("hello abc", tokens, scores, types, prefix)


def test_spm_ties_go_leftmost(tmp_path):
    """Equal scores of one token: the leftmost pair merges first ('aaa' -> 'aa' + 'a')."""
    tokens, scores, types = _vocab()
    aa, a = tokens.index("aa"), tokens.index("a")
    types = list(types)
    types[tokens.index("aaa")] = 5              # unused: 'aaa' never forms
    tok = Tokenizer(tokenizer_json_from_gguf(_gguf(tmp_path / "w.gguf", tokens, scores, types, False), tmp_path))
    assert tok.encode("aaa", add_special=False) == [aa, a] == spm_reference("aaa", tokens, scores, types, False)
    assert tok.encode("aaaaa", add_special=False) == [aa, aa, a]


GEMMA_STYLE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set rest = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set rest = messages -%}{%- endif -%}"
    "{%- for m in rest -%}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}")


def test_gemma_style_chat_template_renders(tmp_path):
    tokens, scores, types = _vocab()
    tok = Tokenizer(tokenizer_json_from_gguf(_gguf(tmp_path / "v.gguf", tokens, scores, types, False), tmp_path),
                    chat_template=GEMMA_STYLE, bos_id=1, eos_ids=(2,))
    out = tok.apply_chat("hello", system="be brief")
    assert out == "<s><start_of_turn>user\nbe brief\n\nhello<end_of_turn>\n<start_of_turn>model\n"
    assert tok.encode(out, add_special=False)[:2] == [1, 3]
    assert tok.stop_ids() == {2, 4}                                     # eos and <end_of_turn>


def test_qwen_chat_template_from_the_real_gguf(qwen_gguf):
    p = qwen_gguf
    import gguf
    r = gguf.GGUFReader(str(p))
    tok = Tokenizer(tokenizer_json_from_gguf(r, p), chat_template=r.fields["tokenizer.chat_template"].contents(),
                    bos_id=151643, eos_ids=(151645,))
    out = tok.apply_chat("hi")
    assert out.startswith("<|im_start|>system\nYou are Qwen") and out.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert 151644 in tok.encode(out)                                   # <|im_start|> is one token
