/* wire.h - what both sides of kvarc's gRPC service do with its messages:
 * pack a protobuf-c message into a gRPC byte buffer, read a received one
 * back, and translate between the engine's return codes and gRPC status
 * codes. kvarcd (storaged/rpc_*.c), libkvarc's transport (client/rpc_client.c)
 * and the admin CLI all use these, so the two ends of a call cannot drift. */
#ifndef KVARC_WIRE_H
#define KVARC_WIRE_H

#include <grpc/byte_buffer.h>
#include <grpc/status.h>
#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

/* m packed into a fresh byte buffer (the caller destroys it); NULL when out of memory. */
grpc_byte_buffer *kw_pack(const ProtobufCMessage *m);

/* m packed into fresh malloc'ed bytes (*len of them; the caller frees); NULL when out of memory. */
uint8_t *kw_pack_bytes(const ProtobufCMessage *m, size_t *len);

/* The bytes of a received buffer as one slice (the caller unrefs it); empty if unreadable. */
grpc_slice kw_slice(grpc_byte_buffer *bb);

/* A received buffer decoded as desc (free with protobuf_c_message_free_unpacked); NULL if it does not. */
ProtobufCMessage *kw_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc);

/* The gRPC status kvarcd answers for an engine return code (0, -errno or KVARC_E*). */
grpc_status_code kw_status_of(int rc);

/* The return code libkvarc reports for a gRPC status. Several codes share
 * a status, so this is not kw_status_of's inverse: RESOURCE_EXHAUSTED is
 * -ENOSPC; UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED (a call kvarcd's
 * shutdown cut off) are -ECONNREFUSED (kvarcd is not there or is stopping:
 * retry); a status kvarcd never answers is -EIO. */
int kw_rc_of(int status);

#endif
