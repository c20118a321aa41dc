/* aegis staging core: stream a tar of a source tree from one rank to writer ranks over MPI.
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
#define AEGIS_E_ARGS 1       /* invalid options (chunk size, depth, ...) */
#define AEGIS_E_NOMEM 2      /* buffer allocation failed */
#define AEGIS_E_SPAWN 3      /* tar could not be started (missing from PATH, ...) */
#define AEGIS_E_SOURCE 4     /* reading the source failed (tar -c failed or was killed) */
#define AEGIS_E_WRITE 5      /* extracting failed (tar -x failed or was killed, disk full) */
#define AEGIS_E_CHECKSUM 6   /* a writer's CRC32C differs from the root's */
#define AEGIS_E_MPI 7        /* an MPI call returned an error */
#define AEGIS_E_THREAD 8     /* a helper thread could not be started */
#define AEGIS_E_SIZE 9       /* a writer received a different byte count than the root sent */
#define AEGIS_E_PREPARE 10   /* used by the Python layer: a rank failed before the transfer */

#define AEGIS_FAULT_NONE 0
#define AEGIS_FAULT_CHECKSUM 1     /* the fault rank's writer corrupts its checksum */
#define AEGIS_FAULT_KILL_WRITER 2  /* the fault rank SIGKILLs its tar -x after fault_after bytes */
#define AEGIS_FAULT_KILL_READER 3  /* the root SIGKILLs its tar -c after fault_after bytes */

typedef struct aegis_stage_opts {
    int64_t chunk_size;   /* bytes per broadcast chunk (>= 1; 64-bit, may exceed 2 GiB) */
    int64_t max_count;    /* max elements per MPI_Bcast call; larger chunks are split */
    int32_t depth;        /* buffers in flight; 1 = serial read -> bcast -> write, no threads */
    int32_t root;         /* rank that runs tar -c */
    int32_t is_writer;    /* this rank runs tar -x into dest_dir */
    int32_t verify;       /* compute and compare CRC32C of the stream */
    int32_t fault_rank;   /* test hook: rank that injects fault_kind, -1 for none */
    int32_t fault_kind;   /* AEGIS_FAULT_* */
    int64_t fault_after;  /* test hook: bytes moved before the fault fires */
    int32_t poll_sleep_us; /* >0: wait in MPI_Test loops sleeping this long between polls
                              (frees the core for tar and the helper threads); 0: block in
                              MPI (MPICH busy-polls) */
} aegis_stage_opts;

typedef struct aegis_stage_result {
    int64_t bytes_done;   /* bytes broadcast so far; read live by a progress thread */
    int64_t total_bytes;  /* length of the tar stream */
    uint32_t checksum;    /* CRC32C of the stream (root's value; 0 when verify is off) */
    int32_t code;         /* AEGIS_OK or AEGIS_E_*, identical on every rank */
    int32_t failing_rank; /* rank that reported the error, -1 on success */
    char host[128];       /* that rank's host name */
    char cause[512];      /* one line: what failed */
} aegis_stage_result;

/* Collective over *(MPI_Comm *)comm_ptr. Root streams `tar -c -C src_dir -- src_member`;
 * writers extract into dest_dir (must exist). Returns res->code on every rank. */
int aegis_stage(void *comm_ptr, const char *src_dir, const char *src_member,
                const char *dest_dir, const aegis_stage_opts *opts, aegis_stage_result *res);

/* "MPICH 5.0.2" / "Open MPI 5.0.3" / ... as seen in mpi.h when this file was compiled. */
int aegis_build_mpi_version(char *out, int outlen);

/* CRC32C (Castagnoli) of buf continuing from crc (0 to start); software_only forces the
 * slicing-by-8 path even where SSE4.2 is available (tests compare the two). */
uint32_t aegis_crc32c(uint32_t crc, const void *buf, size_t n, int software_only);
/* CFFI-END */

#endif
