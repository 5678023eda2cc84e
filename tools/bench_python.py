#!/usr/bin/python3
"""bench_python.py - what the Python package costs per call: libkvarc's decode step in C, through kvarc's
Python API, and through raw ctypes calls, on the same workload in one run.

  PYTHONPATH=python /usr/bin/python3 tools/bench_python.py [--rounds R] [--tokens N] [--steps S]
      [--bench-binding PATH] [--kvarcd PATH]

The workload (bench_binding.c): a conversation of N tokens (2 layers, 2 kv heads, 4 query heads,
head_dim 64, q3, kvarc's defaults), then S decode steps of append + attend per layer, the same
values on every side. Each round runs C, the API and raw ctypes, each on its own new
conversation of one kvarcd, in an order that rotates by round; the table gives every round and the
medians of the ratios to C. The
model is not part of it: passkey.py overhead measures the whole decode step of a model.
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import kvarc
except ImportError:
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import kvarc
import kvarc.daemon  # noqa: E402

M64 = (1 << 64) - 1


def vals(stream, start, n):
    """bench_binding.c's val(stream, start .. start + n - 1), float32."""
    with np.errstate(over="ignore"):
        z = np.uint64((stream * 0x9E3779B97F4A7C15) & M64) + np.arange(start + 1, start + n + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return ((z >> np.uint64(40)).astype(np.float64) * 2.0 ** -24 * 2.0 - 1.0).astype(np.float32)


def python_side(client, name, tokens, steps, raw):
    m = kvarc.Model(n_layers=2, n_kv_heads=2, n_q_heads=4, head_dim=64, fingerprint="bench-binding")
    with client.create("bench", name, m) as c:
        for at in range(0, tokens, 64):
            for layer in range(2):
                n = 2 * 64 * 64
                c.append(layer, vals(10 + layer, at * 128, n).reshape(2, 64, 64),
                         vals(20 + layer, at * 128, n).reshape(2, 64, 64))
        ks = [[vals(30 + l, s * 128, 128).reshape(2, 1, 64) for l in range(2)] for s in range(steps)]
        qs = [[vals(40 + l, s * 256, 256).reshape(4, 1, 64) for l in range(2)] for s in range(steps)]
        out = np.empty((4, 1, 64), np.float32)
        lib, h = kvarc._lib.lib, c._h
        t0 = time.perf_counter()
        for s in range(steps):
            for layer in range(2):
                k, q = ks[s][layer], qs[s][layer]
                if raw:
                    if lib.kvarc_append(h, layer, 0, k.ctypes.data, k.ctypes.data, 1) or \
                            lib.kvarc_attend(h, layer, q.ctypes.data, 1, out.ctypes.data):
                        raise kvarc.Error(lib.kvarc_errmsg(h).decode())
                else:
                    c.append(layer, k, k)
                    c.attend(layer, q, out=out)
        return (time.perf_counter() - t0) / steps * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bench-binding", default=os.path.join(ROOT, "build", "tools", "bench-binding"))
    ap.add_argument("--kvarcd", help="the kvarcd to start (default: $KVARCD_PATH, PATH, the build tree)")
    a = ap.parse_args()
    rows = []
    with kvarc.daemon.Kvarcd(kvarcd=a.kvarcd) as kd, kvarc.Client(kd.data) as cl:
        for r in range(a.rounds):
            def c_side():
                out = subprocess.run([a.bench_binding, kd.data, f"c-{r}", "--tokens", str(a.tokens), "--steps",
                                      str(a.steps)], capture_output=True, text=True, check=True).stdout
                return float(out.split()[1])
            sides = [c_side, lambda: python_side(cl, f"api-{r}", a.tokens, a.steps, raw=False),
                     lambda: python_side(cl, f"raw-{r}", a.tokens, a.steps, raw=True)]
            got = [None] * 3
            for j in range(3):                    # the order rotates by round: no side always goes first
                k = (j + r) % 3
                got[k] = sides[k]()
            c_ms, api, raw = got
            rows.append((c_ms, api, raw))
            print(f"round {r + 1}: C {c_ms:.3f} ms per step, Python API {api:.3f} ({api / c_ms:.3f}x), "
                  f"raw ctypes {raw:.3f} ({raw / c_ms:.3f}x)", flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"median ratio to C over {a.rounds} rounds: Python API {med([r[1] / r[0] for r in rows]):.3f}x, "
          f"raw ctypes {med([r[2] / r[0] for r in rows]):.3f}x; the API's own cost "
          f"{med([(r[1] - r[2]) / 4 * 1e3 for r in rows]):.1f} us per call (4 calls a step)")


if __name__ == "__main__":
    main()
