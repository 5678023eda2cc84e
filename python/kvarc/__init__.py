"""kvarc - the KV-cache archive, from Python (ctypes over libkvarc.so).

An inference worker hands kvarc the K and V of every token, layer by layer,
and asks it for attention: the newest tokens and a few sinks stay exact in
memory, every token is archived in kvarcd, and each query attends over the
sinks, the hot window and the top_k most relevant cold tokens retrieved
from the archive. kvarc.h (installed beside libkvarc.so) is the reference;
this package says the same in Python terms.

    import kvarc, numpy as np
    with kvarc.Client("/var/lib/kvarc") as cl:           # kvarcd's data directory or socket
        m = kvarc.Model(n_layers=32, n_kv_heads=8, n_q_heads=32, head_dim=128, rope_theta=500000)
        with cl.create("ns", "chat-1", m, top_k=64) as conv:
            conv.append(0, k, v)                          # [8, n, 128] pre-RoPE, float32/16, bfloat16
            out = conv.attend(0, q)                       # [32, n_q, 128] pre-RoPE queries

Arrays are numpy arrays or torch tensors (CPU, or CUDA when libkvarc was
built with CUDA), [heads, tokens, head_dim], C-contiguous; they are read in
place, never copied (a float16/bfloat16 query is converted to float32, the
type attention runs in). Failures raise kvarc.Error (.code, .message) or its
subclasses InvalidArgument (also a ValueError), DtypeError (also a
TypeError) and ClosedError; nothing is appended by a call that raises for
its arguments. kvarc.torch fits a decoder's attention (see its docstring).

Threads: a Conversation is used by one thread at a time; different
conversations may run in parallel threads (libkvarc releases the GIL); a
Client may be shared. Do not fork a process holding a Client and use it
in the child (gRPC's rule).
"""
import collections
import ctypes
import errno
import operator
import os
import threading
import weakref

from ._errors import ClosedError, DtypeError, Error, InvalidArgument
from ._lib import KvarcModel, KvarcOptions, KvarcStats, lib
from . import _arrays

__version__ = "0.1.0"
__all__ = ["Client", "Conversation", "Model", "Stats", "Error", "InvalidArgument", "DtypeError", "ClosedError",
           "default_options", "FORMATS", "__version__"]

FORMATS = {}
for _id in range(1, 16):
    _fi = lib.kvarc_format_get(_id)
    if _fi:
        FORMATS[_fi.contents.name.decode()] = _id
_DTYPES = {"f32": 0, "float32": 0, "f16": 1, "float16": 1, "bf16": 2, "bfloat16": 2}
_ENUMS = {
    "pos_mode": {"true": 0, "remapped": 1},
    "score_mode": {"asym": 0, "asymmetric": 0, "hamming": 1},
    "combine": {"max": 0, "mean": 1},
}
_OPTION_NAMES = [f for f, _ in KvarcOptions._fields_]
Stats = collections.namedtuple("Stats", [f for f, _ in KvarcStats._fields_])
Stats.__doc__ = """Counters since the conversation was opened (kvarc_stats): steps and queries attended,
archived (token, layer) pairs, records_fetched over the wire, cache_lookups/cache_hits, bytes_sent/
bytes_received, and ns_stage1, ns_stage2, ns_decode, ns_attend, ns_archive (nanoseconds spent)."""


def _strerror(code):
    return lib.kvarc_strerror(code).decode()


def _check(rc, what, msg):
    """Raise for a failed call: -EINVAL as InvalidArgument (a ValueError), KVARC_EDTYPE as DtypeError."""
    if rc:
        m = msg() if callable(msg) else msg
        cls = {-errno.EINVAL: InvalidArgument, -1004: DtypeError}.get(rc, Error)
        raise cls(f"{what}: {m or _strerror(rc)} ({_strerror(rc)})", rc)


def _index(val, what, n):
    """val as an index 0..n-1 (ints and numpy integers, not bools), else InvalidArgument."""
    try:
        if isinstance(val, bool):
            raise TypeError
        i = operator.index(val)
    except TypeError:
        raise InvalidArgument(f"{what} {val!r}: an integer is expected") from None
    if not 0 <= i < n:
        raise InvalidArgument(f"{what} {i}: 0..{n - 1}")
    return i


def _cstr(s, what):
    """s as bytes for C, refusing an embedded NUL (C would cut the string there)."""
    if not isinstance(s, str) or "\0" in s:
        raise InvalidArgument(f"{what} {s!r}: a string without NUL characters is expected")
    return s.encode()


def _as_dict(o):
    """A KvarcOptions as a dict of keyword arguments."""
    return {f: getattr(o, f) for f in _OPTION_NAMES}


def default_options():
    """kvarc's defaults (kvarc_options_default) as a dict of keyword arguments."""
    return _as_dict(_options({}))


def _options(kw):
    o = KvarcOptions()
    lib.kvarc_options_default(ctypes.byref(o))
    for key, val in kw.items():
        if key not in _OPTION_NAMES:
            raise TypeError(f"unknown option '{key}'; kvarc's options: {', '.join(_OPTION_NAMES)}")
        if key == "format" and isinstance(val, str):
            if val not in FORMATS:
                raise InvalidArgument(f"format '{val}': not one of {', '.join(FORMATS)}")
            val = FORMATS[val]
        elif key in _ENUMS and isinstance(val, str):
            if val not in _ENUMS[key]:
                raise InvalidArgument(f"{key} '{val}': not one of {', '.join(_ENUMS[key])}")
            val = _ENUMS[key][val]
        if isinstance(val, bool):
            val = int(val)
        try:
            setattr(o, key, val)
        except TypeError:
            raise InvalidArgument(f"option {key}={val!r}: a number is expected") from None
        if getattr(o, key) != val and not (key == "scale" and abs(getattr(o, key) - val) <= 1e-6 * abs(val)):
            raise InvalidArgument(f"option {key}={val!r} does not fit its C type")
    return o


class Model:
    """The model a conversation is bound to (kvarc_model); attach checks it.

    n_layers, n_kv_heads, n_q_heads, head_dim (64, 128 or 256); dtype of the
    K/V the model produces ('f32', 'f16', 'bf16'); rope_theta; rotary_dims
    (None: the whole head; 0: no RoPE, keys used as given); rope_layout
    ('half': NeoX/HF half-split pairs, 'interleaved'); fingerprint: the
    client's name for the weights (<= 63 bytes)."""

    def __init__(self, n_layers, n_kv_heads, n_q_heads, head_dim, dtype="f32", rope_theta=10000.0,
                 rotary_dims=None, rope_layout="half", fingerprint=""):
        if dtype not in _DTYPES:
            raise InvalidArgument(f"model dtype '{dtype}': not one of f32, f16, bf16")
        layouts = {"half": 0, "interleaved": 1, 0: 0, 1: 1}
        if rope_layout not in layouts:
            raise InvalidArgument(f"rope_layout {rope_layout!r}: 'half' or 'interleaved'")
        for name, val in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("n_q_heads", n_q_heads),
                          ("head_dim", head_dim)):
            if not isinstance(val, int) or val <= 0 or val >= 1 << 32:
                raise InvalidArgument(f"model {name}={val!r}: a positive integer is expected")
        fp = _cstr(fingerprint, "model fingerprint")
        if len(fp) > 63:
            raise InvalidArgument(f"model fingerprint: {len(fp)} bytes, at most 63")
        self.n_layers, self.n_kv_heads, self.n_q_heads, self.head_dim = n_layers, n_kv_heads, n_q_heads, head_dim
        self.dtype, self.rope_theta = dtype, float(rope_theta)
        self.rotary_dims = head_dim if rotary_dims is None else rotary_dims
        self.rope_layout, self.fingerprint = rope_layout, fingerprint
        self._c = KvarcModel(n_layers, n_kv_heads, n_q_heads, head_dim, _DTYPES[dtype], self.rope_theta,
                             self.rotary_dims, layouts[rope_layout], fp)

    def __repr__(self):
        return (f"kvarc.Model(n_layers={self.n_layers}, n_kv_heads={self.n_kv_heads}, n_q_heads={self.n_q_heads}, "
                f"head_dim={self.head_dim}, dtype='{self.dtype}', rope_theta={self.rope_theta}, "
                f"rotary_dims={self.rotary_dims}, rope_layout='{self.rope_layout}', "
                f"fingerprint='{self.fingerprint}')")


def _default_target():
    return os.environ.get("KVARC_DATA") or os.path.join(os.path.expanduser("~"), ".local", "share", "kvarc")


class Client:
    """A connection to one kvarcd (kvarc_client_open).

    target: kvarcd's data directory, its socket ("unix:/path" or a path), or
    "host:port" (then token, and tls_ca_file for TLS). Default: $KVARC_DATA,
    else ~/.local/share/kvarc, kvarcd's own default. Nothing is sent until
    the first call. close() (or leaving a `with` block) closes every
    conversation still open on it first, then the connection."""

    def __init__(self, target=None, token=None, tls_ca_file=None):
        self.target = target or _default_target()
        h = ctypes.c_void_p()
        rc = lib.kvarc_client_open(self.target.encode(), token.encode() if token else None,
                                   tls_ca_file.encode() if tls_ca_file else None, ctypes.byref(h))
        _check(rc, f"connecting to {self.target}", None)
        self._h = h
        self._convs = weakref.WeakSet()
        self._open = 0            # conversations open in C: the C client is freed only after the last
        self._closing = False     # close() or the finalizer asked for it while some were still open
        self._mu = threading.Lock()   # over _open, _closing and the free: a Client may be shared

    def _handle(self):
        if self._h is None or self._closing:
            raise ClosedError(f"client of {self.target} is closed")
        return self._h

    def _errmsg(self):
        return lib.kvarc_client_errmsg(self._h).decode(errors="replace") if self._h else ""

    def create(self, ns, name, model, means=None, **options):
        """Create ns/name for model, with options as keyword arguments (kvarc's defaults otherwise;
        kvarc.default_options() lists them). means: per (layer, kv head) centering means of K then V,
        float32 [n_layers, n_kv_heads, 2, head_dim] (C-contiguous), or None for zero. Raises
        kvarc.Error if it exists already (-EEXIST) or an option is out of range (-EINVAL)."""
        o = _options(options)
        mp = None
        if means is not None:
            want = (model.n_layers, model.n_kv_heads, 2, model.head_dim)
            if tuple(means.shape) != want:
                raise InvalidArgument(f"means: shape {list(means.shape)}, not {list(want)}")
            v = _arrays.view(means.reshape(model.n_layers * model.n_kv_heads * 2, 1, model.head_dim), "means",
                             model.n_layers * model.n_kv_heads * 2, model.head_dim, 1)
            if v.dtype != _arrays.F32 or v.cuda:
                raise DtypeError("means: float32 on the CPU is expected")
            mp = v.ptr
        h = ctypes.c_void_p()
        rc = lib.kvarc_conv_create(self._handle(), _cstr(ns, "namespace"), _cstr(name, "name"), ctypes.byref(model._c),
                                   ctypes.byref(o), mp, ctypes.byref(h))
        _check(rc, f"creating {ns}/{name}", self._errmsg)
        return self._adopt(Conversation(self, h, ns, name, model))

    def attach(self, ns, name, model, **options):
        """Open the existing ns/name (another worker's, a fork, a restored snapshot): checks model against
        it (kvarc.Error KVARC_ESHAPE naming both sides), loads its signatures, sinks and hot window, and
        continues at its archived length (the shortest layer's if a writer died mid-sync: feed the tokens
        again from conv.length() on). format, pos_mode and seed come from the conversation."""
        o = _options(options)
        h = ctypes.c_void_p()
        rc = lib.kvarc_conv_attach(self._handle(), _cstr(ns, "namespace"), _cstr(name, "name"), ctypes.byref(model._c),
                                   ctypes.byref(o), ctypes.byref(h))
        _check(rc, f"attaching {ns}/{name}", self._errmsg)
        return self._adopt(Conversation(self, h, ns, name, model))

    def _adopt(self, conv):
        with self._mu:
            self._convs.add(conv)
            self._open += 1
        return conv

    def _conv_closed(self):
        with self._mu:
            self._open -= 1
            if self._closing and self._open == 0:
                self._free()

    def _free(self):              # with _mu held
        if self._h is not None:
            lib.kvarc_client_close(self._h)
            self._h = None

    def restore(self, snap_ns, snap_name, dst_ns, dst_name):
        """Make dst_ns/dst_name from the snapshot snap_ns/snap_name (then attach it)."""
        rc = lib.kvarc_restore(self._handle(), _cstr(snap_ns, "namespace"), _cstr(snap_name, "name"),
                               _cstr(dst_ns, "namespace"), _cstr(dst_name, "name"))
        _check(rc, f"restoring {snap_ns}/{snap_name} as {dst_ns}/{dst_name}", self._errmsg)

    def close(self):
        """Close every conversation still open on this client (each syncs: the first failure is raised
        after all are closed), then the connection. Closing twice is harmless. Do not close a client
        while another thread is inside a call on one of its conversations."""
        if self._h is None:
            return
        first = None
        for conv in list(self._convs):
            try:
                conv.close()
            except Error as e:
                first = first or e
        with self._mu:
            self._closing = True
            if self._open == 0:   # else (a conversation the garbage collector holds): freed after its close
                self._free()
        if first:
            raise first

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:   # noqa: BLE001 - a finalizer cannot report
            pass


class Conversation:
    """One archived conversation, open for appending and attending (a kvarc_conv).

    Created by Client.create / Client.attach; close() (or leaving a `with`
    block) syncs and frees it. Used by one thread at a time."""

    def __init__(self, client, handle, ns, name, model):
        self.client, self._h, self.ns, self.name, self.model = client, handle, ns, name, model
        o = KvarcOptions()
        lib.kvarc_conv_options(handle, ctypes.byref(o))
        self.options = _as_dict(o)
        """The options in effect (format, pos_mode and seed the conversation's; score_distance resolved)."""

    def _handle(self):
        if self._h is None:
            raise ClosedError(f"conversation {self.ns}/{self.name} is closed")
        return self._h

    def _errmsg(self):
        return lib.kvarc_errmsg(self._h).decode(errors="replace") if self._h else ""

    def _layer(self, layer):
        return _index(layer, f"{self.ns}/{self.name}: layer", self.model.n_layers)

    def append(self, layer, k, v):
        """Append n tokens of one layer: k and v [n_kv_heads, n, head_dim], pre-RoPE, the same dtype
        (float32, float16, or bfloat16 as torch tensors), C-contiguous, both CPU or both CUDA. Every
        layer must be given the same tokens; positions continue from the layer's length. Archived in
        batches (options batch); a batch is durable when the call that completes it returns (with
        append_together=2, when the next call that waits for kvarcd returns). Raises for bad arguments
        before anything is appended; kvarc.Error if libkvarc or kvarcd refuses (the message says why)."""
        h, layer, m = self._handle(), self._layer(layer), self.model
        kv = _arrays.view(k, "k", m.n_kv_heads, m.head_dim)
        vv = _arrays.view(v, "v", m.n_kv_heads, m.head_dim, kv.shape[1])
        if kv.dtype != vv.dtype:
            raise DtypeError(f"k is {_arrays.DTYPE_NAMES[kv.dtype]} but v is {_arrays.DTYPE_NAMES[vv.dtype]}")
        if kv.cuda != vv.cuda:
            raise InvalidArgument("k and v: one on the GPU, the other not")
        if kv.cuda:
            _arrays.cuda_sync(kv.obj)
        fn = lib.kvarc_append_device if kv.cuda else lib.kvarc_append
        rc = fn(h, layer, kv.dtype, kv.ptr, vv.ptr, kv.shape[1])
        if rc:
            _check(rc, f"{self.ns}/{self.name} layer {layer}: append of {kv.shape[1]} tokens", self._errmsg)

    def attend(self, layer, q, out=None):
        """Attention of the layer's last n_q appended tokens (1 for a decode step, up to options
        max_chunk for a prefill chunk). q: [n_q_heads, n_q, head_dim] pre-RoPE queries (float32; a
        float16/bfloat16 query is converted, and the result returned in its dtype). out: None (a new
        array of q's kind and device), or a float32 C-contiguous array of q's shape to write into.
        Query i attends to the sinks, its top_k cold tokens per kv head and the hot window up to itself."""
        h, layer, m = self._handle(), self._layer(layer), self.model
        qv = _arrays.view(q, "q", m.n_q_heads, m.head_dim)
        q32 = _arrays.as_f32(qv)
        if out is None:                   # ours: nothing to check
            ov = _arrays.empty_f32(qv)
            res = ov.obj
        else:
            res = out
            ov = _arrays.view(res, "out", m.n_q_heads, m.head_dim, qv.shape[1], out=True)
            if ov.dtype != _arrays.F32 or ov.cuda != qv.cuda or ov.kind != qv.kind:
                raise DtypeError(f"out: a float32 {'CUDA ' if qv.cuda else ''}{qv.kind} array like q is expected")
            if _arrays.overlap(ov, q32):
                raise InvalidArgument("out: overlaps q (libkvarc reads q while it writes out)")
        if qv.cuda:
            _arrays.cuda_sync(qv.obj)
        fn = lib.kvarc_attend_device if qv.cuda else lib.kvarc_attend
        rc = fn(h, layer, q32.ptr, qv.shape[1], ov.ptr)
        if rc:
            _check(rc, f"{self.ns}/{self.name} layer {layer}: attend of {qv.shape[1]} queries", self._errmsg)
        if out is None and qv.dtype != _arrays.F32:
            return res.to(q.dtype) if qv.kind == "torch" else res.astype(q.dtype)
        return res

    def length(self, layer=0):
        """Tokens appended to layer."""
        return int(lib.kvarc_length(self._handle(), self._layer(layer)))

    def sync(self):
        """Archive every appended token now, so that kvarcd holds the whole conversation."""
        _check(lib.kvarc_conv_sync(self._handle()), f"{self.ns}/{self.name}: sync", self._errmsg)

    def fork(self, ns, name):
        """Fork this conversation at its current length into ns/name (syncs first; shares the prefix
        without copying it). Every layer must have the same length."""
        rc = lib.kvarc_fork(self._handle(), _cstr(ns, "namespace"), _cstr(name, "name"), 0)
        _check(rc, f"{self.ns}/{self.name}: fork to {ns}/{name}", self._errmsg)

    def snapshot(self, ns, name):
        """Snapshot this conversation at its current length as ns/name (restore with
        Client.restore, then attach)."""
        rc = lib.kvarc_fork(self._handle(), _cstr(ns, "namespace"), _cstr(name, "name"), 1)
        _check(rc, f"{self.ns}/{self.name}: snapshot to {ns}/{name}", self._errmsg)

    def stats(self):
        """kvarc.Stats: the counters since the conversation was opened."""
        s = KvarcStats()
        lib.kvarc_conv_stats(self._handle(), ctypes.byref(s))
        return Stats(*(getattr(s, f) for f in Stats._fields))

    @property
    def uses_gpu(self):
        """True if this conversation's stage 1 and attention run on the GPU."""
        return bool(lib.kvarc_uses_gpu(self._handle()))

    def last_retrieved(self, head=0):
        """The cold positions the last attend retrieved for its last query and kv head `head`, best
        first (a list of ints; empty when nothing was cold). For measuring retrieval."""
        h = self._handle()
        head = _index(head, "kv head", self.model.n_kv_heads)
        n = lib.kvarc_last_retrieved(h, head, None, 0)
        buf = (ctypes.c_uint64 * max(n, 1))()
        n = min(n, lib.kvarc_last_retrieved(h, head, buf, n))
        return list(buf[:n])

    def close(self):
        """Sync, then free the handle (kvarc_conv_close). The handle is freed even when the sync fails,
        and that failure is raised. Closing twice is harmless."""
        if self._h is None:
            return
        h, self._h = self._h, None
        self.client._convs.discard(self)
        rc = lib.kvarc_conv_close(h)    # syncs; a failure's message goes to the client's
        msg = self.client._errmsg() if rc else ""
        self.client._conv_closed()      # the client's C handle outlives every conversation of it
        _check(rc, f"{self.ns}/{self.name}: close (sync)", msg)

    def __del__(self):
        try:
            self.close()
        except Exception:   # noqa: BLE001 - a finalizer cannot report
            pass

    @property
    def closed(self):
        return self._h is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._h is None else f"length {self.length()}"
        return f"<kvarc.Conversation {self.ns}/{self.name}, {state}>"
