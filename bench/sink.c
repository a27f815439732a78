/* bench/portfwd.sh's traffic ends: a TCP sink (`sink PORT`: accepts connections one
 * after another, reads each to its end, answers with the byte count) and a pusher
 * (`push HOST PORT MIB`: sends MIB MiB in 256 KiB writes, half-closes, waits for the
 * count, prints MiB/s). Static, so that the same binary runs on the host and in a
 * busybox image. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)
static char buf[CHUNK];

static int sink(int port) {
    int l = socket(AF_INET6, SOCK_STREAM, 0), off = 0, one = 1;
    setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = in6addr_any};
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 64)) { perror("sink"); return 1; }
    for (;;) {
        int c = accept(l, NULL, NULL);
        if (c < 0) continue;
        uint64_t total = 0;
        ssize_t n;
        while ((n = read(c, buf, CHUNK)) > 0) total += n;
        if (write(c, &total, sizeof total) < 0) perror("sink: answer");
        close(c);
    }
}

static int push(const char *host, int port, long mib) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    memset(buf, 7, CHUNK);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&a, sizeof a)) { perror("push: connect"); return 1; }
    uint64_t sent = 0, want = (uint64_t)mib << 20, got = 0;
    while (sent < want) {
        ssize_t n = write(c, buf, CHUNK);
        if (n <= 0) { perror("push: write"); return 1; }
        sent += n;
    }
    shutdown(c, SHUT_WR);
    if (read(c, &got, sizeof got) != sizeof got || got != sent) { fprintf(stderr, "push: sink got %llu of %llu\n", (unsigned long long)got, (unsigned long long)sent); return 1; }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%.0f\n", sent / 1048576.0 / s);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "sink")) return sink(atoi(argv[2]));
    if (argc == 5 && !strcmp(argv[1], "push")) return push(argv[2], atoi(argv[3]), atol(argv[4]));
    fprintf(stderr, "usage: sink sink PORT | sink push HOST PORT MIB\n");
    return 2;
}
