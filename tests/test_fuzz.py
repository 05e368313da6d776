"""Seeded fuzzing of what a model dir or a GGUF holds: manifest.json fields, the resident.safetensors header, a tiny
GGUF's metadata and bytes. Every mutated input must give a clean PowerlowError (at load, convert or the first
forward) or the unmutated model's logits bit for bit; never a crash, a hang or another exception type.

The loads run in a few worker subprocesses (tests/fuzz_worker.py) in batches: a segfault or a hang ends the worker,
and the case it was on is reported as the failure."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY

WORKER = Path(__file__).resolve().parent / "fuzz_worker.py"
IDS = [5, 17, 33, 2, 250, 99]
JUNK = [None, "x", "", -1, 0, 1, 2**31, 2**40, 2**63, -2**63, 1.5, float("nan"), True, [], {}, [1, 2, 3],
        {"a": [1, {"b": None}]}, [[0] * 3] * 2, "64", -4096, 7]


def _rng(seed):
    return np.random.default_rng(seed)


# ---- mutations ------------------------------------------------------------------------------------------------

def _paths(obj, prefix=()):
    """Every (path) into a JSON tree, containers included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list) and len(obj) <= 64:
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def mutate_json(obj, rng):
    """A copy of obj with one random edit: a key deleted, a value replaced by junk, a list shortened or grown."""
    obj = copy.deepcopy(obj)
    paths = [p for p in _paths(obj) if p]
    path = paths[int(rng.integers(len(paths)))]
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key, cur = path[-1], parent[path[-1]]
    op = int(rng.integers(5))
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(cur, list) and cur:
        parent[key] = cur[: int(rng.integers(len(cur)))]
    elif op == 2 and isinstance(cur, list):
        parent[key] = cur + [copy.deepcopy(cur[-1]) if cur else 1]
    elif op == 3 and isinstance(cur, int) and not isinstance(cur, bool):
        parent[key] = cur + int(rng.choice([-1, 1, 64, -64, 4096, cur, -cur - 1]))
    else:
        parent[key] = copy.deepcopy(JUNK[int(rng.integers(len(JUNK)))])
    return obj, "/".join(map(str, path))


def read_st(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def mutate_st_header(header: dict, data: bytes, rng) -> tuple[bytes, str]:
    """resident.safetensors bytes with one edit of its header (offsets, dtype, shape, the length field)."""
    h = copy.deepcopy(header)
    names = sorted(k for k in h if k != "__metadata__")
    name = names[int(rng.integers(len(names)))]
    t = h[name]
    op = int(rng.integers(9))
    size = len(data)
    if op == 0:
        t["data_offsets"] = [int(rng.integers(0, size)), int(rng.choice([size + 1, 2**40, 2**63 - 1, 0]))]
    elif op == 1:
        a, b = t["data_offsets"]
        t["data_offsets"] = [b, a] if a != b else [a + 1, b]
    elif op == 2:
        t["data_offsets"] = [int(rng.choice([-8, -1])), t["data_offsets"][1]]
    elif op == 3:
        t["dtype"] = str(rng.choice(["F16", "I8", "BF16", "F64", "Q4", "", "I64"]))
    elif op == 4:
        t["shape"] = [[2**40], [2**62, 2**62], [], [-1], [0], ["a"], [1.5], [2, 3, 4, 5, 6], None][int(rng.integers(9))]
    elif op == 5:
        t.pop(str(rng.choice(["dtype", "shape", "data_offsets"])))
    elif op == 6:
        h[name] = JUNK[int(rng.integers(len(JUNK)))]
    else:
        body = json.dumps(h).encode()
        n = [0, 1, len(body) - 1, len(body) + 8, 2**40, 2**64 - 1][int(rng.integers(6))]
        return struct.pack("<Q", n) + body + data, f"{name}: header length {n}"
    body = json.dumps(h).encode()
    return struct.pack("<Q", len(body)) + body + data, f"{name}: {json.dumps(t)[:120]}"


def _file_entry(p: Path) -> dict:
    return {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def _copy_model(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        os.link(f, dst / f.name)            # hard links: only the file a case rewrites is a new copy


def _rewrite(p: Path, data: bytes) -> None:
    p.unlink()
    p.write_bytes(data)


# ---- the harness --------------------------------------------------------------------------------------------

def run_cases(cases: list[dict], ref: Path, workers: int = 2, timeout: float = 240) -> dict:
    """{case id: result dict}; a case whose worker died or hung gets result "crash"."""
    chunks = [cases[i::workers] for i in range(workers)]

    def run_chunk(chunk):
        out, todo = {}, list(chunk)
        while todo:
            inp = "".join(json.dumps(c) + "\n" for c in todo)
            try:
                r = subprocess.run([sys.executable, str(WORKER), str(ref), json.dumps(IDS)], input=inp, text=True,
                                   capture_output=True, timeout=timeout, cwd=WORKER.parent)
                lines, tail = r.stdout.splitlines(), f"rc {r.returncode}: {r.stderr[-400:]}"
            except subprocess.TimeoutExpired as e:
                lines, tail = (e.stdout or b"").decode().splitlines() if isinstance(e.stdout, bytes) else \
                    (e.stdout or "").splitlines(), "hung"
            for line in lines:
                d = json.loads(line)
                out[d["id"]] = d
            todo = [c for c in todo if c["id"] not in out]
            if todo:                       # the first case without a result killed (or hung) the worker
                out[todo[0]["id"]] = {"id": todo[0]["id"], "result": "crash", "msg": tail}
                todo = todo[1:]
        return out

    res = {}
    with ThreadPoolExecutor(workers) as ex:
        for part in ex.map(run_chunk, chunks):
            res.update(part)
    return res


def _check(cases, res, allow_diff=()):
    bad = []
    for c in cases:
        r = res[c["id"]]
        if r["result"] == "error" or r["result"] == "same" or (r["result"] == "diff" and c["id"] in allow_diff):
            continue
        bad.append(f"{c['id']} [{c['what']}] -> {r['result']}: {r.get('msg', '')}")
    assert not bad, f"{len(bad)} of {len(cases)} fuzzed inputs misbehaved:\n" + "\n".join(bad[:30])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny model dir and its logits for IDS (computed in a worker, as the cases are)."""
    from powerlow.convert import convert
    from synthetic import make_hf_model
    root = tmp_path_factory.mktemp("fuzz")
    hf = make_hf_model(root / "hf", act="silu", seed=5, **TINY)
    d = convert(hf, root / "m", bits="8", progress=False)
    import powerlow
    with powerlow.load(d) as m:
        ref = m.forward(IDS)
    np.save(root / "ref.npy", ref)
    return root, hf, d, root / "ref.npy"


def test_fuzzed_manifest(base):
    root, _, d, ref = base
    manifest = json.loads((d / "manifest.json").read_text())
    rng = _rng(1234)
    cases = []
    for i in range(160):
        m, what = mutate_json(manifest, rng)
        cd = root / "man" / str(i)
        _copy_model(d, cd)
        _rewrite(cd / "manifest.json", json.dumps(m).encode())
        cases.append({"id": f"manifest-{i}", "kind": "model", "path": str(cd), "what": what})
    # a config number replaced by another valid one (eps 1, a softcap of 7, ...) is another model, not a bug
    numbers = {f"config/{f}" for f in ("rms_eps", "rope_theta", "rope_scaling_factor", "attn_scale", "embed_scale",
                                       "logit_softcap", "rope_theta_local")}
    _check(cases, run_cases(cases, ref), allow_diff={c["id"] for c in cases if c["what"] in numbers})


def test_fuzzed_safetensors_header(base):
    root, _, d, ref = base
    header, data = read_st(d / "resident.safetensors")
    manifest = json.loads((d / "manifest.json").read_text())
    rng = _rng(99)
    cases = []
    # first the 1-D tensors (read by the header's own dtype and shape): each shape and dtype edit once
    directed = [("output_norm", "shape", v) for v in ([2**40], [2**62, 2**62], [-1], [0], [65], [64, 1], ["a"])]
    directed += [("blk.0.attn_norm", "dtype", v) for v in ("F16", "I64", "BF16", "U8", "nope")]
    for i in range(len(directed) + 120):
        if i < len(directed):
            name, key, v = directed[i]
            h = copy.deepcopy(header)
            h[name][key] = v
            body = json.dumps(h).encode()
            raw, what = struct.pack("<Q", len(body)) + body + data, f"{name}: {key} {v}"
        else:
            raw, what = mutate_st_header(header, data, rng)
        cd = root / "st" / str(i)
        _copy_model(d, cd)
        _rewrite(cd / "resident.safetensors", raw)
        m = copy.deepcopy(manifest)       # the manifest agrees with the file: the header itself is what is tested
        m["files"]["resident.safetensors"] = _file_entry(cd / "resident.safetensors")
        _rewrite(cd / "manifest.json", json.dumps(m).encode())
        cases.append({"id": f"st-{i}", "kind": "model", "path": str(cd), "what": what,
                      "budget": (8 << 20) if i % 3 == 0 else None})     # every third: the offloaded reader
    _check(cases, run_cases(cases, ref))


GGUF_KEYS = ["context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "attention.value_length"]


def test_fuzzed_gguf(base, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from archs_util import make_tiny, write_gguf
    hf = make_tiny("llama", tmp_path / "hf")
    g0 = write_gguf(hf, tmp_path / "ok.gguf")
    from powerlow.convert import convert
    import powerlow
    with powerlow.load(convert(g0, tmp_path / "ok", progress=False)) as m:
        np.save(tmp_path / "ref.npy", m.forward(IDS))
    raw = g0.read_bytes()
    import gguf
    rd = gguf.GGUFReader(str(g0))
    data_start = rd.data_offset    # past it: tensor bytes, which a GGUF has no checksum of
    # the float values (epsilon, RoPE base): another valid number there is another model, and other logits
    # (an edited key: the key is missing, and its documented default is used)
    semantic = [(int(p.ctypes.data - rd.data.ctypes.data), int(p.ctypes.data - rd.data.ctypes.data) + p.nbytes)
                for k, f in rd.fields.items() if k.endswith(("rms_epsilon", "freq_base")) for p in f.parts]
    del rd
    allow = set()
    rng = _rng(7)
    cases = []
    for i, key in enumerate(GGUF_KEYS):
        for j, v in enumerate([0, 1, 3, 2**31 - 1, 2**32 - 1]):
            p = write_gguf(hf, tmp_path / f"meta-{i}-{j}.gguf", **{key: v})
            cases.append({"id": f"gguf-meta-{key}-{v}", "kind": "gguf", "path": str(p), "what": f"{key}={v}"})
    for i in range(40):
        p = tmp_path / f"bytes-{i}.gguf"
        if i < 12:          # truncated anywhere (header, kv data, tensor infos, data)
            cut = int(rng.integers(1, len(raw))) if i > 3 else [8, 24, 100, len(raw) - 1][i]
            p.write_bytes(raw[:cut])
            what = f"truncated at {cut}"
        else:               # one 8-byte field of the metadata/tensor-info area overwritten with junk
            b = bytearray(raw)
            at = int(rng.integers(8, data_start - 8))
            b[at: at + 8] = struct.pack("<Q", [0, 1, 2**32, 2**40, 2**63, 2**64 - 1][int(rng.integers(6))])
            p.write_bytes(bytes(b))
            what = f"8 bytes at {at}"
            if any(a < at + 8 and at < b for a, b in semantic):
                allow.add(f"gguf-bytes-{i}")
        cases.append({"id": f"gguf-bytes-{i}", "kind": "gguf", "path": str(p), "what": what})
    # context_length only bounds the positions: a short input's logits are the same at any context >= len(IDS)
    _check(cases, run_cases(cases, tmp_path / "ref.npy"), allow)
