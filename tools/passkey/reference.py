#!/usr/bin/python3
"""reference.py - torch's logits for one prompt, for the C forward pass's test.

Loads a KVARCMDL file back into train.py's Model, runs the passkey prompt of
(--length, --seed) (tasks.py, the same sequence task.c generates) with full
attention, and writes reference.bin: "KVARCREF", u32 version 1, length of
the prompt, seed, vocab, then the logits [prompt length][vocab] fp32.

  /usr/bin/python3 tools/passkey/reference.py --model tests/fixtures/passkey
"""
import argparse
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402
import train  # noqa: E402


def load(path):
    with open(path, "rb") as f:
        blob = f.read()
    assert blob[:8] == b"KVARCMDL", path
    h = struct.unpack_from("<9I", blob, 8)
    theta, eps = struct.unpack_from("<2f", blob, 44)
    c = train.Config(vocab=h[1], d_model=h[2], n_layers=h[3], n_heads=h[4], n_kv_heads=h[5], head_dim=h[6],
                     ffn=h[7], train_len=h[8], rope_theta=theta, norm_eps=eps)
    model = train.Model(c)
    data = np.frombuffer(blob, dtype="<f4", offset=52)
    at = 0
    for t in train.tensors(model):
        n = t.numel()
        t.data.copy_(torch.from_numpy(data[at:at + n].copy()).view_as(t))
        at += n
    assert at == data.size, "size does not match the header"
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="directory with model.bin; reference.bin is written there")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    model = load(os.path.join(a.model, "model.bin"))
    model.eval()
    prompt, _ = tasks.passkey_sequence(tasks.Rng(a.seed), a.length)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0].float().numpy()
    with open(os.path.join(a.model, "reference.bin"), "wb") as f:
        f.write(b"KVARCREF")
        f.write(struct.pack("<4I", 1, len(prompt), a.seed, logits.shape[1]))
        f.write(logits.astype("<f4").tobytes())
    print(f"reference.bin: {len(prompt)} positions x {logits.shape[1]} logits, seed {a.seed}")


if __name__ == "__main__":
    main()
