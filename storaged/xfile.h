/* xfile.h - the export file format (schema/SCHEMA.md section 10): the
 * preamble, section headers and the conversation section, encoded and
 * checked. Pure functions; transfer.c writes and reads whole files. */
#ifndef KVARC_XFILE_H
#define KVARC_XFILE_H

#include <stddef.h>
#include <stdint.h>

#include "kvd.h"

#define KVX_VERSION        1
#define KVX_PREAMBLE       16
#define KVX_HEADER         32
#define KVX_SECTION_MAGIC  0x5358564bu          /* "KVXS" */
#define KVX_MAX_PAYLOAD    (8u << 20)
#define KVX_LAYER_FIXED    24                   /* a layer section's fields before its arrays */

enum { KVX_CONV = 1, KVX_LAYER = 2, KVX_END = 3 };

typedef struct kvx_header {
    uint32_t kind;
    uint64_t index;
    uint64_t payload_bytes;
    uint32_t payload_crc;
} kvx_header;

/* The conversation section's fields (means follow them in the payload). */
typedef struct kvx_conv {
    kvd_shape shape;
    uint8_t   format_version;
    uint32_t  flags;            /* KVD_CONV_SNAPSHOT */
    uint64_t  length;
    int64_t   created_ns;
    char      src_ns[KVD_NS_MAX], src_name[KVD_NAME_MAX];
} kvx_conv;
#define KVX_CONV_FIXED 320      /* bytes of a kvx_conv in the payload, before the means */

/* Little-endian fields, as the format stores every integer. */
void     kvx_put32(uint8_t *p, uint32_t v);
void     kvx_put64(uint8_t *p, uint64_t v);
uint32_t kvx_get32(const uint8_t *p);
uint64_t kvx_get64(const uint8_t *p);

void kvx_preamble_encode(uint8_t out[KVX_PREAMBLE]);
/* 0, -EINVAL (not an export file: bad magic or preamble CRC) or
 * KVARC_EVERSION (*version newer than KVX_VERSION). */
int  kvx_preamble_decode(const uint8_t in[KVX_PREAMBLE], uint32_t *version);

void kvx_header_encode(const kvx_header *h, uint8_t out[KVX_HEADER]);
/* 0, or -EINVAL when the magic or the header CRC is wrong. */
int  kvx_header_decode(const uint8_t in[KVX_HEADER], kvx_header *h);

void kvx_conv_encode(const kvx_conv *c, uint8_t out[KVX_CONV_FIXED]);
void kvx_conv_decode(const uint8_t in[KVX_CONV_FIXED], kvx_conv *c);

#endif
