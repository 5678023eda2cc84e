#!/usr/bin/python3
"""train.py - train kvarc's passkey model: a small Llama-style decoder.

The model the end-to-end check (tools/passkey/, issue 7) runs from C
through libkvarc. No model can be downloaded here, so we train our own on
a synthetic task generator (tasks.py) with Debian's python3-torch on the
CPU, and commit the weights as a fixture with the seed and the command
that made them. CI never trains.

Architecture (what model.c implements, and must keep implementing):
  token embedding -> n_layers x [RMSNorm -> attention (RoPE half-split,
  GQA: n_heads query heads share n_kv_heads K/V heads) -> residual,
  RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head.
No biases, untied lm_head, attention scale 1/sqrt(head_dim).

Training. Plain passkey sequences alone stay at chance for a long time
(DESIGN section 6); half of every batch is a copy task (a random segment
repeated later, loss on the repeat) that grows induction heads, the other
half passkey sequences with the loss on the answer digits only.
A curriculum of lengths (64 -> 128 -> 256 -> 512 tokens): at 512 tokens
from the start, attention at initialisation spreads over hundreds of
keys, the gradient toward the one key to copy from is that much weaker,
and the loss sat on its unigram plateau for 600+ steps (two runs here);
short sequences first form the induction circuit in cheap steps, the
longer phases teach it the distances up to the trained length.

Run (what made tests/fixtures/passkey/):
  /usr/bin/python3 tools/passkey/train.py --out tests/fixtures/passkey
The file format is written by export() below and read by model.c.
"""
import argparse
import hashlib
import json
import math
import os
import platform
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402


class Config:
    def __init__(self, **kw):
        self.vocab = len(tasks.VOCAB)
        self.d_model = 256
        self.n_layers = 2
        self.n_heads = 4
        self.n_kv_heads = 2
        self.head_dim = 64
        self.ffn = 512
        self.rope_theta = 10000.0
        self.norm_eps = 1e-5
        self.train_len = 512
        self.__dict__.update(kw)


def rope(x, pos, theta):
    """x [B, H, T, D], half-split (NeoX/HF) pairs (i, i + D/2)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2.0 / d)
    ang = pos[:, None].double() * inv[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.wq = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        self.ffn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.w1 = nn.Linear(c.d_model, c.ffn, bias=False)
        self.w3 = nn.Linear(c.d_model, c.ffn, bias=False)
        self.w2 = nn.Linear(c.ffn, c.d_model, bias=False)

    def attention(self, q, k, v, pos, mask):
        """Causal attention of pre-RoPE q [B, n_heads, T, hd] over k, v [B, n_kv_heads, T, hd] at
        positions pos; [B, n_heads, T, hd]. The one function an engine replaces to put its own
        attention in (kvarc.torch: tools/passkey/passkey.py)."""
        c = self.c
        q, k = rope(q, pos, c.rope_theta), rope(k, pos, c.rope_theta)
        g = c.n_heads // c.n_kv_heads
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(c.head_dim)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        return att @ v

    def forward(self, x, pos, mask):
        c = self.c
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.wk(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        o = self.attention(q, k, v, pos, mask).transpose(1, 2).reshape(B, T, c.n_heads * c.head_dim)
        x = x + self.wo(o)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Model(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.emb = nn.Embedding(c.vocab, c.d_model)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layers)])
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.head = nn.Linear(c.d_model, c.vocab, bias=False)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, tok):
        T = tok.shape[1]
        pos = torch.arange(T)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        x = self.emb(tok)
        for b in self.blocks:
            x = b(x, pos, mask)
        return self.head(self.norm(x))


def tensors(model):
    """The parameters in the file's order (export, reference.py's load, model.c)."""
    out = [model.emb.weight]
    for b in model.blocks:
        out += [b.attn_norm.w, b.wq.weight, b.wk.weight, b.wv.weight, b.wo.weight,
                b.ffn_norm.w, b.w1.weight, b.w3.weight, b.w2.weight]
    return out + [model.norm.w, model.head.weight]


def export(model, path):
    """KVARCMDL v1: header, then fp32 tensors, row-major [out][in]."""
    c = model.c
    with open(path, "wb") as f:
        f.write(b"KVARCMDL")
        f.write(struct.pack("<9I", 1, c.vocab, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads,
                            c.head_dim, c.ffn, c.train_len))
        f.write(struct.pack("<2f", c.rope_theta, c.norm_eps))

        for t in tensors(model):
            f.write(t.detach().float().contiguous().numpy().astype("<f4").tobytes())


def passkey_accuracy(model, gen, n, length):
    model.eval()
    ok = 0
    with torch.no_grad():
        for _ in range(n):
            seq, key = tasks.passkey_sequence(gen, length)
            toks = list(seq)
            for _d in range(len(key)):
                logits = model(torch.tensor([toks]))[0, -1]
                toks.append(int(logits.argmax()))
            ok += toks[len(seq):] == key
    model.train()
    return ok / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for model.bin, vocab.txt, train.json")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--curriculum", default="64:32:600,128:32:400,256:16:400,512:16:1000",
                    help="phases LENGTH:BATCH:STEPS, in order (the last length is the trained length)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    a = ap.parse_args()

    phases = [tuple(int(x) for x in p.split(":")) for p in a.curriculum.split(",")]
    steps = sum(p[2] for p in phases)
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    gen = tasks.Rng(a.seed)
    c = Config(train_len=max(p[0] for p in phases))
    model = Model(c)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters, {c.n_layers} layers, d{c.d_model}, "
          f"{c.n_heads}q/{c.n_kv_heads}kv heads of {c.head_dim}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    t0 = time.time()
    log = []
    plan = [(length, batch) for length, batch, n in phases for _ in range(n)]
    for step in range(1, steps + 1):
        length, batch = plan[step - 1]
        toks, tgt = tasks.batch(gen, batch, length)
        logits = model(torch.tensor(toks))
        loss = F.cross_entropy(logits.view(-1, c.vocab), torch.tensor(tgt).view(-1), ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            print(f"step {step}/{steps} length {length} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if step % a.eval_every == 0 or step == steps:
            acc = passkey_accuracy(model, tasks.Rng(1000 + step), 50, length)
            log.append({"step": step, "length": length, "loss": round(loss.item(), 4), "passkey_acc": acc,
                        "seconds": round(time.time() - t0)})
            print(f"eval step {step}: passkey accuracy at {length} = {acc:.2f}", flush=True)

    os.makedirs(a.out, exist_ok=True)
    mpath = os.path.join(a.out, "model.bin")
    export(model, mpath)
    with open(os.path.join(a.out, "vocab.txt"), "w") as f:
        f.write("\n".join(tasks.VOCAB) + "\n")
    with open(mpath, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    meta = {
        "command": "/usr/bin/python3 tools/passkey/train.py " + " ".join(sys.argv[1:]),
        "seed": a.seed, "curriculum": a.curriculum, "steps": steps, "lr": a.lr, "threads": a.threads,
        "parameters": n_params, "config": {k: v for k, v in c.__dict__.items()},
        "model_sha256": sha, "seconds": round(time.time() - t0),
        "torch": torch.__version__, "python": platform.python_version(),
        "eval": log,
    }
    with open(os.path.join(a.out, "train.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {mpath} sha256 {sha} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
