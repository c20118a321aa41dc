/* aegis staging core: root pipes `tar -c` into MPI broadcasts; writer ranks pipe into `tar -x`.
 *
 * Per chunk every rank joins one MPI_Allreduce(MAX) of a small header: the root contributes the
 * chunk length / end-of-stream / checksum, and any rank with a local failure contributes
 * (size - rank). A non-zero failure slot ends the transfer on all ranks at the same chunk; the
 * failing rank then broadcasts its host and cause. Writer failures (tar -x killed, disk full)
 * surface at the next chunk's header, so nobody waits on a dead peer.
 *
 * Pipelining (depth >= 2): a reader thread (root) fills a ring of `depth` buffers from tar -c,
 * the main thread broadcasts, a writer thread drains into tar -x. Only the main thread calls MPI
 * (MPI_THREAD_FUNNELED is enough). depth == 1 runs the same steps inline: the serial baseline.
 * No globals: all state lives in a per-call context.
 */
#define _GNU_SOURCE
#include "bcast.h"

#include <mpi.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

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

/* ---------------------------------------------------------------- context */

typedef struct local_error {
    int code; /* AEGIS_OK when nothing failed */
    char cause[400];
} local_error;

typedef struct child {
    pid_t pid;    /* 0 once reaped */
    int fd;       /* our end of the pipe, -1 when closed */
    FILE *errlog; /* the child's stderr (an unlinked temp file) */
    int status;   /* waitpid status once reaped */
} child;

typedef struct ctx {
    MPI_Comm comm;
    int rank, size, root, is_root, is_writer, verify, threaded;
    int depth;
    int64_t chunk, max_count;
    const aegis_stage_opts *opts;
    aegis_stage_result *res;

    char **buf;
    int64_t *len;
    int *eof;

    /* ring counters: chunks read (root), broadcast, written; guarded by mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int64_t n_read, n_sent, n_written;
    int stop;         /* main asks helpers to quit */
    int writer_done;  /* writer finished tar -x and verification */
    local_error rerr; /* reader-side failure (root) */
    local_error werr; /* writer-side failure */
    pthread_t reader_thread, writer_thread;
    int reader_started, writer_started;

    child src, dst;
    crc_tables crc;
    uint32_t crc_src, crc_dst, crc_expected;
    int64_t bytes_read, bytes_written, bytes_expected;
    int fault_fired_reader, fault_fired_writer;
} ctx;

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

/* ---------------------------------------------------------------- children */

static int spawn_tar(child *c, char *const argv[], int child_fd /* 0 or 1 */, local_error *err)
{
    int p[2];
    c->pid = 0;
    c->fd = -1;
    c->errlog = tmpfile();
    if (!c->errlog) {
        set_error(err, AEGIS_E_SPAWN, "cannot create a temp file for tar's stderr: %s",
                  strerror(errno));
        return -1;
    }
    if (pipe2(p, O_CLOEXEC) != 0) {
        set_error(err, AEGIS_E_SPAWN, "pipe: %s", strerror(errno));
        return -1;
    }
    /* fewer wakeups per chunk; the default 64 KiB pipe is best effort to enlarge */
    (void)fcntl(p[0], F_SETPIPE_SZ, 1 << 20);

    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    sigset_t none, dflt;
    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_init(&attr);
    sigemptyset(&none);
    sigemptyset(&dflt);
    sigaddset(&dflt, SIGPIPE);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &dflt);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    int theirs = child_fd == 0 ? p[0] : p[1];
    int ours = child_fd == 0 ? p[1] : p[0];
    posix_spawn_file_actions_adddup2(&fa, theirs, child_fd);
    posix_spawn_file_actions_adddup2(&fa, fileno(c->errlog), 2);
    int rc = posix_spawnp(&c->pid, argv[0], &fa, &attr, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    close(theirs);
    if (rc != 0) {
        c->pid = 0;
        close(ours);
        set_error(err, AEGIS_E_SPAWN, "cannot run %s: %s", argv[0], strerror(rc));
        return -1;
    }
    c->fd = ours;
    return 0;
}

/* Closes our pipe end and waits for the child. The pid is cleared under `mu` only after the
 * child is known to have exited (WNOWAIT), so cleanup() can kill it under `mu` without racing
 * a recycled pid. */
static void reap(child *c, pthread_mutex_t *mu, int kill_first)
{
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    if (c->pid > 0) {
        siginfo_t si;
        if (kill_first)
            kill(c->pid, SIGKILL);
        while (waitid(P_PID, (id_t)c->pid, &si, WEXITED | WNOWAIT) < 0 && errno == EINTR)
            ;
        pthread_mutex_lock(mu);
        while (waitpid(c->pid, &c->status, 0) < 0 && errno == EINTR)
            ;
        c->pid = 0;
        pthread_mutex_unlock(mu);
    }
}

/* One line describing how a reaped child ended, with the start of its stderr. */
static void describe_exit(child *c, const char *what, local_error *err, int code)
{
    char msg[300] = "";
    if (c->errlog) {
        rewind(c->errlog);
        size_t n = fread(msg, 1, sizeof msg - 1, c->errlog);
        msg[n] = 0;
        for (char *q = msg; *q; q++)
            if (*q == '\n' || *q == '\r')
                *q = (q[1] ? ' ' : 0);
    }
    if (WIFSIGNALED(c->status))
        set_error(err, code, "%s was killed by signal %d%s%s", what, WTERMSIG(c->status),
                  *msg ? ": " : "", msg);
    else
        set_error(err, code, "%s exited with status %d%s%s", what, WEXITSTATUS(c->status),
                  *msg ? ": " : "", msg);
}

static int exited_ok(const child *c)
{
    return WIFEXITED(c->status) && WEXITSTATUS(c->status) == 0;
}

/* ---------------------------------------------------------------- read / write one chunk */

/* Root: fill slot with up to chunk bytes from tar -c. Returns 0, or -1 with *err set. */
static int read_chunk(ctx *x, int64_t k, local_error *err)
{
    int s = (int)(k % x->depth);
    char *b = x->buf[s];
    int64_t got = 0;
    while (got < x->chunk) {
        size_t want = (size_t)(x->chunk - got);
        if (want > (1u << 30))
            want = 1u << 30;
        ssize_t r = read(x->src.fd, b + got, want);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            set_error(err, AEGIS_E_SOURCE, "reading from tar -c: %s", strerror(errno));
            return -1;
        }
        if (r == 0)
            break;
        got += r;
        if (x->opts->fault_kind == AEGIS_FAULT_KILL_READER && x->opts->fault_rank == x->rank &&
            !x->fault_fired_reader && x->bytes_read + got >= x->opts->fault_after) {
            x->fault_fired_reader = 1;
            kill(x->src.pid, SIGKILL);
        }
    }
    int eof = got < x->chunk;
    if (x->verify)
        x->crc_src = crc_update(&x->crc, x->crc_src, b, (size_t)got);
    x->bytes_read += got;
    if (eof) {
        reap(&x->src, &x->mu, 0);
        if (!exited_ok(&x->src)) {
            describe_exit(&x->src, "tar -c", err, AEGIS_E_SOURCE);
            return -1;
        }
    }
    x->len[s] = got;
    x->eof[s] = eof;
    return 0;
}

static int finish_writer(ctx *x, local_error *err);

/* Writer: push slot into tar -x. Returns 0, or -1 with *err set. */
static int write_chunk(ctx *x, int64_t k, local_error *err)
{
    int s = (int)(k % x->depth);
    const char *b = x->buf[s];
    int64_t n = x->len[s], off = 0;
    if (x->opts->fault_kind == AEGIS_FAULT_KILL_WRITER && x->opts->fault_rank == x->rank &&
        !x->fault_fired_writer && x->bytes_written >= x->opts->fault_after) {
        x->fault_fired_writer = 1;
        kill(x->dst.pid, SIGKILL);
    }
    while (off < n) {
        size_t want = (size_t)(n - off);
        if (want > (1u << 30))
            want = 1u << 30;
        ssize_t w = write(x->dst.fd, b + off, want);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            int e = errno;
            reap(&x->dst, &x->mu, 1);
            if (e == EPIPE)
                describe_exit(&x->dst, "tar -x", err, AEGIS_E_WRITE);
            else
                set_error(err, AEGIS_E_WRITE, "writing to tar -x: %s", strerror(e));
            return -1;
        }
        off += w;
    }
    if (x->verify)
        x->crc_dst = crc_update(&x->crc, x->crc_dst, b, (size_t)n);
    x->bytes_written += n;
    if (x->eof[s])
        return finish_writer(x, err);
    return 0;
}

/* End of stream on a writer: close tar's stdin, wait for it, then check size and checksum. */
static int finish_writer(ctx *x, local_error *err)
{
    reap(&x->dst, &x->mu, 0);
    if (!exited_ok(&x->dst)) {
        describe_exit(&x->dst, "tar -x", err, AEGIS_E_WRITE);
        return -1;
    }
    if (x->bytes_written != x->bytes_expected) {
        set_error(err, AEGIS_E_SIZE, "received %lld bytes, root sent %lld",
                  (long long)x->bytes_written, (long long)x->bytes_expected);
        return -1;
    }
    uint32_t mine = x->crc_dst;
    if (x->opts->fault_kind == AEGIS_FAULT_CHECKSUM && x->opts->fault_rank == x->rank)
        mine ^= 1u;
    if (x->verify && mine != x->crc_expected) {
        set_error(err, AEGIS_E_CHECKSUM, "CRC32C mismatch: wrote %08x, root sent %08x",
                  mine, x->crc_expected);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- helper threads */

static void *reader_main(void *arg)
{
    ctx *x = arg;
    for (int64_t k = 0;; k++) {
        pthread_mutex_lock(&x->mu);
        while (!x->stop && k >= x->n_written + x->depth)
            pthread_cond_wait(&x->cv, &x->mu);
        int stop = x->stop;
        pthread_mutex_unlock(&x->mu);
        if (stop)
            return NULL;
        local_error e = {0};
        int rc = read_chunk(x, k, &e); /* touches only slot k and reader-owned fields */
        int last = rc != 0 || x->eof[k % x->depth]; /* read before main may own the slot */
        pthread_mutex_lock(&x->mu);
        if (rc == 0)
            x->n_read = k + 1;
        else
            x->rerr = e;
        pthread_cond_broadcast(&x->cv);
        pthread_mutex_unlock(&x->mu);
        if (last)
            return NULL;
    }
}

static void *writer_main(void *arg)
{
    ctx *x = arg;
    for (int64_t k = 0;; k++) {
        pthread_mutex_lock(&x->mu);
        while (!x->stop && k >= x->n_sent)
            pthread_cond_wait(&x->cv, &x->mu);
        int stop = x->stop;
        pthread_mutex_unlock(&x->mu);
        if (stop)
            return NULL;
        int last = x->eof[k % x->depth];
        local_error e = {0};
        int rc = write_chunk(x, k, &e);
        pthread_mutex_lock(&x->mu);
        if (rc == 0)
            x->n_written = k + 1;
        else
            x->werr = e;
        if (rc != 0 || last)
            x->writer_done = 1;
        pthread_cond_broadcast(&x->cv);
        pthread_mutex_unlock(&x->mu);
        if (rc != 0 || last)
            return NULL;
    }
}

/* ---------------------------------------------------------------- collective steps */

enum { H_FAIL, H_LEN, H_EOF, H_CRC, H_TOTAL, H_N };

typedef struct wire_error {
    int32_t code;
    char host[128];
    char cause[400];
} wire_error;

/* The local failure this rank should report now (reader's first, then writer's). */
static const local_error *pending_error(ctx *x)
{
    if (x->rerr.code)
        return &x->rerr;
    if (x->werr.code)
        return &x->werr;
    return NULL;
}

/* All ranks learn the lowest failing rank's error. `fail` is the reduced H_FAIL slot. */
static int share_error(ctx *x, int64_t fail, const local_error *mine)
{
    int who = x->size - (int)fail;
    wire_error w;
    memset(&w, 0, sizeof w);
    if (who == x->rank && mine) {
        w.code = mine->code;
        gethostname(w.host, sizeof w.host - 1);
        snprintf(w.cause, sizeof w.cause, "%s", mine->cause);
    }
    if (MPI_Bcast(&w, (int)sizeof w, MPI_BYTE, who, x->comm) != MPI_SUCCESS)
        return AEGIS_E_MPI;
    x->res->failing_rank = who;
    snprintf(x->res->host, sizeof x->res->host, "%s", w.host);
    snprintf(x->res->cause, sizeof x->res->cause, "%s", w.cause);
    return w.code;
}

/* Completes req. MPICH spins inside blocking calls; on a node where the ranks share cores
 * with tar and the helper threads, a poll-then-sleep loop leaves them the CPU. A few polls
 * come first so short waits keep their latency. */
static int wait_request(ctx *x, MPI_Request *req)
{
    if (x->opts->poll_sleep_us <= 0)
        return MPI_Wait(req, MPI_STATUS_IGNORE);
    struct timespec nap = {0, (long)x->opts->poll_sleep_us * 1000L};
    for (int polls = 0;; polls++) {
        int done = 0;
        int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS || done)
            return rc;
        if (polls >= 16)
            nanosleep(&nap, NULL);
    }
}

static int allreduce_header(ctx *x, int64_t *h)
{
    MPI_Request req;
    if (MPI_Iallreduce(MPI_IN_PLACE, h, H_N, MPI_INT64_T, MPI_MAX, x->comm, &req) !=
        MPI_SUCCESS)
        return -1;
    return wait_request(x, &req) == MPI_SUCCESS ? 0 : -1;
}

/* One chunk in pieces of at most max_count elements: chunks may exceed INT_MAX bytes. */
static int bcast_split(ctx *x, char *b, int64_t n)
{
    for (int64_t off = 0; off < n; off += x->max_count) {
        int64_t c = n - off < x->max_count ? n - off : x->max_count;
        MPI_Request req;
        if (MPI_Ibcast(b + off, (int)c, MPI_BYTE, x->root, x->comm, &req) != MPI_SUCCESS ||
            wait_request(x, &req) != MPI_SUCCESS)
            return -1;
    }
    return 0;
}

/* Waits (threaded) until the root's reader has chunk k or failed. */
static void await_readable(ctx *x, int64_t k)
{
    pthread_mutex_lock(&x->mu);
    while (k >= x->n_read && !x->rerr.code && !x->werr.code)
        pthread_cond_wait(&x->cv, &x->mu);
    pthread_mutex_unlock(&x->mu);
}

/* Waits (threaded) until slot k is free, i.e. the writer drained chunk k - depth, or failed. */
static void await_free(ctx *x, int64_t k)
{
    pthread_mutex_lock(&x->mu);
    while (k >= x->n_written + x->depth && !x->werr.code)
        pthread_cond_wait(&x->cv, &x->mu);
    pthread_mutex_unlock(&x->mu);
}

static void mark_sent(ctx *x, int64_t k)
{
    pthread_mutex_lock(&x->mu);
    x->n_sent = k + 1;
    if (!x->is_writer)
        x->n_written = k + 1;
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
}

/* Collective "is every rank fine?", with the first failure shared. The helper threads may
 * be running, so the local error is read under the lock. */
static int agree(ctx *x)
{
    int64_t h[H_N] = {0};
    pthread_mutex_lock(&x->mu);
    const local_error *mine = pending_error(x);
    pthread_mutex_unlock(&x->mu);
    if (mine)
        h[H_FAIL] = x->size - x->rank;
    if (allreduce_header(x, h) != 0)
        return AEGIS_E_MPI;
    return h[H_FAIL] ? share_error(x, h[H_FAIL], mine) : AEGIS_OK;
}

static int run_transfer(ctx *x)
{
    int64_t k;
    for (k = 0;; k++) {
        int s = (int)(k % x->depth);
        if (x->is_root) {
            if (x->threaded)
                await_readable(x, k);
            else if (!pending_error(x))
                read_chunk(x, k, &x->rerr);
        } else if (x->threaded) {
            await_free(x, k);
        }

        int64_t h[H_N] = {0};
        pthread_mutex_lock(&x->mu);
        const local_error *mine = pending_error(x);
        pthread_mutex_unlock(&x->mu);
        if (mine)
            h[H_FAIL] = x->size - x->rank;
        else if (x->is_root) {
            h[H_LEN] = x->len[s];
            h[H_EOF] = x->eof[s];
            if (x->eof[s]) { /* the reader has stopped: its totals are final */
                h[H_CRC] = x->crc_src;
                h[H_TOTAL] = x->bytes_read;
            }
        }
        if (allreduce_header(x, h) != 0)
            return AEGIS_E_MPI;
        if (h[H_FAIL])
            return share_error(x, h[H_FAIL], mine);

        x->len[s] = h[H_LEN];
        x->eof[s] = (int)h[H_EOF];
        if (h[H_EOF]) {
            x->crc_expected = (uint32_t)h[H_CRC];
            x->bytes_expected = h[H_TOTAL];
        }
        if (bcast_split(x, x->buf[s], h[H_LEN]) != 0)
            return AEGIS_E_MPI;
        __atomic_store_n(&x->res->bytes_done, x->res->bytes_done + h[H_LEN], __ATOMIC_RELAXED);

        if (x->threaded)
            mark_sent(x, k);
        else if (x->is_writer && !pending_error(x))
            write_chunk(x, k, &x->werr);
        if (h[H_EOF])
            break;
    }

    /* end of stream: writers report tar -x exit status and checksum */
    if (x->threaded && x->is_writer) {
        pthread_mutex_lock(&x->mu);
        while (!x->writer_done)
            pthread_cond_wait(&x->cv, &x->mu);
        pthread_mutex_unlock(&x->mu);
    }
    int code = agree(x);
    if (code == AEGIS_OK) {
        x->res->total_bytes = x->bytes_expected;
        x->res->checksum = x->crc_expected;
    }
    return code;
}

/* ---------------------------------------------------------------- entry point */

static void cleanup(ctx *x)
{
    /* a helper may sit in read()/write() on a pipe: killing its tar ends that call */
    pthread_mutex_lock(&x->mu);
    x->stop = 1;
    if (x->src.pid > 0)
        kill(x->src.pid, SIGKILL);
    if (x->dst.pid > 0)
        kill(x->dst.pid, SIGKILL);
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
    if (x->reader_started)
        pthread_join(x->reader_thread, NULL);
    if (x->writer_started)
        pthread_join(x->writer_thread, NULL);
    reap(&x->src, &x->mu, 1);
    reap(&x->dst, &x->mu, 1);
    if (x->src.errlog)
        fclose(x->src.errlog);
    if (x->dst.errlog)
        fclose(x->dst.errlog);
    if (x->buf) {
        for (int i = 0; i < x->depth; i++)
            free(x->buf[i]);
        free(x->buf);
    }
    free(x->len);
    free(x->eof);
    pthread_cond_destroy(&x->cv);
    pthread_mutex_destroy(&x->mu);
    if (x->comm != MPI_COMM_NULL)
        MPI_Comm_free(&x->comm);
}

int aegis_stage(void *comm_ptr, const char *src_dir, const char *src_member,
                const char *dest_dir, const aegis_stage_opts *opts, aegis_stage_result *res)
{
    memset(res, 0, sizeof *res);
    res->failing_rank = -1;

    ctx x;
    memset(&x, 0, sizeof x);
    x.comm = MPI_COMM_NULL;
    x.src.fd = x.dst.fd = -1;
    x.opts = opts;
    x.res = res;
    pthread_mutex_init(&x.mu, NULL);
    pthread_cond_init(&x.cv, NULL);

    /* a private communicator: our traffic cannot match the caller's, and errors return */
    if (MPI_Comm_dup(*(MPI_Comm *)comm_ptr, &x.comm) != MPI_SUCCESS) {
        x.comm = MPI_COMM_NULL;
        cleanup(&x);
        res->code = AEGIS_E_MPI;
        snprintf(res->cause, sizeof res->cause, "MPI_Comm_dup failed");
        return res->code;
    }
    MPI_Comm_set_errhandler(x.comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(x.comm, &x.rank);
    MPI_Comm_size(x.comm, &x.size);
    x.root = opts->root;
    x.is_root = x.rank == x.root;
    x.is_writer = opts->is_writer != 0;
    x.verify = opts->verify != 0;
    x.depth = opts->depth;
    x.chunk = opts->chunk_size;
    x.max_count = opts->max_count;
    x.threaded = x.depth > 1;

    /* SIGPIPE would kill the process when a writer's tar dies; EPIPE is handled instead */
    struct sigaction ign, old_pipe;
    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    sigaction(SIGPIPE, &ign, &old_pipe);

    if (x.depth < 1 || x.chunk < 1 || x.max_count < 1 || x.max_count > INT_MAX ||
        x.root < 0 || x.root >= x.size)
        set_error(&x.werr, AEGIS_E_ARGS,
                  "invalid options: depth=%d chunk_size=%lld max_count=%lld root=%d", x.depth,
                  (long long)x.chunk, (long long)x.max_count, x.root);
    if (!pending_error(&x)) {
        crc_init(&x.crc, 0);
        x.buf = calloc((size_t)x.depth, sizeof *x.buf);
        x.len = calloc((size_t)x.depth, sizeof *x.len);
        x.eof = calloc((size_t)x.depth, sizeof *x.eof);
        int ok = x.buf && x.len && x.eof;
        for (int i = 0; ok && i < x.depth; i++)
            ok = (x.buf[i] = malloc((size_t)x.chunk)) != NULL;
        if (!ok)
            set_error(&x.werr, AEGIS_E_NOMEM, "cannot allocate %d buffers of %lld bytes",
                      x.depth, (long long)x.chunk);
    }
    if (!pending_error(&x) && x.is_root) {
        char *argv[] = {"tar", "-c", "-f", "-", "-C", (char *)src_dir, "--", (char *)src_member,
                        NULL};
        spawn_tar(&x.src, argv, 1, &x.rerr);
    }
    if (!pending_error(&x) && x.is_writer) {
        char *argv[] = {"tar", "-x", "-p", "-f", "-", "-C", (char *)dest_dir, NULL};
        spawn_tar(&x.dst, argv, 0, &x.werr);
    }
    if (!pending_error(&x) && x.threaded && x.is_root) {
        if (pthread_create(&x.reader_thread, NULL, reader_main, &x) == 0)
            x.reader_started = 1;
        else
            set_error(&x.rerr, AEGIS_E_THREAD, "cannot start the reader thread");
    }
    if (!pending_error(&x) && x.threaded && x.is_writer) {
        if (pthread_create(&x.writer_thread, NULL, writer_main, &x) == 0)
            x.writer_started = 1;
        else
            set_error(&x.werr, AEGIS_E_THREAD, "cannot start the writer thread");
    }

    int code = agree(&x); /* did every rank get through setup? */
    if (code == AEGIS_OK)
        code = run_transfer(&x);
    if (code == AEGIS_E_MPI && !res->cause[0])
        snprintf(res->cause, sizeof res->cause, "an MPI call failed on rank %d", x.rank);
    res->code = code;
    cleanup(&x);
    sigaction(SIGPIPE, &old_pipe, NULL);
    return code;
}
