/* aegis staging core: broadcast a source tree over MPI as a tar stream, written in place.
 *
 * The block between CFFI-BEGIN and CFFI-END is also fed to cffi's cdef() by hatch_build.py,
 * so it must stay plain C declarations (no #include, no #if, only integer #defines).
 */
#ifndef AEGIS_BCAST_H
#define AEGIS_BCAST_H

#include <stddef.h>
#include <stdint.h>

/* CFFI-BEGIN */
#define AEGIS_OK 0
#define AEGIS_E_ARGS 1       /* invalid options, or ranks passed different options */
#define AEGIS_E_NOMEM 2      /* buffer allocation failed */
#define AEGIS_E_INDEX 3      /* the file index is malformed (bad path, type, size) */
#define AEGIS_E_SOURCE 4     /* reading the source failed (or it changed while staging) */
#define AEGIS_E_WRITE 5      /* writing the destination failed (disk full, ...) */
#define AEGIS_E_CHECKSUM 6   /* a writer's CRC32C of a chunk differs from the reader's */
#define AEGIS_E_MPI 7        /* an MPI call returned an error */
#define AEGIS_E_THREAD 8     /* a helper thread could not be started */
#define AEGIS_E_STALL 9      /* no progress for stall_timeout seconds */
#define AEGIS_E_PREPARE 10   /* used by the Python layer: a rank failed outside the transfer */
#define AEGIS_E_CANCELLED 11 /* a rank's cancel_fd delivered a cancelling signal number */

#define AEGIS_FAULT_NONE 0
#define AEGIS_FAULT_CHECKSUM 1     /* the fault rank's writer corrupts a chunk checksum */
#define AEGIS_FAULT_WRITE_ERROR 2  /* the fault rank's writer fails at stream offset fault_after */
#define AEGIS_FAULT_READ_ERROR 3   /* the fault rank's reader fails at stream offset fault_after */
#define AEGIS_FAULT_STALL_WRITER 4 /* the fault rank's writer thread hangs there */
#define AEGIS_FAULT_STALL_READER 5 /* the fault rank's reader thread hangs there */
#define AEGIS_FAULT_SLOW 6         /* the fault rank's helpers take 20 ms more per piece from
                                      stream offset fault_after on (a slow transfer) */

#define AEGIS_MAX_READERS 256

typedef struct aegis_stage_opts {
    int64_t chunk_size;      /* bytes per broadcast chunk (64-bit, may exceed 2 GiB) */
    int64_t max_count;       /* max elements per MPI call; larger chunks are split */
    int64_t max_index_bytes; /* largest file index a rank accepts from the wire */
    int64_t stall_ms;        /* a helper stuck this long on one piece ends the stage */
    int32_t depth;           /* chunks in flight per rank */
    int32_t root;            /* rank that holds the file index */
    int32_t n_readers;       /* chunk k is read and broadcast by readers[k % n_readers] */
    int32_t readers[256];
    int32_t is_writer;       /* this rank writes the tree into dest_dir (must exist) */
    int32_t verify;          /* CRC32C of every chunk on its reader, checked by one writer on
                                every host that received it */
    int32_t share_ring;      /* ranks of one host share one ring of chunk buffers (/dev/shm) */
    int32_t io_threads;      /* reader/writer threads on this rank (local, may differ) */
    int32_t fault_rank;      /* test hook: rank that injects fault_kind, -1 for none */
    int32_t fault_kind;      /* AEGIS_FAULT_* */
    int64_t fault_after;     /* test hook: stream offset where the fault fires */
    const char *capture_path; /* test hook: a writer also saves the raw stream here (or NULL) */
    int32_t cancel_fd;       /* local: -1, or a descriptor the main thread polls (at most every
                                10 ms, never blocking); each byte read from it is a signal
                                number, as Python's signal.set_wakeup_fd() writes them */
    uint64_t cancel_signals; /* bit n set: signal n cancels this rank's stage (AEGIS_E_CANCELLED,
                                reaching every rank like any failure); 0: any byte does */
} aegis_stage_opts;

typedef struct aegis_stage_result {
    int64_t bytes_done;   /* stream bytes broadcast so far; read live by a progress thread */
    int64_t total_bytes;  /* length of the tar stream */
    uint32_t checksum;    /* CRC32C of the whole stream (0 when verify is off) */
    int32_t code;         /* AEGIS_OK or AEGIS_E_*, identical on every rank */
    int32_t failing_rank; /* rank that reported the error (this rank if it alone knows) */
    char host[128];       /* that rank's host name */
    char cause[512];      /* one line: what failed */
} aegis_stage_result;

/* Collective over *(MPI_Comm *)comm_ptr. The root passes the file index (index, index_len;
 * format in docs/staging.md), readers pass src_dir (the paths in the index are relative to
 * it; for a one-file index, the file itself), writers pass dest_dir. Returns res->code on
 * every rank. */
int aegis_stage(void *comm_ptr, const char *src_dir, const void *index, int64_t index_len,
                const char *dest_dir, const aegis_stage_opts *opts, aegis_stage_result *res);

/* "MPICH 5.0.2" / "Open MPI 5.0.3" / ... as seen in mpi.h when this file was compiled. */
int aegis_build_mpi_version(char *out, int outlen);

/* CRC32C (Castagnoli) of buf continuing from crc (0 to start); software_only forces the
 * slicing-by-8 path even where SSE4.2 is available (tests compare the two). */
uint32_t aegis_crc32c(uint32_t crc, const void *buf, size_t n, int software_only);

/* CRC32C of A followed by B, from crc(A), crc(B) and the length of B. */
uint32_t aegis_crc32c_combine(uint32_t crc_a, uint32_t crc_b, int64_t len_b);
/* CFFI-END */

#endif
