/* transfer.h - one conversation out to an export file and back in
 * (schema/SCHEMA.md section 10; transfer.c). Internal to kvarcd and the tests. */
#ifndef KVARC_TRANSFER_H
#define KVARC_TRANSFER_H

#include <stddef.h>
#include <stdint.h>

#include "kvd.h"

/* Export: a cursor over conversation conv, read through r (the caller's,
 * used by this export alone). Each next() gives the next piece of the
 * file, in x's buffer until the following call: the preamble with the
 * conversation section, then one section per call of at most max_section
 * bytes of data (clamped to 4 KiB .. 8 MiB), then the end section; *len 0
 * when the file is complete. */
typedef struct kvd_export kvd_export;
int  kvd_export_open(kvd_engine *e, kvd_reader *r, uint64_t conv, size_t max_section, kvd_export **out,
                     kvd_err *err);
int  kvd_export_next(kvd_export *x, const uint8_t **buf, size_t *len, kvd_err *err);
/* Tokens written so far, of how many (every layer's). */
void kvd_export_progress(const kvd_export *x, uint64_t *done, uint64_t *total);
void kvd_export_close(kvd_export *x);

/* Import into ns/name (which must not exist): feed the file's bytes in
 * pieces of any size; each complete section is checked and stored into
 * a stage as it arrives (memory: one section). finish checks the file was
 * complete and publishes ns/name (info: it). free deletes the stage of an
 * import not published. Errors name the section, its kind, its byte
 * offset in the file and, for layer data, the layer and positions. */
typedef struct kvd_import kvd_import;
int      kvd_import_begin(kvd_engine *e, const char *ns, const char *name, kvd_import **out, kvd_err *err);
int      kvd_import_feed(kvd_import *im, const uint8_t *bytes, size_t len, kvd_err *err);
uint64_t kvd_import_tokens(const kvd_import *im);     /* tokens stored so far */
int      kvd_import_finish(kvd_import *im, kvd_conv_info *info, kvd_err *err);
void     kvd_import_free(kvd_import *im);

#endif
