"""kvarc.torch - a decoder's attention through kvarc, for PyTorch models.

A decoder layer computes this step's q, k, v from its input and attends q
over every earlier k, v. With kvarc the layer hands over this step's
pre-RoPE k and v (kvarc archives them and applies RoPE itself) and gets the
attention of q back; everything earlier lives in kvarc (exact sinks and hot
window, the rest retrieved from kvarcd). Batch 1 per conversation.

    import kvarc, kvarc.torch
    cl = kvarc.Client()
    cache = kvarc.torch.Cache.create(cl, "ns", "chat-1", n_layers=..., n_kv_heads=..., n_q_heads=...,
                                     head_dim=..., rope_theta=..., top_k=64)
    # inside layer `i`'s attention, in place of RoPE + softmax(q k^T) v:
    out = cache.attention(i, q, k, v)       # q [1, Hq, T, hd], k, v [1, Hkv, T, hd] -> [1, Hq, T, hd]

Call every layer with the same T new tokens, in layer order, as a forward
pass does: prefill the prompt in chunks of any size (split here into
pieces of the conversation's max_chunk), then one token per step. The
model's own positions and mask are not used: kvarc numbers the tokens it
was given. tools/passkey/passkey.py replaces one function of a trained
model (Block.attention) this way and leaves every weight as it was.

Tensors may be views (a transpose of the projection's output, as models
make them): they are made contiguous here (a copy when they are not), as
the attention they replace would read them. K and V are handed over in
their dtype (float32, float16, bfloat16); the query is attended in float32
and the output returned in q's dtype, on q's device.
"""
import torch

import kvarc


class Cache:
    """kvarc attention for one conversation (a kvarc.Conversation it owns or borrows)."""

    def __init__(self, conv, own=False):
        self.conv, self.own = conv, own
        self.max_chunk = conv.options["max_chunk"]

    @classmethod
    def create(cls, client, ns, name, n_layers, n_kv_heads, n_q_heads, head_dim, dtype="f32", rope_theta=10000.0,
               rotary_dims=None, rope_layout="half", fingerprint="", means=None, **options):
        """A new conversation ns/name for a model of this shape (kvarc.Model's arguments), options as
        kvarc.Client.create takes them; the cache closes it when closed."""
        m = kvarc.Model(n_layers, n_kv_heads, n_q_heads, head_dim, dtype, rope_theta, rotary_dims, rope_layout,
                        fingerprint)
        return cls(client.create(ns, name, m, means=means, **options), own=True)

    def attention(self, layer, q, k, v):
        """Append this step's k, v of `layer` and attend q: q [Hq, T, hd] or [1, Hq, T, hd], k and v
        [Hkv, T, hd] or [1, Hkv, T, hd], pre-RoPE; returns q's shape and dtype. A prefill longer than
        max_chunk goes in pieces (append, attend, next): if one fails, the pieces before it stay appended
        (conv.length(layer) says how far it got)."""
        batched = q.dim() == 4
        if batched:
            if q.shape[0] != 1 or k.dim() != 4 or v.dim() != 4 or k.shape[0] != 1 or v.shape[0] != 1:
                raise kvarc.InvalidArgument(f"kvarc.torch: batch 1 per conversation (q {list(q.shape)}, "
                                            f"k {list(k.shape)}, v {list(v.shape)})")
            q, k, v = q[0], k[0], v[0]
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
            raise kvarc.InvalidArgument(f"kvarc.torch: q, k, v as [heads, tokens, head_dim] (q {list(q.shape)}, "
                                        f"k {list(k.shape)}, v {list(v.shape)})")
        T = q.shape[1]
        if k.shape[1] != T or v.shape[1] != T:
            raise kvarc.InvalidArgument(f"kvarc.torch: {T} queries but k has {k.shape[1]} and v {v.shape[1]} tokens")
        if T <= self.max_chunk:             # a decode step or one chunk: no slicing
            self.conv.append(layer, k.contiguous(), v.contiguous())
            o = self.conv.attend(layer, q.contiguous())
            return o.unsqueeze(0) if batched else o
        out = []
        for s in range(0, T, self.max_chunk):
            e = min(T, s + self.max_chunk)
            self.conv.append(layer, k[:, s:e].contiguous(), v[:, s:e].contiguous())
            out.append(self.conv.attend(layer, q[:, s:e].contiguous()))
        o = out[0] if len(out) == 1 else torch.cat(out, dim=1)
        return o.unsqueeze(0) if batched else o

    def length(self, layer=0):
        """Tokens the layer holds."""
        return self.conv.length(layer)

    def close(self):
        """Close the conversation if this cache created it (a borrowed one stays open)."""
        if self.own:
            self.conv.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
