/* aegis staging core: broadcast a source tree over MPI as a tar stream, written in place.
 *
 * Every rank learns the sorted file index from the root first. The stream's layout (each
 * entry's header and data offsets, GNU tar format) is a pure function of that index, so:
 *   - reader ranks (opts->readers, chunk k from readers[k % n]) fill any chunk with pread and
 *     generated headers, in pieces, from a pool of threads;
 *   - the ranks of one host share one ring of chunk buffers in shared memory (one ring per
 *     reader there); each ring's leader (its reader, or the host's lowest rank) receives a
 *     chunk once with MPI_Ibcast among the leaders, and every rank of the ring writes its copy
 *     straight from the shared buffer;
 *   - per chunk: a ring barrier (every rank of the ring released the slot), the leaders'
 *     broadcast, then a tiny MPI_Iallreduce over all ranks carrying the reader's CRC32C and
 *     every rank's failure flag: its completion means every ring holds the chunk;
 *   - writer threads place each piece with pwrite at the offset the index gives (files
 *     created and preallocated up front; modes, mtimes, symlinks at the end).
 * Only the main thread calls MPI (MPI_THREAD_FUNNELED suffices) and it never spins: it tests
 * its requests and sleeps on a condition variable with a growing timeout; helpers block on
 * condition variables. A failure anywhere ends the stage on all ranks at the same chunk; a
 * helper stuck on one piece longer than the stall timeout is such a failure, and so is a
 * cancelling signal number read from the caller's cancel_fd (Python's signal wakeup fd).
 * No globals, no signal handlers of its own, no child processes, no MPI_Abort.
 */
#define _GNU_SOURCE
#include "bcast.h"

#include <mpi.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- CRC32C */

#define CRC32C_POLY 0x82F63B78u /* reflected Castagnoli */

typedef struct crc_tables {
    uint32_t t[8][256];
    int use_hw;
} crc_tables;

static void crc_init(crc_tables *ct, int software_only)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1u)));
        ct->t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int s = 1; s < 8; s++)
            ct->t[s][i] = (ct->t[s - 1][i] >> 8) ^ ct->t[0][ct->t[s - 1][i] & 0xFF];
#if defined(__x86_64__) && defined(__GNUC__)
    ct->use_hw = !software_only && __builtin_cpu_supports("sse4.2");
#else
    (void)software_only;
    ct->use_hw = 0;
#endif
}

static uint32_t crc_sw(const crc_tables *ct, uint32_t crc, const unsigned char *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        crc = (crc >> 8) ^ ct->t[0][(crc ^ *p++) & 0xFF];
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc; /* little-endian: low 4 bytes take the running CRC */
        crc = ct->t[7][w & 0xFF] ^ ct->t[6][(w >> 8) & 0xFF] ^ ct->t[5][(w >> 16) & 0xFF] ^
              ct->t[4][(w >> 24) & 0xFF] ^ ct->t[3][(w >> 32) & 0xFF] ^
              ct->t[2][(w >> 40) & 0xFF] ^ ct->t[1][(w >> 48) & 0xFF] ^ ct->t[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ ct->t[0][(crc ^ *p++) & 0xFF];
    return crc;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const unsigned char *p,
                                                         size_t n)
{
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

static uint32_t crc_update(const crc_tables *ct, uint32_t crc, const void *buf, size_t n)
{
    crc = ~crc;
#if defined(__x86_64__) && defined(__GNUC__)
    if (ct->use_hw)
        return ~crc_hw(crc, buf, n);
#endif
    return ~crc_sw(ct, crc, buf, n);
}

uint32_t aegis_crc32c(uint32_t crc, const void *buf, size_t n, int software_only)
{
    crc_tables ct;
    crc_init(&ct, software_only);
    return crc_update(&ct, crc, buf, n);
}



/* ---------------------------------------------------------------- CRC32C combination */

/* a * b modulo the (reflected) Castagnoli polynomial */
static uint32_t multmodp(uint32_t a, uint32_t b)
{
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ CRC32C_POLY : b >> 1;
    }
    return p;
}

uint32_t aegis_crc32c_combine(uint32_t crc_a, uint32_t crc_b, int64_t len_b)
{
    uint32_t sq = 1u << 30; /* x^1 */
    for (int i = 0; i < 3; i++)
        sq = multmodp(sq, sq); /* x^8: one byte */
    uint32_t p = 1u << 31;    /* x^0 */
    for (uint64_t n = (uint64_t)len_b; n; n >>= 1, sq = multmodp(sq, sq))
        if (n & 1)
            p = multmodp(sq, p);
    return multmodp(p, crc_a) ^ crc_b;
}

int aegis_build_mpi_version(char *out, int outlen)
{
#if defined(MPICH_VERSION)
    int n = snprintf(out, (size_t)outlen, "MPICH %s", MPICH_VERSION);
#elif defined(OMPI_MAJOR_VERSION)
    int n = snprintf(out, (size_t)outlen, "Open MPI %d.%d.%d", OMPI_MAJOR_VERSION,
                     OMPI_MINOR_VERSION, OMPI_RELEASE_VERSION);
#elif defined(I_MPI_VERSION)
    int n = snprintf(out, (size_t)outlen, "Intel(R) MPI %s", I_MPI_VERSION);
#else
    int n = snprintf(out, (size_t)outlen, "unknown MPI %d.%d", MPI_VERSION, MPI_SUBVERSION);
#endif
    return n < 0 ? -1 : 0;
}


#define BLOCK 512
#define RECORD 10240            /* GNU tar's default record: the stream is padded to it */
#define NAME_FIELD 100
#define MAX_PATH_BYTES 4095
#define MAX_FILE_SIZE (1LL << 56)
#define MAX_STREAM (1LL << 60)
#define MAX_PIECE (4LL << 20)   /* one helper's unit of work */
#define MAX_CALLS_PER_CHUNK 65536
#define HDR_MAX (3 * BLOCK + 2 * 4608) /* K + L + ustar headers with their long names */
#define INDEX_MAGIC "AEGIDX01"
#define INDEX_HEAD 16
#define INDEX_FIXED 40

typedef struct local_error {
    int code; /* AEGIS_OK when nothing failed */
    char cause[400];
} local_error;

typedef struct entry {
    const char *path; /* relative to the source/dest directory, NUL-terminated */
    const char *link; /* symlink target ("" for others) */
    int64_t size, mtime;
    int64_t hdr_off;  /* stream offset of this entry's first header block */
    int64_t data_off; /* stream offset of its data (the header region ends here) */
    uint32_t mode, uid, gid, path_len, link_len;
    char kind;        /* '0' regular file, '5' directory, '2' symlink */
} entry;

/* a ring slot as this rank sees it: the (shared) buffer and the helpers' work on it
 * (guarded by mu). FREE: this rank is done with it; HELD: it holds chunk k, which is on its
 * way; FILL/READY: the reader fills it / has; DRAIN: the writer places it. */
enum { S_FREE, S_HELD, S_FILL, S_READY, S_DRAIN };
typedef struct slot {
    char *buf;
    int phase;
    int64_t chunk, start, len;
    int64_t cursor; /* next piece (offset in the chunk) a helper may claim */
    int64_t busy;   /* pieces claimed and not finished */
    uint32_t *part_crc;
    uint32_t crc;   /* the reader's CRC32C of this chunk */
    int check;      /* this writer checks the chunk against crc */
} slot;

/* the MPI side of chunk k, in flight[k % depth] (main thread only): each step runs on its
 * own communicator, in chunk order, so all ranks post the same collectives in the same order */
typedef struct inflight {
    MPI_Request freed;   /* Ibarrier(ring): every rank of the ring released the slot */
    MPI_Request *data;   /* Ibcast(leaders) of the chunk from its reader, in max_count pieces */
    int n_data;
    MPI_Request verdict; /* Iallreduce(world, MAX) of hdr */
    int64_t hdr[2];      /* failure flag (size - rank), reader's CRC32C */
} inflight;

struct ctx;
typedef struct worker {
    struct ctx *x;
    pthread_t thread;
    int started;
    int64_t busy_since_ms; /* 0 when idle */
    int64_t busy_at;       /* stream offset of the piece in hand */
    int filling;
} worker;

typedef struct ctx {
    MPI_Comm comm;   /* all ranks: options, index, verdicts */
    MPI_Comm ring;   /* the ranks sharing this rank's ring (MPI_COMM_NULL when alone) */
    MPI_Comm net;    /* the rings' leaders: chunk data (MPI_COMM_NULL on other ranks) */
    const aegis_stage_opts *opts;
    aegis_stage_result *res;
    int rank, size, is_writer, is_reader, verify, depth, dir_source;
    int is_leader, leader, is_verifier, net_size;
    int net_root[AEGIS_MAX_READERS]; /* reader i's rank among the leaders */
    char *ring_mem;                  /* depth * chunk bytes, shared when ring is not NULL */
    char shm_name[64];               /* the leader's shared-memory name until unlinked */
    char host[128];
    int64_t chunk, piece, n_chunks, end_off, total, mpi_stall_ms;
    uint32_t stream_crc;

    char *index;
    entry *ents;
    int64_t n_ents;
    char *arena;

    int src_fd, dst_fd, cap_fd;
    crc_tables crc;
    slot *slots;
    inflight *flight;
    worker *workers;
    int n_workers;

    pthread_mutex_t mu;
    pthread_cond_t work_cv, main_cv;
    int stop;
    int64_t events;   /* helper events so far: main waits only while this is unchanged */
    local_error err;  /* this rank's first failure (guarded by mu) */
    int fault_fired;
    int abandoned;    /* MPI requests or a helper left behind: keep the memory */
    int cancel_sig;   /* the signal number that cancelled this rank (0: none so far) */
    int cancel_off;   /* cancel_fd reached its end or failed: not polled any more */
    int64_t cancel_polled_ms; /* when cancel_fd was last polled (main thread only) */
} ctx;

static int64_t now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static void set_error(local_error *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_error(local_error *e, int code, const char *fmt, ...)
{
    if (e->code != AEGIS_OK)
        return; /* keep the first cause */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->cause, sizeof e->cause, fmt, ap);
    va_end(ap);
    e->code = code;
}

/* Records a helper's failure (caller holds mu) and wakes everyone. */
static void record_error(ctx *x, const local_error *e)
{
    if (x->err.code == AEGIS_OK && e->code != AEGIS_OK)
        x->err = *e;
    x->events++;
    pthread_cond_broadcast(&x->main_cv);
    pthread_cond_broadcast(&x->work_cv);
}

static void fail(ctx *x, const local_error *e)
{
    pthread_mutex_lock(&x->mu);
    record_error(x, e);
    pthread_mutex_unlock(&x->mu);
}

/* ---------------------------------------------------------------- cancellation */

#define CANCEL_POLL_MS 10

static const char *signal_name(int sig)
{
    switch (sig) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case SIGHUP: return "SIGHUP";
    case SIGQUIT: return "SIGQUIT";
    case SIGUSR1: return "SIGUSR1";
    case SIGUSR2: return "SIGUSR2";
    default: return "a signal";
    }
}

/* The signal number that cancels this rank, once one came through opts->cancel_fd, else 0.
 * Main thread only. Polls without blocking, at most every CANCEL_POLL_MS; bytes of signals
 * outside cancel_signals are dropped (Python runs their handlers all the same: it records a
 * signal apart from writing it to the wakeup fd). */
static int cancel_requested(ctx *x)
{
    const aegis_stage_opts *o = x->opts;
    if (x->cancel_sig || x->cancel_off || o->cancel_fd < 0)
        return x->cancel_sig;
    int64_t now = now_ms();
    if (now - x->cancel_polled_ms < CANCEL_POLL_MS)
        return 0;
    x->cancel_polled_ms = now;
    for (;;) {
        struct pollfd p = {.fd = o->cancel_fd, .events = POLLIN};
        int n = poll(&p, 1, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0)
            return 0;
        unsigned char sig[64];
        ssize_t got = n < 0 || (p.revents & POLLNVAL) ? -1 : read(o->cancel_fd, sig, sizeof sig);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (got <= 0) { /* closed or not a descriptor: nothing can come any more */
            x->cancel_off = 1;
            return 0;
        }
        for (ssize_t i = 0; i < got; i++)
            if (!o->cancel_signals || (sig[i] < 64 && (o->cancel_signals >> sig[i] & 1))) {
                x->cancel_sig = sig[i] ? sig[i] : -1;
                return x->cancel_sig;
            }
        if ((size_t)got < sizeof sig)
            return 0;
    }
}

/* Sets e to this rank's cancellation, if it was cancelled: -1 then, else 0. */
static int cancelled(ctx *x, local_error *e)
{
    int sig = cancel_requested(x);
    if (!sig)
        return 0;
    set_error(e, AEGIS_E_CANCELLED, "cancelled by %s (signal %d)", signal_name(sig), sig);
    return -1;
}

/* A cancellation is this rank's failure, which the next verdict or agreement carries to
 * every rank. The caller holds no lock. */
static void check_cancel(ctx *x)
{
    local_error e = {0};
    if (!x->cancel_sig && cancelled(x, &e))
        fail(x, &e);
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t pad512(int64_t n) { return (n + BLOCK - 1) & ~(int64_t)(BLOCK - 1); }

/* ---------------------------------------------------------------- the file index */

static uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const unsigned char *p) { return rd32(p) | (uint64_t)rd32(p + 4) << 32; }

/* relative, no empty, "." or ".." component */
static int safe_relative(const char *p)
{
    if (*p == '/' || *p == 0)
        return 0;
    for (const char *c = p;;) {
        const char *end = strchr(c, '/');
        size_t n = end ? (size_t)(end - c) : strlen(c);
        if (n == 0 || (n == 1 && c[0] == '.') || (n == 2 && c[0] == '.' && c[1] == '.'))
            return 0;
        if (!end)
            return 1;
        c = end + 1;
    }
}

/* Parses and checks the index (never trusting a length in it); see docs/staging.md. */
static int parse_index(ctx *x, int64_t n, local_error *e)
{
    const unsigned char *p = (const unsigned char *)x->index;
    if (n < INDEX_HEAD || memcmp(p, INDEX_MAGIC, 8) != 0) {
        set_error(e, AEGIS_E_INDEX, "file index: bad header");
        return -1;
    }
    uint64_t count = rd64(p + 8);
    if (count == 0 || count > (uint64_t)(n - INDEX_HEAD) / INDEX_FIXED) {
        set_error(e, AEGIS_E_INDEX, "file index: %llu entries cannot fit in %lld bytes",
                  (unsigned long long)count, (long long)n);
        return -1;
    }
    x->ents = calloc((size_t)count, sizeof *x->ents);
    x->arena = malloc((size_t)n + 2 * (size_t)count);
    if (!x->ents || !x->arena) {
        set_error(e, AEGIS_E_NOMEM, "cannot allocate the file index (%llu entries)",
                  (unsigned long long)count);
        return -1;
    }
    x->n_ents = (int64_t)count;
    char *out = x->arena;
    int64_t off = INDEX_HEAD;
    for (int64_t i = 0; i < x->n_ents; i++) {
        entry *en = &x->ents[i];
        if (n - off < INDEX_FIXED)
            goto truncated;
        const unsigned char *f = p + off;
        en->kind = (char)f[0];
        en->mode = rd32(f + 4) & 07777;
        en->mtime = (int64_t)rd64(f + 8);
        en->size = (int64_t)rd64(f + 16);
        en->uid = rd32(f + 24);
        en->gid = rd32(f + 28);
        en->path_len = rd32(f + 32);
        en->link_len = rd32(f + 36);
        off += INDEX_FIXED;
        if (en->path_len == 0 || en->path_len > MAX_PATH_BYTES || en->link_len > MAX_PATH_BYTES ||
            (int64_t)en->path_len + en->link_len > n - off)
            goto truncated;
        if (memchr(p + off, 0, en->path_len) || memchr(p + off + en->path_len, 0, en->link_len)) {
            set_error(e, AEGIS_E_INDEX, "file index: entry %lld has a NUL in its name",
                      (long long)i);
            return -1;
        }
        memcpy(out, p + off, en->path_len);
        out[en->path_len] = 0;
        en->path = out;
        out += en->path_len + 1;
        memcpy(out, p + off + en->path_len, en->link_len);
        out[en->link_len] = 0;
        en->link = out;
        out += en->link_len + 1;
        off += en->path_len + en->link_len;

        int top = i == 0 && strcmp(en->path, ".") == 0;
        if (i == 0)
            x->dir_source = top;
        const char *bad = NULL;
        if (en->kind != '0' && en->kind != '5' && en->kind != '2')
            bad = "an unknown type";
        else if (en->kind == '0' ? (en->size < 0 || en->size > MAX_FILE_SIZE) : en->size != 0)
            bad = "a bad size";
        else if ((en->kind == '2') != (en->link_len > 0))
            bad = "a bad link target";
        else if (top ? en->kind != '5' : !safe_relative(en->path))
            bad = "an unsafe path";
        else if (!x->dir_source && (x->n_ents != 1 || en->kind != '0' || strchr(en->path, '/')))
            bad = "a file-source index that is not one plain file";
        else if (i > 1 && strcmp(x->ents[i - 1].path, en->path) >= 0)
            bad = "a path out of order or repeated";
        if (bad) {
            set_error(e, AEGIS_E_INDEX, "file index: entry %lld has %s", (long long)i, bad);
            return -1;
        }
    }
    if (off != n)
        goto truncated;
    return 0;
truncated:
    set_error(e, AEGIS_E_INDEX, "file index: truncated or with trailing bytes at %lld",
              (long long)off);
    return -1;
}

/* ---------------------------------------------------------------- tar layout and headers */

/* The entry's member name: "./rel" (+ "/" for a directory) for a directory source, as
 * `tar -c -C SRC .` names them; the bare name for a file source. out holds 4100 bytes. */
static size_t tar_name(const ctx *x, const entry *en, char *out)
{
    if (!x->dir_source)
        return (size_t)snprintf(out, MAX_PATH_BYTES + 5, "%s", en->path);
    if (strcmp(en->path, ".") == 0)
        return (size_t)snprintf(out, MAX_PATH_BYTES + 5, "./");
    return (size_t)snprintf(out, MAX_PATH_BYTES + 5, "./%s%s", en->path,
                            en->kind == '5' ? "/" : "");
}

static int64_t header_bytes(const ctx *x, const entry *en)
{
    char name[MAX_PATH_BYTES + 5];
    size_t nl = tar_name(x, en, name);
    int64_t n = BLOCK;
    if (nl >= NAME_FIELD)
        n += BLOCK + pad512((int64_t)nl + 1);
    if (en->link_len >= NAME_FIELD)
        n += BLOCK + pad512((int64_t)en->link_len + 1);
    return n;
}

static int layout(ctx *x, local_error *e)
{
    int64_t off = 0;
    for (int64_t i = 0; i < x->n_ents; i++) {
        entry *en = &x->ents[i];
        en->hdr_off = off;
        en->data_off = off + header_bytes(x, en);
        off = en->data_off + (en->kind == '0' ? pad512(en->size) : 0);
        if (off > MAX_STREAM) {
            set_error(e, AEGIS_E_INDEX, "file index: the stream would exceed 2^60 bytes");
            return -1;
        }
    }
    x->end_off = off;
    x->total = (off + 2 * BLOCK + RECORD - 1) / RECORD * RECORD;
    x->n_chunks = (x->total + x->chunk - 1) / x->chunk;
    return 0;
}

static void octal(unsigned char *field, int width, uint64_t v)
{
    for (int i = width - 2; i >= 0; i--, v >>= 3)
        field[i] = (unsigned char)('0' + (v & 7));
    field[width - 1] = 0;
}

static void header_block(unsigned char *h, const char *name, size_t name_len, const entry *en,
                         char type, int64_t size, const char *link, size_t link_len)
{
    memset(h, 0, BLOCK);
    memcpy(h, name, name_len < NAME_FIELD ? name_len : NAME_FIELD);
    octal(h + 100, 8, en ? en->mode : 0);
    octal(h + 108, 8, en && en->uid <= 07777777 ? en->uid : 0);
    octal(h + 116, 8, en && en->gid <= 07777777 ? en->gid : 0);
    if ((uint64_t)size <= 077777777777ULL) {
        octal(h + 124, 12, (uint64_t)size);
    } else { /* GNU base-256 for sizes of 8 GiB and more */
        h[124] = 0x80;
        for (int i = 0; i < 8; i++)
            h[135 - i] = (unsigned char)((uint64_t)size >> (8 * i));
    }
    int64_t mtime = en ? en->mtime : 0;
    octal(h + 136, 12, mtime < 0 ? 0 : (uint64_t)min64(mtime, 077777777777LL));
    memset(h + 148, ' ', 8);
    h[156] = (unsigned char)type;
    memcpy(h + 157, link, link_len < NAME_FIELD ? link_len : NAME_FIELD);
    memcpy(h + 257, "ustar  ", 8); /* GNU magic and version: "ustar  \0" */
    unsigned sum = 0;
    for (int i = 0; i < BLOCK; i++)
        sum += h[i];
    octal(h + 148, 7, sum);
    h[155] = ' ';
}

/* A GNU long-name ('L') or long-link ('K') record: a header, then the name and a NUL. */
static unsigned char *long_record(unsigned char *o, char type, const char *s, size_t n)
{
    header_block(o, "././@LongLink", 13, NULL, type, (int64_t)n + 1, "", 0);
    o += BLOCK;
    int64_t padded = pad512((int64_t)n + 1);
    memset(o, 0, (size_t)padded);
    memcpy(o, s, n);
    return o + padded;
}

/* The entry's whole header region [hdr_off, data_off) into out (HDR_MAX bytes). */
static void build_headers(const ctx *x, const entry *en, unsigned char *out)
{
    char name[MAX_PATH_BYTES + 5];
    size_t nl = tar_name(x, en, name);
    unsigned char *o = out;
    if (en->link_len >= NAME_FIELD)
        o = long_record(o, 'K', en->link, en->link_len);
    if (nl >= NAME_FIELD)
        o = long_record(o, 'L', name, nl);
    header_block(o, name, nl, en, en->kind, en->kind == '0' ? en->size : 0, en->link,
                 en->link_len);
}

/* index of the entry whose region holds stream offset pos (n_ents past the last one) */
static int64_t entry_at(const ctx *x, int64_t pos)
{
    if (pos >= x->end_off)
        return x->n_ents;
    int64_t lo = 0, hi = x->n_ents - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        if (x->ents[mid].hdr_off <= pos)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static int64_t region_end(const ctx *x, int64_t i)
{
    return i + 1 < x->n_ents ? x->ents[i + 1].hdr_off : x->end_off;
}

/* ---------------------------------------------------------------- helpers: fill and drain */

static int fault_here(ctx *x, int kind, int64_t at)
{
    const aegis_stage_opts *o = x->opts;
    return o->fault_kind == kind && o->fault_rank == x->rank && at >= o->fault_after &&
           !__atomic_exchange_n(&x->fault_fired, 1, __ATOMIC_SEQ_CST);
}

/* Test hook for a hung file system: block until the stage is being torn down. */
static void hang(ctx *x, local_error *e)
{
    pthread_mutex_lock(&x->mu);
    while (!x->stop)
        pthread_cond_wait(&x->work_cv, &x->mu);
    pthread_mutex_unlock(&x->mu);
    set_error(e, AEGIS_E_STALL, "helper hung (injected fault)");
}

/* The monotonic time `ms` milliseconds from now (condition variables here use that clock). */
static struct timespec in_ms(long ms)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_nsec += ms * 1000000L;
    t.tv_sec += t.tv_nsec / 1000000000L;
    t.tv_nsec %= 1000000000L;
    return t;
}

/* Test hook for a slow transfer: the fault rank's helpers take 20 ms more per piece from
 * fault_after on; the nap ends early when the stage is being torn down. */
static void dawdle(ctx *x, int64_t at)
{
    const aegis_stage_opts *o = x->opts;
    if (o->fault_kind != AEGIS_FAULT_SLOW || o->fault_rank != x->rank || at < o->fault_after)
        return;
    struct timespec t = in_ms(20);
    pthread_mutex_lock(&x->mu);
    while (!x->stop && pthread_cond_timedwait(&x->work_cv, &x->mu, &t) == 0)
        ;
    pthread_mutex_unlock(&x->mu);
}

static int read_data(ctx *x, const entry *en, int64_t at, char *dst, int64_t n, local_error *e)
{
    /* a file source: src_fd is that file (its name on the wire may differ) */
    int fd = x->dir_source ? openat(x->src_fd, en->path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
                           : fcntl(x->src_fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) {
        set_error(e, AEGIS_E_SOURCE, "cannot open %s: %s", en->path, strerror(errno));
        return -1;
    }
    int64_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, dst + got, (size_t)min64(n - got, 1LL << 30), at + got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r < 0)
                set_error(e, AEGIS_E_SOURCE, "reading %s: %s", en->path, strerror(errno));
            else
                set_error(e, AEGIS_E_SOURCE, "%s shrank while staging (%lld bytes expected)",
                          en->path, (long long)en->size);
            close(fd);
            return -1;
        }
        got += r;
    }
    close(fd);
    return 0;
}

/* Reader: stream bytes [a, b) into dst: generated headers, file data, zero padding. */
static int fill_piece(ctx *x, char *dst, int64_t a, int64_t b, local_error *e)
{
    if (fault_here(x, AEGIS_FAULT_READ_ERROR, a)) {
        set_error(e, AEGIS_E_SOURCE, "reading the source: Input/output error (injected fault)");
        return -1;
    }
    if (fault_here(x, AEGIS_FAULT_STALL_READER, a)) {
        hang(x, e);
        return -1;
    }
    dawdle(x, a);
    unsigned char hdr[HDR_MAX];
    int64_t built = -1, pos = a;
    for (int64_t i = entry_at(x, a); pos < b; i++) {
        if (i >= x->n_ents) { /* end-of-archive blocks and record padding */
            memset(dst + (pos - a), 0, (size_t)(b - pos));
            break;
        }
        const entry *en = &x->ents[i];
        if (pos < en->data_off) {
            if (built != i)
                build_headers(x, en, hdr);
            built = i;
            int64_t n = min64(b, en->data_off) - pos;
            memcpy(dst + (pos - a), hdr + (pos - en->hdr_off), (size_t)n);
            pos += n;
        }
        int64_t data_end = en->data_off + (en->kind == '0' ? en->size : 0);
        if (pos < b && pos < data_end) {
            int64_t n = min64(b, data_end) - pos;
            if (read_data(x, en, pos - en->data_off, dst + (pos - a), n, e) != 0)
                return -1;
            pos += n;
        }
        if (pos < b) {
            int64_t n = min64(b, region_end(x, i)) - pos;
            memset(dst + (pos - a), 0, (size_t)n);
            pos += n;
        }
    }
    return 0;
}

/* Test hook: stream bytes [a, b) into the capture file, leaving all-zero pieces as holes so a
 * stream of many GiB of sparse files costs no disk; sized to the whole stream. */
static int capture(ctx *x, const char *src, int64_t a, int64_t b)
{
    static const char zeros[BLOCK];
    int64_t n = b - a, i = 0;
    while (i + BLOCK <= n && memcmp(src + i, zeros, BLOCK) == 0)
        i += BLOCK;
    if (i < n && pwrite(x->cap_fd, src, (size_t)n, a) != n)
        return -1;
    return b == x->total ? ftruncate(x->cap_fd, x->total) : 0;
}

/* Writer: place the file data among stream bytes [a, b) (src) with pwrite. */
static int drain_piece(ctx *x, const char *src, int64_t a, int64_t b, local_error *e)
{
    if (fault_here(x, AEGIS_FAULT_WRITE_ERROR, a)) {
        set_error(e, AEGIS_E_WRITE, "writing the destination: Input/output error "
                  "(injected fault)");
        return -1;
    }
    if (fault_here(x, AEGIS_FAULT_STALL_WRITER, a)) {
        hang(x, e);
        return -1;
    }
    dawdle(x, a);
    if (x->cap_fd >= 0 && capture(x, src, a, b) != 0) {
        set_error(e, AEGIS_E_WRITE, "writing the stream capture: %s", strerror(errno));
        return -1;
    }
    for (int64_t i = entry_at(x, a); i < x->n_ents && x->ents[i].hdr_off < b; i++) {
        const entry *en = &x->ents[i];
        if (en->kind != '0')
            continue;
        int64_t lo = en->data_off > a ? en->data_off : a;
        int64_t hi = min64(b, en->data_off + en->size);
        if (lo >= hi)
            continue;
        int fd = openat(x->dst_fd, en->path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) {
            set_error(e, AEGIS_E_WRITE, "cannot open %s: %s", en->path, strerror(errno));
            return -1;
        }
        for (int64_t done = 0; done < hi - lo;) {
            ssize_t w = pwrite(fd, src + (lo - a) + done, (size_t)min64(hi - lo - done, 1LL << 30),
                               lo - en->data_off + done);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                set_error(e, AEGIS_E_WRITE, "writing %s: %s", en->path,
                          w < 0 ? strerror(errno) : "no progress");
                close(fd);
                return -1;
            }
            done += w;
        }
        if (close(fd) != 0) {
            set_error(e, AEGIS_E_WRITE, "writing %s: %s", en->path, strerror(errno));
            return -1;
        }
    }
    return 0;
}

/* Test hook: the checksum fault rank reports a mismatch for slots past fault_after. */
static int corrupts(const ctx *x, const slot *s)
{
    return x->opts->fault_kind == AEGIS_FAULT_CHECKSUM && x->opts->fault_rank == x->rank &&
           s->start + s->len > x->opts->fault_after;
}

/* The last piece of a slot is done (caller holds mu): combine the pieces' CRCs. */
static void finish_slot(ctx *x, slot *s)
{
    uint32_t crc = 0;
    if (s->phase == S_FILL ? x->verify : s->check) {
        int64_t parts = (s->len + x->piece - 1) / x->piece;
        crc = s->part_crc[0];
        for (int64_t j = 1; j < parts; j++)
            crc = aegis_crc32c_combine(crc, s->part_crc[j], min64(x->piece, s->len - j * x->piece));
    }
    if (s->phase == S_FILL) {
        s->crc = crc;
        s->phase = S_READY;
    } else {
        if (corrupts(x, s))
            crc ^= 1u;
        if (s->check && x->err.code == AEGIS_OK && crc != s->crc) {
            local_error e = {0};
            set_error(&e, AEGIS_E_CHECKSUM, "CRC32C mismatch in chunk %lld: wrote %08x, "
                      "reader sent %08x", (long long)s->chunk, crc, s->crc);
            record_error(x, &e);
        }
        s->phase = S_FREE;
    }
    x->events++;
    pthread_cond_broadcast(&x->main_cv);
}

/* the lowest chunk with a piece to claim (caller holds mu) */
static slot *claimable(ctx *x)
{
    slot *best = NULL;
    for (int i = 0; i < x->depth; i++) {
        slot *s = &x->slots[i];
        if ((s->phase == S_FILL || s->phase == S_DRAIN) && s->cursor < s->len &&
            (!best || s->chunk < best->chunk))
            best = s;
    }
    return best;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    ctx *x = w->x;
    pthread_mutex_lock(&x->mu);
    for (;;) {
        slot *s;
        while (!x->stop && !(s = claimable(x)))
            pthread_cond_wait(&x->work_cv, &x->mu);
        if (x->stop)
            break;
        int64_t rel = s->cursor, n = min64(x->piece, s->len - rel);
        s->cursor += n;
        s->busy++;
        int filling = s->phase == S_FILL, skip = x->err.code != AEGIS_OK;
        int sum = filling ? x->verify : s->check;
        char *buf = s->buf + rel;
        int64_t a = s->start + rel;
        w->busy_since_ms = now_ms();
        w->busy_at = a;
        w->filling = filling;
        pthread_mutex_unlock(&x->mu);

        local_error e = {0};
        uint32_t crc = 0;
        if (!skip) { /* after a failure pieces are only counted off, so the ring drains */
            int rc = filling ? fill_piece(x, buf, a, a + n, &e) : drain_piece(x, buf, a, a + n, &e);
            if (rc == 0 && sum)
                crc = crc_update(&x->crc, 0, buf, (size_t)n);
        }

        pthread_mutex_lock(&x->mu);
        w->busy_since_ms = 0;
        if (e.code)
            record_error(x, &e);
        s->part_crc[rel / x->piece] = crc;
        if (--s->busy == 0 && s->cursor >= s->len)
            finish_slot(x, s);
    }
    pthread_mutex_unlock(&x->mu);
    return NULL;
}

/* A helper stuck on one piece past the stall timeout is this rank's failure (holds mu). */
static void check_stalled(ctx *x)
{
    int64_t now = now_ms();
    for (int i = 0; i < x->n_workers; i++) {
        worker *w = &x->workers[i];
        if (w->busy_since_ms && now - w->busy_since_ms > x->opts->stall_ms) {
            int64_t at = w->busy_at;
            int64_t k = entry_at(x, at);
            local_error e = {0};
            set_error(&e, AEGIS_E_STALL, "%s made no progress for %.0f s at stream offset %lld "
                      "(%s)", w->filling ? "reading the source" : "writing the destination",
                      (double)(now - w->busy_since_ms) / 1000.0, (long long)at,
                      k < x->n_ents ? x->ents[k].path : "end of stream");
            record_error(x, &e);
            return;
        }
    }
}

/* ---------------------------------------------------------------- MPI steps (main thread) */

typedef struct wire_error {
    int32_t code;
    char host[128];
    char cause[400];
} wire_error;

/* Sleeps until a helper event after `seen` or for `us` microseconds. */
static void wait_event(ctx *x, int64_t seen, int64_t us)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_sec += us / 1000000;
    t.tv_nsec += (us % 1000000) * 1000;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&x->mu);
    while (x->events == seen && !x->err.code &&
           pthread_cond_timedwait(&x->main_cv, &x->mu, &t) == 0)
        ;
    pthread_mutex_unlock(&x->mu);
}

/* While MPI has work in flight: one bare poll, then sleeps: 20 us while chunk data is moving
 * (a large broadcast progresses only inside our MPI_Test calls), else doubling from 50 us up
 * to about a quarter of a chunk's copy time at 4 GB/s (1 ms for 16 MiB chunks; 20 us for
 * small ones, whose ring barriers must stay prompt), and 1 ms once nothing completed for
 * 100 ms; a helper event ends a sleep early. Every poll runs MPI's progress engine (about
 * 0.1 ms of CPU in the sandbox we benchmark in), so a waiting rank costs a few percent of a
 * core. */
static void backoff(ctx *x, int64_t seen, int idle, int64_t waited_ms, int data_moving)
{
    if (idle < 1)
        return;
    int64_t cap = data_moving ? (waited_ms < 10 ? 20 : 100) : min64(1000, x->chunk / 4096 / 4);
    cap = cap < 20 ? 20 : cap;
    int64_t us = min64(cap, (cap < 50 ? 20LL : 50LL) << (idle < 6 ? idle - 1 : 5));
    wait_event(x, seen, waited_ms >= 100 ? 1000 : us);
}

/* Completes n requests (data: they carry bulk data); AEGIS_E_STALL when the other ranks do
 * not answer in time. */
static int mpi_wait_for(ctx *x, MPI_Request *req, int n, int data)
{
    int64_t since = now_ms();
    for (int idle = 0;; idle++) {
        int done = 0;
        check_cancel(x); /* carried by the next agreement or verdict */
        if (MPI_Testall(n, req, &done, MPI_STATUSES_IGNORE) != MPI_SUCCESS)
            return AEGIS_E_MPI;
        if (done)
            return AEGIS_OK;
        if (now_ms() - since > x->mpi_stall_ms)
            return AEGIS_E_STALL;
        pthread_mutex_lock(&x->mu);
        int64_t seen = x->events;
        pthread_mutex_unlock(&x->mu);
        backoff(x, seen, idle, now_ms() - since, data);
    }
}

static int mpi_wait(ctx *x, MPI_Request *req, int n) { return mpi_wait_for(x, req, n, 0); }

/* A collective that did not complete: the other ranks are gone or stuck; nothing can be
 * agreed any more, so this rank reports it alone and keeps the buffers MPI may still use. */
static int give_up(ctx *x, int code)
{
    x->abandoned = 1;
    x->res->failing_rank = x->rank;
    snprintf(x->res->host, sizeof x->res->host, "%s", x->host);
    if (code == AEGIS_E_STALL)
        snprintf(x->res->cause, sizeof x->res->cause, "no answer from the other ranks for %.0f "
                 "s (a rank was stopped or killed, or its file system hung)",
                 (double)x->mpi_stall_ms / 1000.0);
    else
        snprintf(x->res->cause, sizeof x->res->cause, "an MPI call failed on rank %d", x->rank);
    return code;
}

/* Every rank learns the lowest failing rank's error; fail is the reduced (size - rank). */
static int share_error(ctx *x, int64_t fail)
{
    int who = x->size - (int)fail;
    wire_error w;
    memset(&w, 0, sizeof w);
    if (who == x->rank) {
        pthread_mutex_lock(&x->mu);
        w.code = x->err.code;
        snprintf(w.cause, sizeof w.cause, "%s", x->err.cause);
        pthread_mutex_unlock(&x->mu);
        snprintf(w.host, sizeof w.host, "%s", x->host);
    }
    MPI_Request req;
    if (MPI_Ibcast(&w, (int)sizeof w, MPI_BYTE, who, x->comm, &req) != MPI_SUCCESS)
        return give_up(x, AEGIS_E_MPI);
    int rc = mpi_wait(x, &req, 1);
    if (rc != AEGIS_OK)
        return give_up(x, rc);
    w.host[sizeof w.host - 1] = 0;
    w.cause[sizeof w.cause - 1] = 0;
    x->res->failing_rank = who;
    snprintf(x->res->host, sizeof x->res->host, "%s", w.host);
    snprintf(x->res->cause, sizeof x->res->cause, "%s", w.cause);
    return w.code > 0 && w.code <= AEGIS_E_CANCELLED ? w.code : AEGIS_E_MPI;
}

/* Collective "is every rank fine?"; *value (if given) returns the MAX of what ranks put. */
static int agree_value(ctx *x, int64_t *value)
{
    int64_t h[2] = {0, value ? *value : 0};
    pthread_mutex_lock(&x->mu);
    if (x->err.code)
        h[0] = x->size - x->rank;
    pthread_mutex_unlock(&x->mu);
    MPI_Request req;
    if (MPI_Iallreduce(MPI_IN_PLACE, h, 2, MPI_INT64_T, MPI_MAX, x->comm, &req) != MPI_SUCCESS)
        return give_up(x, AEGIS_E_MPI);
    int rc = mpi_wait(x, &req, 1);
    if (rc != AEGIS_OK)
        return give_up(x, rc);
    if (h[0])
        return share_error(x, h[0]);
    if (value)
        *value = h[1];
    return AEGIS_OK;
}

static int agree(ctx *x) { return agree_value(x, NULL); }

static int owner_of(const ctx *x, int64_t k) { return x->opts->readers[k % x->opts->n_readers]; }

static int64_t chunk_len(const ctx *x, int64_t k) { return min64(x->chunk, x->total - k * x->chunk); }

/* Step 1 of chunk k: this rank released slot k % depth (no step when it has the ring alone). */
static int post_freed(ctx *x, int64_t k)
{
    inflight *f = &x->flight[k % x->depth];
    f->freed = MPI_REQUEST_NULL;
    return x->ring == MPI_COMM_NULL || MPI_Ibarrier(x->ring, &f->freed) == MPI_SUCCESS ? 0 : -1;
}

/* Step 2 (leaders, when there are several rings): the chunk from its reader's ring to all. */
static int post_data(ctx *x, int64_t k)
{
    inflight *f = &x->flight[k % x->depth];
    char *buf = x->slots[k % x->depth].buf;
    int root = x->net_root[k % x->opts->n_readers];
    int64_t len = chunk_len(x, k);
    f->n_data = 0;
    for (int64_t off = 0; off < len; off += x->opts->max_count) {
        int count = (int)min64(len - off, x->opts->max_count);
        if (MPI_Ibcast(buf + off, count, MPI_BYTE, root, x->net, &f->data[f->n_data++]) !=
            MPI_SUCCESS)
            return -1;
    }
    return 0;
}

/* Step 3, every rank once its ring holds the chunk: failure flags and the reader's CRC. */
static int post_verdict(ctx *x, int64_t k, int64_t fail, uint32_t crc)
{
    inflight *f = &x->flight[k % x->depth];
    f->hdr[0] = fail;
    f->hdr[1] = owner_of(x, k) == x->rank ? (int64_t)crc : 0;
    return MPI_Iallreduce(MPI_IN_PLACE, f->hdr, 2, MPI_INT64_T, MPI_MAX, x->comm,
                          &f->verdict) == MPI_SUCCESS ? 0 : -1;
}

static int all_free(const ctx *x)
{
    for (int i = 0; i < x->depth; i++)
        if (x->slots[i].phase != S_FREE)
            return 0;
    return 1;
}

/* How many chunks this rank has posted (_p) and completed (_d) of each step. */
typedef struct steps {
    int64_t freed_p, freed_d, data_p, data_d, verdict_p, verdict_d;
    int64_t fail; /* the failed verdict's flag, once one came */
} steps;

static int moves_data(const ctx *x) { return x->is_leader && x->net_size > 1; }

/* Each try_ takes its step for the next chunk if it can: 1 when it did, 0 when it cannot yet,
 * -1 when MPI failed. The caller holds no lock. */

/* Whether chunk k's slot is free (want_free) or not being filled; once this rank failed,
 * always: its steps then go out at once, their contents garbage. */
static int slot_allows(ctx *x, int64_t k, int want_free)
{
    pthread_mutex_lock(&x->mu);
    int phase = x->slots[k % x->depth].phase;
    int ok = x->err.code != AEGIS_OK || (want_free ? phase == S_FREE : phase != S_FILL);
    pthread_mutex_unlock(&x->mu);
    return ok;
}

/* 1. release the next slot to the ring */
static int try_release(ctx *x, steps *st)
{
    int64_t k = st->freed_p;
    if (k >= x->n_chunks || k >= st->verdict_d + x->depth || !slot_allows(x, k, 1))
        return 0;
    if (post_freed(x, k))
        return -1;
    st->freed_p++;
    return 1;
}

/* the ring released the slot: its reader fills it, the others hold it for the chunk */
static int try_claim(ctx *x, steps *st)
{
    int64_t k = st->freed_d;
    int done = 0;
    if (k >= st->freed_p)
        return 0;
    if (MPI_Test(&x->flight[k % x->depth].freed, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
        return -1;
    if (!done)
        return 0;
    pthread_mutex_lock(&x->mu);
    slot *s = &x->slots[k % x->depth];
    if (s->phase == S_FREE) { /* not while a failed rank's helpers still count it off */
        s->chunk = k;
        s->start = k * x->chunk;
        s->len = chunk_len(x, k);
        s->cursor = s->busy = 0;
        s->crc = 0;
        s->phase = owner_of(x, k) == x->rank && !x->err.code ? S_FILL : S_HELD;
        pthread_cond_broadcast(&x->work_cv);
    }
    pthread_mutex_unlock(&x->mu);
    st->freed_d++;
    return 1;
}

/* 2. leaders: send the filled chunk (its reader) or receive it into the ring */
static int try_move(ctx *x, steps *st)
{
    int64_t k = st->data_p;
    if (!moves_data(x) || k >= st->freed_d || !slot_allows(x, k, 0))
        return 0;
    if (post_data(x, k))
        return -1;
    st->data_p++;
    return 1;
}

static int try_moved(ctx *x, steps *st)
{
    int64_t k = st->data_d;
    int done = 0;
    if (k >= st->data_p)
        return 0;
    inflight *f = &x->flight[k % x->depth];
    if (MPI_Testall(f->n_data, f->data, &done, MPI_STATUSES_IGNORE) != MPI_SUCCESS)
        return -1;
    st->data_d += done;
    return done;
}

/* 3. this rank's ring holds the chunk: post the verdict with this rank's failure flag */
static int try_vote(ctx *x, steps *st)
{
    int64_t k = st->verdict_p;
    if (k >= (moves_data(x) ? st->data_d : st->freed_d))
        return 0;
    pthread_mutex_lock(&x->mu);
    slot *s = &x->slots[k % x->depth];
    int failing = x->err.code != AEGIS_OK;
    int ok = s->phase != S_FILL || failing;
    uint32_t crc = s->crc;
    pthread_mutex_unlock(&x->mu);
    if (!ok)
        return 0;
    if (post_verdict(x, k, failing ? x->size - x->rank : 0, crc))
        return -1;
    st->verdict_p++;
    return 1;
}

/* every ring holds the chunk (or some rank failed): writers place it from the ring */
static int try_place(ctx *x, steps *st)
{
    int64_t k = st->verdict_d;
    int done = 0;
    if (k >= st->verdict_p)
        return 0;
    inflight *f = &x->flight[k % x->depth];
    if (MPI_Test(&f->verdict, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS)
        return -1;
    if (!done)
        return 0;
    if (f->hdr[0]) {
        st->fail = f->hdr[0];
        return 1;
    }
    int64_t len = chunk_len(x, k);
    x->stream_crc = aegis_crc32c_combine(x->stream_crc, (uint32_t)f->hdr[1], len);
    __atomic_store_n(&x->res->bytes_done, k * x->chunk + len, __ATOMIC_RELAXED);
    pthread_mutex_lock(&x->mu);
    slot *s = &x->slots[k % x->depth];
    if (s->phase == S_HELD || s->phase == S_READY) {
        if (x->is_writer && x->err.code == AEGIS_OK) {
            s->phase = S_DRAIN;
            s->crc = (uint32_t)f->hdr[1];
            /* a transfer is checked once per ring that received it (its verifier), never
             * where it was read; the checksum fault forces the check on its rank */
            s->check = x->verify &&
                       ((x->is_verifier && owner_of(x, k) != x->leader) || corrupts(x, s));
            s->cursor = s->busy = 0;
            pthread_cond_broadcast(&x->work_cv);
        } else {
            s->phase = S_FREE;
        }
    }
    pthread_mutex_unlock(&x->mu);
    st->verdict_d++;
    return 1;
}

/* After chunk j's verdict reported a failure: no rank can have posted a step of a chunk past
 * j + depth - 1 (a slot is released only after its last verdict), so all post every step
 * (garbage, nobody writes it) and complete exactly that far before sharing the error. */
static int drain_after_failure(ctx *x, int64_t j, steps *st)
{
    int64_t last = min64(j + x->depth - 1, x->n_chunks - 1);
    for (; st->freed_p <= last; st->freed_p++)
        if (post_freed(x, st->freed_p))
            return give_up(x, AEGIS_E_MPI);
    for (; moves_data(x) && st->data_p <= last; st->data_p++)
        if (post_data(x, st->data_p))
            return give_up(x, AEGIS_E_MPI);
    for (; st->verdict_p <= last; st->verdict_p++)
        if (post_verdict(x, st->verdict_p, 0, 0))
            return give_up(x, AEGIS_E_MPI);
    for (int64_t k = j + 1; k <= last; k++) {
        inflight *f = &x->flight[k % x->depth];
        int rc = k >= st->freed_d ? mpi_wait(x, &f->freed, 1) : AEGIS_OK;
        if (rc == AEGIS_OK && moves_data(x) && k >= st->data_d)
            rc = mpi_wait_for(x, f->data, f->n_data, 1);
        if (rc == AEGIS_OK)
            rc = mpi_wait(x, &f->verdict, 1);
        if (rc != AEGIS_OK)
            return give_up(x, rc);
    }
    return AEGIS_OK;
}

static int transfer(ctx *x)
{
    steps st = {0};
    int64_t mpi_since = now_ms();
    int idle = 0;
    int (*const step[])(ctx *, steps *) = {try_release, try_claim, try_move, try_moved,
                                           try_vote, try_place};
    while (st.verdict_d < x->n_chunks) {
        check_cancel(x);
        pthread_mutex_lock(&x->mu);
        check_stalled(x);
        int64_t seen = x->events;
        pthread_mutex_unlock(&x->mu);
        int moved = 0;
        for (size_t i = 0; i < sizeof step / sizeof step[0]; i++) {
            int rc = step[i](x, &st);
            if (rc < 0)
                return give_up(x, AEGIS_E_MPI);
            moved |= rc;
        }
        if (st.fail) {
            int rc = drain_after_failure(x, st.verdict_d, &st);
            return rc != AEGIS_OK ? rc : share_error(x, st.fail);
        }
        if (moved) {
            idle = 0;
            mpi_since = now_ms();
            continue;
        }
        int mpi_pending = st.freed_d < st.freed_p || st.data_d < st.data_p ||
                          st.verdict_d < st.verdict_p;
        if (!mpi_pending) {
            wait_event(x, seen, 200000); /* only this rank's helpers can move things now */
            continue;
        }
        if (now_ms() - mpi_since > x->mpi_stall_ms)
            return give_up(x, AEGIS_E_STALL);
        backoff(x, seen, idle++, now_ms() - mpi_since, st.data_d < st.data_p);
    }
    /* the writers place the last chunks (a failure here, a cancellation too, reaches the
     * others in run()'s agreement) */
    for (int waiting = 1; waiting;) {
        check_cancel(x);
        pthread_mutex_lock(&x->mu);
        waiting = !all_free(x) && x->err.code == AEGIS_OK;
        if (waiting) {
            check_stalled(x);
            struct timespec t = in_ms(100);
            pthread_cond_timedwait(&x->main_cv, &x->mu, &t);
        }
        pthread_mutex_unlock(&x->mu);
    }
    return AEGIS_OK;
}

/* ---------------------------------------------------------------- writer setup and finish */

/* Directories and empty, preallocated files before any data arrives (index order: parents
 * first). Symlinks come last (finish_tree), so no path is resolved through one meanwhile. */
static int create_tree(ctx *x, local_error *e)
{
    for (int64_t i = 0; i < x->n_ents; i++) {
        const entry *en = &x->ents[i];
        if (cancelled(x, e)) /* a tree of many files takes a while */
            return -1;
        if (en->kind == '5' && strcmp(en->path, ".") != 0) {
            if (mkdirat(x->dst_fd, en->path, 0700) != 0) {
                set_error(e, AEGIS_E_WRITE, "cannot create directory %s: %s", en->path,
                          strerror(errno));
                return -1;
            }
        } else if (en->kind == '0') {
            int fd = openat(x->dst_fd, en->path,
                            O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
            if (fd < 0) {
                set_error(e, AEGIS_E_WRITE, "cannot create %s: %s", en->path, strerror(errno));
                return -1;
            }
            int rc = 0;
            if (en->size > 0) {
                do /* a signal may interrupt a long preallocation: go on, it is polled above */
                    rc = fallocate(fd, 0, 0, en->size);
                while (rc != 0 && errno == EINTR);
                if (rc != 0 && (errno == EOPNOTSUPP || errno == ENOSYS))
                    rc = ftruncate(fd, en->size); /* no preallocation on this file system */
            }
            if (rc != 0) {
                set_error(e, AEGIS_E_WRITE, "cannot allocate %lld bytes for %s: %s",
                          (long long)en->size, en->path, strerror(errno));
                close(fd);
                return -1;
            }
            close(fd);
        }
    }
    return 0;
}

/* Symlinks, then modes and mtimes, children before their directories. Directories keep
 * their mode plus u+rwx so the owner can always write and remove the staged tree. */
static int finish_tree(ctx *x, local_error *e)
{
    for (int64_t i = x->n_ents - 1; i >= 0; i--) {
        const entry *en = &x->ents[i];
        struct timespec times[2] = {{en->mtime, 0}, {en->mtime, 0}};
        if (cancelled(x, e))
            return -1;
        if (en->kind == '2') {
            if (symlinkat(en->link, x->dst_fd, en->path) != 0 ||
                utimensat(x->dst_fd, en->path, times, AT_SYMLINK_NOFOLLOW) != 0) {
                set_error(e, AEGIS_E_WRITE, "symlink %s: %s", en->path, strerror(errno));
                return -1;
            }
            continue;
        }
        int flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | (en->kind == '5' ? O_DIRECTORY : 0);
        int fd = openat(x->dst_fd, en->path, flags);
        if (fd < 0 || fchmod(fd, en->kind == '5' ? (en->mode | 0700) : en->mode) != 0 ||
            futimens(fd, times) != 0) {
            set_error(e, AEGIS_E_WRITE, "setting mode and time of %s: %s", en->path,
                      strerror(errno));
            if (fd >= 0)
                close(fd);
            return -1;
        }
        close(fd);
    }
    return 0;
}

/* ---------------------------------------------------------------- setup */

/* Ranks must pass the same options: compare every shared field's MIN and MAX. */
static int check_same_options(ctx *x)
{
    const aegis_stage_opts *o = x->opts;
    enum { N_FIXED = 12, N = N_FIXED + AEGIS_MAX_READERS };
    static const char *names[N_FIXED] = {"chunk_size", "max_count", "max_index_bytes",
                                         "stall_timeout", "depth", "root", "readers",
                                         "verify", "share_ring", "fault_rank", "fault_kind",
                                         "fault_after"};
    int64_t mine[N], hi[N], lo[N];
    int64_t fixed[N_FIXED] = {o->chunk_size, o->max_count, o->max_index_bytes, o->stall_ms,
                              o->depth, o->root, o->n_readers, o->verify != 0,
                              o->share_ring != 0, o->fault_rank, o->fault_kind,
                              o->fault_after};
    memcpy(mine, fixed, sizeof fixed);
    for (int i = 0; i < AEGIS_MAX_READERS; i++)
        mine[N_FIXED + i] = i < o->n_readers ? o->readers[i] : -1;
    MPI_Request req[2];
    if (MPI_Iallreduce(mine, hi, N, MPI_INT64_T, MPI_MAX, x->comm, &req[0]) != MPI_SUCCESS ||
        MPI_Iallreduce(mine, lo, N, MPI_INT64_T, MPI_MIN, x->comm, &req[1]) != MPI_SUCCESS)
        return give_up(x, AEGIS_E_MPI);
    int rc = mpi_wait(x, req, 2);
    if (rc != AEGIS_OK)
        return give_up(x, rc);
    for (int i = 0; i < N; i++)
        if (hi[i] != lo[i]) {
            local_error e = {0};
            set_error(&e, AEGIS_E_ARGS, "ranks passed different %s (%lld on this rank, %lld "
                      "to %lld across ranks); every rank must pass the same options",
                      i < N_FIXED ? names[i] : "reader ranks", (long long)mine[i],
                      (long long)lo[i], (long long)hi[i]);
            if (mine[i] != hi[i] || x->rank == 0) /* the odd ones report */
                fail(x, &e);
            break;
        }
    return agree(x);
}

static void check_options(ctx *x, local_error *e)
{
    const aegis_stage_opts *o = x->opts;
    int readers_ok = o->n_readers >= 1 && o->n_readers <= AEGIS_MAX_READERS &&
                     o->n_readers <= x->size;
    for (int i = 0; readers_ok && i < o->n_readers; i++) {
        readers_ok = o->readers[i] >= 0 && o->readers[i] < x->size;
        for (int j = 0; j < i; j++)
            readers_ok = readers_ok && o->readers[j] != o->readers[i];
    }
    if (o->chunk_size < 1 || o->chunk_size > (1LL << 40) || o->max_count < 1 ||
        o->max_count > INT_MAX || o->depth < 1 || o->depth > 1024 || o->root < 0 ||
        o->root >= x->size || !readers_ok || o->stall_ms < 1 ||
        o->max_index_bytes < INDEX_HEAD || o->io_threads < 1 || o->io_threads > 256 ||
        (o->chunk_size + o->max_count - 1) / o->max_count > MAX_CALLS_PER_CHUNK - 1)
        set_error(e, AEGIS_E_ARGS, "invalid options: chunk_size=%lld max_count=%lld depth=%d "
                  "root=%d readers=%d stall_ms=%lld io_threads=%d (of %d ranks)",
                  (long long)o->chunk_size, (long long)o->max_count, o->depth, o->root,
                  o->n_readers, (long long)o->stall_ms, o->io_threads, x->size);
}

/* The root's index reaches every rank, its length bounded before any allocation. */
static int receive_index(ctx *x, const void *index, int64_t index_len)
{
    local_error e = {0};
    int64_t len = 0;
    if (x->rank == x->opts->root) {
        if (!index || index_len < INDEX_HEAD || index_len > x->opts->max_index_bytes)
            set_error(&e, AEGIS_E_INDEX, "the file index is %lld bytes (limit %lld)",
                      (long long)index_len, (long long)x->opts->max_index_bytes);
        else
            len = index_len;
        fail(x, &e);
    }
    int rc = agree_value(x, &len);
    if (rc != AEGIS_OK)
        return rc;
    if (len < INDEX_HEAD || len > x->opts->max_index_bytes)
        set_error(&e, AEGIS_E_INDEX, "received a file index length of %lld bytes (limit %lld)",
                  (long long)len, (long long)x->opts->max_index_bytes);
    else if (!(x->index = malloc((size_t)len)))
        set_error(&e, AEGIS_E_NOMEM, "cannot allocate %lld bytes for the file index",
                  (long long)len);
    fail(x, &e);
    if ((rc = agree(x)) != AEGIS_OK)
        return rc;
    if (x->rank == x->opts->root)
        memcpy(x->index, index, (size_t)len);
    for (int64_t off = 0; off < len; off += x->opts->max_count) {
        MPI_Request req;
        int count = (int)min64(len - off, x->opts->max_count);
        if (MPI_Ibcast(x->index + off, count, MPI_BYTE, x->opts->root, x->comm, &req) !=
            MPI_SUCCESS)
            return give_up(x, AEGIS_E_MPI);
        if ((rc = mpi_wait_for(x, &req, 1, 1)) != AEGIS_OK)
            return give_up(x, rc);
    }
    if (parse_index(x, len, &e) == 0)
        layout(x, &e);
    fail(x, &e);
    return agree(x);
}

static int open_ends(ctx *x, const char *src_dir, const char *dest_dir, local_error *e)
{
    if (x->is_reader) {
        int flags = O_RDONLY | O_CLOEXEC | (x->dir_source ? O_DIRECTORY : 0);
        if (!src_dir || (x->src_fd = open(src_dir, flags)) < 0) {
            set_error(e, AEGIS_E_SOURCE, "cannot open the source %s: %s",
                      src_dir ? src_dir : "(none given)", strerror(errno));
            return -1;
        }
    }
    if (x->is_writer) {
        if (!dest_dir || (x->dst_fd = open(dest_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
            set_error(e, AEGIS_E_WRITE, "cannot open %s: %s", dest_dir ? dest_dir : "(none)",
                      strerror(errno));
            return -1;
        }
        if (x->opts->capture_path &&
            (x->cap_fd = open(x->opts->capture_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                              0600)) < 0) {
            set_error(e, AEGIS_E_WRITE, "cannot open %s: %s", x->opts->capture_path,
                      strerror(errno));
            return -1;
        }
        return create_tree(x, e);
    }
    return 0;
}

/* Who shares a ring: the ranks of one host, split so that each ring holds at most one reader,
 * which leads it (the others join the host's lowest reader, or its lowest rank when it has
 * none). share_ring = 0 gives every rank its own ring. The leaders form x->net. Setup only,
 * after every rank agreed: plain blocking calls. */
static int join_ring(ctx *x)
{
    MPI_Comm host = MPI_COMM_NULL;
    int color = x->rank, key = x->is_reader ? 0 : x->rank + 1, host_size = 1;
    if (x->opts->share_ring) {
        if (MPI_Comm_split_type(x->comm, MPI_COMM_TYPE_SHARED, x->rank, MPI_INFO_NULL, &host) !=
            MPI_SUCCESS)
            return -1;
        MPI_Comm_size(host, &host_size);
    }
    if (host_size > 1) {
        int mine[2] = {x->rank, x->is_reader}, *all = malloc(sizeof(int) * 2 * host_size);
        int rc = all ? MPI_Allgather(mine, 2, MPI_INT, all, 2, MPI_INT, host) : MPI_ERR_NO_MEM;
        if (rc == MPI_SUCCESS && !x->is_reader) {
            color = all[0]; /* host ranks follow world ranks: the host's lowest rank */
            for (int i = 0; i < host_size; i++)
                if (all[2 * i + 1]) { /* its lowest reader, if any */
                    color = all[2 * i];
                    break;
                }
        }
        free(all);
        if (rc != MPI_SUCCESS || MPI_Comm_split(host, color, key, &x->ring) != MPI_SUCCESS) {
            MPI_Comm_free(&host);
            return -1;
        }
        MPI_Comm_free(&host);
        int ring_size;
        MPI_Comm_size(x->ring, &ring_size);
        if (ring_size == 1)
            MPI_Comm_free(&x->ring);
    } else if (host != MPI_COMM_NULL) {
        MPI_Comm_free(&host);
    }
    x->is_leader = x->ring == MPI_COMM_NULL;
    x->leader = x->rank;
    int verifier = x->is_writer ? x->rank : INT_MAX;
    if (x->ring != MPI_COMM_NULL) {
        int ring_rank;
        MPI_Comm_rank(x->ring, &ring_rank);
        x->is_leader = ring_rank == 0;
        if (MPI_Bcast(&x->leader, 1, MPI_INT, 0, x->ring) != MPI_SUCCESS ||
            MPI_Allreduce(MPI_IN_PLACE, &verifier, 1, MPI_INT, MPI_MIN, x->ring) != MPI_SUCCESS)
            return -1;
    }
    x->is_verifier = verifier == x->rank; /* the ring's lowest writer */
    if (MPI_Comm_split(x->comm, x->is_leader ? 0 : MPI_UNDEFINED, x->rank, &x->net) !=
        MPI_SUCCESS)
        return -1;
    if (x->net == MPI_COMM_NULL)
        return 0;
    MPI_Comm_size(x->net, &x->net_size);
    MPI_Group world, leaders; /* readers lead their rings: find them among the leaders */
    MPI_Comm_group(x->comm, &world);
    MPI_Comm_group(x->net, &leaders);
    int rc = MPI_Group_translate_ranks(world, x->opts->n_readers, x->opts->readers, leaders,
                                       x->net_root);
    MPI_Group_free(&world);
    MPI_Group_free(&leaders);
    return rc == MPI_SUCCESS ? 0 : -1;
}

static void unlink_ring(ctx *x)
{
    if (x->shm_name[0])
        shm_unlink(x->shm_name);
    x->shm_name[0] = 0;
}

/* The ring's buffers: private memory for a ring of one; otherwise the leader creates a
 * shared-memory object of the whole size (reserved up front, so a full /dev/shm is an error
 * here, not a SIGBUS later), the others map it by name, and after a barrier over the ring
 * (everyone mapped it, or failed to) the leader unlinks the name (unlink_ring). */
static int map_ring(ctx *x, int64_t bytes, local_error *e)
{
    if (x->ring == MPI_COMM_NULL) {
        if (!(x->ring_mem = malloc((size_t)bytes)))
            set_error(e, AEGIS_E_NOMEM, "cannot allocate %lld bytes of chunk buffers",
                      (long long)bytes);
        return 0;
    }
    char name[sizeof x->shm_name] = "";
    int fd = -1;
    if (x->is_leader) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        snprintf(name, sizeof name, "/aegis-ring-%d-%lld", (int)getpid(),
                 (long long)t.tv_sec * 1000000000LL + t.tv_nsec);
        fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        int err = fd < 0 ? errno : posix_fallocate(fd, 0, bytes);
        if (err == EOPNOTSUPP || err == EINVAL)
            err = ftruncate(fd, bytes) == 0 ? 0 : errno;
        if (err) {
            set_error(e, AEGIS_E_NOMEM, "cannot reserve %lld bytes of shared memory (/dev/shm) "
                      "for the chunk ring: %s; free /dev/shm or pass share_ring=False",
                      (long long)bytes, strerror(err));
            if (fd >= 0) {
                close(fd);
                shm_unlink(name);
            }
            fd = -1;
            name[0] = 0;
        }
        snprintf(x->shm_name, sizeof x->shm_name, "%s", name);
    }
    MPI_Request req;
    if (MPI_Ibcast(name, sizeof name, MPI_CHAR, 0, x->ring, &req) != MPI_SUCCESS)
        return AEGIS_E_MPI;
    int rc = mpi_wait(x, &req, 1);
    if (rc != AEGIS_OK)
        return rc;
    name[sizeof name - 1] = 0;
    if (!x->is_leader && name[0] && (fd = shm_open(name, O_RDWR | O_CLOEXEC, 0)) < 0)
        set_error(e, AEGIS_E_NOMEM, "cannot open the shared chunk ring %s: %s", name,
                  strerror(errno));
    if (fd >= 0) {
        void *p = mmap(NULL, (size_t)bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED)
            set_error(e, AEGIS_E_NOMEM, "cannot map %lld bytes of the shared chunk ring: %s",
                      (long long)bytes, strerror(errno));
        else
            x->ring_mem = p;
        close(fd);
    }
    /* every rank of the ring has it mapped (or failed to): the name can go at once, so a
     * job killed from here on leaves nothing in /dev/shm */
    if (MPI_Ibarrier(x->ring, &req) != MPI_SUCCESS)
        return AEGIS_E_MPI;
    rc = mpi_wait(x, &req, 1);
    unlink_ring(x);
    return rc;
}

static int allocate_ring(ctx *x, local_error *e)
{
    if (join_ring(x) != 0)
        return give_up(x, AEGIS_E_MPI);
    int rc = map_ring(x, (int64_t)x->depth * x->chunk, e);
    if (rc != AEGIS_OK)
        return give_up(x, rc);
    int64_t parts = (x->chunk + x->piece - 1) / x->piece;
    int calls = (int)((x->chunk + x->opts->max_count - 1) / x->opts->max_count);
    x->slots = calloc((size_t)x->depth, sizeof *x->slots);
    x->flight = calloc((size_t)x->depth, sizeof *x->flight);
    int ok = x->slots && x->flight;
    for (int i = 0; ok && i < x->depth; i++) {
        x->slots[i].buf = x->ring_mem ? x->ring_mem + (int64_t)i * x->chunk : NULL;
        x->slots[i].part_crc = calloc((size_t)parts, sizeof(uint32_t));
        x->flight[i].data = calloc((size_t)calls, sizeof(MPI_Request));
        ok = x->slots[i].part_crc && x->flight[i].data;
    }
    if (!ok)
        set_error(e, AEGIS_E_NOMEM, "cannot allocate the bookkeeping of %d chunks", x->depth);
    return AEGIS_OK;
}

static int start_workers(ctx *x, local_error *e)
{
    if (!x->is_reader && !x->is_writer)
        return 0;
    x->workers = calloc((size_t)x->opts->io_threads, sizeof *x->workers);
    if (!x->workers) {
        set_error(e, AEGIS_E_NOMEM, "cannot allocate the helper threads");
        return -1;
    }
    /* helpers start with asynchronous signals blocked: a signal (SIGTERM, SIGINT) reaches
     * the main thread, and no helper's pread/pwrite/openat sees EINTR from it */
    sigset_t async, before;
    sigfillset(&async);
    int sync_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT};
    for (size_t i = 0; i < sizeof sync_signals / sizeof sync_signals[0]; i++)
        sigdelset(&async, sync_signals[i]);
    pthread_sigmask(SIG_BLOCK, &async, &before);
    int rc = 0;
    for (int i = 0; i < x->opts->io_threads; i++) {
        x->workers[i].x = x;
        int err = pthread_create(&x->workers[i].thread, NULL, worker_main, &x->workers[i]);
        if (err != 0) {
            set_error(e, AEGIS_E_THREAD, "cannot start helper thread %d: %s", i,
                      strerror(err));
            rc = -1;
            break;
        }
        x->workers[i].started = 1;
        x->n_workers = i + 1;
    }
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    return rc;
}

/* ---------------------------------------------------------------- entry point */

static void cleanup(ctx *x)
{
    unlink_ring(x);
    pthread_mutex_lock(&x->mu);
    x->stop = 1;
    pthread_cond_broadcast(&x->work_cv);
    pthread_mutex_unlock(&x->mu);
    for (int i = 0; i < x->n_workers; i++) {
        /* a helper inside a hung system call cannot be joined: leave it its memory */
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_sec += 5;
        if (pthread_timedjoin_np(x->workers[i].thread, NULL, &t) != 0)
            x->abandoned = 1;
    }
    if (x->abandoned)
        return;
    if (x->src_fd >= 0)
        close(x->src_fd);
    if (x->dst_fd >= 0)
        close(x->dst_fd);
    if (x->cap_fd >= 0)
        close(x->cap_fd);
    for (int i = 0; x->slots && i < x->depth; i++)
        free(x->slots[i].part_crc);
    for (int i = 0; x->flight && i < x->depth; i++)
        free(x->flight[i].data);
    if (x->ring_mem && x->ring != MPI_COMM_NULL)
        munmap(x->ring_mem, (size_t)x->depth * (size_t)x->chunk);
    else
        free(x->ring_mem);
    free(x->slots);
    free(x->flight);
    free(x->workers);
    free(x->ents);
    free(x->arena);
    free(x->index);
    pthread_cond_destroy(&x->work_cv);
    pthread_cond_destroy(&x->main_cv);
    pthread_mutex_destroy(&x->mu);
    MPI_Comm *comms[] = {&x->ring, &x->net, &x->comm};
    for (int i = 0; i < 3; i++)
        if (*comms[i] != MPI_COMM_NULL)
            MPI_Comm_free(comms[i]);
}

static int run(ctx *x, const char *src_dir, const void *index, int64_t index_len,
               const char *dest_dir)
{
    local_error e = {0};
    int rc = check_same_options(x);
    if (rc != AEGIS_OK)
        return rc;
    check_options(x, &e);
    fail(x, &e);
    if ((rc = agree(x)) != AEGIS_OK || (rc = receive_index(x, index, index_len)) != AEGIS_OK)
        return rc;
    if ((rc = allocate_ring(x, &e)) != AEGIS_OK)
        return rc;
    if (!e.code && open_ends(x, src_dir, dest_dir, &e) == 0)
        start_workers(x, &e);
    fail(x, &e);
    if ((rc = agree(x)) != AEGIS_OK || (rc = transfer(x)) != AEGIS_OK)
        return rc;
    pthread_mutex_lock(&x->mu);
    int ok = x->err.code == AEGIS_OK;
    pthread_mutex_unlock(&x->mu);
    if (ok && x->is_writer && finish_tree(x, &e) != 0)
        fail(x, &e);
    return agree(x);
}

int aegis_stage(void *comm_ptr, const char *src_dir, const void *index, int64_t index_len,
                const char *dest_dir, const aegis_stage_opts *opts, aegis_stage_result *res)
{
    memset(res, 0, sizeof *res);
    res->failing_rank = -1;
    ctx *x = calloc(1, sizeof *x); /* on the heap: kept alive if a helper cannot be joined */
    if (!x) {
        res->code = AEGIS_E_NOMEM;
        snprintf(res->cause, sizeof res->cause, "cannot allocate the staging context");
        return res->code;
    }
    x->comm = x->ring = x->net = MPI_COMM_NULL;
    x->net_size = 1;
    x->src_fd = x->dst_fd = x->cap_fd = -1;
    x->opts = opts;
    x->res = res;
    x->chunk = opts->chunk_size;
    x->piece = min64(opts->chunk_size, MAX_PIECE);
    x->depth = opts->depth;
    x->verify = opts->verify != 0;
    x->is_writer = opts->is_writer != 0;
    /* a rank waiting on the others allows them their own stall timeout to report first */
    x->mpi_stall_ms = 2 * opts->stall_ms + 5000;
    gethostname(x->host, sizeof x->host - 1);
    crc_init(&x->crc, 0);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->work_cv, &ca);
    pthread_cond_init(&x->main_cv, &ca);
    pthread_condattr_destroy(&ca);

    int code;
    MPI_Comm_rank(*(MPI_Comm *)comm_ptr, &x->rank); /* for the report, even if dup fails */
    /* a private communicator: our traffic cannot match the caller's, and errors return */
    if (MPI_Comm_dup(*(MPI_Comm *)comm_ptr, &x->comm) != MPI_SUCCESS) {
        x->comm = MPI_COMM_NULL;
        code = AEGIS_E_MPI;
        snprintf(res->cause, sizeof res->cause, "MPI_Comm_dup failed");
    } else {
        MPI_Comm_set_errhandler(x->comm, MPI_ERRORS_RETURN);
        MPI_Comm_size(x->comm, &x->size);
        for (int i = 0; i < opts->n_readers && i < AEGIS_MAX_READERS; i++)
            x->is_reader |= opts->readers[i] == x->rank;
        code = run(x, src_dir, index, index_len, dest_dir);
    }
    if (code == AEGIS_OK) {
        res->total_bytes = x->total;
        res->checksum = x->verify ? x->stream_crc : 0;
    } else if (res->failing_rank < 0) { /* only this rank knows: name it */
        res->failing_rank = x->rank;
        snprintf(res->host, sizeof res->host, "%s", x->host);
    }
    res->code = code;
    cleanup(x);
    if (!x->abandoned)
        free(x);
    return code;
}
