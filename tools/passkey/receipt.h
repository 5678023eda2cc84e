/* receipt.h - JSON receipts for reported numbers: the command, the git
 * revision, hashes of the weights and inputs, an environment
 * fingerprint, and the figures; and the re-check of a receipt's hashes.
 *
 * A receipt is a JSON object (cJSON) with at least
 *   "command": "...", "git_revision": "<sha>[+dirty]",
 *   "inputs": [ { "name": "...", "path": "...", "sha256": "..." }, ... ],
 *   "environment": { ... }, "figures": { ... }
 * Input paths are stored relative to the source tree when inside it. */
#ifndef KVARC_PASSKEY_RECEIPT_H
#define KVARC_PASSKEY_RECEIPT_H

#include <stddef.h>
#include <stdio.h>

#include <cjson/cJSON.h>

/* SHA-256 of a file as 64 hex digits. 0, or -1 with a message. */
int rc_sha256_file(const char *path, char hex[65], char *err, size_t len);

/* SHA-256 of a buffer. */
void rc_sha256_buf(const void *buf, size_t n, char hex[65]);

/* The source tree's revision ("<sha>", "<sha>+dirty", or "unknown"). */
void rc_git_revision(char *buf, size_t len);

/* A new receipt with command (argv), git revision, environment. NULL on OOM. */
cJSON *rc_new(int argc, char **argv);

/* Hash path and add it to the receipt's inputs as name. 0 or -1 with msg. */
int rc_add_input(cJSON *receipt, const char *name, const char *path, char *err, size_t len);

/* Write the receipt to path (temp file, fsync, rename). 0 or -1 with msg. */
int rc_write(const cJSON *receipt, const char *path, char *err, size_t len);

/* Read and parse a receipt. NULL with a message. */
cJSON *rc_read(const char *path, char *err, size_t len);

/* Re-hash every input of receipt (relative paths from root, NULL: the
 * source tree), one line each to out. Returns the number of mismatches or
 * unreadable inputs (0: all match), -1 if the receipt has no inputs. */
int rc_check_inputs(const cJSON *receipt, const char *root, FILE *out);

#endif
