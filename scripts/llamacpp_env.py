"""The benchmark environment with llama.cpp (llama-cpp-python), built once, never a runtime dependency.

`python scripts/llamacpp_env.py` prints the path of a Python that can `import llama_cpp`, creating the venv
($POWERLOW_HOME/bench-venv, default ~/.cache/powerlow/bench-venv) and building llama.cpp (~5 minutes) if needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# Not GGML_NATIVE: on a guest whose CPUID lists AMX (an Intel Xeon here: amx_tile/int8/bf16 in /proc/cpuinfo),
# -march=native compiles llama.cpp's AMX backend, whose matmuls then crash (SIGSEGV in ggml_backend_amx_mul_mat,
# on the tiny synthetic models and on Qwen2.5-1.5B alike). The ISA extensions are named instead: AVX-512 with
# VNNI/VBMI/BF16 where the CPU has them (llama.cpp's CPU backend is then built for this machine only), AMX off.
def _cmake_args() -> str:
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        flags = set()
    on = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_BMI2": "bmi2",
          "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
          "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}
    args = ["-DGGML_NATIVE=OFF"] + [f"-D{k}={'ON' if v in flags else 'OFF'}" for k, v in on.items()]
    return " ".join(args + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


CMAKE_ARGS = _cmake_args()


def bench_python() -> Path:
    home = Path(os.environ.get("POWERLOW_HOME") or Path.home() / ".cache" / "powerlow")
    venv = home / "bench-venv"
    py = venv / "bin" / "python"
    stamp = venv / "powerlow-build.txt"           # what it was built with; another build is redone
    want = f"{LLAMA_CPP_PYTHON} {CMAKE_ARGS}"
    ok = (py.exists() and stamp.exists() and stamp.read_text() == want
          and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0)
    if not ok:
        print(f"building llama.cpp into {venv} (about 5 minutes, once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--force-reinstall", "--no-cache-dir", LLAMA_CPP_PYTHON,
                        "numpy"], check=True, env=env)
        stamp.write_text(want)
    return py


if __name__ == "__main__":
    print(bench_python())
