/* task.h - the passkey task generator, the C twin of tools/passkey/tasks.py.
 *
 * Same splitmix64 stream and draw order as tasks.py, so a sequence named
 * by (seed, length) is the same token for token in torch and in C (the
 * model test checks the model's logits against a torch reference). */
#ifndef KVARC_PASSKEY_TASK_H
#define KVARC_PASSKEY_TASK_H

#include <stdint.h>

enum {
    PK_BOS = 1, PK_KEY = 2, PK_QUESTION = 3, PK_DOT = 4, PK_DIGIT0 = 5, PK_FILLER0 = 15,
    PK_VOCAB = 64, PK_KEY_DIGITS = 5,
};

typedef struct pk_rng {
    uint64_t s;
} pk_rng;

uint64_t pk_next(pk_rng *g);
uint64_t pk_below(pk_rng *g, uint64_t n);

/* A passkey prompt of length - 5 tokens into prompt (caller's, >= length),
 * ending "? key:"; the 5 distinct answer digits into key; the needle's
 * position (of "key:") into *depth. length >= 16. */
void pk_passkey_sequence(pk_rng *g, uint32_t length, int32_t *prompt, int32_t key[PK_KEY_DIGITS],
                         uint32_t *depth);

#endif
