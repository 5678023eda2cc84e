/* pb_strings.c - refuse string fields that hold a NUL byte.
 *
 * Walks the protobuf wire format of a request alongside its descriptor:
 * each field is a varint key (number << 3 | wire type) and a value; only
 * length-delimited values of string fields (checked) and of message fields
 * (walked recursively) matter, the rest is skipped by its wire type. */
#include <errno.h>
#include <string.h>

#include "kvd_internal.h"
#include "pb_strings.h"

#define PB_DEPTH_MAX 16     /* our messages nest 2 deep; deeper is refused */

static int varint(const uint8_t *p, size_t len, size_t *at, uint64_t *v)
{
    *v = 0;
    for (int shift = 0; shift < 64 && *at < len; shift += 7) {
        uint8_t b = p[(*at)++];
        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return 0;
    }
    return -EINVAL;
}

static int walk(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t len, size_t base,
                int depth, kvd_err *err)
{
    size_t at = 0;
    if (depth > PB_DEPTH_MAX)
        return kvd_fail(err, -EINVAL, "request %s nests messages deeper than %d", d->name, PB_DEPTH_MAX);
    while (at < len) {
        uint64_t key, n;
        if (varint(p, len, &at, &key))
            goto bad;
        unsigned wt = (unsigned)(key & 7);
        const ProtobufCFieldDescriptor *f =
            key >> 3 <= UINT32_MAX ? protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3)) : NULL;
        switch (wt) {
        case 0:
            if (varint(p, len, &at, &n))
                goto bad;
            break;
        case 1:
        case 5:
            if (len - at < (wt == 1 ? 8u : 4u))
                goto bad;
            at += wt == 1 ? 8 : 4;
            break;
        case 2:
            if (varint(p, len, &at, &n) || n > len - at)
                goto bad;
            if (f && f->type == PROTOBUF_C_TYPE_STRING) {
                const uint8_t *z = memchr(p + at, 0, (size_t)n);
                if (z)
                    return kvd_fail(err, -EINVAL, "field '%s' of %s holds a NUL byte at its byte %zu: "
                                    "names and strings may not contain NUL (nothing was done)", f->name,
                                    d->name, (size_t)(z - (p + at)));
            } else if (f && f->type == PROTOBUF_C_TYPE_MESSAGE) {
                int rc = walk(f->descriptor, p + at, (size_t)n, base + at, depth + 1, err);
                if (rc)
                    return rc;
            }
            at += (size_t)n;
            break;
        default:
            goto bad;
        }
    }
    return 0;
bad:
    return kvd_fail(err, -EINVAL, "request %s is malformed near byte %zu", d->name, base + at);
}

int pb_strings_check(const ProtobufCMessageDescriptor *d, const uint8_t *in, size_t len, kvd_err *err)
{
    return walk(d, in, len, 0, 0, err);
}
