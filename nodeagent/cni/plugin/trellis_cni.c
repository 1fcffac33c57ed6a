/*
 * trellis-cni: the chained CNI plugin the container runtime runs on the host.
 *
 * It decides nothing that needs the node agent's view of the cluster. It
 * forwards the CNI call (the CNI_* environment and the configuration on stdin)
 * to the agent's unix socket and prints the agent's answer; the agent parses,
 * validates and decides (nodeagent/cni/spec.py, nodeagent/cni_server.py).
 * Locally, with no agent involved, it only:
 *
 *   - answers VERSION;
 *   - lets through a call for a namespace in the config's "excludeNamespaces"
 *     (kube-system and Trellis's own namespace: the agent's own pod must never
 *     wait for an agent), or for a container that is not a Kubernetes pod;
 *   - when the agent is not running (no socket, or nobody listening on it):
 *     succeeds for DEL, and for ADD/CHECK follows the per-namespace verdict the
 *     agent last wrote to "<agentSocket>.fallback" ("pass" or "wait"); any other
 *     namespace, or no such file, gets CNI error 11 ("try again later"), so a
 *     pod that may be in the mesh never starts unredirected.
 *
 * Static (musl), no allocation beyond three bounded buffers, no shell, no
 * other process. Every read is bounded in size and every wait in time.
 *
 * Wire protocol (nodeagent/cni/protocol.py is the other end):
 *   request: u32 big-endian length, then "trellis-cni/2\0", then each forwarded
 *            "NAME=VALUE\0", then "\0", then the stdin bytes;
 *   reply:   u32 big-endian length, then one byte (the exit code), then the
 *            bytes to print on stdout.
 */
#define _GNU_SOURCE  /* MSG_NOSIGNAL, SOCK_CLOEXEC */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_INPUT (1u << 20)   /* a network config is a few KiB; refuse absurd ones */
#define MAX_REPLY (1u << 20)
#define MAX_FALLBACK (1u << 20)
#define MAX_STR 4096           /* a path, a namespace or a version, decoded */
#define MAX_DEPTH 64
#define DEFAULT_SOCKET "/var/run/trellis/cni.sock"
#define DEFAULT_TIMEOUT_MS 30000
#define MAGIC "trellis-cni/2"
#define FALLBACK_SUFFIX ".fallback"
#define FALLBACK_HEADER "trellis-cni-fallback 1\n"

/* The spec's error codes that we use. */
enum { INVALID_ENVIRONMENT = 4, IO_FAILURE = 5, DECODE_FAILURE = 6, INVALID_CONFIG = 7,
       TRY_AGAIN_LATER = 11 };

static const char *const FORWARDED[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
                                        "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"};
static const char SUPPORTED[] = "[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\"]";

static char input[MAX_INPUT + 1];
static char reply[MAX_REPLY];
static char frame[MAX_INPUT + 8192];

struct span { const char *p; size_t n; };

/* ---- output ------------------------------------------------------------------ */

static void write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return;
        p += w;
        n -= (size_t)w;
    }
}

static void out(const char *s) { write_all(1, s, strlen(s)); }

static void out_json_string(const char *s) {
    char esc[8];
    out("\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { esc[0] = '\\'; esc[1] = (char)c; write_all(1, esc, 2); }
        else if (c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", c); out(esc); }
        else write_all(1, s, 1);
    }
    out("\"");
}

static const char *version = "1.0.0";  /* the config's cniVersion once known */

static int fail(int code, const char *msg, const char *details) {
    char num[16];
    snprintf(num, sizeof num, "%d", code);
    out("{\"cniVersion\":");
    out_json_string(version);
    out(",\"code\":");
    out(num);
    out(",\"msg\":");
    out_json_string(msg);
    out(",\"details\":");
    out_json_string(details);
    out("}\n");
    return 1;
}

static void note(const char *what, const char *detail) {
    /* stderr reaches the runtime's log; stdout is the result. */
    char line[MAX_STR + 256];
    int n = snprintf(line, sizeof line, "trellis-cni: %s: %s\n", what, detail);
    if (n > 0) write_all(2, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* ---- a validating JSON scanner (RFC 8259), spans only, no tree ---------------- */

static const char *ws(const char *p, const char *e) {
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* p at '"'; returns the byte after the closing quote, or NULL. */
static const char *skip_string(const char *p, const char *e) {
    for (p++; p < e; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') return p + 1;
        if (c < 0x20) return NULL;
        if (c == '\\') {
            if (++p >= e) return NULL;
            if (*p == 'u') {
                if (e - p < 5) return NULL;
                for (int i = 1; i <= 4; i++) if (hexval(p[i]) < 0) return NULL;
                p += 4;
            } else if (!strchr("\"\\/bfnrt", *p) || *p == 0) {
                return NULL;
            }
        }
    }
    return NULL;
}

static const char *skip_number(const char *p, const char *e) {
    const char *start;
    if (p < e && *p == '-') p++;
    if (p >= e) return NULL;
    if (*p == '0') p++;
    else if (*p >= '1' && *p <= '9') while (p < e && *p >= '0' && *p <= '9') p++;
    else return NULL;
    if (p < e && *p == '.') {
        start = ++p;
        while (p < e && *p >= '0' && *p <= '9') p++;
        if (p == start) return NULL;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-')) p++;
        start = p;
        while (p < e && *p >= '0' && *p <= '9') p++;
        if (p == start) return NULL;
    }
    return p;
}

static const char *skip_value(const char *p, const char *e, int depth) {
    p = ws(p, e);
    if (p >= e || depth > MAX_DEPTH) return NULL;
    if (*p == '"') return skip_string(p, e);
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        p = ws(p + 1, e);
        if (p < e && *p == close) return p + 1;
        for (;;) {
            if (close == '}') {
                if (p >= e || *p != '"' || !(p = skip_string(p, e))) return NULL;
                p = ws(p, e);
                if (p >= e || *p++ != ':') return NULL;
            }
            if (!(p = skip_value(p, e, depth + 1))) return NULL;
            p = ws(p, e);
            if (p < e && *p == ',') { p = ws(p + 1, e); continue; }
            if (p < e && *p == close) return p + 1;
            return NULL;
        }
    }
    if (e - p >= 4 && (!memcmp(p, "true", 4) || !memcmp(p, "null", 4))) return p + 4;
    if (e - p >= 5 && !memcmp(p, "false", 5)) return p + 5;
    return skip_number(p, e);
}

/* Members of an object, one at a time: *at starts just inside the '{'. Returns 1
 * with key (quotes included) and value spans, 0 at the end. Call only on a span
 * skip_value accepted, so no error can occur. */
static int next_member(const char **at, const char *e, struct span *key, struct span *val) {
    const char *p = ws(*at, e);
    if (*p == ',') p = ws(p + 1, e);
    if (*p == '}') return 0;
    key->p = p;
    p = skip_string(p, e);
    key->n = (size_t)(p - key->p);
    p = ws(p, e) + 1;  /* ':' */
    p = ws(p, e);
    val->p = p;
    p = skip_value(p, e, 0);
    val->n = (size_t)(p - val->p);
    *at = p;
    return 1;
}

/* The last member named `name` (as json.loads keeps the last duplicate). Keys are
 * compared as written: a key spelled with escapes does not match. */
static int member(struct span obj, const char *name, struct span *val) {
    const char *at = obj.p + 1, *e = obj.p + obj.n;
    struct span k, v;
    size_t len = strlen(name);
    int found = 0;
    while (next_member(&at, e, &k, &v))
        if (k.n == len + 2 && !memcmp(k.p + 1, name, len)) { *val = v; found = 1; }
    return found;
}

/* A string value, unescaped into out (NUL-terminated). Only ASCII \u escapes
 * (no NUL) are accepted: none of our fields needs more. */
static int string_of(struct span v, char *dst, size_t cap) {
    size_t n = 0;
    if (v.n < 2 || v.p[0] != '"') return -1;
    for (const char *p = v.p + 1; p < v.p + v.n - 1; p++) {
        char c = *p;
        if (c == '\\') {
            c = *++p;
            switch (c) {
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            case 'u': {
                int cp = (hexval(p[1]) << 12) | (hexval(p[2]) << 8) | (hexval(p[3]) << 4)
                         | hexval(p[4]);
                if (cp <= 0 || cp > 0x7f) return -1;
                c = (char)cp;
                p += 4;
                break;
            }
            default: break;  /* \" \\ \/ stand for themselves */
            }
        }
        if (n + 1 >= cap) return -1;
        dst[n++] = c;
    }
    dst[n] = 0;
    return 0;
}

/* ---- the configuration and the environment ----------------------------------- */

struct config {
    struct span root;          /* the whole object, or p == NULL */
    char socket[108];          /* sun_path */
    int timeout_ms;
    struct span exclude;       /* excludeNamespaces, an array, or p == NULL */
    struct span prev;          /* prevResult, an object, or p == NULL */
};

static char version_buf[32];

/* 0, or an error already printed. */
static int read_config(size_t len, struct config *cfg) {
    char buf[MAX_STR];
    struct span v;
    const char *e = input + len, *p = ws(input, e), *end;
    memset(cfg, 0, sizeof *cfg);
    strcpy(cfg->socket, DEFAULT_SOCKET);
    cfg->timeout_ms = DEFAULT_TIMEOUT_MS;
    if (p == e) return 0;  /* nothing: only VERSION may do that, checked later */
    end = skip_value(p, e, 0);
    if (!end || *p != '{' || ws(end, e) != e)
        return fail(DECODE_FAILURE, "network configuration on stdin is not a JSON object", "");
    cfg->root = (struct span){p, (size_t)(end - p)};
    if (member(cfg->root, "cniVersion", &v) && string_of(v, buf, sizeof buf) == 0
        && strlen(buf) < sizeof version_buf && strspn(buf, "0123456789.") == strlen(buf)) {
        strcpy(version_buf, buf);
        version = version_buf;
    }
    if (member(cfg->root, "agentSocket", &v)) {
        if (string_of(v, buf, sizeof buf) != 0 || buf[0] != '/'
            || strlen(buf) >= sizeof cfg->socket)
            return fail(INVALID_CONFIG, "agentSocket: not an absolute path of a unix socket",
                        "");
        strcpy(cfg->socket, buf);
    }
    if (member(cfg->root, "timeoutSeconds", &v)) {
        char num[64];
        char *stop;
        double s;
        if (v.n >= sizeof num || (v.p[0] != '-' && (v.p[0] < '0' || v.p[0] > '9')))
            return fail(INVALID_CONFIG, "timeoutSeconds: not a positive number", "");
        memcpy(num, v.p, v.n);
        num[v.n] = 0;
        s = strtod(num, &stop);
        if (*stop || !(s > 0) || s > 3600)
            return fail(INVALID_CONFIG, "timeoutSeconds: not a positive number of at most 3600",
                        num);
        cfg->timeout_ms = (int)(s * 1000) > 0 ? (int)(s * 1000) : 1;
    }
    if (member(cfg->root, "excludeNamespaces", &v)) {
        if (v.p[0] != '[')
            return fail(INVALID_CONFIG, "excludeNamespaces: not a list of namespaces", "");
        cfg->exclude = v;
    }
    if (member(cfg->root, "prevResult", &v)) {
        if (v.p[0] != '{') return fail(INVALID_CONFIG, "prevResult: not a JSON object", "");
        cfg->prev = v;
    }
    return 0;
}

/* `key` from CNI_ARGS ("K=V;K=V", the last one wins, as in spec.py) into dst; "" if
 * absent. -1 if a value does not fit: never read as "absent", which would pass. */
static int cni_arg(const char *key, char *dst, size_t cap) {
    const char *args = getenv("CNI_ARGS"), *p;
    size_t klen = strlen(key);
    dst[0] = 0;
    for (p = args; p && *p; ) {
        const char *end = strchr(p, ';');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n > klen && !memcmp(p, key, klen) && p[klen] == '=') {
            if (n - klen - 1 >= cap) return -1;
            memcpy(dst, p + klen + 1, n - klen - 1);
            dst[n - klen - 1] = 0;
        }
        p = end ? end + 1 : p + n;
    }
    return 0;
}

static int excluded(const struct config *cfg, const char *ns) {
    char buf[MAX_STR];
    const char *p, *e;
    if (!cfg->exclude.p) return 0;
    p = cfg->exclude.p + 1;
    e = cfg->exclude.p + cfg->exclude.n;
    for (;;) {
        const char *start = ws(p, e), *end;
        if (*start == ']') return 0;
        end = skip_value(start, e, 0);
        if (string_of((struct span){start, (size_t)(end - start)}, buf, sizeof buf) == 0
            && !strcmp(buf, ns))
            return 1;
        p = ws(end, e);
        if (*p == ',') p++;
    }
}

/* ---- answers made here ----------------------------------------------------------- */

/* What a chained plugin that changes nothing prints: prevResult for ADD (in the
 * config's cniVersion), nothing for DEL and CHECK. */
static int pass(const char *command, const struct config *cfg) {
    const char *at, *e;
    struct span k, v;
    if (strcmp(command, "ADD") != 0) return 0;
    if (!cfg->prev.p)
        return fail(INVALID_CONFIG, "prevResult: missing; trellis-cni must be chained after "
                                    "the interface plugin", "");
    out("{\"cniVersion\":");
    out_json_string(version);
    at = cfg->prev.p + 1;
    e = cfg->prev.p + cfg->prev.n;
    while (next_member(&at, e, &k, &v)) {
        if (k.n == 12 && !memcmp(k.p, "\"cniVersion\"", 12)) continue;
        out(",");
        write_all(1, k.p, k.n);
        out(":");
        write_all(1, v.p, v.n);
    }
    out("}\n");
    return 0;
}

/* The agent's last word for `ns` when it is away: 1 pass, 0 wait (also: unknown). */
static int fallback_passes(const char *socket_path, const char *ns) {
    char path[sizeof(((struct config *)0)->socket) + sizeof FALLBACK_SUFFIX];
    static char text[MAX_FALLBACK + 1];
    size_t len = 0, nslen = strlen(ns);
    ssize_t r;
    int fd;
    snprintf(path, sizeof path, "%s%s", socket_path, FALLBACK_SUFFIX);
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) return 0;
    while (len < MAX_FALLBACK && (r = read(fd, text + len, MAX_FALLBACK - len)) != 0) {
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { close(fd); return 0; }
        len += (size_t)r;
    }
    close(fd);
    text[len] = 0;
    if (len == MAX_FALLBACK || strncmp(text, FALLBACK_HEADER, strlen(FALLBACK_HEADER)) != 0)
        return 0;
    /* Lines "pass <namespace>" or "wait <namespace>"; the file is written whole
     * (rename), so it is never seen half-written. */
    for (char *line = text + strlen(FALLBACK_HEADER); *line; ) {
        char *nl = strchr(line, '\n');
        size_t n = nl ? (size_t)(nl - line) : strlen(line);
        if (n == 5 + nslen && line[4] == ' ' && !memcmp(line + 5, ns, nslen))
            return !memcmp(line, "pass", 4);
        line = nl ? nl + 1 : line + n;
    }
    return 0;
}

/* ---- asking the agent ---------------------------------------------------------------- */

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int wait_fd(int fd, short events, int64_t deadline) {
    struct pollfd pfd = {.fd = fd, .events = events};
    for (;;) {
        int64_t left = deadline - now_ms();
        int r;
        if (left <= 0) { errno = ETIMEDOUT; return -1; }
        r = poll(&pfd, 1, left > 60000 ? 60000 : (int)left);
        if (r > 0) return 0;
        if (r < 0 && errno != EINTR) return -1;
    }
}

static size_t build_request(size_t stdin_len) {
    size_t n = 4;
    memcpy(frame + n, MAGIC, sizeof MAGIC);  /* with its NUL */
    n += sizeof MAGIC;
    for (size_t i = 0; i < sizeof FORWARDED / sizeof *FORWARDED; i++) {
        const char *value = getenv(FORWARDED[i]);
        size_t need;
        if (!value) continue;
        need = strlen(FORWARDED[i]) + 1 + strlen(value) + 1;
        if (n + need + 1 + stdin_len > sizeof frame) return 0;
        n += (size_t)sprintf(frame + n, "%s=%s", FORWARDED[i], value) + 1;
    }
    frame[n++] = 0;
    memcpy(frame + n, input, stdin_len);
    n += stdin_len;
    frame[0] = (char)((n - 4) >> 24);
    frame[1] = (char)((n - 4) >> 16);
    frame[2] = (char)((n - 4) >> 8);
    frame[3] = (char)(n - 4);
    return n;
}

enum outcome { ANSWERED, ABSENT, FAILED };

/* One request and its reply within timeout_ms. ABSENT: no agent runs (no socket
 * file, or nobody listening). FAILED: errno-ish reason in *why. */
static enum outcome ask_agent(const struct config *cfg, size_t stdin_len, size_t *reply_len,
                              const char **why) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    int64_t deadline = now_ms() + cfg->timeout_ms;
    struct timeval tv = {.tv_sec = cfg->timeout_ms / 1000,
                         .tv_usec = (cfg->timeout_ms % 1000) * 1000};
    size_t n = build_request(stdin_len), sent = 0, got = 0, want = 4;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    *why = "";
    if (n == 0) { *why = "the request is too large"; return FAILED; }
    if (fd < 0) { *why = strerror(errno); return FAILED; }
    strcpy(addr.sun_path, cfg->socket);
    /* A full listen backlog blocks connect(); SO_SNDTIMEO bounds that wait. */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        int err = errno;
        close(fd);
        *why = strerror(err);
        return (err == ENOENT || err == ECONNREFUSED) ? ABSENT : FAILED;
    }
    fcntl(fd, F_SETFL, O_NONBLOCK);
    while (sent < n) {
        ssize_t w;
        if (wait_fd(fd, POLLOUT, deadline) != 0) goto io_error;
        w = send(fd, frame + sent, n - sent, MSG_NOSIGNAL);
        if (w < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (w < 0) goto io_error;
        sent += (size_t)w;
    }
    while (got < want) {
        ssize_t r;
        if (wait_fd(fd, POLLIN, deadline) != 0) goto io_error;
        r = recv(fd, reply + got, want - got, 0);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (r < 0) goto io_error;
        if (r == 0) { *why = "the agent closed the connection without answering"; goto out; }
        got += (size_t)r;
        if (got == 4 && want == 4) {
            uint32_t len = ((uint32_t)(unsigned char)reply[0] << 24)
                         | ((uint32_t)(unsigned char)reply[1] << 16)
                         | ((uint32_t)(unsigned char)reply[2] << 8) | (unsigned char)reply[3];
            if (len < 1 || len > MAX_REPLY - 4) { *why = "reply of a bad length"; goto out; }
            want = 4 + len;
        }
    }
    close(fd);
    *reply_len = got;
    return ANSWERED;
io_error:
    *why = errno == ETIMEDOUT ? "timeout" : strerror(errno);
out:
    close(fd);
    return FAILED;
}

/* ---- main -------------------------------------------------------------------------- */

static int read_stdin(size_t *len) {
    *len = 0;
    for (;;) {
        ssize_t r = read(0, input + *len, MAX_INPUT + 1 - *len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) return 0;
        *len += (size_t)r;
        if (*len > MAX_INPUT) return -1;
    }
}

int main(void) {
    const char *command = getenv("CNI_COMMAND");
    char ns[MAX_STR], detail[MAX_STR + 256];
    struct config cfg;
    size_t len, reply_len = 0;
    const char *why;
    int is_add, is_check, is_del;

    if (read_stdin(&len) != 0)
        return fail(DECODE_FAILURE, "network configuration on stdin is unreadable or larger "
                                    "than 1 MiB", "");
    if (read_config(len, &cfg) != 0) return 1;
    if (command && !strcmp(command, "VERSION")) {
        out("{\"cniVersion\":");
        out_json_string(version);
        out(",\"supportedVersions\":");
        out(SUPPORTED);
        out("}\n");
        return 0;
    }
    if (!cfg.root.p) return fail(DECODE_FAILURE, "network configuration on stdin is empty", "");
    is_add = command && !strcmp(command, "ADD");
    is_check = command && !strcmp(command, "CHECK");
    is_del = command && !strcmp(command, "DEL");
    if (cni_arg("K8S_POD_NAMESPACE", ns, 254) != 0)
        return fail(INVALID_ENVIRONMENT, "CNI_ARGS: K8S_POD_NAMESPACE is too long", "");
    if ((is_add || is_check || is_del) && (!ns[0] || excluded(&cfg, ns)))
        return pass(command, &cfg);  /* not a pod of ours to wait for */

    switch (ask_agent(&cfg, len, &reply_len, &why)) {
    case ANSWERED:
        write_all(1, reply + 5, reply_len - 5);
        return (unsigned char)reply[4];
    case ABSENT:
        if (is_del) {
            /* DEL must not fail on what is already gone; the rules went with the
             * namespace the runtime is deleting. */
            note("DEL with no node agent running; nothing to clean up", cfg.socket);
            return 0;
        }
        if ((is_add || is_check) && fallback_passes(cfg.socket, ns)) {
            note("no node agent running; its last verdict lets this namespace through", ns);
            return pass(command, &cfg);
        }
        snprintf(detail, sizeof detail, "%s: %s; namespace %s may be in the mesh", cfg.socket,
                 why, ns);
        return fail(TRY_AGAIN_LATER, "the trellis node agent is not running", detail);
    case FAILED:
    default:
        if (is_del) {
            note("DEL: the node agent did not answer; nothing else to clean up", why);
            return 0;
        }
        snprintf(detail, sizeof detail, "%s: %s", cfg.socket, why);
        return fail(!strcmp(why, "timeout") ? TRY_AGAIN_LATER : IO_FAILURE,
                    !strcmp(why, "timeout") ? "the trellis node agent did not answer in time"
                                            : "the trellis node agent is unreachable",
                    detail);
    }
}
