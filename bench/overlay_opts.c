/* Per-request cost of corral's overlay root, and of overlay mount options (issue 13).
 * Built and run by bench/overlay_opts.sh in a throwaway mount namespace (unshare -m).
 * usage: overlay_opts ROUNDS ITERS RELPATH DIR... : for each DIR (a mount point), in shuffled
 * interleaved rounds, times four loops as an unprivileged user (nobody), as nginx serves a
 * static file without open_file_cache:
 *   open    openat(dir, RELPATH) + fstat + read 4 KB + close
 *   sendfile openat + fstat + sendfile 4 KB to /dev/null + close   (nginx with sendfile on)
 *   stat    fstatat(dir, RELPATH)                                  (the lookup alone)
 *   readfd  pread 4 KB of an fd opened once                         (the read alone)
 * Prints one line per DIR and loop: median and min ns per operation over the rounds. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

enum { OPEN, SENDFILE, STAT, READFD, NLOOPS };
static const char *names[] = {"open", "sendfile", "stat", "readfd"};

static double run(int loop, int dfd, const char *rel, int null, long iters) {
    char buf[4096];
    struct stat st;
    int keep = -1;
    if (loop == READFD && (keep = openat(dfd, rel, O_RDONLY)) < 0) { perror(rel); exit(1); }
    double t0 = now();
    for (long i = 0; i < iters; i++) {
        if (loop == STAT) {
            if (fstatat(dfd, rel, &st, 0)) { perror("stat"); exit(1); }
        } else if (loop == READFD) {
            if (pread(keep, buf, sizeof buf, 0) != sizeof buf) { perror("pread"); exit(1); }
        } else {
            int fd = openat(dfd, rel, O_RDONLY | O_NONBLOCK);
            if (fd < 0 || fstat(fd, &st)) { perror("open"); exit(1); }
            if (loop == OPEN) {
                if (read(fd, buf, sizeof buf) != sizeof buf) { perror("read"); exit(1); }
            } else {
                off_t off = 0;
                if (sendfile(null, fd, &off, sizeof buf) != sizeof buf) { perror("sf"); exit(1); }
            }
            close(fd);
        }
    }
    double t = (now() - t0) / iters;
    if (keep >= 0) close(keep);
    return t;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s ROUNDS ITERS RELPATH DIR...\n", argv[0]); return 2; }
    int rounds = atoi(argv[1]);
    long iters = atol(argv[2]);
    const char *rel = argv[3];
    int n = argc - 4;
    int *dfd = calloc(n, sizeof *dfd);
    for (int i = 0; i < n; i++)
        if ((dfd[i] = open(argv[4 + i], O_DIRECTORY | O_RDONLY)) < 0) { perror(argv[4 + i]); return 1; }
    int null = open("/dev/null", O_WRONLY);
    if (setgid(65534) || setuid(65534)) { perror("setuid"); return 1; }
    double *res = calloc((size_t)n * NLOOPS * rounds, sizeof *res);
    int *order = calloc(n, sizeof *order);
    srand(12345);
    for (int i = 0; i < n; i++) run(OPEN, dfd[i], rel, null, iters / 10); /* warm the caches */
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < n; i++) order[i] = i;
        for (int i = n - 1; i > 0; i--) { int j = rand() % (i + 1), t = order[i]; order[i] = order[j]; order[j] = t; }
        for (int k = 0; k < n; k++)
            for (int l = 0; l < NLOOPS; l++)
                res[((size_t)order[k] * NLOOPS + l) * rounds + r] = run(l, dfd[order[k]], rel, null, iters);
    }
    for (int i = 0; i < n; i++)
        for (int l = 0; l < NLOOPS; l++) {
            double *v = res + ((size_t)i * NLOOPS + l) * rounds;
            qsort(v, rounds, sizeof *v, cmp);
            printf("%s\t%s\t%.0f\t%.0f\n", argv[4 + i], names[l], v[rounds / 2], v[0]);
        }
    return 0;
}
