"""Build: the C/Cython kernels in cython_ext/ become the extension powerlow._kernels, the streaming core
(cython_ext/plk_io.c) powerlow._iocore.

One build runs on any x86-64: no -march flags; the AVX2 and AVX-512 variants are compiled with
per-function target attributes (a `#pragma GCC target` region per source file) and chosen at run time
from cpuid (see cython_ext/plk_common.c). On aarch64 the same: the baseline armv8-a build, with the neon,
dotprod and i8mm variants of cython_ext/plk_neon.c in target regions, chosen from getauxval(AT_HWCAP/2);
no global -march=...+dotprod (GCC would auto-vectorise the portable reference kernels with sdot, and the
generic variant would no longer run everywhere). -ffp-contract=off there: AArch64 always has FMA, and GCC
would otherwise fuse the portable C's separate multiplies and adds, which the NEON kernels reproduce exactly
(plk_neon_rows.h); x86-64's baseline has no FMA, so its flags are unchanged. predictors/ is installed as
powerlow.predictors.
"""
import os
import platform

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
MACHINE = platform.machine().lower()
X86 = MACHINE in ("x86_64", "amd64")
ARM64 = MACHINE in ("aarch64", "arm64")
if not (X86 or ARM64):
    raise SystemExit(f"powerlow's kernels need an x86-64 or aarch64 CPU (this is {MACHINE})")
C_SOURCES = ["plk_common.c", "plk_generic.c", "plk_ops.c", "plk_kq_generic.c", "plk_crc.c"]
C_SOURCES += ["plk_avx2.c", "plk_avx512.c"] if X86 else ["plk_neon.c"]

# -fno-wrapv: Python's own CFLAGS carry -fwrapv (signed overflow wraps), which keeps GCC from some loop and index
# optimisations; nothing here relies on it (the SIMD intrinsics wrap by definition, the hashes are unsigned).
# Measured (7 Dec 2026, Zen 5 guest, builds alternated in one process, 2 threads): GEMV from DRAM, multiply-add q2
# +10%, q1 +7%, q4_k +4%, table-lookup q1 +5-7%, q2/tern +2-3%, AVX2 q4_1 +4-6%, AVX-512 q8 row pairs 2-6% slower;
# batch-32 GEMM q4_k / q6_k +6%, the rest level.
extra_compile = ["-O3", "-fno-wrapv", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
if ARM64:
    extra_compile.append("-ffp-contract=off")

ext = Extension(
    "powerlow._kernels",
    sources=["cython_ext/_kernels.pyx"] + [f"cython_ext/{s}" for s in C_SOURCES],
    include_dirs=[np.get_include(), os.path.join(HERE, "cython_ext")],
    depends=[f"cython_ext/{s}" for s in os.listdir(os.path.join(HERE, "cython_ext")) if s.endswith((".h", ".pxd"))],
    extra_compile_args=extra_compile,
    extra_link_args=["-fopenmp"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# the streaming core of an offloaded run (slot table, request queue, reader threads without the GIL)
iocore = Extension(
    "powerlow._iocore",
    sources=["cython_ext/_iocore.pyx", "cython_ext/plk_io.c", "cython_ext/plk_crc.c"],
    include_dirs=[np.get_include(), os.path.join(HERE, "cython_ext")],
    depends=["cython_ext/plk_io.h", "cython_ext/plk.h"],
    extra_compile_args=["-O2", "-pthread", "-Wall"],
    extra_link_args=["-pthread"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

if not os.path.exists(os.path.join(HERE, "predictors", "__init__.py")):
    os.makedirs(os.path.join(HERE, "predictors"), exist_ok=True)
    open(os.path.join(HERE, "predictors", "__init__.py"), "w").close()

setup(
    name="powerlow",
    version="0.1.0",
    description="Sparse-FFN offloading LLM inference on CPUs (PowerInfer-2 style) with low-bit kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["powerlow", "powerlow.*"]) + ["powerlow.predictors"],
    package_dir={"powerlow": "powerlow", "powerlow.predictors": "predictors"},
    ext_modules=cythonize([ext, iocore], language_level=3, compiler_directives={"boundscheck": False, "wraparound": False}),
    install_requires=["numpy", "safetensors>=0.8", "tokenizers", "gguf", "zstandard", "tqdm", "jinja2"],
    extras_require={
        # torch only for offline predictor training and the reference tests; the runtime never imports it
        "test": ["pytest", "torch==2.13.0", "transformers", "matplotlib"],
        "train": ["torch==2.13.0"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["powerlow=powerlow.cli:main"]},
    zip_safe=False,
)
