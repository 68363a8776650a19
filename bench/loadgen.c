/*
 * Load generator and test servers for bench/bench.py (Linux only).
 *
 * Everything listens on and connects to 127.0.0.0/8 only (127.0.0.1, and
 * 127.0.0.2 and up as extra client source addresses when ephemeral ports run
 * short).  No name is ever resolved.
 *
 *   loadgen serve
 *       Start five servers on 127.0.0.1, ephemeral ports, one epoll loop:
 *         source: writes a known byte pattern forever, until the peer closes;
 *         sink:   reads frames (4-byte big-endian length, then that many
 *                 pattern bytes) and checks them; a zero-length frame ends
 *                 the upload: it answers a 9-byte trailer (8-byte big-endian
 *                 payload byte count, 1 byte "framing and pattern ok") and
 *                 closes.  Framing, not half-close, marks the end, so that
 *                 proxies that do not relay half-close (microsocks) work;
 *         echo:   writes back whatever it reads, and closes once it has
 *                 written back 64 bytes (the churn message): the server
 *                 closes first, so TIME_WAIT stays on the server's port
 *                 instead of filling the client's ephemeral port range;
 *         pecho:  writes back whatever it reads, until the peer closes
 *                 (round trips over one connection);
 *         udp:    a UDP socket that sends every datagram back to its sender.
 *       Prints "source=P sink=P echo=P pecho=P udp=P" on one line, then
 *       serves until stdin reaches EOF (the parent died or closed it).
 *
 *   loadgen [options] download PORT   read from a source for -t seconds
 *                                     (-n streams at once, summed)
 *   loadgen [options] upload PORT     write to a sink for -t seconds
 *   loadgen [options] churn PORT      connect, echo 64 bytes, wait for the
 *                                     server's close, close; -c at once
 *   loadgen [options] rtt PORT        one connection to a pecho server;
 *                                     -s bytes there and back, one at a
 *                                     time, for -t seconds or -i round trips
 *   loadgen [options] idle PORT       open -n tunnels to an echo server
 *                                     (each checked with a 1-byte echo), print
 *                                     a JSON line, hold them until stdin
 *                                     closes (at most -t seconds), then end
 *                                     each with the rest of the 64 bytes so
 *                                     that the server closes first
 *   loadgen [options] udp PORT        datagrams of -s bytes to a udp echo
 *                                     server, -w in flight, for -t seconds;
 *                                     through the proxy with UDP ASSOCIATE
 *
 *   options: -p PROXYPORT  go through the SOCKS5 proxy at 127.0.0.1:PROXYPORT
 *                          (no-auth greeting 05 01 00, then CONNECT or UDP
 *                          ASSOCIATE with the IPv4 address 127.0.0.1)
 *            -t SECONDS    how long to run (default 3)
 *            -b BYTES      stop a download/upload after this many bytes too
 *            -c N          churn concurrency (default 50)
 *            -n N          download: streams (default 1); idle: tunnels
 *            -i N          rtt: most round trips measured (default 100000)
 *            -s BYTES      rtt and udp: message size (default 64)
 *            -w N          udp: datagrams in flight (default 32)
 *            -T SECONDS    per-operation timeout (default 10)
 *            -H            with -p: open tunnels with an HTTP CONNECT
 *                          (the proxy's HTTP side) instead of SOCKS5
 *
 * Each client mode prints one JSON object on stdout (idle prints two: when
 * the tunnels are open, and at the end).  The pattern is byte k of a stream
 * == k % 251, so every chunk is checked with one memcmp.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAT 251
#define CHUNK (256 * 1024)
#define LOOPBACK 0x7f000001u
#define MAX_SOURCES 250 /* client source addresses 127.0.0.1 .. 127.0.0.250 */
#define MAX_CHURN_ERRORS 1000
#define MSG 64 /* churn message size; the echo server closes after echoing it */

static uint8_t ref[CHUNK + PAT];
static uint8_t iobuf[CHUNK];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void fill_ref(void) {
    for (size_t i = 0; i < sizeof ref; i++) ref[i] = (uint8_t)(i % PAT);
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(LOOPBACK);
    return a;
}

static void json_str(const char *key, const char *value) {
    printf("\"%s\": \"", key);
    for (const char *p = value; *p; p++) {
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if ((unsigned char)*p < 0x20)
            printf(" ");
        else
            putchar(*p);
    }
    printf("\"");
}

/* ------------------------------------------------------------------ serve */

enum kind {
    K_LISTEN_SOURCE,
    K_LISTEN_SINK,
    K_LISTEN_ECHO,
    K_LISTEN_PECHO,
    K_SOURCE,
    K_SINK,
    K_ECHO,
    K_UDP,
    K_STDIN
};

struct sconn {
    enum kind kind;
    int fd;
    uint64_t off;         /* source: bytes written; sink: payload bytes read */
    int ok;               /* sink: framing and pattern intact so far */
    uint8_t hdr[4];       /* sink: frame header being read */
    size_t hdrgot, left;  /* sink: header bytes read; payload left in frame */
    size_t pend, pendoff; /* echo: bytes read and not yet written back */
    uint64_t echoed;      /* echo: bytes written back */
    int persistent;       /* echo: pecho, never closes first */
    uint8_t *buf;         /* echo: its pending bytes */
};

static int listen_on_loopback(int *port, int type) {
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0) return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = loopback(0);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) return -1;
    if (type == SOCK_STREAM && listen(fd, 4096) < 0) return -1;
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

static void sclose(int ep, struct sconn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->buf);
    free(c);
}

static void set_events(int ep, struct sconn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void serve_accept(int ep, struct sconn *l) {
    for (;;) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN, or EMFILE & co: try again later */
        struct sconn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            return;
        }
        c->fd = fd;
        c->ok = 1;
        uint32_t events = EPOLLIN | EPOLLRDHUP;
        if (l->kind == K_LISTEN_SOURCE) {
            c->kind = K_SOURCE;
            events = EPOLLOUT | EPOLLRDHUP;
        } else if (l->kind == K_LISTEN_SINK) {
            c->kind = K_SINK;
        } else {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            c->kind = K_ECHO;
            c->persistent = l->kind == K_LISTEN_PECHO;
            c->buf = malloc(4096);
            if (!c->buf) {
                close(fd);
                free(c);
                continue;
            }
        }
        struct epoll_event ev = {.events = events, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(c->buf);
            free(c);
        }
    }
}

static void serve_source(int ep, struct sconn *c, uint32_t events) {
    if (events & (EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
        sclose(ep, c);
        return;
    }
    for (int i = 0; i < 4; i++) {
        ssize_t n = send(c->fd, ref + c->off % PAT, CHUNK, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) sclose(ep, c);
            return;
        }
        c->off += (uint64_t)n;
        if (n < CHUNK) return;
    }
}

static void sink_trailer(int ep, struct sconn *c) {
    uint8_t t[9];
    for (int k = 0; k < 8; k++) t[k] = (uint8_t)(c->off >> (56 - 8 * k));
    t[8] = (uint8_t)c->ok;
    (void)!send(c->fd, t, sizeof t, MSG_NOSIGNAL);
    sclose(ep, c);
}

static void serve_sink(int ep, struct sconn *c) {
    for (int i = 0; i < 4; i++) {
        ssize_t n = recv(c->fd, iobuf, CHUNK, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (n <= 0) {
            /* EOF or error before the end frame: a truncated upload */
            c->ok = 0;
            sink_trailer(ep, c);
            return;
        }
        uint8_t *p = iobuf, *e = iobuf + n;
        while (p < e) {
            if (!c->left) {
                while (p < e && c->hdrgot < 4) c->hdr[c->hdrgot++] = *p++;
                if (c->hdrgot < 4) break;
                c->hdrgot = 0;
                c->left = (size_t)c->hdr[0] << 24 | (size_t)c->hdr[1] << 16 |
                          (size_t)c->hdr[2] << 8 | c->hdr[3];
                if (!c->left) {
                    if (p != e) c->ok = 0; /* bytes after the end frame */
                    sink_trailer(ep, c);
                    return;
                }
                continue;
            }
            size_t take = (size_t)(e - p) < c->left ? (size_t)(e - p) : c->left;
            while (take) {
                size_t part = take < CHUNK ? take : CHUNK; /* ref covers CHUNK */
                if (c->ok && memcmp(p, ref + c->off % PAT, part) != 0) c->ok = 0;
                c->off += part;
                c->left -= part;
                p += part;
                take -= part;
            }
        }
    }
}

static void serve_echo(int ep, struct sconn *c, uint32_t events) {
    if (c->pend) {
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        ssize_t n = send(c->fd, c->buf + c->pendoff, c->pend - c->pendoff, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) sclose(ep, c);
            return;
        }
        c->pendoff += (size_t)n;
        c->echoed += (uint64_t)n;
        if (c->pendoff < c->pend) return;
        c->pend = c->pendoff = 0;
        if (c->echoed >= MSG && !c->persistent)
            sclose(ep, c);
        else
            set_events(ep, c, EPOLLIN | EPOLLRDHUP);
        return;
    }
    ssize_t n = recv(c->fd, c->buf, 4096, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
        sclose(ep, c);
        return;
    }
    ssize_t w = send(c->fd, c->buf, (size_t)n, MSG_NOSIGNAL);
    if (w < 0 && errno != EAGAIN && errno != EINTR) {
        sclose(ep, c);
        return;
    }
    if (w < 0) w = 0;
    c->echoed += (uint64_t)w;
    if (w < n) {
        c->pend = (size_t)n;
        c->pendoff = (size_t)w;
        set_events(ep, c, EPOLLOUT | EPOLLRDHUP);
    } else if (c->echoed >= MSG && !c->persistent) {
        sclose(ep, c);
    }
}

/* UDP echo: each datagram back to its sender; one that cannot be sent now is
 * dropped, as a busy UDP server would. */
static void serve_udp(struct sconn *c) {
    for (int i = 0; i < 64; i++) {
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        ssize_t n = recvfrom(c->fd, iobuf, 65536, 0, (struct sockaddr *)&from, &len);
        if (n < 0) return; /* EAGAIN, or an ICMP error for an earlier reply */
        (void)!sendto(c->fd, iobuf, (size_t)n, 0, (struct sockaddr *)&from, len);
    }
}

static int cmd_serve(void) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int ports[5];
    enum kind kinds[5] = {K_LISTEN_SOURCE, K_LISTEN_SINK, K_LISTEN_ECHO, K_LISTEN_PECHO, K_UDP};
    for (int i = 0; i < 5; i++) {
        struct sconn *l = calloc(1, sizeof *l);
        l->kind = kinds[i];
        l->fd = listen_on_loopback(&ports[i], kinds[i] == K_UDP ? SOCK_DGRAM : SOCK_STREAM);
        if (l->fd < 0) {
            perror("loadgen serve: listen");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
        epoll_ctl(ep, EPOLL_CTL_ADD, l->fd, &ev);
    }
    static struct sconn in = {.kind = K_STDIN, .fd = 0};
    struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &in};
    int watch_stdin = epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev) == 0;
    printf("source=%d sink=%d echo=%d pecho=%d udp=%d\n", ports[0], ports[1], ports[2],
           ports[3], ports[4]);
    fflush(stdout);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return 1;
        for (int i = 0; i < n; i++) {
            struct sconn *c = evs[i].data.ptr;
            switch (c->kind) {
            case K_LISTEN_SOURCE:
            case K_LISTEN_SINK:
            case K_LISTEN_ECHO:
            case K_LISTEN_PECHO: serve_accept(ep, c); break;
            case K_SOURCE: serve_source(ep, c, evs[i].events); break;
            case K_SINK: serve_sink(ep, c); break;
            case K_ECHO: serve_echo(ep, c, evs[i].events); break;
            case K_UDP: serve_udp(c); break;
            case K_STDIN:
                if (watch_stdin && read(0, iobuf, sizeof iobuf) <= 0) return 0;
                break;
            }
        }
    }
}

/* ------------------------------------------------------- blocking clients */

static char errmsg[512];

static int fail(const char *fmt, const char *detail) {
    snprintf(errmsg, sizeof errmsg, fmt, detail);
    return -1;
}

static void set_timeouts(int fd, double seconds) {
    struct timeval tv = {.tv_sec = (time_t)seconds,
                         .tv_usec = (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6)};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static int read_full(int fd, uint8_t *buf, size_t len) {
    size_t got = 0;
    while (got < len) {
        ssize_t n = recv(fd, buf + got, len - got, 0);
        if (n == 0) return fail("unexpected EOF%s", "");
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return fail("timed out reading%s", "");
            return fail("read: %s", strerror(errno));
        }
        got += (size_t)n;
    }
    return 0;
}

static int write_full(int fd, const uint8_t *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = send(fd, buf + done, len - done, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return fail("timed out writing%s", "");
            return fail("write: %s", strerror(errno));
        }
        done += (size_t)n;
    }
    return 0;
}

/* Length of a SOCKS5 reply whose first 5 bytes are known, or -1. */
static int socks_reply_len(const uint8_t *h) {
    switch (h[3]) {
    case 1: return 10;
    case 4: return 22;
    case 3: return 4 + 1 + h[4] + 2;
    default: return -1;
    }
}

#define CMD_CONNECT 1
#define CMD_UDP 3

/* A request for 127.0.0.1:port (cmd 1 CONNECT, 3 UDP ASSOCIATE). */
static void socks_request(uint8_t req[10], uint8_t cmd, int port) {
    req[0] = 5;
    req[1] = cmd;
    req[2] = 0;
    req[3] = 1; /* IPv4 */
    req[4] = 127;
    req[5] = 0;
    req[6] = 0;
    req[7] = 1;
    req[8] = (uint8_t)(port >> 8);
    req[9] = (uint8_t)port;
}

static int check_reply(const uint8_t *r) {
    char d[64];
    if (r[0] != 5) {
        snprintf(d, sizeof d, "%u", r[0]);
        return fail("SOCKS reply VER %s", d);
    }
    if (r[1] != 0) {
        snprintf(d, sizeof d, "0x%02x", r[1]);
        return fail("SOCKS reply REP %s", d);
    }
    return 0;
}

/* -H: tunnels through the proxy are HTTP CONNECTs. */
static int http_connect = 0;

/* HTTP CONNECT 127.0.0.1:port; the answer's head read byte by byte, so
 * that nothing of the tunnel is read with it. */
static int http_open(int fd, int port) {
    char req[128], head[1024];
    int n = snprintf(req, sizeof req,
                     "CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n", port, port);
    if (write_full(fd, (const uint8_t *)req, (size_t)n)) return -1;
    size_t got = 0;
    while (got < sizeof head - 1) {
        if (read_full(fd, (uint8_t *)head + got, 1)) return -1;
        got++;
        if (got >= 4 && !memcmp(head + got - 4, "\r\n\r\n", 4)) break;
    }
    head[got] = 0;
    if (got < 12 || memcmp(head + 8, " 200", 4)) {
        char *eol = strchr(head, '\r');
        if (eol) *eol = 0;
        return fail("HTTP CONNECT answered %s", head);
    }
    return 0;
}

/*
 * Connect (through the proxy when proxy_port > 0, with request cmd for
 * 127.0.0.1:port); returns fd or -1.  *bound gets the reply's BND address
 * when it is IPv4 (UDP ASSOCIATE: where the relay listens).
 */
static int socks_open(int port, int proxy_port, double timeout, uint8_t cmd,
                      struct sockaddr_in *bound) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail("socket: %s", strerror(errno));
    set_timeouts(fd, timeout);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = loopback(proxy_port > 0 ? proxy_port : port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        fail("connect: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (proxy_port <= 0) return fd;
    if (http_connect && cmd == CMD_CONNECT) {
        if (http_open(fd, port)) goto bad;
        return fd;
    }
    uint8_t greet[3] = {5, 1, 0}, m[2], req[10], rep[262];
    socks_request(req, cmd, port);
    if (write_full(fd, greet, 3) || read_full(fd, m, 2)) goto bad;
    if (m[0] != 5 || m[1] != 0) {
        char d[32];
        snprintf(d, sizeof d, "%02x %02x", m[0], m[1]);
        fail("SOCKS method reply %s", d);
        goto bad;
    }
    if (write_full(fd, req, 10) || read_full(fd, rep, 5)) goto bad;
    int len = socks_reply_len(rep);
    if (len < 0) {
        fail("SOCKS reply with bad ATYP%s", "");
        goto bad;
    }
    if (read_full(fd, rep + 5, (size_t)len - 5) || check_reply(rep)) goto bad;
    if (bound) {
        memset(bound, 0, sizeof *bound);
        if (rep[3] == 1) {
            bound->sin_family = AF_INET;
            memcpy(&bound->sin_addr, rep + 4, 4);
            memcpy(&bound->sin_port, rep + 8, 2);
        }
    }
    return fd;
bad:
    close(fd);
    return -1;
}

static int client_connect(int port, int proxy_port, double timeout) {
    return socks_open(port, proxy_port, timeout, CMD_CONNECT, NULL);
}

static void print_stream(const char *mode, uint64_t bytes, double secs, const char *err) {
    printf("{\"mode\": \"%s\", \"bytes\": %llu, \"seconds\": %.6f, \"mbps\": %.3f, \"ok\": %s",
           mode, (unsigned long long)bytes, secs, secs > 0 ? (double)bytes / secs / 1e6 : 0.0,
           err ? "false" : "true");
    if (err) {
        printf(", ");
        json_str("error", err);
    }
    printf("}\n");
}

static int cmd_download(int port, int proxy_port, double seconds, uint64_t max_bytes,
                        double timeout) {
    int fd = client_connect(port, proxy_port, timeout);
    if (fd < 0) {
        print_stream("download", 0, 0, errmsg);
        return 1;
    }
    uint64_t got = 0;
    const char *err = NULL;
    double t0 = now(), t = t0, end = t0 + seconds;
    while (got < max_bytes && t < end) {
        size_t want = CHUNK;
        if (max_bytes - got < want) want = (size_t)(max_bytes - got);
        ssize_t n = recv(fd, iobuf, want, 0);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) continue;
            err = n == 0 ? "source closed early (EOF)"
                         : (errno == EAGAIN ? "timed out reading" : strerror(errno));
            break;
        }
        if (memcmp(iobuf, ref + got % PAT, (size_t)n) != 0) {
            err = "wrong bytes received";
            break;
        }
        got += (uint64_t)n;
        t = now();
    }
    t = now();
    close(fd);
    print_stream("download", got, t - t0, err);
    return err != NULL;
}

/* -n streams at once, one epoll loop; every stream's bytes are checked. */
static int cmd_download_multi(int port, int proxy_port, double seconds, uint64_t max_bytes,
                              double timeout, int streams) {
    int *fds = calloc((size_t)streams, sizeof *fds);
    uint64_t *got = calloc((size_t)streams, sizeof *got);
    struct epoll_event *evs = calloc((size_t)streams, sizeof *evs);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    const char *err = NULL;
    if (!fds || !got || !evs || ep < 0) {
        print_stream("download", 0, 0, "out of memory");
        return 1;
    }
    int opened = 0;
    for (; opened < streams; opened++) {
        fds[opened] = client_connect(port, proxy_port, timeout);
        if (fds[opened] < 0) {
            err = errmsg;
            break;
        }
        fcntl(fds[opened], F_SETFL, fcntl(fds[opened], F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)opened};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[opened], &ev);
    }
    uint64_t total = 0;
    double t0 = now(), t = t0, end = t0 + seconds, last_data = t0;
    while (!err && total < max_bytes && t < end) {
        int n = epoll_wait(ep, evs, streams, 100);
        t = now();
        if (n < 0 && errno != EINTR) err = strerror(errno);
        for (int i = 0; i < n && !err; i++) {
            uint32_t k = evs[i].data.u32;
            size_t want = CHUNK;
            if (max_bytes - total < want) want = (size_t)(max_bytes - total);
            ssize_t r = recv(fds[k], iobuf, want, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) {
                err = r == 0 ? "source closed early (EOF)" : strerror(errno);
                break;
            }
            if (memcmp(iobuf, ref + got[k] % PAT, (size_t)r) != 0) {
                err = "wrong bytes received";
                break;
            }
            got[k] += (uint64_t)r;
            total += (uint64_t)r;
            last_data = t;
            if (total >= max_bytes) break;
        }
        if (!err && t - last_data > timeout) err = "timed out reading";
    }
    t = now();
    uint64_t least = UINT64_MAX;
    for (int k = 0; k < opened; k++) {
        if (got[k] < least) least = got[k];
        close(fds[k]);
    }
    double secs = t - t0;
    printf("{\"mode\": \"download\", \"streams\": %d, \"bytes\": %llu, \"seconds\": %.6f, "
           "\"mbps\": %.3f, \"slowest_stream_mbps\": %.3f, \"ok\": %s",
           streams, (unsigned long long)total, secs, secs > 0 ? (double)total / secs / 1e6 : 0.0,
           secs > 0 && opened ? (double)least / secs / 1e6 : 0.0, err ? "false" : "true");
    if (err) {
        printf(", ");
        json_str("error", err);
    }
    printf("}\n");
    free(fds);
    free(got);
    free(evs);
    close(ep);
    return err != NULL;
}

/* One upload frame: 4-byte big-endian length, then the payload. */
static int send_frame(int fd, const uint8_t *payload, size_t len) {
    uint8_t hdr[4] = {(uint8_t)(len >> 24), (uint8_t)(len >> 16), (uint8_t)(len >> 8),
                      (uint8_t)len};
    struct iovec iov[2] = {{hdr, 4}, {(void *)payload, len}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = len ? 2 : 1};
    size_t total = 4 + len;
    while (total) {
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return fail("%s", errno == EAGAIN ? "timed out writing" : strerror(errno));
        }
        total -= (size_t)n;
        while (n > 0 && msg.msg_iovlen) { /* skip what was written */
            if ((size_t)n >= msg.msg_iov->iov_len) {
                n -= (ssize_t)msg.msg_iov->iov_len;
                msg.msg_iov++;
                msg.msg_iovlen--;
            } else {
                msg.msg_iov->iov_base = (uint8_t *)msg.msg_iov->iov_base + n;
                msg.msg_iov->iov_len -= (size_t)n;
                n = 0;
            }
        }
    }
    return 0;
}

static int cmd_upload(int port, int proxy_port, double seconds, uint64_t max_bytes,
                      double timeout) {
    int fd = client_connect(port, proxy_port, timeout);
    if (fd < 0) {
        print_stream("upload", 0, 0, errmsg);
        return 1;
    }
    uint64_t sent = 0;
    const char *err = NULL;
    double t0 = now(), end = t0 + seconds;
    while (sent < max_bytes && now() < end) {
        size_t want = CHUNK;
        if (max_bytes - sent < want) want = (size_t)(max_bytes - sent);
        if (send_frame(fd, ref + sent % PAT, want) < 0) {
            err = errmsg;
            break;
        }
        sent += want;
    }
    double t = now();
    if (!err) {
        uint8_t trailer[9];
        if (send_frame(fd, NULL, 0) < 0 || read_full(fd, trailer, 9) < 0) {
            snprintf(errmsg + strlen(errmsg), sizeof errmsg - strlen(errmsg),
                     " (ending the upload, waiting for the sink's byte count)");
            err = errmsg;
        } else {
            t = now();
            uint64_t count = 0;
            for (int k = 0; k < 8; k++) count = count << 8 | trailer[k];
            static char buf[160];
            if (count != sent) {
                snprintf(buf, sizeof buf, "sink received %llu bytes, %llu were sent",
                         (unsigned long long)count, (unsigned long long)sent);
                err = buf;
            } else if (!trailer[8]) {
                err = "sink received wrong bytes or bad framing";
            } else {
                ssize_t n = recv(fd, trailer, 1, 0);
                if (n != 0) err = "no EOF after the sink closed";
            }
        }
    }
    close(fd);
    print_stream("upload", sent, t - t0, err);
    return err != NULL;
}

/* ------------------------------------------------------------ churn, idle */

/*
 * Non-blocking connections driven through the same steps: 0 greeting, 1
 * request, 2 payload echo, 3 waiting for the server's close; idle tunnels
 * stop after a 1-byte echo in step 4 (held) until they are told to end.
 */
struct cconn {
    int fd;         /* -1: free slot */
    int step;       /* 0 greeting, 1 request, 2 payload, 3 waiting for EOF, 4 held */
    int sending;    /* 1 while out[outoff..outlen) is being written */
    int extended;   /* the reply's full length is known */
    int connecting; /* waiting for the non-blocking connect to finish */
    int hold;       /* idle: after the echo, hold instead of waiting for EOF */
    double t0, deadline, latency;
    uint8_t out[64], in[300], payload[MSG];
    size_t outlen, outoff, inneed, inoff;
    size_t msgoff, msglen; /* step 2 echoes payload[msgoff..msgoff+msglen) */
};

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(const double *v, size_t n, double p) {
    if (!n) return 0;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return v[i];
}

struct churn {
    int ep, port, proxy_port;
    double timeout;
    uint64_t started, done, errors, counter;
    uint64_t opened, closed_while_held; /* idle */
    double *lat;
    size_t nlat, caplat;
    char first_error[256];
};

/* Client source addresses: 127.0.0.1 first (chosen by the kernel), then
 * 127.0.0.2 and up once connect() runs out of ephemeral ports. */
static int source_index = 0;

static void churn_error(struct churn *ch, struct cconn *c, const char *what, int err) {
    if (!ch->errors)
        snprintf(ch->first_error, sizeof ch->first_error, "%s%s%s (step %d)", what,
                 err ? ": " : "", err ? strerror(err) : "", c->step);
    ch->errors++;
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

static void begin_step(struct cconn *c, int port) {
    c->sending = 1;
    c->outoff = c->inoff = 0;
    c->extended = 0;
    if (c->step == 0) {
        c->out[0] = 5, c->out[1] = 1, c->out[2] = 0;
        c->outlen = 3;
        c->inneed = 2;
    } else if (c->step == 1) {
        socks_request(c->out, CMD_CONNECT, port);
        c->outlen = 10;
        c->inneed = 5;
    } else {
        memcpy(c->out, c->payload + c->msgoff, c->msglen);
        c->outlen = c->msglen;
        c->inneed = c->msglen;
    }
}

static void record_latency(struct churn *ch, double lat) {
    if (ch->nlat == ch->caplat) {
        ch->caplat = ch->caplat ? ch->caplat * 2 : 65536;
        ch->lat = realloc(ch->lat, ch->caplat * sizeof *ch->lat);
        if (!ch->lat) {
            perror("realloc");
            exit(2);
        }
    }
    ch->lat[ch->nlat++] = lat;
}

static void churn_finish(struct churn *ch, struct cconn *c) {
    if (!c->hold && c->msgoff == 0) record_latency(ch, c->latency); /* churn */
    ch->done++;
    close(c->fd);
    c->fd = -1;
}

static void watch(struct churn *ch, struct cconn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ch->ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Drive one connection as far as it can go without blocking. */
static void churn_progress(struct churn *ch, struct cconn *c) {
    for (;;) {
        if (c->step == 3 || c->step == 4) {
            uint8_t extra;
            ssize_t n = recv(c->fd, &extra, 1, 0);
            if (n == 0 && c->step == 3)
                churn_finish(ch, c);
            else if (n == 0) {
                ch->closed_while_held++;
                churn_error(ch, c, "tunnel closed while idle", 0);
            } else if (n > 0)
                churn_error(ch, c, "bytes after the echo", 0);
            else if (errno != EAGAIN && errno != EINTR)
                churn_error(ch, c, "read", errno);
            return;
        }
        if (c->sending) {
            while (c->outoff < c->outlen) {
                ssize_t n = send(c->fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
                if (n < 0) {
                    if (errno == EINTR) continue;
                    if (errno == EAGAIN) {
                        watch(ch, c, EPOLLOUT);
                        return;
                    }
                    churn_error(ch, c, "write", errno);
                    return;
                }
                c->outoff += (size_t)n;
            }
            c->sending = 0;
            watch(ch, c, EPOLLIN);
            return; /* the answer cannot be there yet: wait for EPOLLIN */
        }
        while (c->inoff < c->inneed) {
            ssize_t n = recv(c->fd, c->in + c->inoff, c->inneed - c->inoff, 0);
            if (n == 0) {
                churn_error(ch, c, "unexpected EOF", 0);
                return;
            }
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) return;
                churn_error(ch, c, "read", errno);
                return;
            }
            c->inoff += (size_t)n;
            if (c->step == 1 && !c->extended && c->inoff >= 5) {
                int len = socks_reply_len(c->in);
                if (len < 0) {
                    churn_error(ch, c, "SOCKS reply with bad ATYP", 0);
                    return;
                }
                c->inneed = (size_t)len;
                c->extended = 1;
            }
        }
        if (c->step == 0 && (c->in[0] != 5 || c->in[1] != 0)) {
            churn_error(ch, c, "bad SOCKS method reply", 0);
            return;
        }
        if (c->step == 1 && check_reply(c->in) < 0) {
            churn_error(ch, c, errmsg, 0);
            return;
        }
        if (c->step == 2) {
            if (memcmp(c->in, c->payload + c->msgoff, c->msglen) != 0) {
                churn_error(ch, c, "wrong bytes echoed", 0);
                return;
            }
            c->latency = now() - c->t0;
            if (c->hold) {
                c->step = 4; /* idle: a working tunnel, held open */
                ch->opened++;
                record_latency(ch, c->latency);
                watch(ch, c, EPOLLIN | EPOLLRDHUP);
                return;
            }
            c->step = 3; /* then wait for the server's close */
            continue;
        }
        c->step++;
        begin_step(c, ch->port);
    }
}

/* A non-blocking TCP socket connecting to 127.0.0.1:port; -1 and errno. */
static int nb_connect(int port, int *in_progress) {
    struct sockaddr_in dst = loopback(port);
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) return -1;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (source_index > 0) {
            struct sockaddr_in src = loopback(0);
            src.sin_addr.s_addr = htonl(LOOPBACK + (uint32_t)source_index);
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
                int e = errno;
                close(fd);
                errno = e;
                return -1;
            }
        }
        int r = connect(fd, (struct sockaddr *)&dst, sizeof dst);
        if (r == 0 || errno == EINPROGRESS) {
            *in_progress = r < 0;
            return fd;
        }
        int e = errno;
        close(fd);
        if (e == EADDRNOTAVAIL && source_index + 1 < MAX_SOURCES) {
            source_index++; /* out of ephemeral ports: next source address */
            continue;
        }
        errno = e;
        return -1;
    }
}

static void churn_start(struct churn *ch, struct cconn *c) {
    c->t0 = now();
    c->deadline = c->t0 + ch->timeout;
    c->step = ch->proxy_port > 0 ? 0 : 2;
    c->msgoff = 0;
    c->msglen = c->hold ? 1 : MSG;
    ch->counter++;
    for (int i = 0; i < MSG; i++) c->payload[i] = (uint8_t)((ch->counter * 131u + (unsigned)i) & 0xff);
    begin_step(c, ch->port);
    ch->started++;
    int in_progress = 0;
    c->fd = nb_connect(ch->proxy_port > 0 ? ch->proxy_port : ch->port, &in_progress);
    if (c->fd < 0) {
        churn_error(ch, c, "connect", errno);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ch->ep, EPOLL_CTL_ADD, c->fd, &ev);
    c->connecting = in_progress;
    if (!in_progress) churn_progress(ch, c);
}

/* One epoll round over the connections; fd 0 (stdin) is reported as NULL. */
static int churn_poll(struct churn *ch, struct epoll_event *evs, int maxev, int ms) {
    int n = epoll_wait(ch->ep, evs, maxev, ms);
    int stdin_ready = 0;
    for (int i = 0; i < n; i++) {
        struct cconn *c = evs[i].data.ptr;
        if (!c) {
            stdin_ready = 1;
            continue;
        }
        if (c->fd < 0) continue;
        if (c->connecting) {
            /* first writable event: the connect finished (or failed) */
            c->connecting = 0;
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) {
                churn_error(ch, c, "connect", err);
                continue;
            }
        }
        churn_progress(ch, c);
    }
    return stdin_ready;
}

static void expire(struct churn *ch, struct cconn *conns, int count, double t) {
    for (int i = 0; i < count; i++)
        if (conns[i].fd >= 0 && conns[i].step != 4 && t > conns[i].deadline)
            churn_error(ch, &conns[i], "timed out", 0);
}

static int cmd_churn(int port, int proxy_port, double seconds, int concurrency, double timeout) {
    struct churn ch;
    memset(&ch, 0, sizeof ch);
    ch.ep = epoll_create1(EPOLL_CLOEXEC);
    ch.port = port;
    ch.proxy_port = proxy_port;
    ch.timeout = timeout;
    struct cconn *conns = calloc((size_t)concurrency, sizeof *conns);
    struct epoll_event *evs = calloc((size_t)concurrency, sizeof *evs);
    if (!conns || !evs) return 2;
    double t0 = now(), end = t0 + seconds, last_check = t0, t_last = t0;
    for (int i = 0; i < concurrency; i++) {
        conns[i].fd = -1;
        churn_start(&ch, &conns[i]);
    }
    for (;;) {
        int active = 0;
        double t = now();
        for (int i = 0; i < concurrency; i++) {
            /* stop early when everything fails (e.g. refused): the error is known */
            if (conns[i].fd < 0 && t < end && ch.errors < MAX_CHURN_ERRORS)
                churn_start(&ch, &conns[i]);
            if (conns[i].fd >= 0) active++;
        }
        if (!active) break;
        uint64_t before = ch.done;
        churn_poll(&ch, evs, concurrency, 100);
        t = now();
        if (ch.done != before) t_last = t;
        if (t - last_check > 0.1) {
            last_check = t;
            expire(&ch, conns, concurrency, t);
        }
    }
    double secs = t_last - t0;
    qsort(ch.lat, ch.nlat, sizeof *ch.lat, cmp_double);
    printf("{\"mode\": \"churn\", \"concurrency\": %d, \"conns\": %llu, \"errors\": %llu, "
           "\"seconds\": %.6f, \"cps\": %.1f, \"p50_ms\": %.4f, \"p90_ms\": %.4f, "
           "\"p99_ms\": %.4f, \"max_ms\": %.4f, \"sources\": %d, \"ok\": %s",
           concurrency, (unsigned long long)ch.done, (unsigned long long)ch.errors, secs,
           secs > 0 ? (double)ch.done / secs : 0.0, pct(ch.lat, ch.nlat, 0.50) * 1e3,
           pct(ch.lat, ch.nlat, 0.90) * 1e3, pct(ch.lat, ch.nlat, 0.99) * 1e3,
           ch.nlat ? ch.lat[ch.nlat - 1] * 1e3 : 0.0, source_index + 1,
           ch.errors ? "false" : "true");
    if (ch.errors) {
        printf(", ");
        json_str("error", ch.first_error);
    }
    printf("}\n");
    return ch.errors != 0;
}

/*
 * Open `count` tunnels (at most IDLE_INFLIGHT being set up at once), each
 * checked with a 1-byte echo; report; hold them until stdin closes or `hold`
 * seconds; then end each by sending the other 63 bytes, so that the echo
 * server closes first, and wait for those closes.
 */
#define IDLE_INFLIGHT 200

static int cmd_idle(int port, int proxy_port, int count, double hold, double timeout) {
    struct churn ch;
    memset(&ch, 0, sizeof ch);
    ch.ep = epoll_create1(EPOLL_CLOEXEC);
    ch.port = port;
    ch.proxy_port = proxy_port;
    ch.timeout = timeout;
    struct cconn *conns = calloc((size_t)count, sizeof *conns);
    int maxev = count < 1024 ? count + 1 : 1024;
    struct epoll_event *evs = calloc((size_t)maxev, sizeof *evs);
    if (!conns || !evs) return 2;
    for (int i = 0; i < count; i++) {
        conns[i].fd = -1;
        conns[i].hold = 1;
    }
    double t0 = now(), last_check = t0;
    int next = 0;
    for (;;) { /* open: each connection has its deadline, so this ends */
        double t = now();
        int busy = 0;
        for (int i = 0; i < next; i++)
            if (conns[i].fd >= 0 && conns[i].step != 4) busy++;
        while (next < count && busy < IDLE_INFLIGHT && ch.errors < MAX_CHURN_ERRORS) {
            churn_start(&ch, &conns[next++]);
            busy++;
        }
        if (!busy) break;
        churn_poll(&ch, evs, maxev, 100);
        t = now();
        if (t - last_check > 0.1) {
            last_check = t;
            expire(&ch, conns, next, t);
        }
    }
    double open_secs = now() - t0;
    uint64_t open_errors = ch.errors;
    qsort(ch.lat, ch.nlat, sizeof *ch.lat, cmp_double);
    printf("{\"mode\": \"idle\", \"phase\": \"open\", \"tunnels\": %d, \"opened\": %llu, "
           "\"errors\": %llu, \"seconds\": %.6f, \"open_p50_ms\": %.4f, \"open_p99_ms\": %.4f, "
           "\"sources\": %d",
           count, (unsigned long long)ch.opened, (unsigned long long)ch.errors, open_secs,
           pct(ch.lat, ch.nlat, 0.50) * 1e3, pct(ch.lat, ch.nlat, 0.99) * 1e3, source_index + 1);
    if (ch.errors) {
        printf(", ");
        json_str("error", ch.first_error);
    }
    printf("}\n");
    fflush(stdout);

    /* hold: until stdin closes (or says anything), at most `hold` seconds */
    struct epoll_event sev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = NULL};
    if (epoll_ctl(ch.ep, EPOLL_CTL_ADD, 0, &sev) == 0) {
        double end = now() + hold;
        while (now() < end)
            if (churn_poll(&ch, evs, maxev, 100)) break;
        epoll_ctl(ch.ep, EPOLL_CTL_DEL, 0, NULL);
    } /* else stdin is /dev/null or a file: no hold */

    /* end every held tunnel; the server closes after 64 bytes in all */
    double t1 = now();
    for (int i = 0; i < count; i++) {
        struct cconn *c = &conns[i];
        if (c->fd < 0 || c->step != 4) continue;
        c->hold = 0;
        c->step = 2;
        c->msgoff = 1;
        c->msglen = MSG - 1;
        c->deadline = t1 + timeout;
        begin_step(c, port);
        churn_progress(&ch, c);
    }
    for (;;) {
        int active = 0;
        for (int i = 0; i < count; i++)
            if (conns[i].fd >= 0) active++;
        if (!active) break;
        churn_poll(&ch, evs, maxev, 100);
        expire(&ch, conns, count, now());
    }
    int ok = ch.errors == 0 && ch.opened == (uint64_t)count && ch.done == ch.opened;
    printf("{\"mode\": \"idle\", \"phase\": \"end\", \"tunnels\": %d, \"opened\": %llu, "
           "\"open_errors\": %llu, \"closed_while_idle\": %llu, \"ended\": %llu, "
           "\"errors\": %llu, \"seconds\": %.6f, \"close_seconds\": %.6f, "
           "\"open_p50_ms\": %.4f, \"open_p99_ms\": %.4f, \"sources\": %d, \"ok\": %s",
           count, (unsigned long long)ch.opened, (unsigned long long)open_errors,
           (unsigned long long)ch.closed_while_held, (unsigned long long)ch.done,
           (unsigned long long)ch.errors, open_secs, now() - t1,
           pct(ch.lat, ch.nlat, 0.50) * 1e3, pct(ch.lat, ch.nlat, 0.99) * 1e3, source_index + 1,
           ok ? "true" : "false");
    if (ch.errors) {
        printf(", ");
        json_str("error", ch.first_error);
    } else if (!ok) {
        printf(", ");
        json_str("error", "not every tunnel opened and ended");
    }
    printf("}\n");
    return !ok;
}

/* ------------------------------------------------------------------- rtt */

/* One tunnel to a pecho server; `size` bytes there and back, one at a time. */
static int cmd_rtt(int port, int proxy_port, double seconds, long iterations, size_t size,
                   double timeout) {
    const char *err = NULL;
    long done = 0;
    double *lat = malloc((size_t)iterations * sizeof *lat);
    uint8_t *in = malloc(size);
    double t0 = now(), t = t0;
    int fd = client_connect(port, proxy_port, timeout);
    if (!lat || !in)
        err = "out of memory";
    else if (fd < 0)
        err = errmsg;
    else {
        /* warm-up: 100 round trips or 0.1 s, not counted */
        double warm_end = now() + 0.1;
        for (long i = 0; i < 100 && now() < warm_end && !err; i++)
            if (write_full(fd, ref + i % PAT, size) || read_full(fd, in, size)) err = errmsg;
        t0 = now();
        double end = t0 + seconds;
        t = t0;
        while (!err && done < iterations && t < end) {
            const uint8_t *msg = ref + done % PAT;
            double s = now();
            if (write_full(fd, msg, size) || read_full(fd, in, size)) {
                err = errmsg;
                break;
            }
            t = now();
            if (memcmp(in, msg, size) != 0) {
                err = "wrong bytes echoed";
                break;
            }
            lat[done++] = t - s;
        }
    }
    if (fd >= 0) close(fd);
    double secs = t - t0, sum = 0;
    for (long i = 0; i < done; i++) sum += lat[i];
    if (lat) qsort(lat, (size_t)done, sizeof *lat, cmp_double);
    size_t n = (size_t)done;
    printf("{\"mode\": \"rtt\", \"size\": %zu, \"iterations\": %ld, \"seconds\": %.6f, "
           "\"min_us\": %.2f, \"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, "
           "\"max_us\": %.2f, \"mean_us\": %.2f, \"ok\": %s",
           size, done, secs, n ? lat[0] * 1e6 : 0.0, pct(lat, n, 0.50) * 1e6,
           pct(lat, n, 0.90) * 1e6, pct(lat, n, 0.99) * 1e6, n ? lat[n - 1] * 1e6 : 0.0,
           n ? sum / (double)n * 1e6 : 0.0, err || !n ? "false" : "true");
    if (err || !n) {
        printf(", ");
        json_str("error", err ? err : "no round trip completed");
    }
    printf("}\n");
    free(lat);
    free(in);
    return err != NULL || !n;
}

/* ------------------------------------------------------------------- udp */

#define UDP_HDR 10
#define UDP_STALL 0.05 /* no answer for this long: what is in flight is lost */
#define UDP_DRAIN 0.2  /* at the end, wait this long at most for stragglers */

/*
 * Datagrams of `size` bytes (an 8-byte sequence number, then the pattern) to
 * a UDP echo server, directly or through the proxy's UDP ASSOCIATE relay
 * (each with the 10-byte SOCKS UDP header for 127.0.0.1:port), keeping at
 * most `window` in flight.  When nothing comes back for UDP_STALL seconds,
 * the window is written off (lost) and refilled.  Every answer is checked:
 * header, sequence number (never answered twice), size, pattern.
 */
static int cmd_udp(int port, int proxy_port, double seconds, int window, size_t size,
                   double timeout) {
    const char *err = NULL;
    static char errbuf[160];
    uint8_t pkt[UDP_HDR + 65536], in[UDP_HDR + 65536 + 64];
    size_t hlen = proxy_port > 0 ? UDP_HDR : 0;
    uint64_t sent = 0, received = 0, stalls = 0, dups = 0, refused = 0;
    uint8_t *seen = NULL; /* bitmap of sequence numbers answered */
    size_t seen_cap = 0;
    int ctrl = -1, fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in me = loopback(0), relay = loopback(port);
    socklen_t len = sizeof me;
    double t0 = now(), t_last = t0;
    if (fd < 0 || bind(fd, (struct sockaddr *)&me, sizeof me) < 0 ||
        getsockname(fd, (struct sockaddr *)&me, &len) < 0) {
        err = strerror(errno);
        goto out;
    }
    if (proxy_port > 0) {
        /* declare the address we send from: 127.0.0.1 and our port */
        ctrl = socks_open(ntohs(me.sin_port), proxy_port, timeout, CMD_UDP, &relay);
        if (ctrl < 0) {
            err = errmsg;
            goto out;
        }
        if (relay.sin_family != AF_INET) {
            err = "UDP ASSOCIATE reply with no IPv4 relay address";
            goto out;
        }
        if (relay.sin_addr.s_addr == htonl(0)) relay.sin_addr.s_addr = htonl(LOOPBACK);
        if ((ntohl(relay.sin_addr.s_addr) >> 24) != 127) {
            snprintf(errbuf, sizeof errbuf, "UDP relay at %s: not loopback, not used",
                     inet_ntoa(relay.sin_addr));
            err = errbuf;
            goto out;
        }
        socks_request(pkt, 0, port); /* then make it the UDP header */
        pkt[0] = pkt[1] = pkt[2] = 0;
    }
    if (connect(fd, (struct sockaddr *)&relay, sizeof relay) < 0) {
        err = strerror(errno);
        goto out;
    }
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    double end = now() + seconds, last_answer = now();
    uint64_t outstanding = 0;
    t0 = t_last = now();
    for (int draining = 0; !err;) {
        double t = now();
        if (!draining && t >= end) draining = 1;
        if (draining && (outstanding == 0 || t - t_last > UDP_DRAIN || t - end > UDP_DRAIN))
            break;
        while (!draining && outstanding < (uint64_t)window) {
            uint8_t *p = pkt + hlen;
            for (int k = 0; k < 8; k++) p[k] = (uint8_t)(sent >> (56 - 8 * k));
            memcpy(p + 8, ref + sent % PAT, size - 8);
            ssize_t n = send(fd, pkt, hlen + size, 0);
            if (n < 0) {
                if (errno == ECONNREFUSED) refused++;
                if (errno == EAGAIN || errno == ENOBUFS || errno == ECONNREFUSED) break;
                err = strerror(errno);
                break;
            }
            sent++;
            outstanding++;
        }
        if (refused > 1000) err = "relay or server refused (ICMP port unreachable)";
        double wait = draining ? UDP_DRAIN : (end - now() < UDP_STALL ? end - now() : UDP_STALL);
        int r = poll(&pfd, 1, wait > 0 ? (int)(wait * 1000) + 1 : 0);
        if (r < 0 && errno != EINTR) err = strerror(errno);
        if (r == 0 && !draining && now() - last_answer >= UDP_STALL) {
            stalls++; /* nothing came back: write the window off */
            outstanding = 0;
            last_answer = now();
        }
        for (int k = 0; r > 0 && k < 4 * window && !err; k++) {
            ssize_t n = recv(fd, in, sizeof in, 0);
            if (n < 0) {
                if (errno == ECONNREFUSED) {
                    refused++;
                    continue;
                }
                if (errno != EAGAIN && errno != EINTR) err = strerror(errno);
                break;
            }
            if ((size_t)n != hlen + size) {
                snprintf(errbuf, sizeof errbuf, "answer of %zd bytes, expected %zu", n,
                         hlen + size);
                err = errbuf;
                break;
            }
            if (hlen && (in[0] || in[1] || in[2] || memcmp(in + 3, pkt + 3, UDP_HDR - 3))) {
                err = "answer's SOCKS UDP header does not name the echo server";
                break;
            }
            uint8_t *p = in + hlen;
            uint64_t seq = 0;
            for (int j = 0; j < 8; j++) seq = seq << 8 | p[j];
            if (seq >= sent || memcmp(p + 8, ref + seq % PAT, size - 8) != 0) {
                err = "wrong bytes in an answer";
                break;
            }
            if (seq / 8 >= seen_cap) {
                size_t cap = seen_cap ? seen_cap : 1 << 16;
                while (seq / 8 >= cap) cap *= 2;
                uint8_t *grown = realloc(seen, cap);
                if (!grown) {
                    err = "out of memory";
                    break;
                }
                memset(grown + seen_cap, 0, cap - seen_cap);
                seen = grown;
                seen_cap = cap;
            }
            if (seen[seq / 8] & (1u << (seq % 8))) {
                dups++;
                continue;
            }
            seen[seq / 8] |= (uint8_t)(1u << (seq % 8));
            received++;
            if (outstanding) outstanding--;
            t_last = last_answer = now();
        }
    }
out:;
    double secs = t_last - t0;
    uint64_t lost = sent - received;
    if (!err && !received) err = "no datagram came back";
    if (!err && dups) err = "datagrams answered twice";
    printf("{\"mode\": \"udp\", \"size\": %zu, \"window\": %d, \"sent\": %llu, "
           "\"received\": %llu, \"lost\": %llu, \"loss_pct\": %.3f, \"stalls\": %llu, "
           "\"duplicates\": %llu, \"seconds\": %.6f, \"dgps\": %.1f, \"ok\": %s",
           size, window, (unsigned long long)sent, (unsigned long long)received,
           (unsigned long long)lost, sent ? 100.0 * (double)lost / (double)sent : 0.0,
           (unsigned long long)stalls, (unsigned long long)dups, secs,
           secs > 0 ? (double)received / secs : 0.0, err ? "false" : "true");
    if (err) {
        printf(", ");
        json_str("error", err);
    }
    printf("}\n");
    if (ctrl >= 0) close(ctrl);
    if (fd >= 0) close(fd);
    free(seen);
    return err != NULL;
}

/* ------------------------------------------------------------------- main */

static void usage(void) {
    fprintf(stderr, "usage: loadgen serve\n"
                    "       loadgen [-p PROXYPORT] [-t SECONDS] [-b BYTES] [-c CONCURRENCY]"
                    " [-n N] [-i N] [-s BYTES] [-w N] [-T TIMEOUT] [-H]"
                    " download|upload|churn|rtt|idle|udp PORT\n");
    exit(2);
}

/* Raise the open-file limit to its hard limit (idle tunnels). */
static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

int main(int argc, char **argv) {
    int proxy_port = 0, concurrency = 50, count = 0, window = 32, opt;
    long iterations = 100000;
    size_t size = MSG;
    double seconds = 3, timeout = 10;
    uint64_t max_bytes = UINT64_MAX;
    signal(SIGPIPE, SIG_IGN);
    fill_ref();
    raise_nofile();
    while ((opt = getopt(argc, argv, "p:t:b:c:n:i:s:w:T:H")) != -1) {
        switch (opt) {
        case 'p': proxy_port = atoi(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 'b': max_bytes = strtoull(optarg, NULL, 10); break;
        case 'c': concurrency = atoi(optarg); break;
        case 'n': count = atoi(optarg); break;
        case 'i': iterations = atol(optarg); break;
        case 's': size = (size_t)atol(optarg); break;
        case 'w': window = atoi(optarg); break;
        case 'T': timeout = atof(optarg); break;
        case 'H': http_connect = 1; break;
        default: usage();
        }
    }
    if (optind >= argc) usage();
    const char *mode = argv[optind];
    if (!strcmp(mode, "serve")) return cmd_serve();
    if (optind + 1 >= argc || concurrency < 1 || seconds <= 0 || timeout <= 0 || count < 0 ||
        iterations < 1 || window < 1 || size < 1 || size > 4096)
        usage();
    int port = atoi(argv[optind + 1]);
    if (port <= 0 || port > 65535) usage();
    if (!strcmp(mode, "download")) {
        if (count > 1)
            return cmd_download_multi(port, proxy_port, seconds, max_bytes, timeout, count);
        return cmd_download(port, proxy_port, seconds, max_bytes, timeout);
    }
    if (!strcmp(mode, "upload")) return cmd_upload(port, proxy_port, seconds, max_bytes, timeout);
    if (!strcmp(mode, "churn")) return cmd_churn(port, proxy_port, seconds, concurrency, timeout);
    if (!strcmp(mode, "rtt")) return cmd_rtt(port, proxy_port, seconds, iterations, size, timeout);
    if (!strcmp(mode, "idle"))
        return cmd_idle(port, proxy_port, count ? count : 1000, seconds, timeout);
    if (!strcmp(mode, "udp")) {
        if (size < 8) usage(); /* the sequence number */
        return cmd_udp(port, proxy_port, seconds, window, size, timeout);
    }
    usage();
    return 2;
}
