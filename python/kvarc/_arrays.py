"""_arrays.py - what libkvarc needs to know about a numpy array or torch tensor.

A C call takes a pointer to [heads][tokens][head_dim] elements in row-major
order. Anything else (another shape, a dtype libkvarc does not take, a
strided view) is refused here, before any call, with an exception naming
the argument: a hidden copy would hide a cost from the caller, and a
wrong layout would be wrong K/V archived forever. torch is imported only
when a tensor is handed over, so numpy users do not need it.
"""
from . import _errors

F32, F16, BF16 = 0, 1, 2
DTYPE_NAMES = {F32: "float32", F16: "float16", BF16: "bfloat16"}


class View:
    """A checked array: pointer, kvarc dtype, shape, where it lives."""

    __slots__ = ("obj", "ptr", "dtype", "shape", "kind", "cuda")

    def __init__(self, obj, ptr, dtype, shape, kind, cuda):
        self.obj, self.ptr, self.dtype, self.shape, self.kind, self.cuda = obj, ptr, dtype, shape, kind, cuda


_TORCH_CODES = None                    # torch dtype -> kvarc dtype, once torch is seen
_NP_CODES = {"<f4": F32, "<f2": F16}   # numpy's type strings (little-endian) -> kvarc dtype


def _torch_codes():
    global _TORCH_CODES
    if _TORCH_CODES is None:
        import torch
        _TORCH_CODES = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}
    return _TORCH_CODES


def _is_torch(x):
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def view(x, what, heads, head_dim, tokens=None, out=False):
    """Check x as [heads][tokens][head_dim] (tokens: any >= 1 if None; out: written, so writeable)."""
    if _is_torch(x):
        codes = _torch_codes()
        if x.dtype not in codes:
            raise _errors.DtypeError(f"{what}: dtype {x.dtype} (libkvarc takes float32, float16, bfloat16)")
        dt, shape, contiguous, cuda = codes[x.dtype], tuple(x.shape), x.is_contiguous(), x.device.type == "cuda"
        if x.device.type not in ("cpu", "cuda"):
            raise _errors.InvalidArgument(f"{what}: a tensor on {x.device} (libkvarc takes CPU and CUDA tensors)")
        kind, ptr = "torch", x.data_ptr()
        aligned, writeable = ptr % x.element_size() == 0, True
    elif hasattr(x, "__array_interface__"):
        ai = x.__array_interface__        # one lookup: type, shape, strides (None: C-contiguous), address
        dt = _NP_CODES.get(ai["typestr"])
        if dt is None:
            raise _errors.DtypeError(f"{what}: dtype {getattr(x, 'dtype', ai['typestr'])} (libkvarc takes float32 "
                                     "and float16 numpy arrays, bfloat16 as torch tensors)")
        shape, contiguous, cuda = ai["shape"], ai["strides"] is None, False
        (ptr, readonly), kind = ai["data"], "numpy"
        aligned, writeable = ptr % (4 if dt == F32 else 2) == 0, not readonly
    else:
        raise _errors.DtypeError(f"{what}: a {type(x).__name__} (libkvarc takes numpy arrays and torch tensors)")
    want = f"[{heads}, {'tokens' if tokens is None else tokens}, {head_dim}]"
    if len(shape) != 3 or shape[0] != heads or shape[2] != head_dim or (tokens is not None and shape[1] != tokens):
        raise _errors.InvalidArgument(f"{what}: shape {list(shape)}, not {want} (heads, tokens, head_dim)")
    if shape[1] == 0:
        raise _errors.InvalidArgument(f"{what}: no tokens (shape {list(shape)})")
    if not contiguous:
        raise _errors.InvalidArgument(f"{what}: not contiguous (strides {_strides(x)}); libkvarc reads "
                                      f"{want} row-major: pass {what}.contiguous() / np.ascontiguousarray({what})")
    if not aligned:
        raise _errors.InvalidArgument(f"{what}: not aligned to its element size (address {ptr:#x})")
    if out and not writeable:
        raise _errors.InvalidArgument(f"{what}: read-only")
    return View(x, ptr, dt, shape, kind, cuda)


def overlap(a, b):
    """True if two views' bytes overlap."""
    import math
    na = math.prod(a.shape) * (4 if a.dtype == F32 else 2)
    nb = math.prod(b.shape) * (4 if b.dtype == F32 else 2)
    return a.cuda == b.cuda and a.ptr < b.ptr + nb and b.ptr < a.ptr + na


def _strides(x):
    return list(x.stride()) if _is_torch(x) else [s // x.itemsize for s in x.strides]


def _f32_like(x, v):
    """The View of x, a new float32 array of v's shape, kind and device (ours: nothing to check)."""
    return View(x, x.data_ptr() if v.kind == "torch" else x.ctypes.data, F32, v.shape, v.kind, v.cuda)


def empty_f32(v):
    """A new float32 array of v's shape, on v's device, of v's kind, as a View."""
    if v.kind == "torch":
        import torch
        return _f32_like(torch.empty(v.shape, dtype=torch.float32, device=v.obj.device), v)
    import numpy as np
    return _f32_like(np.empty(v.shape, dtype=np.float32), v)


def as_f32(v):
    """v itself if float32, else a float32 copy (a query in f16/bf16)."""
    if v.dtype == F32:
        return v
    return _f32_like(v.obj.float() if v.kind == "torch" else v.obj.astype("float32"), v)


def cuda_sync(t):
    """Wait for the work queued on t's device by torch's current stream: libkvarc copies device memory
    on CUDA's default stream, which does not wait for a non-blocking stream's work."""
    import torch
    torch.cuda.current_stream(t.device).synchronize()
