"""kvtest.py - what the Python tests share: a kvarcd per test class, exact attention in numpy.

The tests run from ctest with Debian's /usr/bin/python3 and the
environment CMake gives them (KVARC_LIBRARY, KVARCD_PATH, PYTHONPATH).
A test whose module is missing (numpy, torch) exits 77: skipped.
"""
import sys
import unittest

try:
    import numpy as np
except ImportError:
    print("numpy is missing: skipped")
    sys.exit(77)

import kvarc
import kvarc.daemon


class DaemonCase(unittest.TestCase):
    """A real kvarcd on a fresh temporary directory for the class, and a Client on it."""

    @classmethod
    def setUpClass(cls):
        cls.kd = kvarc.daemon.Kvarcd(args=["--threads", "2"]).start()
        cls.client = kvarc.Client(cls.kd.data)
        cls.n = 0

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.kd.stop()

    def name(self):
        type(self).n += 1
        return f"{self._testMethodName}-{self.n}"


def rope_np(x, pos, theta):
    """Half-split RoPE of x [..., T, d] at positions pos [T] (float64)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d // 2, dtype=np.float64) * 2.0 / d)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


def exact_attention(q, k, v, theta, rotary=True):
    """Causal softmax attention, float64: q [Hq, Tq, d] are the last Tq of k, v [Hkv, T, d]."""
    Hq, Tq, d = q.shape
    Hkv, T, _ = k.shape
    pq, pk = np.arange(T - Tq, T), np.arange(T)
    q64, k64, v64 = q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)
    if rotary:
        q64, k64 = rope_np(q64, pq, theta), rope_np(k64, pk, theta)
    out = np.zeros((Hq, Tq, d))
    for h in range(Hq):
        kh = h // (Hq // Hkv)
        s = q64[h] @ k64[kh].T / np.sqrt(d)
        s[pk[None, :] > pq[:, None]] = -np.inf
        s = np.exp(s - s.max(-1, keepdims=True))
        out[h] = (s / s.sum(-1, keepdims=True)) @ v64[kh]
    return out


def f16_values(rng, shape, scale=1.0):
    """float32 values that float16 holds exactly."""
    return (rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)


def main():
    unittest.main(verbosity=2)
