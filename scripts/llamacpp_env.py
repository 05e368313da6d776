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
# GGML_NATIVE alone also compiles llama.cpp's AMX backend on a Zen 4 guest (no AMX in the CPU), whose Q8_0 matmul
# then crashes (SIGSEGV in ggml_backend_amx_mul_mat on the tiny synthetic models); the AMX backend stays off
CMAKE_ARGS = "-DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"


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
