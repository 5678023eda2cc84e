/* wire.c - packing, unpacking and the status tables of wire.h. */
#include <errno.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <stdlib.h>

#include "kvarc_schema.h"
#include "wire.h"

uint8_t *kw_pack_bytes(const ProtobufCMessage *m, size_t *len)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n ? n : 1);
    if (buf)
        protobuf_c_message_pack(m, buf);
    *len = n;
    return buf;
}

grpc_byte_buffer *kw_pack(const ProtobufCMessage *m)
{
    size_t n;
    uint8_t *buf = kw_pack_bytes(m, &n);
    if (!buf)
        return NULL;
    grpc_slice sl = grpc_slice_from_copied_buffer((const char *)buf, n);
    free(buf);
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&sl, 1);
    grpc_slice_unref(sl);
    return bb;
}

grpc_slice kw_slice(grpc_byte_buffer *bb)
{
    grpc_byte_buffer_reader rd;
    grpc_slice all = grpc_empty_slice();
    if (grpc_byte_buffer_reader_init(&rd, bb)) {
        all = grpc_byte_buffer_reader_readall(&rd);
        grpc_byte_buffer_reader_destroy(&rd);
    }
    return all;
}

ProtobufCMessage *kw_unpack(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *desc)
{
    grpc_slice all = kw_slice(bb);
    ProtobufCMessage *m = protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
    grpc_slice_unref(all);
    return m;
}

grpc_status_code kw_status_of(int rc)
{
    switch (rc) {
    case 0:                return GRPC_STATUS_OK;
    case -ENOENT:          return GRPC_STATUS_NOT_FOUND;
    case -EEXIST:          return GRPC_STATUS_ALREADY_EXISTS;
    case KVARC_ESHAPE:
    case -EPERM:           return GRPC_STATUS_FAILED_PRECONDITION;
    case -ENOSPC:
    case -E2BIG:
    case -ENOMEM:          return GRPC_STATUS_RESOURCE_EXHAUSTED;
    case KVARC_ECORRUPT:   return GRPC_STATUS_DATA_LOSS;
    case -EINVAL:
    case -ERANGE:
    case KVARC_EHEADDIM:
    case KVARC_EFORMAT:
    case KVARC_EVERSION:
    case KVARC_EDTYPE:
    case KVARC_ENONFINITE: return GRPC_STATUS_INVALID_ARGUMENT;
    case -EBUSY:
    case -ETIMEDOUT:       /* the Ceph cluster did not answer in time */
    case -ECANCELED:       return GRPC_STATUS_UNAVAILABLE;
    case KVARC_ELOCKED:    return GRPC_STATUS_ABORTED;
    case -EACCES:          return GRPC_STATUS_PERMISSION_DENIED;
    case -ENOSYS:          return GRPC_STATUS_UNIMPLEMENTED;
    default:               return GRPC_STATUS_INTERNAL;
    }
}

int kw_rc_of(int status)
{
    switch (status) {
    case GRPC_STATUS_OK:                  return 0;
    case GRPC_STATUS_NOT_FOUND:           return -ENOENT;
    case GRPC_STATUS_ALREADY_EXISTS:      return -EEXIST;
    case GRPC_STATUS_FAILED_PRECONDITION: return KVARC_ESHAPE;
    case GRPC_STATUS_INVALID_ARGUMENT:    return -EINVAL;
    case GRPC_STATUS_RESOURCE_EXHAUSTED:  return -ENOSPC;
    case GRPC_STATUS_DATA_LOSS:           return KVARC_ECORRUPT;
    case GRPC_STATUS_ABORTED:             return KVARC_ELOCKED;
    case GRPC_STATUS_PERMISSION_DENIED:
    case GRPC_STATUS_UNAUTHENTICATED:     return -EACCES;
    case GRPC_STATUS_UNAVAILABLE:
    case GRPC_STATUS_CANCELLED:           /* kvarcd's shutdown cut the call off after its grace */
    case GRPC_STATUS_DEADLINE_EXCEEDED:   return -ECONNREFUSED;
    default:                              return -EIO;
    }
}
