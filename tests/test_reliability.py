"""Rows of "nothing lost, nothing silent": read errors while loading, a dict config, the context advice, and the
incremental detokenizer (O(1) per token, the same text as the plain decode)."""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

import powerlow
from powerlow.convert import convert
from powerlow.errors import PowerlowError
from conftest import TINY, run_cli


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    from synthetic import make_hf_model
    return make_hf_model(tmp_path_factory.mktemp("rel") / "hf", act="silu", seed=3, **TINY)


@pytest.fixture()
def model_dir(tiny_src, tmp_path):
    return convert(tiny_src, tmp_path / "m", bits="8", progress=False)


def test_eio_while_reading_weights_names_the_file(model_dir, monkeypatch):
    def eio(*a, **k):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr("powerlow.stream.os.preadv", eio)
    with pytest.raises(PowerlowError, match=r"resident\.safetensors: read error \(Input/output error\)"):
        powerlow.load(model_dir)


def test_directory_where_a_file_should_be_is_exit_2(model_dir):
    """resident.safetensors replaced by a directory (the manifest's size made to agree): one message naming the
    file, exit 2, no traceback."""
    p = model_dir / "resident.safetensors"
    p.unlink()
    p.mkdir()
    mp = model_dir / "manifest.json"
    m = json.loads(mp.read_text())
    m["files"]["resident.safetensors"]["size"] = p.stat().st_size
    mp.write_text(json.dumps(m))
    with pytest.raises(PowerlowError, match="resident.safetensors"):
        powerlow.load(model_dir)
    r = run_cli("run", "-m", model_dir, "-p", "hi", "-n", "2")
    assert r.returncode == 2 and "resident.safetensors" in r.stderr and "Traceback" not in r.stderr, r.stderr[-600:]


def test_load_with_a_dict_config(model_dir):
    with powerlow.load(model_dir, {"budget": "8MiB", "threads": 1}) as m:
        assert m.tf.runtime.budget_bytes == 8 << 20 and m.tf.runtime.n_threads == 1
    with pytest.raises(PowerlowError, match="unknown key 'budget_bytes'; did you mean 'budget'"):
        powerlow.load(model_dir, {"budget_bytes": 1 << 20})
    for bad in ("512MiB", 3, ["budget"]):
        with pytest.raises(PowerlowError, match=f"config must be a RuntimeConfig.*got {type(bad).__name__}"):
            powerlow.load(model_dir, bad)


def test_prompt_past_the_models_context_says_so_first(model_dir):
    """With --budget, a prompt + -n past the model's own context (TINY: 128 positions) is said first and only:
    no "raise --budget", no "set max_context" (which the model's context would refuse)."""
    long_prompt = "a b c d " * 100
    for extra in (["--budget", "8MiB"], ["--budget", "5.6MiB"], []):
        r = run_cli("run", "-m", model_dir, "-p", long_prompt, "-n", "4", *extra)
        assert r.returncode == 2 and "exceeds the context of 128 tokens" in r.stderr, r.stderr
        assert "max_context" not in r.stderr and "raise --budget" not in r.stderr, r.stderr
    with powerlow.load(model_dir, {"budget": "8MiB", "max_context": 64}) as m:
        with pytest.raises(PowerlowError) as e:
            list(m.generate(long_prompt, 4))
        assert "context of 64" in str(e.value) and "max_context" not in str(e.value)


TEXT = ("Der Leuchtturmwärter sah den Sturm kommen — «ça va mal», dit-il. 灯台守は嵐を見た。 Ünïcödé ✓ 🌊🌩️ "
        "and plain ASCII words, numbers 12345, tabs\tand\nnewlines. ")


def test_stream_decoder_matches_plain_decode_on_long_text(model_dir):
    from powerlow.tokenizer import StreamDecoder
    with powerlow.load(model_dir) as m:
        tok = m.tokenizer
        ids = tok.encode(TEXT * 60, add_special=False)
        assert len(ids) > 3000
        dec = StreamDecoder(tok)
        pieces = [dec.push(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids)
        assert any(p == "" for p in pieces)            # multi-byte characters were held back mid-sequence
        rng = np.random.default_rng(0)
        for _ in range(20):                            # random ids (invalid UTF-8 too): no exception, and once the
            r = [int(i) for i in rng.integers(0, m.config.vocab_size, 200)]    # text ends cleanly, the same text
            dec = StreamDecoder(tok)
            out = "".join(dec.push(i) for i in r + tok.encode(" end", add_special=False))
            assert out == tok.decode(r + tok.encode(" end", add_special=False))


def test_stream_decoder_is_constant_work_per_token(model_dir, monkeypatch):
    """Each push decodes a window of a few ids, however long the output (it re-decoded all of it: O(n^2))."""
    from powerlow.tokenizer import StreamDecoder
    with powerlow.load(model_dir) as m:
        tok = m.tokenizer
        ids = tok.encode(TEXT * 40, add_special=False)
        sizes = []
        real = tok.decode
        monkeypatch.setattr(tok, "decode", lambda x: sizes.append(len(x)) or real(x))
        dec = StreamDecoder(tok)
        for i in ids:
            dec.push(i)
        assert max(sizes) <= StreamDecoder.CONTEXT + StreamDecoder.MAX_PENDING


def test_budget_kv_cache_is_allocated_once(tmp_path):
    """Under a budget the KV cache is its planned size at the first token and never re-allocated: doubling kept the
    outgrown caches in RSS (malloc's raised mmap threshold puts the next ones on a heap that does not shrink)."""
    from conftest import make_converted
    _, d = make_converted(tmp_path, act="silu", seed=3, **dict(TINY, max_positions=1024))
    with powerlow.load(d, {"budget": "8MiB", "max_context": 1000}) as m:
        list(m.generate([5, 17, 33], 2))
        first = [id(a) for a in m.tf.kv.k]
        assert m.tf.kv.cap == m.tf.kv.limit == m.tf.plan.context == 1000
        list(m.generate([5, 17, 33] * 100, 30))
        assert [id(a) for a in m.tf.kv.k] == first


def test_ignore_eos_runs_to_max_tokens(smol):
    """A chat answer ends with an end token well before -n; ignore_eos (run --ignore-eos) goes on to exactly -n,
    with the same tokens up to the end token."""
    short = [t.id for t in smol.generate("What is 2+2?", 64, chat=True)]
    assert len(short) < 64
    full = [t.id for t in smol.generate("What is 2+2?", 64, chat=True, ignore_eos=True)]
    assert len(full) == 64 and full[: len(short)] == short
    assert full[len(short)] in smol.tokenizer.stop_ids()


def test_import_runtime_imports_what_a_run_imports(smol_dir):
    """scripts/soak.py's baseline is RSS after powerlow.util.import_runtime: a load + generate (chat, sampling,
    speculative, under a budget) must import no extension module or top-level library it did not, or the
    soak would count library code as model memory."""
    d = smol_dir
    code = f"""
import sys
from powerlow.util import import_runtime
import_runtime()
before = set(sys.modules)
import powerlow
with powerlow.load({str(d)!r}, {{"budget": "90MiB"}}) as m:
    list(m.generate("Once upon a time", 8, temperature=0.8, seed=1))
    list(m.generate("hi", 4, chat=True))
new = sorted(n for n in set(sys.modules) - before
             if "." not in n or getattr(sys.modules[n], "__file__", "") and not str(sys.modules[n].__file__).endswith(".py"))
print(new)
"""
    import subprocess, sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("after", [0, 3, 12])
def test_eio_in_a_reader_thread_while_decoding(model_dir, monkeypatch, after):
    """A disk error in an I/O thread in the middle of an offloaded run (bundle reads, read-ahead, the dense
    stream window): the run stops with one PowerlowError naming ffn.bin and the read, never a hang, a dead
    thread's traceback or wrong tokens. `after`: reads by I/O threads that succeed before the disk fails."""
    from powerlow.plan import minimum_budget
    from powerlow.manifest import load_manifest
    budget = minimum_budget(model_dir, load_manifest(model_dir), powerlow.RuntimeConfig(max_context=64))
    with powerlow.load(model_dir, {"budget": budget, "max_context": 64}) as m:
        list(m.generate([5, 17, 33], 2))           # loaded and decoding
        m.tf.ffn_source.core.inject_failure(after, errno.EIO)     # the reader threads' preadv fails from now on
        with pytest.raises(PowerlowError, match=r"ffn\.bin.*(read|failed).*Input/output error"):
            list(m.generate([5, 17, 33, 40], 20))
