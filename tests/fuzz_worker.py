"""A worker of tests/test_fuzz.py: loads fuzzed model dirs (or converts fuzzed GGUFs) given one JSON case a line
on stdin, and prints one JSON result a line: "same" (the logits of the unmutated model, bit for bit), "error"
(a PowerlowError), "diff" (other logits), or "exc" (any other exception). A crash or hang shows as a missing line.

Run as: python fuzz_worker.py REF_LOGITS.npy IDS_JSON"""
from __future__ import annotations

import json
import resource
import signal
import sys

import numpy as np

# a 4 TiB allocation attempt must fail fast (MemoryError -> "exc"), not swap the machine
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


def _alarm(*_):
    raise TimeoutError("case took over 30 s")


def run_case(case: dict, ref: np.ndarray, ids: list[int]) -> dict:
    import powerlow
    from powerlow.convert import convert
    from powerlow.errors import PowerlowError
    signal.alarm(30)
    try:
        path = case["path"]
        if case["kind"] == "gguf":
            path = convert(path, path + ".m", progress=False)
        cfg = powerlow.RuntimeConfig(budget_bytes=case["budget"]) if case.get("budget") else None
        with powerlow.load(path, cfg) as m:
            got = m.forward(ids)
        same = got.shape == ref.shape and np.array_equal(got, ref)
        return {"result": "same" if same else "diff"}
    except PowerlowError as e:
        return {"result": "error", "msg": str(e)[:300]}
    except BaseException as e:      # noqa: BLE001 -- anything else is the finding
        return {"result": "exc", "msg": f"{type(e).__name__}: {e}"[:300]}
    finally:
        signal.alarm(0)


def main() -> None:
    signal.signal(signal.SIGALRM, _alarm)
    ref = np.load(sys.argv[1])
    ids = json.loads(sys.argv[2])
    for line in sys.stdin:
        case = json.loads(line)
        out = run_case(case, ref, ids)
        out["id"] = case["id"]
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
