"""test_kvarc.py - the Python package over libkvarc.so against a real kvarcd (numpy arrays)."""
import ctypes
import os
import threading
import unittest

from kvtest import DaemonCase, exact_attention, f16_values, main, np

import kvarc
import kvarc._lib
import kvarc.daemon

M = kvarc.Model(n_layers=2, n_kv_heads=2, n_q_heads=4, head_dim=64, rope_theta=10000.0, fingerprint="test")
EXACT = dict(format="f16", pos_mode="true", sinks=4, hot_window=32, batch=32, top_k=400, shortlist=1)


class Structs(unittest.TestCase):
    def test_options_layout(self):
        """kvarc_options_default fills the ctypes struct exactly: every default where kvarc.h says it is,
        and not a byte past its end (a canary after it stays)."""
        size = ctypes.sizeof(kvarc._lib.KvarcOptions)
        buf = (ctypes.c_uint8 * (size + 64))(*([0xAB] * (size + 64)))
        kvarc._lib.lib.kvarc_options_default(ctypes.cast(buf, ctypes.POINTER(kvarc._lib.KvarcOptions)))
        self.assertEqual(bytes(buf[size:]), b"\xab" * 64, "kvarc_options is larger in C than in _lib.py")
        o = kvarc._lib.KvarcOptions.from_buffer(buf)
        want = dict(format=1, pos_mode=0, seed=0x6b76617263, sinks=4, hot_window=256, top_k=64, shortlist=8, batch=64,
                    max_chunk=512, score_mode=0, combine=0, score_distance=-1, cache_records=1 << 18,
                    coarse_blocks=0, prefill_coarse_blocks=0, prefill_shortlist=0, threads=0, fast_tier=0,
                    append_together=1, scale=0.0, use_gpu=1)
        self.assertEqual({f: getattr(o, f) for f in want}, want)
        self.assertEqual(kvarc.default_options(), want)

    def test_formats_and_version(self):
        self.assertEqual(kvarc.FORMATS, {"q3": 1, "q4": 2, "i8": 3, "f16": 4, "bf16": 5})
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(os.path.join(root, "CMakeLists.txt")) as f:
            self.assertIn(f"project(kvarc VERSION {kvarc.__version__} ", f.read())

    def test_model_and_options_refused(self):
        with self.assertRaises(kvarc.InvalidArgument):
            kvarc.Model(n_layers=0, n_kv_heads=2, n_q_heads=4, head_dim=64)
        with self.assertRaises(ValueError):
            kvarc.Model(n_layers=1, n_kv_heads=2, n_q_heads=4, head_dim=64, dtype="f64")
        with self.assertRaises(ValueError):
            kvarc.Model(n_layers=1, n_kv_heads=2, n_q_heads=4, head_dim=64, fingerprint="x" * 64)


class Conversations(DaemonCase):
    def test_attention_is_exact(self):
        """Lossless records, true positions, top_k over every cold token: kvarc's attention is exact
        softmax attention with RoPE (numpy, float64), for a prefill chunk and a decode step, both layers."""
        rng = np.random.default_rng(1)
        T = 300
        k, v = f16_values(rng, (2, 2, T, 64)), f16_values(rng, (2, 2, T, 64))
        with self.client.create("py", self.name(), M, **EXACT) as c:
            self.assertEqual(c.options["top_k"], 400)
            for layer in range(2):
                c.append(layer, k[layer, :, :T - 8].copy(), v[layer, :, :T - 8].copy())
            for layer in range(2):                                # the last 8 as a prefill chunk
                c.append(layer, k[layer, :, T - 8:].copy(), v[layer, :, T - 8:].copy())
                q = rng.standard_normal((4, 8, 64)).astype(np.float32)
                out = c.attend(layer, q)
                self.assertEqual((out.shape, out.dtype), ((4, 8, 64), np.float32))
                ref = exact_attention(q, k[layer], v[layer], 10000.0)
                self.assertLess(np.abs(out - ref).max(), 1e-4)
                buf = np.zeros_like(q)
                self.assertIs(c.attend(layer, q, out=buf), buf)
                np.testing.assert_array_equal(buf, out)
            self.assertEqual(c.length(0), T)
            st = c.stats()
            self.assertEqual((st.steps, st.queries), (4, 32))
            self.assertGreater(st.records_fetched, 0)
            ret = c.last_retrieved(1)
            self.assertEqual(len(ret), len(set(ret)))                  # distinct positions
            self.assertTrue(len(ret) > 0 and all(4 <= p < T - 8 - 32 + 1 for p in ret), ret)

    def test_float16_is_float32_of_its_values(self):
        """The same values as float16 and as float32 arrays archive and attend to the same bits."""
        rng = np.random.default_rng(2)
        k, v = f16_values(rng, (2, 200, 64)), f16_values(rng, (2, 200, 64))
        q = rng.standard_normal((4, 1, 64)).astype(np.float32)
        outs = []
        for dt in (np.float32, np.float16):
            with self.client.create("py", self.name(), M, format="q3", hot_window=64, batch=32) as c:
                for layer in range(2):
                    c.append(layer, k.astype(dt), v.astype(dt))
                outs.append(c.attend(1, q))
        np.testing.assert_array_equal(outs[0], outs[1])

    def test_bad_input_appends_nothing(self):
        rng = np.random.default_rng(3)
        good = f16_values(rng, (2, 5, 64))
        buf = np.zeros(good.nbytes + 1, np.uint8)
        unaligned = np.frombuffer(buf.data, dtype=np.float32, count=good.size, offset=1).reshape(good.shape)
        huge = good.copy()
        huge[0, 4, 0] = 2.0 ** 60                              # finite, but its square overflows fp32
        with self.client.create("py", self.name(), M) as c:
            c.append(0, good, good)
            cases = [
                (kvarc.DtypeError, "dtype float64", lambda: c.append(0, good.astype(np.float64), good)),
                (TypeError, "dtype int32", lambda: c.append(0, good.astype(np.int32), good)),
                (TypeError, "list", lambda: c.append(0, good.tolist(), good)),
                (kvarc.DtypeError, "v is float16", lambda: c.append(0, good, good.astype(np.float16))),
                (ValueError, "shape [3, 5, 64]", lambda: c.append(0, np.zeros((3, 5, 64), np.float32), good)),
                (ValueError, "shape [2, 5, 128]", lambda: c.append(0, np.zeros((2, 5, 128), np.float32), good)),
                (ValueError, "shape [5, 64]", lambda: c.append(0, good[0], good[0])),
                (ValueError, "v: shape [2, 4, 64]", lambda: c.append(0, good, good[:, :4].copy())),
                (ValueError, "no tokens", lambda: c.append(0, good[:, :0], good[:, :0])),
                (ValueError, "k: not contiguous", lambda: c.append(0, good[:, ::-1], good)),
                (ValueError, "k: not contiguous", lambda: c.append(0, np.zeros((64, 5, 2), np.float32).T, good)),
                (ValueError, "layer 2", lambda: c.append(2, good, good)),
                (ValueError, "layer -1", lambda: c.append(-1, good, good)),
                (ValueError, "layer True", lambda: c.append(True, good, good)),
                (ValueError, "not aligned", lambda: c.append(0, unaligned, good)),
                (kvarc.Error, "2^59", lambda: c.append(0, huge, good)),         # libkvarc's own check
            ]
            for exc, words, call in cases:
                with self.subTest(words):
                    with self.assertRaises(exc) as cm:
                        call()
                    self.assertIsInstance(cm.exception, kvarc.Error)
                    self.assertIn(words, str(cm.exception))
                    self.assertEqual((c.length(0), c.length(1)), (5, 0), "a refused call appended")
            nan = good.copy()
            nan[1, 3, 7] = np.nan
            with self.assertRaises(kvarc.Error) as cm:
                c.append(0, nan, good)
            self.assertEqual(cm.exception.errno_name, "KVARC_ENONFINITE")
            self.assertEqual(c.length(0), 5)
            c.append(np.int64(1), good, good)                  # numpy integers are layers too
            q = np.zeros((4, 1, 64), np.float32)
            ro = np.zeros((4, 1, 64), np.float32)
            ro.flags.writeable = False
            for exc, words, call in [
                (ValueError, "q: shape [2, 1, 64]", lambda: c.attend(0, q[:2])),
                (TypeError, "out: a float32", lambda: c.attend(0, q, out=np.zeros((4, 1, 64), np.float16))),
                (ValueError, "out: shape [4, 2, 64]", lambda: c.attend(0, q, out=np.zeros((4, 2, 64), np.float32))),
                (ValueError, "out: read-only", lambda: c.attend(0, q, out=ro)),
                (ValueError, "out: overlaps q", lambda: c.attend(0, q, out=q)),
                (ValueError, "q: not contiguous", lambda: c.attend(0, np.zeros((4, 64, 1), np.float32).transpose(0, 2, 1)[:, :, ::-1])),
            ]:
                with self.subTest(words):
                    with self.assertRaises(exc) as cm:
                        call()
                    self.assertIn(words, str(cm.exception))
            qn = np.zeros((4, 2, 64), np.float32)
            qn[3, 1, 5] = np.inf
            with self.assertRaises(kvarc.Error) as cm:         # nothing cold yet: checked all the same
                c.attend(0, qn)
            self.assertEqual(cm.exception.errno_name, "KVARC_ENONFINITE")
            self.assertIn("query 1 head 3", cm.exception.message)
            with self.assertRaises(kvarc.Error) as cm:         # libkvarc's own check: more queries than tokens
                c.attend(0, np.zeros((4, 6, 64), np.float32))
            self.assertEqual(cm.exception.code, -22)
            self.assertEqual(c.stats().steps, 0)

    def test_options_are_checked(self):
        with self.assertRaises(TypeError) as cm:
            self.client.create("py", self.name(), M, topk=8)
        self.assertIn("unknown option 'topk'", str(cm.exception))
        with self.assertRaises(ValueError):
            self.client.create("py", self.name(), M, format="q9")
        with self.assertRaises(ValueError):
            self.client.create("py", self.name(), M, pos_mode="sideways")
        with self.assertRaises(ValueError):
            self.client.create("py", self.name(), M, sinks=-1)
        with self.assertRaises(kvarc.Error) as cm:              # libkvarc refuses it, with its message
            self.client.create("py", self.name(), M, coarse_blocks=3)
        self.assertEqual(cm.exception.errno_name, "EINVAL")
        self.assertIn("coarse", cm.exception.message)
        for bad, words in [(dict(combine=2), "combine 2"), (dict(scale=float("inf")), "scale inf"),
                           (dict(scale=-1.0), "scale -1"), (dict(cache_records=1 << 33), "cache_records 8589934592")]:
            with self.subTest(words):
                with self.assertRaises(kvarc.Error) as cm:          # refused at create, not at the first attend
                    self.client.create("py", self.name(), M, **bad)
                self.assertEqual(cm.exception.code, -22)
                self.assertIn(words, cm.exception.message)
        for ns, name in [("", "x"), ("py", ""), ("n" * 64, "x"), ("py", "x" * 128)]:
            with self.assertRaises(kvarc.Error) as cm:          # never silently cut to fit
                self.client.create(ns, name, M)
            self.assertEqual(cm.exception.code, -22)
            self.assertIn("bad name", cm.exception.message)
        with self.client.create("n" * 63, "x" * 127, M) as c:   # the longest names there are
            self.assertEqual(c.length(), 0)
        with self.assertRaises(ValueError) as cm:
            self.client.create("py", "a\0b", M)
        self.assertIn("NUL", str(cm.exception))
        with self.assertRaises(kvarc.InvalidArgument) as cm:    # refused before asking kvarcd
            self.client.attach("py", "x" * 128, M)
        self.assertIn("bad name", cm.exception.message)

    def test_fork_snapshot_restore_attach(self):
        rng = np.random.default_rng(4)
        k, v = f16_values(rng, (2, 2, 150, 64)), f16_values(rng, (2, 2, 150, 64))
        q = rng.standard_normal((4, 1, 64)).astype(np.float32)
        base = self.name()
        with self.client.create("py", base, M, **EXACT) as c:
            for layer in range(2):
                c.append(layer, k[layer], v[layer])
            c.fork("py", base + "-fork")
            c.snapshot("py", base + "-snap")
            want = c.attend(1, q)
        self.client.restore("py", base + "-snap", "py", base + "-restored")
        for name in (base + "-fork", base + "-restored"):
            with self.client.attach("py", name, M, top_k=400, shortlist=1, hot_window=32, batch=32, sinks=4) as d:
                self.assertEqual((d.length(0), d.length(1)), (150, 150))
                self.assertEqual(d.options["format"], kvarc.FORMATS["f16"])
                # the query attends as the 151st token: append the last token again would change it, so
                # compare attention of the same last token: exact either way
                np.testing.assert_allclose(d.attend(1, q), want, atol=1e-5)
        wrong = kvarc.Model(n_layers=2, n_kv_heads=2, n_q_heads=4, head_dim=128, fingerprint="test")
        with self.assertRaises(kvarc.Error) as cm:
            self.client.attach("py", base + "-fork", wrong)
        self.assertEqual(cm.exception.errno_name, "KVARC_ESHAPE")
        self.assertIn("head_dim", cm.exception.message)
        with self.assertRaises(kvarc.Error) as cm:
            self.client.attach("py", base + "-nothing", M)
        self.assertIn(base + "-nothing", str(cm.exception))

    def test_closed(self):
        c = self.client.create("py", self.name(), M)
        self.assertFalse(c.closed)
        c.close()
        c.close()                                               # twice: harmless
        self.assertTrue(c.closed)
        z = np.zeros((2, 1, 64), np.float32)
        for call in (lambda: c.append(0, z, z), lambda: c.attend(0, np.zeros((4, 1, 64), np.float32)), c.sync,
                     c.stats, c.length, lambda: c.fork("py", "x")):
            with self.assertRaises(kvarc.ClosedError) as cm:
                call()
            self.assertIn("is closed", str(cm.exception))

    def test_collected_together(self):
        """A client and its conversation collected together (a reference cycle) still sync the conversation
        before the client goes: nothing appended is lost, nothing is used after it is freed."""
        import gc
        name = self.name()
        cl = kvarc.Client(self.kd.data)
        c = cl.create("py", name, M, hot_window=64, batch=32)
        z = np.ones((2, 50, 64), np.float32)
        for layer in range(2):
            c.append(layer, z, z)
        holder = {"client": cl, "conv": c}
        holder["self"] = holder                                 # a cycle: only the collector frees it
        del cl, c, holder
        gc.collect()
        with self.client.attach("py", name, M, hot_window=64, batch=32) as again:
            self.assertEqual((again.length(0), again.length(1)), (50, 50))
        # the order the collector may choose: it clears weak references (the client's set of its
        # conversations) before finalizers, and may finalize the client first
        cl = kvarc.Client(self.kd.data)
        c = cl.create("py", name + "-b", M, hot_window=64, batch=32)
        for layer in range(2):
            c.append(layer, z, z)
        cl._convs.discard(c)
        cl.__del__()
        self.assertIsNotNone(cl._h, "the client was freed under an open conversation")
        with self.assertRaises(kvarc.ClosedError):
            cl.create("py", name + "-c", M)
        c.__del__()
        self.assertIsNone(cl._h, "the last conversation's close frees the client")
        with self.client.attach("py", name + "-b", M, hot_window=64, batch=32) as again:
            self.assertEqual(again.length(1), 50)

    def test_threads(self):
        """Two conversations attended from two threads at once give what each gives alone."""
        rng = np.random.default_rng(5)
        k, v = f16_values(rng, (2, 2, 400, 64)), f16_values(rng, (2, 2, 400, 64))
        q = rng.standard_normal((4, 1, 64)).astype(np.float32)
        convs = [self.client.create("py", self.name(), M, hot_window=64, batch=32) for _ in range(2)]
        for c in convs:
            for layer in range(2):
                c.append(layer, k[layer], v[layer])
        alone = [c.attend(0, q) for c in convs]
        res = [None, None]

        def work(i):
            res[i] = [convs[i].attend(0, q) for _ in range(20)]
        ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for i in range(2):
            for r in res[i]:
                np.testing.assert_array_equal(r, alone[i])
            convs[i].close()


class KvarcdGone(unittest.TestCase):
    def test_kvarcd_killed(self):
        """kvarcd killed under an open conversation: the calls that need it raise kvarc.Error naming
        the socket; nothing hangs; closing still frees the handle."""
        kd = kvarc.daemon.Kvarcd(args=["--threads", "2"]).start()
        try:
            with kvarc.Client(kd.data) as cl:
                c = cl.create("py", "gone", M, hot_window=64, batch=32)
                z = np.ones((2, 100, 64), np.float32)
                for layer in range(2):
                    c.append(layer, z, z)
                kd.kill()
                for layer in range(2):                  # held in memory: nothing to send yet
                    c.append(layer, z[:, :10].copy(), z[:, :10].copy())
                with self.assertRaises(kvarc.Error) as cm:
                    c.sync()
                self.assertIn("kvarcd at unix:" + kd.socket, cm.exception.message)
                with self.assertRaises(kvarc.Error) as cm:
                    c.attend(0, np.ones((4, 1, 64), np.float32))
                self.assertIn("kvarcd at unix:" + kd.socket, cm.exception.message)
                with self.assertRaises(kvarc.Error):
                    c.close()
                self.assertTrue(c.closed)
        finally:
            kd.stop()


if __name__ == "__main__":
    main()
