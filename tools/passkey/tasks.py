"""tasks.py - the synthetic task generator the passkey model is trained on.

The C side (tools/passkey/task.c) generates the same sequences from the
same seed (same splitmix64 stream, same draw order), so a sequence can be
named by its seed in a receipt and checked against torch bit for bit.

A passkey sequence:
  <bos> filler ... key: D D D D D . filler ... ? key:   -> D D D D D
The needle sits at a uniformly random depth; the five digits are distinct
(a 2-layer induction circuit copies "the token after the one I just
saw", which a repeated digit would make ambiguous). Filler is drawn
uniformly from the filler words.
A copy sequence: random tokens with one long random segment repeated
later; the loss is on the repeat.
"""

VOCAB = ["<pad>", "<bos>", "key:", "?", "."] + [str(d) for d in range(10)] + [
    "the", "grass", "is", "green", "sky", "blue", "sun", "warm", "river", "runs",
    "over", "stones", "and", "a", "bird", "sings", "in", "tree", "wind", "moves",
    "slow", "clouds", "drift", "far", "hills", "rise", "quiet", "roads", "bend", "toward",
    "old", "towns", "where", "people", "walk", "talk", "of", "rain", "light", "falls",
    "on", "fields", "night", "comes", "stars", "shine", "morning", "returns", "again"]
BOS, KEY, QUESTION, DOT, DIGIT0, FILLER0 = 1, 2, 3, 4, 5, 15
N_FILLER = len(VOCAB) - FILLER0
KEY_DIGITS = 5
M64 = (1 << 64) - 1


class Rng:
    """splitmix64; below(n) = next() % n (task.c draws the same way)."""

    def __init__(self, seed):
        self.s = seed & M64

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def below(self, n):
        return self.next() % n

    def choice(self, xs):
        return xs[self.below(len(xs))]


def passkey_sequence(g, length):
    """(prompt, key): prompt ends with '? key:'; len(prompt) + 5 == length."""
    digits = list(range(10))
    key = []
    for _ in range(KEY_DIGITS):
        key.append(DIGIT0 + digits.pop(g.below(len(digits))))
    needle = [KEY] + key + [DOT]
    n_prompt = length - KEY_DIGITS
    n_filler = n_prompt - 1 - len(needle) - 2
    depth = g.below(n_filler + 1)
    filler = [FILLER0 + g.below(N_FILLER) for _ in range(n_filler)]
    prompt = [BOS] + filler[:depth] + needle + filler[depth:] + [QUESTION, KEY]
    return prompt, key


def copy_sequence(g, length):
    """(tokens, first, end): tokens[first:end] repeat tokens[src:src + end - first].

    The repeated segment is long (16 .. length/2 tokens), so that about a
    quarter of the tokens carry the copy loss: a dense signal that grows the
    induction circuit (previous-token head + induction head) quickly."""
    seg = 16 + g.below(length // 2 - 16)
    toks = [BOS] + [DOT + g.below(len(VOCAB) - DOT) for _ in range(length - 1)]
    first = 1 + seg + g.below(length - 2 * seg)
    src = 1 + g.below(first - seg)
    toks[first:first + seg] = toks[src:src + seg]
    return toks, first, first + seg


def batch(g, n, length):
    """n sequences of length + 1 tokens -> inputs [n][length], targets [n][length] (-1: no loss)."""
    xs, ys = [], []
    for i in range(n):
        y = [-1] * length
        if i % 2 == 0:
            prompt, key = passkey_sequence(g, length + 1)
            seq = prompt + key
            for j in range(len(prompt), len(seq)):
                y[j - 1] = seq[j]
        else:
            seq, a, b = copy_sequence(g, length + 1)
            for j in range(a + 1, b):
                y[j - 1] = seq[j]
        xs.append(seq[:length])
        ys.append(y)
    return xs, ys
