/* TCP connect loop of bench/nft_rate.py, compiled at bench time (gcc -O2).
 *
 *   nft_connect server ADDR PORT
 *       listen on ADDR:PORT (backlog 4096), print "ready", accept and close until killed.
 *   nft_connect client ADDR PORT WARMUP SECONDS
 *       connect+close to ADDR:PORT in a loop for WARMUP seconds (not reported), then for
 *       SECONDS; print "CONNECTIONS ELAPSED_NS ERRORS CPU_NS" (CPU_NS: the client's user+system
 *       time in that window, which includes the softirq work done in its context). Each close sends an RST (SO_LINGER 0)
 *       so no TIME_WAIT piles up; every connection sends SYN, ACK and RST through the output
 *       hook of the client's network namespace. Exit 1 if every attempt failed.
 *   nft_connect probe ADDR PORT
 *       one non-blocking connect, 300 ms to complete; print "ok", "refused", "timeout" or the
 *       errno name (EPERM: dropped at output).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in address(const char *addr, const char *port) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(port))};
    if (inet_pton(AF_INET, addr, &sa.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", addr);
        exit(2);
    }
    return sa;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int server(struct sockaddr_in sa) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) || listen(s, 4096)) {
        perror("server");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int c = accept4(s, NULL, NULL, SOCK_CLOEXEC);
        if (c >= 0)
            close(c);
    }
}

/* Connections made in [start, start + ns); errors counted. */
static long long loop(struct sockaddr_in sa, long long ns, long long *errors, long long *elapsed) {
    static const struct linger rst = {.l_onoff = 1, .l_linger = 0};
    long long start = now_ns(), end = start + ns, n = 0, t = start;
    while (t < end) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0) {
            perror("socket");
            exit(1);
        }
        setsockopt(s, SOL_SOCKET, SO_LINGER, &rst, sizeof rst);
        if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0)
            n++;
        else
            (*errors)++;
        close(s);
        t = now_ns();
    }
    *elapsed = t - start;
    return n;
}

static long long cpu_ns(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000LL
        + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000LL;
}

static int client(struct sockaddr_in sa, double warmup, double seconds) {
    long long errors = 0, elapsed = 0;
    loop(sa, (long long)(warmup * 1e9), &errors, &elapsed);
    errors = 0;
    long long cpu = cpu_ns();
    long long n = loop(sa, (long long)(seconds * 1e9), &errors, &elapsed);
    cpu = cpu_ns() - cpu;
    printf("%lld %lld %lld %lld\n", n, elapsed, errors, cpu);
    return n == 0;
}

static int probe(struct sockaddr_in sa) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) == 0) {
        puts("ok");
        return 0;
    }
    if (errno != EINPROGRESS) {
        puts(errno == EPERM ? "EPERM" : strerror(errno));
        return 0;
    }
    struct pollfd p = {.fd = s, .events = POLLOUT};
    if (poll(&p, 1, 300) == 0) {
        puts("timeout");
        return 0;
    }
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
    puts(err == 0 ? "ok" : err == ECONNREFUSED ? "refused" : err == EPERM ? "EPERM" : strerror(err));
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "server"))
        return server(address(argv[2], argv[3]));
    if (argc == 6 && !strcmp(argv[1], "client"))
        return client(address(argv[2], argv[3]), atof(argv[4]), atof(argv[5]));
    if (argc == 4 && !strcmp(argv[1], "probe"))
        return probe(address(argv[2], argv[3]));
    fprintf(stderr, "usage: nft_connect server|client|probe ...\n");
    return 2;
}
