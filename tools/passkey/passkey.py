#!/usr/bin/python3
"""passkey.py - the passkey experiments with the model's attention through kvarc's Python package.

The C runner (kvarc-passkey) runs the trained passkey model's forward pass
in C. This runner runs train.py's torch module itself, loaded from the
committed fixture, and puts kvarc into it by replacing ONE function,
train.Block.attention, with one that calls kvarc.torch.Cache.attention;
no weight is touched (their SHA-256 before and after is in the receipt).
It shows that an engine written in PyTorch gets kvarc through the Python
package, and measures what that path costs.

  passkey.py run [options]          the passkey grid (modes x lengths) and
                                    next-token agreement, as kvarc-passkey run
  passkey.py compare PY.json C.json the same prompts answered the same, mode by
                                    mode; agreement figures side by side
  passkey.py overhead [options]     decode-step time through Python against the
                                    C runner on the same prompts, in one run

Modes: kvarc (remapped positions), kvarc-true, no-retrieval (top_k 0), window
(exact attention over sinks + the last hot + top_k tokens, in torch), full.
Defaults are kvarc-passkey's (q3, top_k 64, hot 256, 4 sinks, chunks of 64,
keys centered with means calibrated on one prompt of the trained length).
Needs Debian's python3-torch and python3-numpy, and kvarc importable
(PYTHONPATH=python in a built checkout, or pip install ./python).
"""
import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
try:
    import kvarc
except ImportError:                    # a built checkout without PYTHONPATH
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import kvarc
import kvarc.daemon  # noqa: E402
import kvarc.torch  # noqa: E402
import reference  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402

MODES = ["full", "window", "kvarc", "kvarc-true", "no-retrieval"]
DEFAULTS = kvarc.default_options()
CALIB_SEED = 0xCA11B8A7E             # kvarc-passkey's calibration prompt


def digits(tokens):
    return "".join(str(t - tasks.DIGIT0) if tasks.DIGIT0 <= t < tasks.DIGIT0 + 10 else "?" for t in tokens)


def weights_sha(model):
    h = hashlib.sha256()
    for t in train.tensors(model):
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- attention backends: what train.Block.attention calls ----------------------

EXACT = train.Block.attention          # the model's own attention, kept for full / calibration
BACKEND = None                         # the current backend: f(block, q, k, v, pos, mask)


def attention(self, q, k, v, pos, mask):
    """The replacement of train.Block.attention: whatever backend is current."""
    return BACKEND(self, q, k, v, pos, mask)


class KvarcBackend:
    """kvarc attention through a kvarc.torch.Cache (K/V rounded to fp16 for the f16 format, as C)."""

    def __init__(self, cache, f16):
        self.cache, self.f16, self.seconds = cache, f16, 0.0

    def __call__(self, block, q, k, v, pos, mask):
        t0 = time.perf_counter()
        if self.f16:
            k, v = k.half(), v.half()
        out = self.cache.attention(block.layer_index, q, k, v)
        self.seconds += time.perf_counter() - t0
        return out


class WindowBackend:
    """Exact attention over the sinks and the last `window` tokens (0: every token), K turned to its
    true position; what kvarc-passkey's window and full modes compute."""

    def __init__(self, c, sinks, window):
        self.c, self.sinks, self.window = c, sinks, window
        self.k = [None] * c.n_layers
        self.v = [None] * c.n_layers

    def __call__(self, block, q, k, v, pos, mask):
        c, i = self.c, block.layer_index
        base = 0 if self.k[i] is None else self.k[i].shape[2]
        T = q.shape[2]
        p = torch.arange(base, base + T)
        kr = train.rope(k, p, c.rope_theta)
        self.k[i] = kr if self.k[i] is None else torch.cat([self.k[i], kr], dim=2)
        self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v], dim=2)
        lo = 0 if not self.window else max(0, base + 1 - self.window)
        keep = torch.cat([torch.arange(0, min(self.sinks, lo)), torch.arange(lo, base + T)])
        K, V = self.k[i][:, :, keep], self.v[i][:, :, keep]
        g = c.n_heads // c.n_kv_heads
        K, V = K.repeat_interleave(g, dim=1), V.repeat_interleave(g, dim=1)
        qr = train.rope(q, p, c.rope_theta)
        att = (qr @ K.transpose(-1, -2)) / (c.head_dim ** 0.5)
        j = keep[None, :]
        pq = p[:, None]
        allowed = (j <= pq) & ((j < self.sinks) | (self.window == 0) | (j >= pq + 1 - self.window))
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        return att @ V


# ---- the experiments --------------------------------------------------------------

class Runner:
    def __init__(self, a, model, client):
        self.a, self.model, self.client, self.c = a, model, client, model.c
        self.n = 0
        self.means = calibrate(model) if not a.no_means else None
        self.shape = dict(n_layers=self.c.n_layers, n_kv_heads=self.c.n_kv_heads, n_q_heads=self.c.n_heads,
                          head_dim=self.c.head_dim, dtype="f32", rope_theta=self.c.rope_theta,
                          rotary_dims=self.c.head_dim, rope_layout="half", fingerprint="kvarc-passkey")

    def options(self, mode, fmt, hot):
        a = self.a
        return dict(format=fmt, pos_mode=0 if mode == "kvarc-true" else 1, top_k=0 if mode == "no-retrieval" else
                    a.top_k, hot_window=hot, sinks=a.sinks, coarse_blocks=a.coarse, batch=min(DEFAULTS["batch"], hot),
                    max_chunk=max(DEFAULTS["max_chunk"], a.chunk))      # as trial.c's pk_setup_options

    def open(self, mode, fmt, hot, tag):
        """A backend for mode; returns (backend, cache or None)."""
        global BACKEND
        if mode in ("full", "window"):
            BACKEND = WindowBackend(self.c, self.a.sinks, 0 if mode == "full" else hot + self.a.top_k)
            return BACKEND, None
        self.n += 1
        name = f"py-{mode}-{tag}-{os.getpid()}-{self.n}"
        cache = kvarc.torch.Cache.create(self.client, "pk", name, means=self.means, **self.shape,
                                         **self.options(mode, fmt, hot))
        BACKEND = KvarcBackend(cache, fmt == "f16")
        return BACKEND, cache

    def forward(self, toks):
        with torch.no_grad():
            return self.model(torch.tensor([toks]))[0]

    def trial(self, mode, length, seed):
        a = self.a
        prompt, key = tasks.passkey_sequence(tasks.Rng(seed), length)
        needle = prompt.index(tasks.KEY, 1) + 1      # the first key digit (trial.c's needle)
        t0 = time.perf_counter()
        backend, cache = self.open(mode, a.format, a.hot, f"{length}-{seed}")
        try:
            for at in range(0, len(prompt), a.chunk):
                logits = self.forward(prompt[at:at + a.chunk])[-1]
            retrieved = None
            if cache is not None and mode != "no-retrieval":
                retrieved = any(needle <= p + 1 and p < needle + tasks.KEY_DIGITS
                                for h in range(self.c.n_kv_heads) for p in cache.conv.last_retrieved(h))
            answer = []
            td = time.perf_counter()
            k0 = getattr(backend, "seconds", 0.0)
            for i in range(tasks.KEY_DIGITS):
                answer.append(int(torch.argmax(logits)))
                if i + 1 < tasks.KEY_DIGITS:
                    logits = self.forward([answer[-1]])[-1]
            nxt = answer[-1]
            for _ in range(a.decode_steps):       # on past the answer, for timing (kvarc-passkey's --decode-steps)
                nxt = int(torch.argmax(self.forward([nxt])[-1]))
            decode_s = time.perf_counter() - td
            kvarc_s = getattr(backend, "seconds", 0.0) - k0
        finally:
            if cache is not None:
                cache.close()
        return dict(correct=answer == key, answer=digits(answer), retrieved=retrieved, decode_s=decode_s,
                    decode_kvarc_s=kvarc_s, seconds=time.perf_counter() - t0)

    def grid(self):
        a, out = self.a, []
        print(f"passkey through kvarc's Python package: {a.trials} prompts per length (seeds {a.seed}..), "
              f"format {a.format}, top_k {a.top_k}, hot {a.hot}, {a.sinks} sinks, chunks of {a.chunk}")
        for length in a.lengths:
            for mode in a.modes:
                if mode == "full" and length > a.full_max:
                    continue
                rs = []
                for t in range(a.trials):
                    print(f"\r{mode:<12} length {length:<6} trial {t + 1}/{a.trials} ...", end="", file=sys.stderr,
                          flush=True)
                    rs.append(self.trial(mode, length, a.seed + t))
                print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
                steps = a.trials * (tasks.KEY_DIGITS - 1 + a.decode_steps)
                e = dict(length=length, x_train=length / self.c.train_len, mode=mode,
                         correct=sum(r["correct"] for r in rs), trials=a.trials,
                         seconds_per_trial=round(sum(r["seconds"] for r in rs) / a.trials, 3),
                         decode_ms_per_step=round(sum(r["decode_s"] for r in rs) / steps * 1e3, 3),
                         answers=[r["answer"] for r in rs])
                if mode.startswith("kvarc") or mode == "no-retrieval":
                    e["decode_kvarc_ms_per_step"] = round(sum(r["decode_kvarc_s"] for r in rs) / steps * 1e3, 3)
                if rs[0]["retrieved"] is not None:
                    e["needle_retrieved"] = sum(bool(r["retrieved"]) for r in rs)
                print(f"{length:<8} {mode:<13} {e['correct']:>3}/{a.trials:<3} decode step "
                      f"{e['decode_ms_per_step']:8.3f} ms  ({e['seconds_per_trial']:.2f} s per trial)", flush=True)
                out.append(e)
        return out

    def agreement(self):
        """KL(full || kvarc) and top-1 agreement at every position >= sinks + hot + chunk of prompts of the
        trained length (seeds seed + 1000 + t), as kvarc-passkey's agreement table."""
        global BACKEND
        a, L, out = self.a, self.c.train_len, []
        print(f"\nnext-token agreement with full attention: {a.agree} prompts of {L} tokens, top_k {a.top_k}, "
              f"{a.sinks} sinks, KL(full || kvarc) in nats,\nat positions >= sinks + hot + chunk (chunk {a.chunk}):")
        print(f"{'format':<6} {'hot':>5} {'from':>5} {'positions':>9}  {'mode':<11} {'median KL':>10} "
              f"{'mean KL':>10} {'p90 KL':>10} {'max KL':>8} {'top-1':>7} {'s':>6}")
        full = {}
        for t in range(a.agree):
            prompt, _ = tasks.passkey_sequence(tasks.Rng(a.seed + 1000 + t), L)
            BACKEND = EXACT
            full[t] = (prompt, self.forward(prompt).double().log_softmax(-1))
        for hot in a.agree_hots:
            for fmt in a.agree_formats:
                for mode in ("kvarc", "kvarc-true"):
                    frm = a.sinks + hot + a.chunk
                    kls, top1, t0 = [], 0, time.perf_counter()
                    for t in range(a.agree):
                        prompt, lf = full[t]
                        _, cache = self.open(mode, fmt, hot, f"agree-{t}")
                        try:
                            lk = torch.cat([self.forward(prompt[at:at + a.chunk])
                                            for at in range(0, len(prompt), a.chunk)]).double().log_softmax(-1)
                        finally:
                            cache.close()
                        la, lb = lf[frm:], lk[frm:]
                        kls += (la.exp() * (la - lb)).sum(-1).tolist()
                        top1 += int((la.argmax(-1) == lb.argmax(-1)).sum())
                    secs = time.perf_counter() - t0
                    n = len(kls)
                    e = dict(mode=mode, format=fmt, hot_window=hot, top_k=a.top_k, prompts=a.agree, prompt_length=L,
                             from_position=frm, positions=n, median_kl_nats=quantile(kls, 0.5),
                             mean_kl_nats=sum(kls) / n if n else 0, p90_kl_nats=quantile(kls, 0.9),
                             max_kl_nats=max(kls) if n else 0, top1_agreement=top1 / n if n else 0,
                             seconds=round(secs, 2))
                    print(f"{fmt:<6} {hot:>5} {frm:>5} {n:>9}  {mode:<11} {e['median_kl_nats']:10.5f} "
                          f"{e['mean_kl_nats']:10.5f} {e['p90_kl_nats']:10.4f} {e['max_kl_nats']:8.3f} "
                          f"{e['top1_agreement']:7.4f} {secs:6.1f}", flush=True)
                    out.append(e)
        return out


def quantile(xs, q):
    """kvarc-passkey's quantile: interpolated between ranks."""
    if not xs:
        return 0.0
    s = sorted(xs)
    at = q * (len(s) - 1)
    lo = int(at)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (at - lo) * (s[hi] - s[lo])


def calibrate(model):
    """Centering means as kvarc-passkey makes them: the pre-RoPE K and V of one prompt of the trained length
    (seed CALIB_SEED) through full attention, averaged per (layer, kv head): [layers, kv, 2, hd] float32."""
    global BACKEND
    c = model.c
    prompt, _ = tasks.passkey_sequence(tasks.Rng(CALIB_SEED), c.train_len)
    acc = torch.zeros(c.n_layers, c.n_kv_heads, 2, c.head_dim, dtype=torch.float64)

    def capture(block, q, k, v, pos, mask):
        acc[block.layer_index, :, 0] += k[0].double().sum(1)
        acc[block.layer_index, :, 1] += v[0].double().sum(1)
        return EXACT(block, q, k, v, pos, mask)

    BACKEND = capture
    with torch.no_grad():
        model(torch.tensor([prompt]))
    return (acc / len(prompt)).float().contiguous()


def git_revision():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_model(model_dir):
    path = os.path.join(model_dir, "model.bin")
    with open(path, "rb") as f:
        file_sha = hashlib.sha256(f.read()).hexdigest()
    model = reference.load(path)
    model.eval()
    for i, b in enumerate(model.blocks):
        b.layer_index = i           # which conversation layer a block is (an attribute, not a weight)
    return model, path, file_sha


def common_args(ap):
    ap.add_argument("--model", default=os.path.join(ROOT, "tests", "fixtures", "passkey"),
                    help="directory with model.bin (default: the fixture)")
    ap.add_argument("--lengths", default="512,4096,16384", help="prompt lengths (default 512,4096,16384)")
    ap.add_argument("--trials", type=int, default=20, help="prompts per length; trial t uses seed S+t (default 20)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--format", default="q3", help="record format (default q3)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--hot", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=64, help="prefill tokens per forward call (default 64)")
    ap.add_argument("--coarse", type=int, default=0, help="coarse tier blocks (default 0: every cold token)")
    ap.add_argument("--no-means", action="store_true", help="do not center keys with calibrated means")
    ap.add_argument("--data", help="use the kvarcd of this data directory (default: start one on a temporary one)")
    ap.add_argument("--kvarcd", help="the kvarcd to start (default: $KVARCD_PATH, PATH, the build tree)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--decode-steps", type=int, default=0,
                    help="greedy decode steps after the answer, timed with it (default 0)")


def run(a):
    a.lengths = [int(x) for x in a.lengths.split(",")]
    a.modes = a.modes.split(",")
    for m in a.modes:
        if m not in MODES:
            sys.exit(f"passkey.py: unknown mode '{m}' ({', '.join(MODES)})")
    a.agree_hots = [int(x) for x in a.agree_hots.split(",")]
    a.agree_formats = (a.agree_formats or a.format).split(",")
    torch.set_num_threads(a.threads)
    model, path, file_sha = load_model(a.model)
    before = weights_sha(model)
    train.Block.attention = attention                 # the one function replaced
    kd = None if a.data else kvarc.daemon.Kvarcd(kvarcd=a.kvarcd).start()
    try:
        with kvarc.Client(a.data or kd.data) as client:
            r = Runner(a, model, client)
            grid = r.grid() if a.trials else []
            agree = r.agreement() if a.agree else []
    finally:
        if kd:
            kd.stop()
    after = weights_sha(model)
    with open(path, "rb") as f:
        file_after = hashlib.sha256(f.read()).hexdigest()
    receipt = dict(receipt="kvarc-python/1", command=" ".join(sys.argv), git_revision=git_revision(),
                   time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   environment=dict(python=platform.python_version(), torch=torch.__version__,
                                    kvarc=kvarc.__version__, libkvarc=kvarc._lib.lib.path,
                                    torch_threads=torch.get_num_threads()),
                   settings=dict(format=a.format, top_k=a.top_k, hot_window=a.hot, sinks=a.sinks, prefill_chunk=a.chunk,
                                 coarse_blocks=a.coarse, means_calibrated=not a.no_means, seed=a.seed),
                   replaced="train.Block.attention", model_file_sha256=file_sha, model_file_sha256_after=file_after,
                   weights_sha256_before=before, weights_sha256_after=after,
                   weights_unchanged=before == after and file_sha == file_after,
                   figures=dict(passkey=grid, agreement=agree))
    with open(a.receipt, "w") as f:
        json.dump(receipt, f, indent=1)
        f.write("\n")
    print(f"weights: sha256 {before[:16]}.. before and {after[:16]}.. after "
          f"({'unchanged' if receipt['weights_unchanged'] else 'CHANGED'}); receipt {a.receipt}")
    return 0 if receipt["weights_unchanged"] else 1


def compare(a):
    with open(a.python) as f, open(a.c) as g:
        py, c = json.load(f), json.load(g)
    cgrid = {(e["length"], e["mode"]): e for e in c["figures"].get("passkey", [])}
    same_all, n = True, 0
    for e in py["figures"]["passkey"]:
        ce = cgrid.get((e["length"], e["mode"]))
        if not ce or "answers" not in ce:
            continue
        n += 1
        diff = [i for i, (x, y) in enumerate(zip(e["answers"], ce["answers"])) if x != y]
        same = not diff and len(e["answers"]) == len(ce["answers"])
        same_all &= same
        print(f"{e['length']:<7} {e['mode']:<13} python {e['correct']:>3}/{e['trials']:<3} C {ce['correct']:>3}/"
              f"{ce['trials']:<3} answers {'the same, prompt for prompt' if same else 'DIFFER at ' + str(diff)}")
    cag = {(e["format"], e["hot_window"], e["mode"]): e for e in c["figures"].get("agreement", [])}
    for e in py["figures"]["agreement"]:
        ce = cag.get((e["format"], e["hot_window"], e["mode"]))
        if not ce:
            continue
        n += 1
        for k, fmt in (("median_kl_nats", "%.5f"), ("mean_kl_nats", "%.5f"), ("p90_kl_nats", "%.4f"),
                       ("max_kl_nats", "%.3f"), ("top1_agreement", "%.4f")):
            x, y = fmt % e[k], fmt % ce[k]
            print(f"{e['format']:<5} hot {e['hot_window']:<4} {e['mode']:<11} {k:<15} python {x:>9}  C {y:>9}"
                  f"{'' if x == y else '   differs'}")
    if not n:
        print("nothing to compare (the C receipt lacks per-prompt answers, or no common rows)")
        return 1
    return 0 if same_all else 1


def overhead(a):
    """Decode-step time of the Python path against the C runner on the same prompts: --repeat pairs of runs
    (C, then Python), alternating, in one invocation; the medians of the per-pair ratios."""
    c_runner = a.c_runner or os.path.join(ROOT, "build", "tools", "passkey", "kvarc-passkey")
    receipt, rows, pairs, rc, lengths = a.receipt, [], [], 0, a.lengths
    for rep in range(a.repeat):
        a.lengths, a.modes, a.agree, a.agree_hots, a.agree_formats = lengths, "kvarc", 0, "64", None   # run() parses
        with tempfile.TemporaryDirectory() as tmp:
            cr = os.path.join(tmp, "c.json")
            cmd = [c_runner, "run", "--lengths", lengths, "--trials", str(a.trials), "--modes", "kvarc",
                   "--decode-steps", str(a.decode_steps), "--gate", "0", "--agree", "0", "--receipt", cr, "--seed",
                   str(a.seed), "--format", a.format, "--top-k", str(a.top_k), "--hot", str(a.hot), "--sinks",
                   str(a.sinks), "--chunk", str(a.chunk), "--coarse", str(a.coarse), "--model", a.model]
            if a.no_means:
                cmd.append("--no-means")
            if a.kvarcd:
                cmd += ["--kvarcd", a.kvarcd]
            print(f"pair {rep + 1}/{a.repeat}, C runner: " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            a.receipt = os.path.join(tmp, "py.json")
            rc |= run(a)
            with open(cr) as f, open(a.receipt) as g:
                c, py = json.load(f), json.load(g)
        pairs.append(dict(c_runner=c, python=py))
        cg = {e["length"]: e for e in c["figures"]["passkey"]}
        for e in py["figures"]["passkey"]:
            ce = cg[e["length"]]
            rows.append(dict(pair=rep + 1, length=e["length"], c_step_ms=ce["decode_ms_per_step"],
                             python_step_ms=e["decode_ms_per_step"], c_kvarc_ms=ce["decode_kvarc_ms_per_step"],
                             python_kvarc_ms=e["decode_kvarc_ms_per_step"], same_answers=e["answers"] == ce["answers"]))
    print("\ndecode step: the model's forward of one token (C: model.c; Python: train.py's torch module), and of it\n"
          "the time inside kvarc (C: kvarc_append + kvarc_attend; Python: kvarc.torch.Cache.attention, the whole\n"
          "Python path: argument checks, ctypes, the same C calls), ms per step, same prompts:")
    print(f"{'pair':<5} {'length':<8} {'C step':>8} {'py step':>8} {'py / C':>7}   {'C kvarc':>8} {'py kvarc':>9} "
          f"{'py / C':>7} {'answers':>8}")
    for r in rows:
        r["step_ratio"] = r["python_step_ms"] / r["c_step_ms"]
        r["kvarc_ratio"] = r["python_kvarc_ms"] / r["c_kvarc_ms"]
        print(f"{r['pair']:<5} {r['length']:<8} {r['c_step_ms']:8.3f} {r['python_step_ms']:8.3f} {r['step_ratio']:6.3f}x   "
              f"{r['c_kvarc_ms']:8.3f} {r['python_kvarc_ms']:9.3f} {r['kvarc_ratio']:6.3f}x "
              f"{'same' if r['same_answers'] else 'DIFFER':>8}")
    medians = []
    for length in sorted({r["length"] for r in rows}):
        rs = [r for r in rows if r["length"] == length]
        m = dict(length=length, step_ratio=quantile([r["step_ratio"] for r in rs], 0.5),
                 kvarc_ratio=quantile([r["kvarc_ratio"] for r in rs], 0.5))
        medians.append(m)
        print(f"median over {len(rs)} pairs at {length}: whole step {m['step_ratio']:.3f}x, kvarc's part "
              f"{m['kvarc_ratio']:.3f}x")
    with open(receipt, "w") as f:
        json.dump(dict(receipt="kvarc-python-overhead/2", command=" ".join(sys.argv), git_revision=git_revision(),
                       time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), medians=medians, rows=rows,
                       pairs=pairs), f, indent=1)
        f.write("\n")
    print(f"receipt {receipt}")
    return rc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the passkey grid and next-token agreement")
    common_args(r)
    r.add_argument("--modes", default="window,kvarc,kvarc-true,no-retrieval",
                   help="of " + ",".join(MODES) + " (default: all but full)")
    r.add_argument("--full-max", type=int, default=4096, help="full attention only up to this length")
    r.add_argument("--agree", type=int, default=8, help="agreement prompts of the trained length (0 skips)")
    r.add_argument("--agree-hots", default="64", help="the agreement's hot windows (default 64)")
    r.add_argument("--agree-formats", help="the agreement's formats (default: --format's)")
    r.add_argument("--receipt", default="kvarc-passkey-python.json")
    c = sub.add_parser("compare", help="a Python receipt against a kvarc-passkey receipt")
    c.add_argument("python")
    c.add_argument("c")
    o = sub.add_parser("overhead", help="decode-step time against the C runner, same prompts, same run")
    common_args(o)
    o.set_defaults(lengths="4096,16384", trials=2, decode_steps=150)
    o.add_argument("--repeat", type=int, default=3, help="pairs of runs, C then Python (default 3)")
    o.add_argument("--c-runner", help="kvarc-passkey (default: build/tools/passkey/kvarc-passkey)")
    o.add_argument("--receipt", default="kvarc-passkey-overhead.json", help="both runs' receipts and the table")
    a = ap.parse_args()
    return {"run": run, "compare": compare, "overhead": overhead}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
