/*
 * Load generator for the chat room benchmark: one thread, epoll, thousands of members.
 *
 * Open loop: message k is due at start + k / rate, whatever the server does, and carries that
 * scheduled time; latency is measured from it, so a stalled server cannot hide its delay.
 * Each message also carries its sender and sequence number; every receiver checks that each
 * sender's messages arrive in order, that its own never come back, and counts deliveries.
 *
 * Speaks the chat protocol ("chat") or Redis pub/sub ("redis": members SUBSCRIBE, senders are
 * extra connections that PUBLISH). In chat mode the last WEB_MEMBERS members (0 if not given)
 * join as a browser does, over a WebSocket on /ws: an HTTP upgrade, then one masked text frame
 * per line out and one text frame per line in (RFC 6455, the little of it a client needs);
 * their deliveries and latency are also reported apart. Prints one JSON object on stdout.
 *
 * PORT may be a comma-separated list (servers sharing one room over Redis): member i joins
 * the server at port i mod N, and deliveries are also timed apart by whether the sender is
 * on the receiver's server ("same") or another ("cross"). WebSocket members name the first
 * port in their Host header.
 *
 * usage: loadgen chat|redis HOST PORT[,PORT...] MEMBERS SENDERS RATE SECONDS MESSAGE_BYTES
 *        [WEB_MEMBERS]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_BYTES 8192
#define CONNECT_WINDOW 256     /* joins in flight at once: a client's own pacing */
#define QUIET_NS 300000000LL   /* setup is over when nothing arrives for this long */
#define DRAIN_NS 2000000000LL  /* after the last send, how long to wait for deliveries */
#define LATE_NS 50000000LL     /* sending this late means the generator fell behind */
#define BUCKETS 20000          /* latency histogram: 10 us buckets up to 200 ms ... */
#define BUCKET_NS 10000LL
#define SLOW_BUCKETS 600       /* ... then 100 ms buckets up to 60 s */
#define SLOW_BUCKET_NS 100000000LL
#define MAX_PORTS 16
#define HIST_SIZE (BUCKETS + SLOW_BUCKETS)

enum mode { CHAT, REDIS };

struct conn {
    int fd;
    int member;          /* member index, or -1 for a Redis publisher */
    int sender;          /* sender index, or -1 */
    int ready;           /* joined (chat: welcome seen; redis: subscribed) */
    int web;             /* a WebSocket member: 1 while its upgrade is answered, 2 once open */
    char in[LINE_MAX_BYTES];
    size_t in_len;
    char *out;           /* bytes the kernel has not taken yet */
    size_t out_len, out_cap;
};

static enum mode mode;
static int members, senders, web_members;
static char host_header[64];        /* HOST:PORT, for a WebSocket member's upgrade request */
static struct conn *conns;
static int nconns;
static int epfd;
static int32_t *last_seq;           /* [member * senders + sender] */
static long long delivered, order_errors, echoes, ready_count, refused_count, dropped_notices;
static long long web_delivered;     /* deliveries to WebSocket members, also in delivered */
static long long delivered_same, delivered_cross;  /* by whether sender and receiver share a server */
/* Latency of every delivery; of those to TCP and to WebSocket members apart; and of those
 * from the receiver's own server and from another apart. */
static long long hist[HIST_SIZE], tcp_hist[HIST_SIZE], web_hist[HIST_SIZE],
    hist_same[HIST_SIZE], hist_cross[HIST_SIZE];
static int nports = 1;  /* servers; member i is on server i % nports */
static long long received_bytes_at;  /* when anything last arrived (setup quiet detection) */

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void record_latency(long long *h, long long ns) {
    if (ns < 0) ns = 0;
    long long b = ns / BUCKET_NS;
    if (b < BUCKETS) {
        h[b]++;
    } else {
        long long s = (ns - BUCKETS * BUCKET_NS) / SLOW_BUCKET_NS;
        h[BUCKETS + (s < SLOW_BUCKETS ? s : SLOW_BUCKETS - 1)]++;
    }
}

static double percentile_ms(const long long *h, double p) {
    long long total = 0, seen = 0;
    for (int i = 0; i < HIST_SIZE; i++) total += h[i];
    if (!total) return -1;
    long long want = (long long)(p * total);
    for (int i = 0; i < HIST_SIZE; i++) {
        seen += h[i];
        if (seen > want) {
            if (i < BUCKETS) return (i + 1) * BUCKET_NS / 1e6;
            return (BUCKETS * BUCKET_NS + (i - BUCKETS + 1) * SLOW_BUCKET_NS) / 1e6;
        }
    }
    return -1;
}

static void watch(struct conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl");
}

static void flush(struct conn *c) {
    while (c->out_len) {
        ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) break;
            c->out_len = 0;  /* dropped by the server: its loss shows as missing deliveries */
            return;
        }
        memmove(c->out, c->out + n, c->out_len - n);
        c->out_len -= n;
    }
    watch(c, EPOLLIN | (c->out_len ? EPOLLOUT : 0));
}

static void queue(struct conn *c, const char *data, size_t len) {
    if (c->out_len + len > c->out_cap) {
        c->out_cap = (c->out_len + len) * 2;
        c->out = realloc(c->out, c->out_cap);
        if (!c->out) die("realloc");
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    flush(c);
}

/* A decimal number and the space after it; -1 if there is none. */
static long long parse_number(char **p) {
    long long value = 0;
    char *start = *p;
    while (**p >= '0' && **p <= '9') value = value * 10 + (*(*p)++ - '0');
    if (*p == start || **p != ' ') return -1;
    (*p)++;
    return value;
}

/* One line from the server: a message ("M<sender> <seq> <due>"), possibly after a "[id] "
 * tag, a welcome or subscribe confirmation, a leave notice, or anything else. */
static void handle_line(struct conn *c, char *line, long long now) {
    char *text = line;
    if (*text == '[') {
        char *tag_end = strstr(text, "] ");
        if (tag_end) text = tag_end + 2;
    }
    if (*text == 'M' && c->member >= 0) {
        char *p = text + 1;
        long long sender = parse_number(&p), seq = parse_number(&p), due = parse_number(&p);
        if (sender < 0 || sender >= senders || seq < 0 || due < 0) return;
        if (mode == CHAT && sender == c->member) echoes++;
        int32_t *last = &last_seq[(long long)c->member * senders + sender];
        if (seq <= *last) order_errors++;
        *last = seq;
        delivered++;
        record_latency(hist, now - due);
        if (c->web) {
            web_delivered++;
            record_latency(web_hist, now - due);
        } else {
            record_latency(tcp_hist, now - due);
        }
        if (sender % nports == c->member % nports) {  /* chat: sender s is member s */
            delivered_same++;
            record_latency(hist_same, now - due);
        } else {
            delivered_cross++;
            record_latency(hist_cross, now - due);
        }
    } else if (!c->ready && (strstr(line, "* Welcome") || strcmp(line, "subscribe\r") == 0)) {
        c->ready = 1;
        ready_count++;
    } else if (strstr(line, "left (too slow)")) {
        dropped_notices++;
    }
}

/* One line as a client's text frame: masked, as RFC 6455 requires of a client, with the key
 * 0 (XOR with zeros), since nothing here needs hiding from a proxy. */
static void queue_frame(struct conn *c, int opcode, const char *data, size_t len) {
    char frame[LINE_MAX_BYTES + 16];
    size_t at = 0;
    frame[at++] = (char)(0x80 | opcode);
    if (len < 126) {
        frame[at++] = (char)(0x80 | len);
    } else {
        frame[at++] = (char)(0x80 | 126);
        frame[at++] = (char)(len >> 8);
        frame[at++] = (char)(len & 0xff);
    }
    memset(frame + at, 0, 4);
    at += 4;
    memcpy(frame + at, data, len);
    queue(c, frame, at + len);
}

/* Whole things in c->in: the upgrade's answer, then frames, each text frame one line.
 * Returns how many bytes were used. */
static size_t handle_web_bytes(struct conn *c, char *in, size_t len, long long now) {
    size_t used = 0;
    if (c->web == 1) {
        char *crlf = memmem(in, len, "\r\n\r\n", 4);
        if (!crlf) return 0;
        if (strncmp(in, "HTTP/1.1 101", 12) != 0) {
            c->in_len = 0;
            return len;  /* refused: the server closes, and it counts as refused */
        }
        used = crlf + 4 - in;
        c->web = 2;
        queue_frame(c, 1, "!Join", 5);
    }
    while (len - used >= 2) {
        unsigned char *f = (unsigned char *)in + used;
        int opcode = f[0] & 0x0f;
        size_t payload = f[1] & 0x7f, head = 2;
        if (payload == 126) {
            if (len - used < 4) break;
            payload = (size_t)f[2] << 8 | f[3];
            head = 4;
        } else if (payload == 127) {
            if (len - used < 10) break;
            payload = 0;
            for (int i = 2; i < 10; i++) payload = payload << 8 | f[i];
            head = 10;
        }
        if (len - used < head + payload) break;
        char *data = (char *)f + head;
        if (opcode == 1) {
            char saved = data[payload];
            data[payload] = 0;
            handle_line(c, data, now);
            data[payload] = saved;
        } else if (opcode == 9) {
            queue_frame(c, 10, data, payload);  /* a ping: the pong carries its payload */
        }
        used += head + payload;
    }
    return used;
}

static int read_from(struct conn *c, long long now) {
    for (;;) {
        size_t room = sizeof c->in - c->in_len - 1;
        ssize_t n = recv(c->fd, c->in + c->in_len, room, 0);
        if (n == 0) return -1;
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        received_bytes_at = now;
        c->in_len += n;
        c->in[c->in_len] = 0;
        if (c->web) {
            size_t used = handle_web_bytes(c, c->in, c->in_len, now);
            c->in_len -= used;
            memmove(c->in, c->in + used, c->in_len);
            if (c->in_len == sizeof c->in - 1) c->in_len = 0;  /* an absurd frame: drop it */
            if ((size_t)n < room) return 0;
            continue;
        }
        char *start = c->in, *nl;
        while ((nl = memchr(start, '\n', c->in + c->in_len - start))) {
            *nl = 0;
            handle_line(c, start, now);
            start = nl + 1;
        }
        c->in_len -= start - c->in;
        memmove(c->in, start, c->in_len);
        if (c->in_len == sizeof c->in - 1) c->in_len = 0;  /* an absurd line: drop it */
        /* A short read drained the socket: skip the recv() that would only say EAGAIN
         * (epoll is level-triggered and reports the socket again if more arrives). */
        if ((size_t)n < room) return 0;
    }
}

static void serve_events(int timeout_ms) {
    struct epoll_event events[1024];
    int n = epoll_wait(epfd, events, 1024, timeout_ms);
    long long now = now_ns();
    for (int i = 0; i < n; i++) {
        struct conn *c = events[i].data.ptr;
        if (events[i].events & EPOLLOUT) flush(c);
        if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
            if (read_from(c, now) < 0) {
                epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                c->fd = -1;
                if (!c->ready) refused_count++;  /* closed before it joined: refused */
            }
        }
    }
}

static void open_conn(struct conn *c, struct sockaddr_in *addr) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)addr, sizeof *addr) < 0 && errno != EINPROGRESS)
        die("connect");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl add");
    if (c->member < 0) {
        c->ready = 1;  /* a Redis publisher needs no setup */
        ready_count++;
    } else if (c->web) {
        char upgrade[512];
        int len = snprintf(upgrade, sizeof upgrade,
                           "GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n",
                           host_header);
        queue(c, upgrade, len);
    } else if (mode == CHAT) {
        queue(c, "!Join\n", 6);
    } else {
        const char *sub = "*2\r\n$9\r\nSUBSCRIBE\r\n$4\r\nroom\r\n";
        queue(c, sub, strlen(sub));
    }
}

static void send_message(struct conn *c, int sender, int seq, long long due, int size) {
    char payload[LINE_MAX_BYTES];
    int len = snprintf(payload, sizeof payload, "M%d %d %lld ", sender, seq, due);
    while (len < size - 1) payload[len++] = 'x';
    char frame[LINE_MAX_BYTES + 64];
    int flen;
    if (mode == CHAT) {
        flen = snprintf(frame, sizeof frame, "%.*s\n", len, payload);
    } else {
        flen = snprintf(frame, sizeof frame, "*3\r\n$7\r\nPUBLISH\r\n$4\r\nroom\r\n$%d\r\n%.*s\r\n",
                        len, len, payload);
    }
    if (c->fd >= 0) queue(c, frame, flen);
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

int main(int argc, char **argv) {
    if (argc != 9 && argc != 10) {
        fprintf(stderr,
                "usage: loadgen chat|redis HOST PORT[,PORT...] MEMBERS SENDERS RATE SECONDS "
                "BYTES [WEB_MEMBERS]\n");
        return 2;
    }
    mode = strcmp(argv[1], "redis") == 0 ? REDIS : CHAT;
    struct sockaddr_in addrs[MAX_PORTS];
    nports = 0;
    for (char *port = strtok(argv[3], ","); port && nports < MAX_PORTS; port = strtok(NULL, ",")) {
        addrs[nports] = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(atoi(port))};
        inet_pton(AF_INET, argv[2], &addrs[nports].sin_addr);
        nports++;
    }
    if (!nports) return 2;
    members = atoi(argv[4]);
    senders = atoi(argv[5]);
    double rate = atof(argv[6]);
    double seconds = atof(argv[7]);
    int size = atoi(argv[8]);
    web_members = argc == 10 && mode == CHAT ? atoi(argv[9]) : 0;
    if (web_members > members - senders) web_members = members - senders;  /* senders: TCP */
    snprintf(host_header, sizeof host_header, "%s:%s", argv[2], argv[3]);

    /* Chat: the first SENDERS members send. Redis: SENDERS extra publisher connections. */
    nconns = members + (mode == REDIS ? senders : 0);
    conns = calloc(nconns, sizeof *conns);
    last_seq = malloc(sizeof *last_seq * (size_t)members * senders);
    for (long long i = 0; i < (long long)members * senders; i++) last_seq[i] = -1;
    epfd = epoll_create1(0);
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        conns[i].member = i < members ? i : -1;
        conns[i].sender = mode == CHAT ? (i < senders ? i : -1) : (i >= members ? i - members : -1);
        conns[i].web = i < members && i >= members - web_members;
    }

    /* Join, CONNECT_WINDOW at a time, and time it. */
    long long join_start = now_ns(), setup_deadline = join_start + 60000000000LL;
    int opened = 0;
    while (ready_count + refused_count < nconns && now_ns() < setup_deadline) {
        while (opened < nconns && opened - ready_count - refused_count < CONNECT_WINDOW)
        {
            struct conn *c = &conns[opened++];
            open_conn(c, &addrs[c->member >= 0 ? c->member % nports : 0]);
        }
        serve_events(10);
    }
    double join_seconds = (now_ns() - join_start) / 1e9;
    /* Let the join notices settle before measuring. */
    received_bytes_at = now_ns();
    while (now_ns() - received_bytes_at < QUIET_NS && now_ns() < setup_deadline) serve_events(50);

    struct conn **sender_conns = calloc(senders, sizeof *sender_conns);
    for (int i = 0; i < nconns; i++)
        if (conns[i].sender >= 0) sender_conns[conns[i].sender] = &conns[i];

    long long total = (long long)(rate * seconds);
    long long receivers = mode == CHAT ? members - 1 : members;
    double cpu_before = cpu_seconds();
    long long start = now_ns() + 10000000LL, send_end = 0, max_late = 0;
    long long k = 0;
    for (;;) {
        long long now = now_ns();
        while (k < total) {
            long long due = start + (long long)(k / rate * 1e9);
            if (due > now) break;
            if (now - due > max_late) max_late = now - due;
            int s = (int)(k % senders);
            send_message(sender_conns[s], s, (int)(k / senders), due, size);
            k++;
        }
        if (k == total && !send_end) send_end = now;
        if (send_end && (delivered >= total * receivers || now - send_end > DRAIN_NS)) break;
        long long next = k < total ? start + (long long)(k / rate * 1e9) : now + 10000000LL;
        /* Rounded up, so the loop sleeps instead of spinning; a send may go up to 1 ms late,
         * and that counts in the latency, which runs from the scheduled time. */
        int timeout = (int)((next - now + 999999) / 1000000);
        serve_events(timeout < 0 ? 0 : timeout);
    }
    double wall = (now_ns() - start) / 1e9;
    double cpu = cpu_seconds() - cpu_before;
    printf("{\"joined\": %lld, \"join_seconds\": %.3f, \"sent\": %lld, \"expected\": %lld, "
           "\"delivered\": %lld, \"order_errors\": %lld, \"echoes\": %lld, "
           "\"dropped_slow\": %lld, \"p50_ms\": %.3f, \"p99_ms\": %.3f, \"max_late_ms\": %.1f, "
           "\"wall_seconds\": %.3f, \"cpu_seconds\": %.3f, \"saturated\": %s, "
           "\"tcp_p50_ms\": %.3f, \"tcp_p99_ms\": %.3f, "
           "\"web_members\": %d, \"web_expected\": %lld, \"web_delivered\": %lld, "
           "\"web_p50_ms\": %.3f, \"web_p99_ms\": %.3f, "
           "\"same_delivered\": %lld, \"same_p50_ms\": %.3f, \"same_p99_ms\": %.3f, "
           "\"cross_delivered\": %lld, \"cross_p50_ms\": %.3f, \"cross_p99_ms\": %.3f}\n",
           ready_count, join_seconds, k, k * receivers, delivered, order_errors, echoes,
           dropped_notices, percentile_ms(hist, 0.50), percentile_ms(hist, 0.99), max_late / 1e6,
           wall, cpu, (cpu / wall > 0.9 || max_late > LATE_NS) ? "true" : "false",
           percentile_ms(tcp_hist, 0.50), percentile_ms(tcp_hist, 0.99), web_members,
           k * web_members, web_delivered, percentile_ms(web_hist, 0.50),
           percentile_ms(web_hist, 0.99), delivered_same, percentile_ms(hist_same, 0.50),
           percentile_ms(hist_same, 0.99), delivered_cross, percentile_ms(hist_cross, 0.50),
           percentile_ms(hist_cross, 0.99));
    return 0;
}
