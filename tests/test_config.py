"""Runtime config: TOML files, checked values, unknown keys, sizes, round trip, CLI errors."""
from __future__ import annotations

import pytest

from powerlow.config import RuntimeConfig, config_from_dict, dump_toml, load_toml, parse_size
from powerlow.errors import PowerlowError
from conftest import run_cli

GOOD = """
budget = "512MiB"
threads = 2
mode = "threshold"
density = 0.25
max_context = 256
cache_policy = "lfu"
hot_fraction = 0.5
queue_depth = 4
io_threads = 2
io_block = "2MiB"
prefetch_depth = 2
o_direct = false
"""


def test_load_toml_all_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(GOOD)
    kw = load_toml(p)
    cfg = RuntimeConfig(**kw)
    assert cfg.budget_bytes == 512 << 20 and cfg.io_block_bytes == 2 << 20
    assert (cfg.threads, cfg.mode, cfg.density, cfg.max_context) == (2, "threshold", 0.25, 256)
    assert (cfg.cache_policy, cfg.hot_fraction, cfg.queue_depth, cfg.io_threads, cfg.prefetch_depth, cfg.o_direct) == \
        ("lfu", 0.5, 4, 2, 2, False)


def test_dump_toml_round_trip(tmp_path):
    kw = load_toml_text(tmp_path, GOOD)
    p = tmp_path / "again.toml"
    p.write_text(dump_toml(kw))
    assert load_toml(p) == kw


def load_toml_text(tmp_path, text):
    p = tmp_path / "x.toml"
    p.write_text(text)
    return load_toml(p)


@pytest.mark.parametrize("text, words", [
    ("budgett = '1GiB'", ["budgett", "did you mean 'budget'"]),
    ("colour = 3", ["unknown key 'colour'"]),
    ("density = 0", ["density", "(0, 1]"]),
    ("density = 1.5", ["density"]),
    ("recall = 2.0", ["recall"]),
    ("threads = -1", ["threads"]),
    ("threads = '4'", ["threads", "integer"]),
    ("mode = 'fast'", ["mode", "dense"]),
    ("cache_policy = 'random'", ["cache_policy", "lru"]),
    ("hot_fraction = 1.2", ["hot_fraction"]),
    ("queue_depth = 0", ["queue_depth"]),
    ("io_threads = 0", ["io_threads"]),
    ("io_block = '1000'", ["io_block", "4KiB"]),
    ("prefetch_depth = 20", ["prefetch_depth"]),
    ("o_direct = 'yes'", ["o_direct", "true or false"]),
    ("budget = 'lots'", ["budget", "512MiB"]),
    ("budget = 0", ["budget", "positive"]),
    ("max_context = 0", ["max_context"]),
    ("[cache]\npolicy = 'lru'", ["unknown key 'cache'"]),
])
def test_bad_values_name_the_key(tmp_path, text, words):
    with pytest.raises(PowerlowError) as e:
        load_toml_text(tmp_path, text)
    msg = str(e.value)
    for w in words:
        assert w in msg, msg
    assert "x.toml" in msg


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(PowerlowError, match="not valid TOML"):
        load_toml_text(tmp_path, "budget = ")
    with pytest.raises(PowerlowError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")


def test_parse_size():
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4k") == 4000 and parse_size(4096) == 4096
    for bad in ("", "MiB", "12 parsecs", True):
        with pytest.raises(PowerlowError):
            parse_size(bad)


def test_int_for_float_key_is_accepted():
    assert config_from_dict({"density": 1, "hot_fraction": 0})["density"] == 1.0


def test_cli_reports_config_errors(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("queue_depth = 1000\n")
    r = run_cli("run", "-p", "hi", "--config", p, "-m", tmp_path, timeout=60)
    assert r.returncode == 2
    assert "queue_depth" in r.stderr and "bad.toml" in r.stderr
