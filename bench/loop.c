/* The run-time workloads of corral's benchmark, compiled at bench time (gcc -O2).
 *
 *   loop SYSCALLS FILES DIR REPS [nowarm] [seccomp] [landlock]
 *
 * runs one unreported warm-up round (none with "nowarm"), then REPS rounds of:
 *   - SYSCALLS x getppid(2) (the raw system call, never cached by libc), and
 *   - FILES small files in a fresh directory under DIR: create+write 64 bytes+close each, then
 *     open+read+close each, then unlink each (and the directory),
 * and prints first "fs KIND" (when FILES: DIR's file system, tmpfs, overlay or its magic number
 * in hex, so that the inside is compared like with like), then one line per measurement,
 * "syscall WALL CPU" and "files WALL CPU": nanoseconds of
 * CLOCK_MONOTONIC and of the process's CPU time (CLOCK_PROCESS_CPUTIME_ID, which other work on
 * the machine disturbs much less) around the loop only (start-up and exit are not included). A count of 0
 * skips that loop. "seccomp" first loads a one-instruction seccomp filter that allows
 * everything: the floor that any filter costs (the kernel's seccomp entry path). "landlock"
 * first restricts the process with a Landlock ruleset that handles every file-system right the
 * kernel knows and grants read beneath / and everything beneath DIR, like corral's grant on
 * /tmp: what Landlock's checks cost the file loop.
 * Exit status: 0, or 1 with a message on stderr if any call fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/landlock.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

struct stamp {
    long long wall, cpu;
};

static long long ns_of(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct stamp now(void) {
    struct stamp s = {ns_of(CLOCK_MONOTONIC), ns_of(CLOCK_PROCESS_CPUTIME_ID)};
    return s;
}

static struct stamp since(struct stamp t0) {
    struct stamp t1 = now();
    struct stamp d = {t1.wall - t0.wall, t1.cpu - t0.cpu};
    return d;
}

static void die(const char *what, const char *path) {
    fprintf(stderr, "loop: %s %s: %s\n", what, path ? path : "", strerror(errno));
    exit(1);
}

static struct stamp syscalls(long n) {
    volatile long sink = 0;
    struct stamp t0 = now();
    for (long i = 0; i < n; i++)
        sink += syscall(SYS_getppid);
    struct stamp d = since(t0);
    (void)sink;
    return d;
}

static struct stamp files(long n, const char *dir, int round) {
    char sub[4096], path[4200], buf[64];
    memset(buf, 'x', sizeof buf);
    snprintf(sub, sizeof sub, "%s/loop.%d.%d", dir, (int)getpid(), round);
    struct stamp t0 = now();
    if (mkdir(sub, 0700) != 0)
        die("mkdir", sub);
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%06ld", sub, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0)
            die("create", path);
        if (write(fd, buf, sizeof buf) != (ssize_t)sizeof buf)
            die("write", path);
        close(fd);
    }
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%06ld", sub, i);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die("open", path);
        if (read(fd, buf, sizeof buf) != (ssize_t)sizeof buf)
            die("read", path);
        close(fd);
    }
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%06ld", sub, i);
        if (unlink(path) != 0)
            die("unlink", path);
    }
    if (rmdir(sub) != 0)
        die("rmdir", sub);
    return since(t0);
}

static void allow_all_filter(void) {
    struct sock_filter insns[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {.len = 1, .filter = insns};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) != 0)
        die("seccomp", NULL);
}

static void allow_beneath(int ruleset, const char *path, unsigned long long rights) {
    struct landlock_path_beneath_attr rule = {.allowed_access = rights};
    rule.parent_fd = open(path, O_PATH | O_CLOEXEC);
    if (rule.parent_fd < 0)
        die("open", path);
    if (syscall(__NR_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule, 0) != 0)
        die("landlock_add_rule", path);
    close(rule.parent_fd);
}

static void landlock_beneath(const char *dir) {
    long abi = syscall(__NR_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
    if (abi < 1)
        die("landlock (not available?)", NULL);
    /* ABI 1: bits 0-12; 2: + REFER (13); 3: + TRUNCATE (14); 5: + IOCTL_DEV (15) */
    int bits = abi >= 5 ? 16 : abi >= 3 ? 15 : abi >= 2 ? 14 : 13;
    unsigned long long all = (1ULL << bits) - 1;
    struct { unsigned long long fs; } attr = {all}; /* struct landlock_ruleset_attr, ABI 1 */
    int ruleset = syscall(__NR_landlock_create_ruleset, &attr, sizeof attr, 0);
    if (ruleset < 0)
        die("landlock_create_ruleset", NULL);
    allow_beneath(ruleset, "/", LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR);
    allow_beneath(ruleset, dir, all);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        syscall(__NR_landlock_restrict_self, ruleset, 0) != 0)
        die("landlock_restrict_self", NULL);
    close(ruleset);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: loop SYSCALLS FILES DIR REPS [nowarm] [seccomp] [landlock]\n");
        return 2;
    }
    long nsys = atol(argv[1]), nfiles = atol(argv[2]);
    const char *dir = argv[3];
    int reps = atoi(argv[4]), warm = 1;
    for (int i = 5; i < argc; i++) {
        if (strcmp(argv[i], "nowarm") == 0)
            warm = 0;
        else if (strcmp(argv[i], "seccomp") == 0)
            allow_all_filter();
        else if (strcmp(argv[i], "landlock") == 0)
            landlock_beneath(dir);
        else {
            fprintf(stderr, "loop: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (nfiles) {
        struct statfs fs;
        if (statfs(dir, &fs) != 0)
            die("statfs", dir);
        if (fs.f_type == 0x01021994) /* TMPFS_MAGIC */
            printf("fs tmpfs\n");
        else if (fs.f_type == 0x794c7630) /* OVERLAYFS_SUPER_MAGIC */
            printf("fs overlay\n");
        else
            printf("fs 0x%lx\n", (unsigned long)fs.f_type);
    }
    if (warm) { /* page in, settle caches and the CPU's frequency */
        if (nsys)
            syscalls(nsys);
        if (nfiles)
            files(nfiles, dir, 0);
    }
    for (int r = 1; r <= reps; r++) {
        if (nsys) {
            struct stamp d = syscalls(nsys);
            printf("syscall %lld %lld\n", d.wall, d.cpu);
        }
        if (nfiles) {
            struct stamp d = files(nfiles, dir, r);
            printf("files %lld %lld\n", d.wall, d.cpu);
        }
    }
    fflush(stdout);
    return 0;
}
