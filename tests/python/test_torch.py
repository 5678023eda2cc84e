"""test_torch.py - torch tensors through kvarc, kvarc.torch.Cache, and the passkey model with its attention
replaced by kvarc's (one function), against a real kvarcd."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

from kvtest import DaemonCase, exact_attention, f16_values, main, np

try:
    import torch
except ImportError:
    print("torch is missing: skipped")
    sys.exit(77)

import kvarc
import kvarc.torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "passkey"))
M = kvarc.Model(n_layers=2, n_kv_heads=2, n_q_heads=4, head_dim=64, rope_theta=10000.0)
EXACT = dict(format="f16", pos_mode="true", sinks=4, hot_window=32, batch=32, top_k=400, shortlist=1)


class Tensors(DaemonCase):
    def test_dtypes(self):
        """float32, float16 and bfloat16 tensors of the same values archive to the same bits; a bfloat16
        query comes back bfloat16."""
        rng = np.random.default_rng(7)
        k = torch.from_numpy(f16_values(rng, (2, 200, 64))).bfloat16().float()   # values all three hold
        v = torch.from_numpy(f16_values(rng, (2, 200, 64))).bfloat16().float()
        q = torch.randn(4, 1, 64, generator=torch.Generator().manual_seed(1))
        outs = []
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            with self.client.create("pt", self.name(), M, hot_window=64, batch=32) as c:
                for layer in range(2):
                    c.append(layer, k.to(dt), v.to(dt))
                outs.append(c.attend(1, q))
                ob = c.attend(1, q.bfloat16())
                self.assertEqual(ob.dtype, torch.bfloat16)
                self.assertTrue(torch.equal(ob, c.attend(1, q.bfloat16().float()).bfloat16()))
        self.assertTrue(torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]))

    def test_bad_tensors(self):
        z = torch.zeros(2, 4, 64)
        with self.client.create("pt", self.name(), M) as c:
            for exc, words, call in [
                (TypeError, "dtype torch.float64", lambda: c.append(0, z.double(), z.double())),
                (TypeError, "dtype torch.int64", lambda: c.append(0, z.long(), z.long())),
                (ValueError, "k: not contiguous", lambda: c.append(0, torch.zeros(4, 2, 64).transpose(0, 1), z)),
                (ValueError, "v: shape [2, 4, 32]", lambda: c.append(0, z, z[:, :, :32])),
                (ValueError, "meta", lambda: c.append(0, z.to("meta"), z.to("meta"))),
                (TypeError, "out: a float32", lambda: c.attend(0, torch.zeros(4, 1, 64), out=np.zeros((4, 1, 64),
                                                                                                     np.float32))),
            ]:
                with self.subTest(words):
                    with self.assertRaises(exc) as cm:
                        call()
                    self.assertIn(words, str(cm.exception))
                    self.assertEqual(c.length(0), 0)

    def test_cuda(self):
        """CUDA tensors go through kvarc_append_device / kvarc_attend_device (the CPU tensors' answer)."""
        if not torch.cuda.is_available():
            self.skipTest("no CUDA device")
        rng = np.random.default_rng(8)
        k, v = torch.from_numpy(f16_values(rng, (2, 100, 64))), torch.from_numpy(f16_values(rng, (2, 100, 64)))
        q = torch.randn(4, 1, 64)
        outs = []
        for dev in ("cpu", "cuda"):
            with self.client.create("pt", self.name(), M, use_gpu=0, hot_window=64, batch=32) as c:
                try:
                    for layer in range(2):
                        c.append(layer, k.to(dev), v.to(dev))
                    outs.append(c.attend(0, q.to(dev)).cpu())
                except kvarc.Error as e:
                    if e.errno_name == "ENOTSUP":
                        self.skipTest("libkvarc was built without CUDA")
                    raise
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


class CacheCase(DaemonCase):
    def test_cache_is_exact_attention(self):
        """kvarc.torch.Cache.attention over transposed views ([1, H, T, hd], as a model makes them), a prefill
        longer than max_chunk and then decode steps: exact softmax attention with RoPE."""
        rng = np.random.default_rng(9)
        T, P = 120, 100
        k, v = f16_values(rng, (2, 2, T, 64)), f16_values(rng, (2, 2, T, 64))
        q = rng.standard_normal((2, 4, T, 64)).astype(np.float32)
        with kvarc.torch.Cache.create(self.client, "pt", self.name(), n_layers=2, n_kv_heads=2, n_q_heads=4,
                                      head_dim=64, max_chunk=16, **EXACT) as cache:
            self.assertEqual(cache.max_chunk, 16)
            outs = [[], []]
            for s, e in [(0, P)] + [(t, t + 1) for t in range(P, T)]:
                for layer in range(2):
                    # [1, T, H, hd] -> [1, H, T, hd] views, not contiguous
                    qt = torch.from_numpy(q[layer][:, s:e].transpose(1, 0, 2).copy())[None].transpose(1, 2)
                    kt = torch.from_numpy(k[layer][:, s:e].transpose(1, 0, 2).copy())[None].transpose(1, 2)
                    vt = torch.from_numpy(v[layer][:, s:e].transpose(1, 0, 2).copy())[None].transpose(1, 2)
                    self.assertFalse(qt.is_contiguous() and e - s > 1)
                    o = cache.attention(layer, qt, kt, vt)
                    self.assertEqual(tuple(o.shape), (1, 4, e - s, 64))
                    outs[layer].append(o[0].numpy())
            self.assertEqual(cache.length(1), T)
            for layer in range(2):
                got = np.concatenate(outs[layer], axis=1)
                for t in (0, 17, P - 1, T - 1):
                    ref = exact_attention(q[layer][:, t:t + 1], k[layer][:, :t + 1], v[layer][:, :t + 1], 10000.0)
                    self.assertLess(np.abs(got[:, t:t + 1] - ref).max(), 1e-4, f"layer {layer} token {t}")
            with self.assertRaises(ValueError) as cm:
                cache.attention(0, torch.zeros(2, 4, 1, 64), torch.zeros(2, 2, 1, 64), torch.zeros(2, 2, 1, 64))
            self.assertIn("batch 1", str(cm.exception))


class PasskeyModel(DaemonCase):
    def test_passkey_through_python(self):
        """train.py's module from the fixture, Block.attention replaced by kvarc's: the weights unchanged, and
        each prompt answered as kvarc-passkey (C) answers it."""
        import passkey
        import train
        model, _, _ = passkey.load_model(os.path.join(ROOT, "tests", "fixtures", "passkey"))
        before = passkey.weights_sha(model)
        saved = train.Block.attention
        train.Block.attention = passkey.attention
        try:
            a = passkey.argparse.Namespace(no_means=False, top_k=64, hot=64, sinks=4, chunk=64, coarse=0, decode_steps=0,
                                           format="q3", seed=1)
            r = passkey.Runner(a, model, self.client)
            got = {mode: [r.trial(mode, 1024, a.seed + t)["answer"] for t in range(3)]
                   for mode in ("kvarc", "no-retrieval")}
        finally:
            train.Block.attention = saved
        self.assertEqual(passkey.weights_sha(model), before)
        runner = os.environ.get("KVARC_PASSKEY_PATH")
        if not runner:
            self.skipTest("KVARC_PASSKEY_PATH not set: no C runner to compare with")
        with tempfile.TemporaryDirectory() as tmp:
            rc = os.path.join(tmp, "c.json")
            subprocess.run([runner, "run", "--lengths", "1024", "--trials", "3", "--modes", "kvarc,no-retrieval",
                            "--hot", "64", "--gate", "0", "--agree", "0", "--receipt", rc, "--data", self.kd.data],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(rc) as f:
                c = {e["mode"]: e["answers"] for e in json.load(f)["figures"]["passkey"]}
        self.assertEqual(got, c)
        keys = [passkey.digits(passkey.tasks.passkey_sequence(passkey.tasks.Rng(1 + t), 1024)[1]) for t in range(3)]
        self.assertEqual(got["kvarc"], keys, "kvarc finds every passkey at 1024 with a hot window of 64")
        self.assertNotEqual(got["no-retrieval"], keys, "without retrieval the needles are out of reach")


if __name__ == "__main__":
    main()
