"""The aarch64 NEON kernels (cython_ext/plk_neon.c), cross-compiled and run under qemu-user on this x86 machine.

tests/c/gen_cases.py writes the cases (formats.py packing, numpy reference outputs), tests/c/plk_harness.c runs
every variant the emulated CPU has through the production drivers and checks them against the reference and the
generic variant (its header lists the checks). Three CPU models: `max` (dotprod + i8mm), `cortex-a76` (dotprod,
no i8mm), `cortex-a53` (plain NEON). Emulation says nothing about speed; nothing here measures it.
Needs gcc-aarch64-linux-gnu and qemu-user-static: without them the tests fail (no skip), naming the apt-get command."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT = os.path.join(ROOT, "cython_ext")
CC, QEMU, OBJDUMP = "aarch64-linux-gnu-gcc", "qemu-aarch64-static", "aarch64-linux-gnu-objdump"
INSTALL = "apt-get install -y gcc-aarch64-linux-gnu qemu-user-static"
# setup.py's aarch64 flags (checked below to stay the same), plus a static link for qemu-user
FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-ffp-contract=off"]
KERNEL_SOURCES = ["plk_common.c", "plk_generic.c", "plk_kq_generic.c", "plk_neon.c", "plk_ops.c"]
CPUS = {"max": ["generic", "neon", "dotprod", "i8mm"],
        "cortex-a76": ["generic", "neon", "dotprod"],
        "cortex-a53": ["generic", "neon"]}


def _tools():
    missing = [t for t in (CC, QEMU, OBJDUMP) if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: the ARM kernel tests need a cross compiler and qemu-user; "
                    f"install them with `{INSTALL}` (as root, or with sudo)")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    _tools()
    d = tmp_path_factory.mktemp("arm")
    cases = d / "cases.bin"
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "c", "gen_cases.py"), str(cases)], check=True,
                   capture_output=True, text=True, timeout=120)
    objs = []
    for src in KERNEL_SOURCES + ["../tests/c/plk_harness.c"]:
        o = d / (os.path.basename(src) + ".o")
        r = subprocess.run([CC, *FLAGS, "-I", EXT, "-c", os.path.join(EXT, src), "-o", str(o)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{src} does not compile for aarch64:\n{r.stderr}"
        assert "warning" not in r.stderr, f"{src}: compiler warnings for aarch64:\n{r.stderr}"
        objs.append(str(o))
    exe = d / "plk_harness"
    r = subprocess.run([CC, "-static", "-fopenmp", "-pthread", *objs, "-lm", "-o", str(exe)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"link failed:\n{r.stderr}"
    return {"exe": str(exe), "cases": str(cases), "dir": d}


def _run(h, cpu, env=None):
    return subprocess.run([QEMU, "-cpu", cpu, h["exe"], h["cases"]], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})


def test_setup_py_builds_neon_with_the_tested_flags():
    """the harness is compiled as setup.py compiles the extension on aarch64 (no global -march, no fp contraction)"""
    src = open(os.path.join(ROOT, "setup.py")).read()
    for f in FLAGS:
        assert f'"{f}"' in src, f
    assert "plk_neon.c" in src and "-march" not in re.sub(r'""".*?"""', "", src, flags=re.S)


def test_dot_instructions_only_in_their_variants(harness):
    """sdot only in the dotprod / i8mm variants' functions, smmla only in i8mm's: the portable C (generic) and plain
    NEON stay runnable on a Cortex-A53 (a global +dotprod would let GCC auto-vectorise them into sdot)"""
    seen = {"sdot": set(), "smmla": set()}
    for src in ("plk_generic.c", "plk_kq_generic.c", "plk_neon.c", "plk_common.c", "plk_ops.c"):
        out = subprocess.run([OBJDUMP, "-d", str(harness["dir"] / (src + ".o"))], capture_output=True, text=True,
                             check=True).stdout
        fn = None
        for line in out.splitlines():
            m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
            if m:
                fn = m.group(1)
            for ins in seen:
                if re.search(rf"\s{ins}\s", line):
                    seen[ins].add((src, fn))
    assert seen["sdot"] and seen["smmla"], "the dotprod / i8mm variants were compiled without their instructions"
    for src, fn in seen["sdot"]:
        assert src == "plk_neon.c" and fn.endswith(("_dotprod", "_i8mm")), (src, fn)
    for src, fn in seen["smmla"]:
        assert src == "plk_neon.c" and fn.endswith("_i8mm"), (src, fn)


@pytest.mark.parametrize("cpu", list(CPUS))
def test_harness_under_qemu(harness, cpu):
    r = _run(harness, cpu)
    out = r.stdout
    print(out)
    want = CPUS[cpu]
    feats = re.search(r"^cpu: aarch64 asimd=(\d) asimddp=(\d) i8mm=(\d)$", out, re.M)
    assert feats and feats.groups() == ("1", str(int("dotprod" in want)), str(int("i8mm" in want))), out
    assert re.search(r"^variants: (.*)$", out, re.M).group(1).split() == want, out
    assert re.search(r"^detected: (\S+)$", out, re.M).group(1) == want[-1], out
    for v in want:
        assert re.search(rf"^ran {v}: (\d+) matmul cases$", out, re.M), (v, out)
    n = {v: int(re.search(rf"^ran {v}: (\d+) matmul", out, re.M).group(1)) for v in want}
    assert len(set(n.values())) == 1 and n["generic"] >= 150, n
    assert r.returncode == 0 and "RESULT: PASS" in out, out + r.stderr


def test_harness_can_fail(harness):
    """one flipped bit in every non-generic output must be reported (and exit non-zero)"""
    r = _run(harness, "max", {"PLK_HARNESS_CORRUPT": "1"})
    assert r.returncode != 0 and "RESULT: FAIL" in r.stdout, r.stdout
    for v in ("neon", "dotprod", "i8mm"):
        assert f"[{v}]: differs from generic" in r.stdout, v
    assert "[generic]" not in r.stdout


_FAKE = """
import sys, types
import powerlow
fake = types.ModuleType("powerlow._kernels")
fake.detect_isa = lambda: {best}
sys.modules["powerlow._kernels"] = fake
powerlow._kernels = fake
from powerlow import kernels as K
print(",".join(K.supported_isas), K.isa, K._isa_id(K.isa))
"""


@pytest.mark.parametrize("best,want", [(5, "generic,neon,dotprod,i8mm"), (4, "generic,neon,dotprod"), (3, "generic,neon"),
                                       (0, "generic"), (2, "generic,avx2,avx512")])
def test_python_names_the_arm_variants(best, want):
    """powerlow.kernels on an aarch64 build (plk_detect_isa's ids, plk.h): supported_isas lists generic and the
    variants up to the detected one, isa is the best unless POWERLOW_ISA forces one, and the id passed to C is plk.h's"""
    def run(env_isa=None):
        env = {k: v for k, v in os.environ.items() if k != "POWERLOW_ISA"}
        if env_isa:
            env["POWERLOW_ISA"] = env_isa
        return subprocess.run([sys.executable, "-c", _FAKE.format(best=best)], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=60)
    r = run()
    assert r.returncode == 0, r.stderr
    names, isa, ident = r.stdout.split()
    assert names == want and isa == want.split(",")[-1] and int(ident) == best
    if best >= 3:
        r = run("neon")
        assert r.returncode == 0 and r.stdout.split()[1:] == ["neon", "3"], r.stderr
    if best in (3, 4):
        r = run("i8mm")
        assert r.returncode != 0 and "supports only" in r.stderr, r.stderr
