/* kvarc_schema.h - the byte formats every part of kvarc shares.
 *
 * One header for the daemon, the client, the kernels and the tools. The
 * byte-level specification is schema/SCHEMA.md; this header is its C form.
 * Everything here is pure computation: no I/O, no allocation, no globals
 * that change after load, so it is safe from any thread.
 *
 * Error convention (as liburing): functions return 0 or a positive count on
 * success and a negative code on failure. Negative errno values (-EINVAL,
 * -ENOMEM, ...) keep their POSIX meaning; kvarc's own codes live in the
 * reserved range [KVARC_ERR_LAST, KVARC_ERR_FIRST] below. kvarc_strerror()
 * names both.
 *
 * Caveats
 * - Only power-of-two head_dims 64, 128 and 256 are supported: the rotation
 *   is a Walsh-Hadamard transform. 80/96/112 would need a padded or blocked
 *   rotation and a new format version.
 * - All multi-byte fields are little-endian; the code assumes a
 *   little-endian host (static-asserted in schema.c).
 */
#ifndef KVARC_SCHEMA_H
#define KVARC_SCHEMA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- error codes (reserved range, all negative) ---------------------- */
#define KVARC_ERR_FIRST     (-1000)
#define KVARC_EHEADDIM      (-1001) /* head_dim not one of 64, 128, 256 */
#define KVARC_EFORMAT       (-1002) /* unknown record format id */
#define KVARC_EVERSION      (-1003) /* known format, unsupported version */
#define KVARC_EDTYPE        (-1004) /* unknown element dtype */
#define KVARC_ENONFINITE    (-1005) /* NaN or Inf in K, V or a query */
#define KVARC_ECORRUPT      (-1006) /* checksum or structure mismatch */
#define KVARC_ESHAPE        (-1007) /* shape differs from the bound shape */
#define KVARC_ELOCKED       (-1008) /* another kvarcd holds the conversation's writer lock */
#define KVARC_ERR_LAST      (-1099)

/* Static string for any code this project returns (0, -errno or kvarc's). */
const char *kvarc_strerror(int err);

/* ---- element types of K/V/Q handed to kvarc -------------------------- */
typedef enum kvarc_dtype {
    KVARC_DTYPE_F32  = 0,
    KVARC_DTYPE_F16  = 1,
    KVARC_DTYPE_BF16 = 2,
} kvarc_dtype;

/* Bytes per element of dt, or 0 for an unknown dtype. */
size_t kvarc_dtype_size(kvarc_dtype dt);
const char *kvarc_dtype_name(kvarc_dtype dt);

/* IEEE binary16 / bfloat16 <-> binary32, round to nearest even, NaN kept
 * a NaN, overflow to Inf. Bit-exact, no dependence on host FPU modes. */
float    kvarc_f16_to_f32(uint16_t h);
uint16_t kvarc_f32_to_f16(float f);
float    kvarc_bf16_to_f32(uint16_t b);
uint16_t kvarc_f32_to_bf16(float f);

/* Load element i of a dt array as fp32. */
float kvarc_load_f32(kvarc_dtype dt, const void *base, size_t i);
/* Store x as element i of a dt array (rounding to nearest even). */
void kvarc_store_f32(kvarc_dtype dt, void *base, size_t i, float x);

/* ---- record formats --------------------------------------------------- */
/* A record holds K and V of one (token, layer, kv head). Ids are stored in
 * block headers and conversation metadata; never renumber. */
typedef enum kvarc_format {
    KVARC_FMT_Q3   = 1, /* default: scale f32 + 3-bit Lloyd-Max codes, K and V */
    KVARC_FMT_Q4   = 2, /* scale f32 + 4-bit Lloyd-Max codes */
    KVARC_FMT_I8   = 3, /* scale f32 + int8 codes (uniform, max-abs) */
    KVARC_FMT_F16  = 4, /* lossless: K and V as IEEE fp16, unrotated */
    KVARC_FMT_BF16 = 5, /* lossless: K and V as bfloat16, unrotated */
} kvarc_format;

/* A conversation's position mode, which also names the kind of its
 * signatures (SCHEMA.md section 6): the byte stored in its metadata. */
typedef enum kvarc_pos_kind {
    KVARC_POS_TRUE_FREE = 0, /* true positions with position-free signatures: written
                                before kind 2 existed; they rank keys by the wrong
                                score, so retrieval refuses them (KVARC_EVERSION) */
    KVARC_POS_REMAPPED  = 1, /* remapped; kind-1 signatures (position-free, scored at
                                one fixed distance, the distance it attends at) */
    KVARC_POS_TRUE      = 2, /* true positions; kind-2 signatures (each key at its own
                                position, the query at its own) */
} kvarc_pos_kind;
#define KVARC_POS_KIND_MAX 2

#define KVARC_FMT_DEFAULT      KVARC_FMT_Q3
#define KVARC_FORMAT_VERSION   1   /* every format's current version byte */
#define KVARC_HEAD_DIM_MAX     256

typedef struct kvarc_format_info {
    kvarc_format id;
    uint8_t      version;      /* current version byte of this format */
    const char  *name;         /* "q3", "q4", "i8", "f16", "bf16" */
    uint8_t      code_bits;    /* bits per coordinate (3, 4, 8, 16) */
    uint8_t      rotated;      /* 1: centered + rotated codes; 0: raw values */
    uint8_t      lossless;     /* 1: values stored exactly (for that dtype) */
} kvarc_format_info;

/* Table entry for fmt, or NULL if unknown. */
const kvarc_format_info *kvarc_format_get(int fmt);
/* Format by name ("q3", ...), or NULL. */
const kvarc_format_info *kvarc_format_by_name(const char *name);

/* 0 if head_dim is supported, else KVARC_EHEADDIM. */
int kvarc_head_dim_check(int head_dim);

/* Bytes of one half (K or V) of a record; negative error code if the
 * format or head_dim is unsupported. */
int kvarc_record_half_bytes(int fmt, int head_dim);
/* Bytes of one record (K half then V half): 104 for q3 at head_dim 128. */
int kvarc_record_bytes(int fmt, int head_dim);

/* ---- signatures -------------------------------------------------------
 * The signature of a cold token, stored beside its record:
 *   bits : head_dim sign bits of y = R (k - mu_k), bit i set iff !(y_i < 0),
 *          bit i at byte i/8, bit position i%8 (LSB first): head_dim/8 bytes.
 *   scale: fp16 of ||y||_2^2 / ||y||_1 (0 for y = 0), the RaBitQ correction
 *          that makes  scale * sum_i q_i * (bit_i ? +1 : -1)  an estimate of
 *          q . y  for a rotated query q.
 * Kept as two planes (structure of arrays) so stage 1 streams the bits. */
static inline int kvarc_sig_bytes(int head_dim) { return head_dim / 8; }

/* ---- the randomized Hadamard rotation ---------------------------------
 * R x = (1/sqrt(d)) * H (D x), D = diag(signs), H the Sylvester Hadamard
 * matrix, computed with the butterfly order of kvarc_fwht(). R is
 * orthogonal, so q . k = (R q) . (R k). signs[i] is bit (i % 64) of the
 * (i / 64)-th output of splitmix64 seeded with `seed` (bit set -> -1). */
typedef struct kvarc_rotation {
    int      head_dim;                      /* d */
    uint64_t seed;                          /* the conversation's seed */
    float    inv_sqrt_d;                    /* fp32 of 1/sqrt(d) */
    float    signs[KVARC_HEAD_DIM_MAX];     /* +1 / -1 per coordinate */
} kvarc_rotation;

/* Fill *rot for head_dim and seed. 0 or KVARC_EHEADDIM. */
int kvarc_rotation_init(kvarc_rotation *rot, int head_dim, uint64_t seed);

/* The splitmix64 step used for rotation signs and by the test generators. */
uint64_t kvarc_splitmix64(uint64_t *state);

/* In-place unnormalized Walsh-Hadamard transform of x[0..d), the butterfly
 * order that defines bit-exact results (SCHEMA.md section 3). */
void kvarc_fwht(float *x, int d);

/* Pairwise-tree sum of x[0..d) (d a power of two), the reduction order
 * every implementation uses: for h = d/2 .. 1: x[i] += x[i + h]. Does not
 * modify x (works on a copy). */
float kvarc_tree_sum(const float *x, int d);

/* ---- Lloyd-Max codebooks (unit-variance Gaussian) ---------------------
 * Coordinate u = y_i * sqrt(d) / ||y|| is coded as the number of
 * boundaries b_j with u > b_j; it decodes to scale * level[code]. */
extern const float kvarc_q3_levels[8];
extern const float kvarc_q3_bounds[7];
extern const float kvarc_q4_levels[16];
extern const float kvarc_q4_bounds[15];

/* ---- CRC-32C (Castagnoli) -------------------------------------------
 * crc = kvarc_crc32c(0, buf, len); chain by passing the previous value.
 * Standard CRC-32C (reflected 0x82f63b78, init/xorout ~0): "123456789" ->
 * 0xe3069283. SSE4.2 instruction when the CPU has it, a table otherwise. */
uint32_t kvarc_crc32c(uint32_t crc, const void *buf, size_t len);

/* ---- segment blocks (SCHEMA.md section 9) -----------------------------
 * A segment file is a sequence of self-describing blocks, each a 64-byte
 * header then payload_bytes of payload. */
#define KVARC_BLOCK_MAGIC    0x3142564bu  /* "KVB1" little-endian */
#define KVARC_BLOCK_VERSION  2           /* the newest understood (2: data blocks with summaries) */
#define KVARC_BLOCK_VERSION_PLAIN 1      /* what is written where no summary needs 2, so an older reader
                                            reads every block but those */
#define KVARC_SUM_ITEMS      2           /* summary items per 64-position block (SCHEMA.md 6.3) */
#define KVARC_SUM_BLOCK      64          /* positions a summary covers */
#define KVARC_BLOCK_HEADER   64

typedef enum kvarc_block_kind {
    KVARC_BLOCK_DATA        = 1, /* signatures + records of one layer */
    KVARC_BLOCK_CONV_CREATE = 2, /* a conversation's metadata (create or fork) */
    KVARC_BLOCK_CONV_DELETE = 3, /* a conversation deleted */
} kvarc_block_kind;

typedef struct kvarc_block_header {
    uint8_t  kind;           /* kvarc_block_kind */
    uint8_t  version;        /* KVARC_BLOCK_VERSION */
    uint8_t  format;         /* record format id (data blocks) */
    uint8_t  format_version; /* that format's version byte */
    uint16_t head_dim;
    uint16_t n_heads;        /* KV heads in this block */
    uint32_t layer;
    uint64_t conv;           /* internal conversation id */
    uint64_t first_pos;      /* position of the block's first token */
    uint32_t count;          /* tokens */
    uint32_t rec_bytes;      /* bytes per record */
    uint32_t payload_bytes;  /* bytes after the header */
    uint32_t payload_crc;    /* meta blocks: CRC of the payload; data: 0 */
    uint64_t seq;            /* engine-wide sequence number (replay order) */
    uint32_t n_sum;          /* data blocks: the 64-position blocks whose summaries this one carries,
                                0 or kvarc_block_n_sum(first_pos, count) (version 2) */
    uint32_t header_crc;     /* filled by encode, checked by decode */
} kvarc_block_header;

/* Serialize h into 64 bytes (computing header_crc, stored back into h). */
void kvarc_block_header_encode(kvarc_block_header *h, uint8_t out[KVARC_BLOCK_HEADER]);
/* Parse and check magic, version and header CRC: 0 or KVARC_ECORRUPT
 * (KVARC_EVERSION for a newer block version). */
int kvarc_block_header_decode(const uint8_t in[KVARC_BLOCK_HEADER], kvarc_block_header *h);

/* Data block geometry. Per head h, first all signature sections
 * (bits[count][d/8], scales[count] fp16, zero pad to 4, crc32c), then all
 * record sections (count slots of record[rec_bytes] + crc32c); the
 * payload is zero-padded to a multiple of 8. */
size_t kvarc_block_sig_section(uint32_t count, int head_dim);
size_t kvarc_block_payload_bytes(uint32_t count, int head_dim, int n_heads, uint32_t rec_bytes);
size_t kvarc_block_sig_offset(const kvarc_block_header *h, int head);   /* from block start */
/* Summaries (SCHEMA.md section 6.3), after the record sections: per head h
 * bits[n_sum][KVARC_SUM_ITEMS][d/8], scales[n_sum][KVARC_SUM_ITEMS] fp16,
 * zero pad to 4, crc32c. Summary j is of the 64-position block
 * first_pos / 64 + j: the blocks whose last position the block holds. */
uint32_t kvarc_block_n_sum(uint64_t first_pos, uint32_t count);
size_t kvarc_block_sum_section(uint32_t n_sum, int head_dim);
size_t kvarc_block_payload_bytes_sum(uint32_t count, int head_dim, int n_heads, uint32_t rec_bytes, uint32_t n_sum);
size_t kvarc_block_sum_offset(const kvarc_block_header *h, int head);
size_t kvarc_block_slot_offset(const kvarc_block_header *h, int head, uint32_t t);

/* CRC of head's summary section (without its CRC), seeded with the key
 * (conv, layer, head | 0x40000000, first_pos). */
uint32_t kvarc_sum_section_crc(uint64_t conv, uint32_t layer, uint64_t first_pos, uint32_t head,
                               const uint8_t *section, size_t bytes);
/* CRC of a signature section (bits+scales+pad of one head), over
 * (conv, layer, first_pos, head) then the section, so a section cannot
 * pass in another block. */
uint32_t kvarc_sig_section_crc(uint64_t conv, uint32_t layer, uint64_t first_pos, uint32_t head,
                               const uint8_t *section, size_t bytes);
/* CRC of a record slot: over (conv, layer, head, pos) then the record, so
 * a record read from the wrong place does not verify. */
uint32_t kvarc_record_crc(uint64_t conv, uint32_t layer, uint32_t head, uint64_t pos,
                          const uint8_t *rec, uint32_t rec_bytes);

#ifdef __cplusplus
}
#endif
#endif /* KVARC_SCHEMA_H */
