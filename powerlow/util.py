"""Small shared helpers: memory figures."""
from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started or since reset_peak_rss() (VmHWM; else
    ru_maxrss, which Linux reports in KiB and never resets)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start a new peak (Linux: writing 5 to /proc/self/clear_refs resets VmHWM); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def release_free_heap() -> None:
    """glibc: return freed heap memory to the kernel (malloc_trim), so RSS stays what is really in use."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


RUNTIME_MODULES = ("numpy", "numpy.random", "hashlib", "zlib", "json", "tokenizers", "jinja2.sandbox",
                   "powerlow.model", "powerlow.generate", "powerlow.speculate", "powerlow.tokenizer", "powerlow.kernels",
                   "powerlow.steps", "powerlow._iocore")


def import_runtime() -> None:
    """Import the program a run executes (numpy, the compiled kernels, tokenizers, jinja2 for chat templates,
    OpenSSL through hashlib: ~30 MiB of code and interpreter state) without loading any model: what is resident
    after this is the interpreter's baseline, the part of a process's RSS that --budget does not cover.
    powerlow imports these lazily, so a measurement taken right after `import powerlow` would count ~15 MiB of
    library code as model memory. tests/test_reliability.py checks that a run imports no extension module
    this did not."""
    import hashlib
    import importlib
    for name in RUNTIME_MODULES:
        importlib.import_module(name)
    hashlib.sha256(b"")                       # maps OpenSSL's code as a load's sha256 does


def read_bytes_so_far(source) -> int:
    """Bytes an offloaded run's cluster source and weight ring have read from storage (0 for a resident run)."""
    c = getattr(source, "counters", None)
    if c is None:
        return 0
    return int(c()["io_all_bytes"])
