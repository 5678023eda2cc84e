/* pb_strings.h - string fields of a request, checked on the wire. */
#ifndef PB_STRINGS_H
#define PB_STRINGS_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

#include "kvd.h"

/* Check that no string field of the message (d) encoded in in[0..len),
 * nested messages included, holds a NUL byte. protobuf-c hands strings
 * over NUL-terminated, so "team-a\0team-b" would reach the engine as
 * "team-a": a name silently cut, not refused. Call after a successful
 * unpack (the bytes are then well-formed). 0, or -EINVAL with err naming
 * the field and the byte offset of the NUL. */
int pb_strings_check(const ProtobufCMessageDescriptor *d, const uint8_t *in, size_t len, kvd_err *err);

#endif
