/*
 * Load generator and test servers for bench/bench.py (Linux only).
 *
 * Everything listens on and connects to 127.0.0.1 only.
 *
 *   loadgen serve
 *       Start three servers on 127.0.0.1, ephemeral ports, one epoll loop:
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
 *                 instead of filling the client's ephemeral port range.
 *       Prints "source=P sink=P echo=P" on one line, then serves until stdin
 *       reaches EOF (the parent died or closed it) or a signal.
 *
 *   loadgen [options] download PORT   read from a source for -t seconds
 *   loadgen [options] upload PORT     write to a sink for -t seconds
 *   loadgen [options] churn PORT      connect, echo 64 bytes, wait for the
 *                                     server's close, close; -c at once
 *
 *   options: -p PROXYPORT  go through the SOCKS5 proxy at 127.0.0.1:PROXYPORT
 *                          (no-auth greeting 05 01 00, then CONNECT to
 *                          127.0.0.1:PORT)
 *            -t SECONDS    how long to run (default 3)
 *            -b BYTES      stop a download/upload after this many bytes too
 *            -c N          churn concurrency (default 50)
 *            -T SECONDS    per-operation timeout (default 10)
 *
 * Each client mode prints one JSON object on stdout.  The pattern is byte
 * k of a stream == k % 251, so every chunk is checked with one memcmp.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PAT 251
#define CHUNK (256 * 1024)
#define LOOPBACK 0x7f000001u
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

enum kind { K_LISTEN_SOURCE, K_LISTEN_SINK, K_LISTEN_ECHO, K_SOURCE, K_SINK, K_ECHO, K_STDIN };

struct sconn {
    enum kind kind;
    int fd;
    uint64_t off;         /* source: bytes written; sink: payload bytes read */
    int ok;               /* sink: framing and pattern intact so far */
    uint8_t hdr[4];       /* sink: frame header being read */
    size_t hdrgot, left;  /* sink: header bytes read; payload left in frame */
    size_t pend, pendoff; /* echo: bytes read and not yet written back */
    uint64_t echoed;      /* echo: bytes written back */
    uint8_t *buf;         /* echo: its pending bytes */
};

static int listen_on_loopback(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0) return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = loopback(0);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 4096) < 0) return -1;
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
        if (c->echoed >= MSG)
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
    } else if (c->echoed >= MSG) {
        sclose(ep, c);
    }
}

static int cmd_serve(void) {
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int ports[3];
    enum kind kinds[3] = {K_LISTEN_SOURCE, K_LISTEN_SINK, K_LISTEN_ECHO};
    for (int i = 0; i < 3; i++) {
        struct sconn *l = calloc(1, sizeof *l);
        l->kind = kinds[i];
        l->fd = listen_on_loopback(&ports[i]);
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
    printf("source=%d sink=%d echo=%d\n", ports[0], ports[1], ports[2]);
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
            case K_LISTEN_ECHO: serve_accept(ep, c); break;
            case K_SOURCE: serve_source(ep, c, evs[i].events); break;
            case K_SINK: serve_sink(ep, c); break;
            case K_ECHO: serve_echo(ep, c, evs[i].events); break;
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

static void socks_request(uint8_t req[10], int port) {
    req[0] = 5;
    req[1] = 1; /* CONNECT */
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

/* Connect (through the proxy when proxy_port > 0); returns fd or -1. */
static int client_connect(int port, int proxy_port, double timeout) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return fail("socket: %s", strerror(errno));
    set_timeouts(fd, timeout);
    struct sockaddr_in a = loopback(proxy_port > 0 ? proxy_port : port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        fail("connect: %s", strerror(errno));
        close(fd);
        return -1;
    }
    if (proxy_port <= 0) return fd;
    uint8_t greet[3] = {5, 1, 0}, m[2], req[10], rep[262];
    socks_request(req, port);
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
    return fd;
bad:
    close(fd);
    return -1;
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

/* ------------------------------------------------------------------ churn */

struct cconn {
    int fd;       /* -1: free slot */
    int step;     /* 0 greeting, 1 request, 2 payload, 3 waiting for EOF */
    int sending;  /* 1 while out[outoff..outlen) is being written */
    int extended; /* the reply's full length is known */
    int connecting; /* waiting for the non-blocking connect to finish */
    double t0, deadline, latency;
    uint8_t out[64], in[300], payload[MSG];
    size_t outlen, outoff, inneed, inoff;
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
    double *lat;
    size_t nlat, caplat;
    char first_error[256];
};

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
        socks_request(c->out, port);
        c->outlen = 10;
        c->inneed = 5;
    } else {
        memcpy(c->out, c->payload, MSG);
        c->outlen = MSG;
        c->inneed = MSG;
    }
}

static void churn_finish(struct churn *ch, struct cconn *c) {
    double lat = c->latency;
    if (ch->nlat == ch->caplat) {
        ch->caplat = ch->caplat ? ch->caplat * 2 : 65536;
        ch->lat = realloc(ch->lat, ch->caplat * sizeof *ch->lat);
        if (!ch->lat) {
            perror("realloc");
            exit(2);
        }
    }
    ch->lat[ch->nlat++] = lat;
    ch->done++;
    close(c->fd);
    c->fd = -1;
}

/* Drive one connection as far as it can go without blocking. */
static void churn_progress(struct churn *ch, struct cconn *c) {
    for (;;) {
        if (c->step == 3) {
            uint8_t extra;
            ssize_t n = recv(c->fd, &extra, 1, 0);
            if (n == 0)
                churn_finish(ch, c);
            else if (n > 0)
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
                        struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
                        epoll_ctl(ch->ep, EPOLL_CTL_MOD, c->fd, &ev);
                        return;
                    }
                    churn_error(ch, c, "write", errno);
                    return;
                }
                c->outoff += (size_t)n;
            }
            c->sending = 0;
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            epoll_ctl(ch->ep, EPOLL_CTL_MOD, c->fd, &ev);
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
            if (memcmp(c->in, c->payload, MSG) != 0) {
                churn_error(ch, c, "wrong bytes echoed", 0);
                return;
            }
            c->latency = now() - c->t0;
            c->step = 3; /* then wait for the server's close */
            continue;
        }
        c->step++;
        begin_step(c, ch->port);
    }
}

static void churn_start(struct churn *ch, struct cconn *c) {
    c->t0 = now();
    c->deadline = c->t0 + ch->timeout;
    c->step = ch->proxy_port > 0 ? 0 : 2;
    ch->counter++;
    for (int i = 0; i < MSG; i++) c->payload[i] = (uint8_t)((ch->counter * 131u + (unsigned)i) & 0xff);
    begin_step(c, ch->port);
    ch->started++;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        churn_error(ch, c, "socket", errno);
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = loopback(ch->proxy_port > 0 ? ch->proxy_port : ch->port);
    int r = connect(c->fd, (struct sockaddr *)&a, sizeof a);
    if (r < 0 && errno != EINPROGRESS) {
        churn_error(ch, c, "connect", errno);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ch->ep, EPOLL_CTL_ADD, c->fd, &ev);
    c->connecting = r < 0;
    if (r == 0) churn_progress(ch, c);
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
        int n = epoll_wait(ch.ep, evs, concurrency, 100);
        for (int i = 0; i < n; i++) {
            struct cconn *c = evs[i].data.ptr;
            if (c->fd < 0) continue;
            if (c->connecting) {
                /* first writable event: the connect finished (or failed) */
                c->connecting = 0;
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    churn_error(&ch, c, "connect", err);
                    continue;
                }
            }
            uint64_t before = ch.done;
            churn_progress(&ch, c);
            if (ch.done != before) t_last = now();
        }
        t = now();
        if (t - last_check > 0.1) {
            last_check = t;
            for (int i = 0; i < concurrency; i++)
                if (conns[i].fd >= 0 && t > conns[i].deadline)
                    churn_error(&ch, &conns[i], "timed out", 0);
        }
    }
    double secs = t_last - t0;
    qsort(ch.lat, ch.nlat, sizeof *ch.lat, cmp_double);
    printf("{\"mode\": \"churn\", \"concurrency\": %d, \"conns\": %llu, \"errors\": %llu, "
           "\"seconds\": %.6f, \"cps\": %.1f, \"p50_ms\": %.4f, \"p90_ms\": %.4f, "
           "\"p99_ms\": %.4f, \"max_ms\": %.4f, \"ok\": %s",
           concurrency, (unsigned long long)ch.done, (unsigned long long)ch.errors, secs,
           secs > 0 ? (double)ch.done / secs : 0.0, pct(ch.lat, ch.nlat, 0.50) * 1e3,
           pct(ch.lat, ch.nlat, 0.90) * 1e3, pct(ch.lat, ch.nlat, 0.99) * 1e3,
           ch.nlat ? ch.lat[ch.nlat - 1] * 1e3 : 0.0, ch.errors ? "false" : "true");
    if (ch.errors) {
        printf(", ");
        json_str("error", ch.first_error);
    }
    printf("}\n");
    return ch.errors != 0;
}

/* ------------------------------------------------------------------- main */

static void usage(void) {
    fprintf(stderr, "usage: loadgen serve\n"
                    "       loadgen [-p PROXYPORT] [-t SECONDS] [-b BYTES] [-c CONCURRENCY]"
                    " [-T TIMEOUT] download|upload|churn PORT\n");
    exit(2);
}

int main(int argc, char **argv) {
    int proxy_port = 0, concurrency = 50, opt;
    double seconds = 3, timeout = 10;
    uint64_t max_bytes = UINT64_MAX;
    signal(SIGPIPE, SIG_IGN);
    fill_ref();
    while ((opt = getopt(argc, argv, "p:t:b:c:T:")) != -1) {
        switch (opt) {
        case 'p': proxy_port = atoi(optarg); break;
        case 't': seconds = atof(optarg); break;
        case 'b': max_bytes = strtoull(optarg, NULL, 10); break;
        case 'c': concurrency = atoi(optarg); break;
        case 'T': timeout = atof(optarg); break;
        default: usage();
        }
    }
    if (optind >= argc) usage();
    const char *mode = argv[optind];
    if (!strcmp(mode, "serve")) return cmd_serve();
    if (optind + 1 >= argc || concurrency < 1 || seconds <= 0 || timeout <= 0) usage();
    int port = atoi(argv[optind + 1]);
    if (port <= 0 || port > 65535) usage();
    if (!strcmp(mode, "download")) return cmd_download(port, proxy_port, seconds, max_bytes, timeout);
    if (!strcmp(mode, "upload")) return cmd_upload(port, proxy_port, seconds, max_bytes, timeout);
    if (!strcmp(mode, "churn")) return cmd_churn(port, proxy_port, seconds, concurrency, timeout);
    usage();
    return 2;
}
