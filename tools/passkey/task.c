/* task.c - the passkey task generator (see task.h and tasks.py). */
#include "task.h"

#include <string.h>

uint64_t pk_next(pk_rng *g)
{
    uint64_t z = (g->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t pk_below(pk_rng *g, uint64_t n)
{
    return pk_next(g) % n;
}

static uint32_t put_needle(int32_t *p, uint32_t t, const int32_t *key)
{
    p[t++] = PK_KEY;
    for (int j = 0; j < PK_KEY_DIGITS; j++)
        p[t++] = key[j];
    p[t++] = PK_DOT;
    return t;
}

void pk_passkey_sequence(pk_rng *g, uint32_t length, int32_t *prompt, int32_t key[PK_KEY_DIGITS], uint32_t *depth)
{
    int digits[10], nd = 10;
    for (int i = 0; i < 10; i++)
        digits[i] = i;
    for (int i = 0; i < PK_KEY_DIGITS; i++) {   /* Python's list.pop(index) */
        int at = (int)pk_below(g, (uint64_t)nd);
        key[i] = PK_DIGIT0 + digits[at];
        memmove(digits + at, digits + at + 1, (size_t)(nd - at - 1) * sizeof *digits);
        nd--;
    }
    const uint32_t n_needle = PK_KEY_DIGITS + 2, n_prompt = length - PK_KEY_DIGITS;
    const uint32_t n_filler = n_prompt - 1 - n_needle - 2;
    const uint32_t d = (uint32_t)pk_below(g, (uint64_t)n_filler + 1);
    uint32_t t = 0;
    prompt[t++] = PK_BOS;
    /* the filler is drawn in one run, then split at the needle (as tasks.py) */
    for (uint32_t i = 0; i < n_filler; i++) {
        if (i == d)
            t = put_needle(prompt, t, key);
        prompt[t++] = PK_FILLER0 + (int32_t)pk_below(g, PK_VOCAB - PK_FILLER0);
    }
    if (d == n_filler)
        t = put_needle(prompt, t, key);
    prompt[t++] = PK_QUESTION;
    prompt[t++] = PK_KEY;
    *depth = d + 1;
}
