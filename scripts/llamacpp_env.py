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


def bench_python() -> Path:
    home = Path(os.environ.get("POWERLOW_HOME") or Path.home() / ".cache" / "powerlow")
    venv = home / "bench-venv"
    py = venv / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not ok:
        print(f"building llama.cpp into {venv} (about 5 minutes, once) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON")
        subprocess.run([str(py), "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON, "numpy"], check=True, env=env)
    return py


if __name__ == "__main__":
    print(bench_python())
