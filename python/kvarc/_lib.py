"""_lib.py - libkvarc.so through ctypes: finding it, its structs, its functions.

The structs mirror kvarc.h field for field (ctypes lays them out as the C
compiler does); tests/python checks them against kvarc_options_default().
Every function is declared with its argument and return types, so a wrong
call is a TypeError here instead of a crash inside the library. ctypes
releases the GIL around each call, so two threads using two conversations
run in parallel, as the C library allows.

Which library: $KVARC_LIBRARY if set (a path to libkvarc.so), else the
system's libkvarc.so.0 (an installed prefix on the loader's path), else the
build tree this package sits in (../build/client/libkvarc.so, then
../build*/), so that
PYTHONPATH=python alone works in a built checkout.
"""
import ctypes
import ctypes.util
import glob
import os

c_u32, c_u64, c_int, c_float, c_size = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int, ctypes.c_float, ctypes.c_size_t
c_char_p, c_void_p = ctypes.c_char_p, ctypes.c_void_p


class KvarcModel(ctypes.Structure):
    _fields_ = [("n_layers", c_u32), ("n_kv_heads", c_u32), ("n_q_heads", c_u32), ("head_dim", c_u32),
                ("dtype", c_int), ("rope_theta", c_float), ("rotary_dims", c_u32), ("rope_layout", c_int),
                ("fingerprint", c_char_p)]


class KvarcOptions(ctypes.Structure):
    _fields_ = [("format", c_int), ("pos_mode", c_int), ("seed", c_u64), ("sinks", c_u32),
                ("hot_window", c_u32), ("top_k", c_u32), ("shortlist", c_u32), ("batch", c_u32),
                ("max_chunk", c_u32), ("score_mode", c_int), ("combine", c_int), ("score_distance", ctypes.c_int32),
                ("cache_records", c_size), ("coarse_blocks", c_u32), ("prefill_coarse_blocks", c_u32),
                ("prefill_shortlist", c_u32), ("threads", c_u32), ("fast_tier", c_int), ("append_together", c_int),
                ("scale", c_float), ("use_gpu", c_int)]


class KvarcStats(ctypes.Structure):
    _fields_ = [(n, c_u64) for n in ("steps", "queries", "archived", "records_fetched", "cache_lookups",
                                     "cache_hits", "bytes_sent", "bytes_received", "ns_stage1", "ns_stage2",
                                     "ns_decode", "ns_attend", "ns_archive")]


class KvarcFormatInfo(ctypes.Structure):
    _fields_ = [("id", c_int), ("version", ctypes.c_uint8), ("name", c_char_p), ("code_bits", ctypes.c_uint8),
                ("rotated", ctypes.c_uint8), ("lossless", ctypes.c_uint8)]


P = ctypes.POINTER
_PROTOTYPES = {
    "kvarc_options_default": (None, [P(KvarcOptions)]),
    "kvarc_client_open": (c_int, [c_char_p, c_char_p, c_char_p, P(c_void_p)]),
    "kvarc_client_close": (None, [c_void_p]),
    "kvarc_client_errmsg": (c_char_p, [c_void_p]),
    "kvarc_conv_create": (c_int, [c_void_p, c_char_p, c_char_p, P(KvarcModel), P(KvarcOptions), c_void_p,
                                  P(c_void_p)]),
    "kvarc_conv_attach": (c_int, [c_void_p, c_char_p, c_char_p, P(KvarcModel), P(KvarcOptions), P(c_void_p)]),
    "kvarc_conv_sync": (c_int, [c_void_p]),
    "kvarc_conv_close": (c_int, [c_void_p]),
    "kvarc_errmsg": (c_char_p, [c_void_p]),
    "kvarc_append": (c_int, [c_void_p, c_u32, c_int, c_void_p, c_void_p, c_u32]),
    "kvarc_attend": (c_int, [c_void_p, c_u32, c_void_p, c_u32, c_void_p]),
    "kvarc_length": (c_u64, [c_void_p, c_u32]),
    "kvarc_fork": (c_int, [c_void_p, c_char_p, c_char_p, c_int]),
    "kvarc_restore": (c_int, [c_void_p, c_char_p, c_char_p, c_char_p, c_char_p]),
    "kvarc_conv_stats": (None, [c_void_p, P(KvarcStats)]),
    "kvarc_conv_options": (None, [c_void_p, P(KvarcOptions)]),
    "kvarc_uses_gpu": (c_int, [c_void_p]),
    "kvarc_append_device": (c_int, [c_void_p, c_u32, c_int, c_void_p, c_void_p, c_u32]),
    "kvarc_attend_device": (c_int, [c_void_p, c_u32, c_void_p, c_u32, c_void_p]),
    "kvarc_last_retrieved": (c_size, [c_void_p, c_u32, P(c_u64), c_size]),
    "kvarc_strerror": (c_char_p, [c_int]),
    "kvarc_format_get": (P(KvarcFormatInfo), [c_int]),
    "kvarc_format_by_name": (P(KvarcFormatInfo), [c_char_p]),
}


def _candidates():
    env = os.environ.get("KVARC_LIBRARY")
    if env:
        return [env]          # asked for: only that one, so a wrong path is an error, not a silent fallback
    here = os.path.dirname(os.path.abspath(__file__))
    out = [os.path.join(here, "libkvarc.so.0")]      # a wheel that carries the library
    found = ctypes.util.find_library("kvarc")
    out.append(found or "libkvarc.so.0")
    root = os.path.dirname(os.path.dirname(here))    # python/kvarc -> the checkout
    first = os.path.join(root, "build", "client", "libkvarc.so")      # the README's build directory
    out += [first] + [p for p in sorted(glob.glob(os.path.join(root, "build*", "client", "libkvarc.so"))) if p != first]
    return out


def load():
    tried = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path}: {e}")
            continue
        missing = [name for name in _PROTOTYPES if not hasattr(lib, name)]
        if missing:               # an older libkvarc: not this package's
            tried.append(f"{path}: lacks {', '.join(missing)} (an older libkvarc?)")
            continue
        for name, (res, args) in _PROTOTYPES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        lib.path = path
        return lib
    raise ImportError("kvarc: cannot load libkvarc.so (set KVARC_LIBRARY to its path, or install it with "
                      "`cmake --install`); tried:\n  " + "\n  ".join(tried))


lib = load()
