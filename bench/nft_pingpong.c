/* Request/response ping-pong of bench/nft_cost.py, compiled at bench time (gcc -O2).
 *
 *   nft_pingpong tcp|udp SERVER_UID PORT WARMUP ROUNDS SIZE
 *
 * One thread owns both ends over loopback: the server's socket is created (and, for TCP,
 * accepted) with effective uid SERVER_UID, so `meta skuid` of every packet it sends is that
 * user's and the service table dispatches it to its process chain, as a contained server's
 * replies are; the client's socket stays root's (the table lets it through on the vmap miss).
 * Each round: the client sends SIZE bytes, the server reads them and sends SIZE bytes back, the
 * client reads them. Nothing blocks (loopback delivers in the sender's syscall), so there are no
 * wake-ups or context switches to blur the figure: what a round costs is the two sends and
 * receives, each packet's hooks (conntrack, the table) and the socket layer.
 * WARMUP rounds first (not reported), then ROUNDS; prints "ROUNDS CPU_NS WALL_NS" where CPU_NS
 * is the process's CPU time (CLOCK_PROCESS_CPUTIME_ID) over the ROUNDS.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void as_user(uid_t uid) {
    if (seteuid(uid))  /* the fsuid follows: a socket's owner is its creator's */
        die("seteuid");
}

static long long ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void exact(ssize_t got, size_t want, const char *what) {
    if (got != (ssize_t)want) {
        fprintf(stderr, "%s: %zd of %zu bytes\n", what, got, want);
        if (got < 0)
            perror(what);
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 7 || (strcmp(argv[1], "tcp") && strcmp(argv[1], "udp"))) {
        fprintf(stderr, "usage: nft_pingpong tcp|udp SERVER_UID PORT WARMUP ROUNDS SIZE\n");
        return 2;
    }
    int tcp = !strcmp(argv[1], "tcp"), one = 1, type = tcp ? SOCK_STREAM : SOCK_DGRAM;
    uid_t server_uid = (uid_t)atol(argv[2]);
    long long warmup = atoll(argv[4]), rounds = atoll(argv[5]);
    size_t size = (size_t)atol(argv[6]);
    char *buf = calloc(1, size ? size : 1);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[3])),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    struct sockaddr_in from;
    socklen_t fromlen = sizeof from;

    as_user(server_uid);
    int server = socket(AF_INET, type | SOCK_CLOEXEC, 0);
    if (server >= 0)  /* the previous sample's connection may still be in TIME_WAIT */
        setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (server < 0 || bind(server, (struct sockaddr *)&sa, sizeof sa))
        die("server socket");
    if (tcp && listen(server, 1))
        die("listen");
    as_user(0);
    int client = socket(AF_INET, type | SOCK_CLOEXEC, 0);
    if (client < 0 || connect(client, (struct sockaddr *)&sa, sizeof sa))
        die("client connect");
    if (tcp) {
        as_user(server_uid);
        int conn = accept4(server, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0)
            die("accept");
        as_user(0);
        close(server);
        server = conn;
        setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }

    long long cpu = 0, wall = 0;
    for (int phase = 0; phase < 2; phase++) {
        long long n = phase ? rounds : warmup;
        long long cpu0 = ns(CLOCK_PROCESS_CPUTIME_ID), wall0 = ns(CLOCK_MONOTONIC);
        for (long long i = 0; i < n; i++) {
            exact(send(client, buf, size, 0), size, "client send");
            if (tcp) {
                exact(recv(server, buf, size, MSG_WAITALL), size, "server recv");
                exact(send(server, buf, size, 0), size, "server send");
            } else {
                exact(recvfrom(server, buf, size, 0, (struct sockaddr *)&from, &fromlen), size,
                      "server recv");
                exact(sendto(server, buf, size, 0, (struct sockaddr *)&from, fromlen), size,
                      "server send");
            }
            exact(recv(client, buf, size, MSG_WAITALL), size, "client recv");
        }
        cpu = ns(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
        wall = ns(CLOCK_MONOTONIC) - wall0;
    }
    printf("%lld %lld %lld\n", rounds, cpu, wall);
    return 0;
}
