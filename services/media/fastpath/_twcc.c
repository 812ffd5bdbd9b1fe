/* A subscriber's transport-wide feedback, read and measured in C: every packet its client reports arrived is
 * looked up in the transport's SentPackets ring (what was sent when, and how big), added to the window of acked
 * bytes, and grouped into 5 ms bursts whose delay change feeds the trendline overuse detector.
 *
 * This is the per-packet part of bwe.SendSideBwe: a client reports every packet it is forwarded, so in Python it
 * cost more server CPU than forwarding the packet. The Python classes bwe.ArrivalDelay and bwe.Trendline are the
 * reference; tests/test_bwe_compiled.py feeds both the same feedback and compares every field (delay_snapshot).
 * What is done once per feedback (the rate and loss control) stays in Python.
 *
 * The state is a caller-owned bytearray of delay_state_size() zero bytes, so a zeroed one is a fresh estimator. */
#include "_twcc.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/* bwe.py's constants, which the comparison test holds the two to */
#define GROUP_US 5000
#define BURST_US 5000
#define WINDOW 20
#define SMOOTHING 0.9
#define THRESHOLD_GAIN 4.0
#define K_UP 0.0087
#define K_DOWN 0.039
#define OVERUSE_TIME_MS 10.0
#define INITIAL_THRESHOLD 12.5
#define ACKED_WINDOW_US 500000u
#define ACKED_MAX 2048 /* bwe.ArrivalDelay.ACKED_MAX */

enum { NORMAL = 0, OVERUSING = 1, UNDERUSING = 2 };

typedef struct {
    uint32_t first_send, send, arrival, size;
} Group;

typedef struct {
    uint32_t arrival, size;
} Acked;

typedef struct {
    int started;  /* 0 in a zeroed state: the defaults below are set on first use */
    int has_group, has_previous;
    Group group, previous;
    /* acked window, oldest first from acked_head */
    uint32_t acked_head, acked_count;
    uint64_t acked_bytes;
    Acked acked[ACKED_MAX];
    /* trendline */
    double threshold, accumulated, smoothed, first_arrival, over_ms, previous_trend, last_update_ms;
    int has_first_arrival, has_last_update, deltas, over_count, state;
    double points_x[WINDOW], points_y[WINDOW];
    int points_head, points_count;
} DelayState;

Py_ssize_t delay_state_size(void) { return (Py_ssize_t)sizeof(DelayState); }

static void start(DelayState *s) {
    if (!s->started) {
        s->started = 1;
        s->threshold = INITIAL_THRESHOLD;
        s->over_ms = -1.0;
    }
}

/* --- acked window ------------------------------------------------------------------------------------------ */

static void ack(DelayState *s, uint32_t arrival, uint32_t size) {
    if (s->acked_count == ACKED_MAX) {
        s->acked_bytes -= s->acked[s->acked_head].size;
        s->acked_head = (s->acked_head + 1) % ACKED_MAX;
        s->acked_count--;
    }
    s->acked[(s->acked_head + s->acked_count) % ACKED_MAX] = (Acked){arrival, size};
    s->acked_count++;
    s->acked_bytes += size;
    while (s->acked_count && (uint32_t)(arrival - s->acked[s->acked_head].arrival) > ACKED_WINDOW_US) {
        s->acked_bytes -= s->acked[s->acked_head].size;
        s->acked_head = (s->acked_head + 1) % ACKED_MAX;
        s->acked_count--;
    }
}

static double acked_bps(const DelayState *s) {
    if (s->acked_count < 2)
        return 0.0;
    uint32_t newest = s->acked[(s->acked_head + s->acked_count - 1) % ACKED_MAX].arrival;
    uint32_t span = newest - s->acked[s->acked_head].arrival;
    return (double)(s->acked_bytes * 8 * 1000000) / (double)(span > 100000 ? span : 100000);
}

/* --- trendline --------------------------------------------------------------------------------------------- */

static double slope(const DelayState *s) {
    double sum_x = 0.0, sum_y = 0.0, num = 0.0, den = 0.0;
    for (int i = 0; i < WINDOW; i++) {
        int k = (s->points_head + i) % WINDOW;
        sum_x += s->points_x[k];
        sum_y += s->points_y[k];
    }
    double mean_x = sum_x / WINDOW, mean_y = sum_y / WINDOW;
    for (int i = 0; i < WINDOW; i++) {
        int k = (s->points_head + i) % WINDOW;
        num += (s->points_x[k] - mean_x) * (s->points_y[k] - mean_y);
    }
    for (int i = 0; i < WINDOW; i++) {
        int k = (s->points_head + i) % WINDOW;
        den += (s->points_x[k] - mean_x) * (s->points_x[k] - mean_x);
    }
    return den != 0.0 ? num / den : 0.0;
}

static void adapt_threshold(DelayState *s, double modified, double now_ms) {
    if (!s->has_last_update) {
        s->has_last_update = 1;
        s->last_update_ms = now_ms;
    }
    double size = fabs(modified);
    if (size > s->threshold + 15) {
        s->last_update_ms = now_ms;
        return;
    }
    double k = size < s->threshold ? K_DOWN : K_UP;
    double elapsed = now_ms - s->last_update_ms;
    if (elapsed > 100.0)
        elapsed = 100.0;
    double threshold = s->threshold + k * (size - s->threshold) * elapsed;
    s->threshold = threshold < 6.0 ? 6.0 : threshold > 600.0 ? 600.0 : threshold;
    s->last_update_ms = now_ms;
}

static void detect(DelayState *s, double trend, double send_delta_ms, double now_ms) {
    double modified = (double)(s->deltas < 60 ? s->deltas : 60) * trend * THRESHOLD_GAIN;
    if (modified > s->threshold) {
        s->over_ms = s->over_ms < 0 ? send_delta_ms / 2 : s->over_ms + send_delta_ms;
        s->over_count++;
        if (s->over_ms > OVERUSE_TIME_MS && s->over_count > 1 && trend >= s->previous_trend) {
            s->over_ms = 0.0;
            s->over_count = 0;
            s->state = OVERUSING;
        }
    } else if (modified < -s->threshold) {
        s->over_ms = -1.0;
        s->over_count = 0;
        s->state = UNDERUSING;
    } else {
        s->over_ms = -1.0;
        s->over_count = 0;
        s->state = NORMAL;
    }
    s->previous_trend = trend;
    adapt_threshold(s, modified, now_ms);
}

static void trendline_update(DelayState *s, double delay_ms, double send_delta_ms, double arrival_ms) {
    s->deltas = s->deltas + 1 < 1000 ? s->deltas + 1 : 1000;
    if (!s->has_first_arrival) {
        s->has_first_arrival = 1;
        s->first_arrival = arrival_ms;
    }
    s->accumulated += delay_ms;
    s->smoothed = SMOOTHING * s->smoothed + (1 - SMOOTHING) * s->accumulated;
    int at = (s->points_head + s->points_count) % WINDOW;
    if (s->points_count == WINDOW)
        s->points_head = (s->points_head + 1) % WINDOW;
    else
        s->points_count++;
    s->points_x[at] = arrival_ms - s->first_arrival;
    s->points_y[at] = s->smoothed;
    double trend = s->points_count == WINDOW ? slope(s) : s->previous_trend;
    detect(s, trend, send_delta_ms, arrival_ms);
}

/* --- packet groups ----------------------------------------------------------------------------------------- */

static void group_packet(DelayState *s, uint32_t send, uint32_t arrival, uint32_t size) {
    if (!s->has_group) {
        s->has_group = 1;
        s->group = (Group){send, send, arrival, size};
        return;
    }
    Group *g = &s->group;
    uint32_t since_first = send - g->first_send;
    if (since_first >= 0x80000000u)
        return; /* sent before this group began: reordered */
    int64_t arrival_gap = (int64_t)(uint32_t)(arrival - g->arrival);
    if (arrival_gap >= 0x80000000LL)
        arrival_gap -= 0x100000000LL;
    int in_burst = arrival_gap < BURST_US && arrival_gap - (int64_t)(uint32_t)(send - g->send) < 0;
    if (since_first <= GROUP_US || in_burst) {
        g->send = send;
        g->size += size;
        if (arrival_gap > 0)
            g->arrival = arrival;
        return;
    }
    Group done = *g;
    int had_previous = s->has_previous;
    Group previous = s->previous;
    s->previous = done;
    s->has_previous = 1;
    *g = (Group){send, send, arrival, size};
    if (!had_previous)
        return;
    uint32_t send_delta = done.send - previous.send;
    if (send_delta >= 0x80000000u)
        return;
    int64_t arrival_delta = (int64_t)(uint32_t)(done.arrival - previous.arrival);
    if (arrival_delta >= 0x80000000LL)
        arrival_delta -= 0x100000000LL;
    trendline_update(s, (double)(arrival_delta - (int64_t)send_delta) / 1000, (double)send_delta / 1000,
                     (double)done.arrival / 1000);
}

/* --- feedback ---------------------------------------------------------------------------------------------- */

/* twcc_feed(body, ring, state) -> (received, lost, acked_bps, trend_state) | None: a transport-wide feedback
 * packet's body (after its 4-byte RTCP header) read as twcc.parse reads it; each packet it reports arrived that the
 * SentPackets `ring` still knows is acked and grouped into `state` as bwe.ArrivalDelay.feed does (both times mod
 * 2^32). Returns how many were matched, how many it reports lost, the acked rate (bits/s) and the overuse state
 * (0 normal, 1 overusing, 2 underusing); None when malformed, with what came before the fault already fed. */
PyObject *twcc_feed(PyObject *module, PyObject *args) {
    Py_buffer body, ring, state;
    if (!PyArg_ParseTuple(args, "y*y*w*", &body, &ring, &state))
        return NULL;
    PyObject *result = NULL;
    uint8_t *symbols = NULL;
    const uint8_t *b = (const uint8_t *)body.buf;
    Py_ssize_t n = body.len;
    if (ring.len < 4 + TWCC_RING * TWCC_ENTRY || state.len != (Py_ssize_t)sizeof(DelayState)) {
        PyErr_SetString(PyExc_ValueError, "twcc_feed: a SentPackets ring and a delay state of delay_state_size()");
        goto done;
    }
    if (n < 16)
        goto malformed;
    DelayState *s = (DelayState *)state.buf;
    start(s);
    unsigned int base = ((unsigned int)b[8] << 8) | b[9];
    unsigned int count = ((unsigned int)b[10] << 8) | b[11];
    int32_t reference = (int32_t)(((uint32_t)b[12] << 16) | ((uint32_t)b[13] << 8) | b[14]);
    if (reference & 0x800000)
        reference -= 0x1000000;
    symbols = PyMem_Malloc(count ? count : 1);
    if (symbols == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t pos = 16;
    unsigned int seen = 0;
    while (seen < count) {
        if (pos + 2 > n)
            goto malformed;
        unsigned int word = ((unsigned int)b[pos] << 8) | b[pos + 1];
        pos += 2;
        if (!(word & 0x8000)) {
            unsigned int run = word & 0x1FFF;
            if (run > count - seen)
                run = count - seen;
            memset(symbols + seen, (word >> 13) & 3, run);
            seen += run;
        } else if (!(word & 0x4000)) {
            for (int k = 0; k < 14 && seen < count; k++)
                symbols[seen++] = (word >> (13 - k)) & 1;
        } else {
            for (int k = 0; k < 7 && seen < count; k++)
                symbols[seen++] = (word >> (12 - 2 * k)) & 3;
        }
    }
    /* the deltas are checked before anything is fed, as twcc.parse refuses the whole packet */
    Py_ssize_t deltas_at = pos;
    for (unsigned int i = 0; i < count; i++) {
        if (symbols[i] == 1 || symbols[i] == 2) {
            pos += symbols[i];
            if (pos > n)
                goto malformed;
        }
    }
    pos = deltas_at;
    const uint8_t *entries = (const uint8_t *)ring.buf + 4;
    int64_t at = (int64_t)reference * 64000;
    unsigned long lost = 0, received = 0;
    for (unsigned int i = 0; i < count; i++) {
        unsigned int symbol = symbols[i];
        if (symbol == 0 || symbol == 3) {
            lost++;
            continue;
        }
        if (symbol == 1) {
            at += (int64_t)b[pos] * 250;
            pos += 1;
        } else {
            at += (int64_t)(int16_t)(((unsigned int)b[pos] << 8) | b[pos + 1]) * 250;
            pos += 2;
        }
        unsigned int seq = (base + i) & 0xFFFF;
        const uint8_t *entry = entries + (seq % TWCC_RING) * TWCC_ENTRY;
        uint32_t sent_at;
        uint16_t size, stored;
        memcpy(&sent_at, entry, 4);
        memcpy(&size, entry + 4, 2);
        memcpy(&stored, entry + 6, 2);
        if (stored != seq || !size)
            continue;
        ack(s, (uint32_t)at, size);
        group_packet(s, sent_at, (uint32_t)at, size);
        received++;
    }
    result = Py_BuildValue("(kkdi)", received, lost, acked_bps(s), s->state);
    goto done;
malformed:
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(symbols);
    PyBuffer_Release(&body);
    PyBuffer_Release(&ring);
    PyBuffer_Release(&state);
    return result;
}

/* delay_snapshot(state) -> dict: every field of `state` under the names bwe.ArrivalDelay.snapshot() uses, so the
 * comparison test can hold C and Python to the same numbers. */
PyObject *delay_snapshot(PyObject *module, PyObject *args) {
    Py_buffer state;
    if (!PyArg_ParseTuple(args, "y*", &state))
        return NULL;
    PyObject *result = NULL;
    if (state.len != (Py_ssize_t)sizeof(DelayState)) {
        PyErr_SetString(PyExc_ValueError, "delay_snapshot: a state of delay_state_size()");
        goto done;
    }
    DelayState fresh;
    const DelayState *s = (const DelayState *)state.buf;
    if (!s->started) {
        memset(&fresh, 0, sizeof(fresh));
        start(&fresh);
        s = &fresh;
    }
    PyObject *points = PyList_New(s->points_count);
    if (points == NULL)
        goto done;
    for (int i = 0; i < s->points_count; i++) {
        int k = (s->points_head + i) % WINDOW;
        PyObject *point = Py_BuildValue("(dd)", s->points_x[k], s->points_y[k]);
        if (point == NULL) {
            Py_DECREF(points);
            goto done;
        }
        PyList_SET_ITEM(points, i, point);
    }
    PyObject *group = s->has_group ? Py_BuildValue("(kkkk)", (unsigned long)s->group.first_send,
                                                   (unsigned long)s->group.send, (unsigned long)s->group.arrival,
                                                   (unsigned long)s->group.size)
                                   : Py_NewRef(Py_None);
    PyObject *previous = s->has_previous ? Py_BuildValue("(kkkk)", (unsigned long)s->previous.first_send,
                                                         (unsigned long)s->previous.send,
                                                         (unsigned long)s->previous.arrival,
                                                         (unsigned long)s->previous.size)
                                         : Py_NewRef(Py_None);
    PyObject *first_arrival = s->has_first_arrival ? PyFloat_FromDouble(s->first_arrival) : Py_NewRef(Py_None);
    PyObject *last_update = s->has_last_update ? PyFloat_FromDouble(s->last_update_ms) : Py_NewRef(Py_None);
    if (group && previous && first_arrival && last_update)
        result = Py_BuildValue(
            "{s:O,s:O,s:k,s:K,s:d,s:d,s:d,s:d,s:O,s:d,s:i,s:d,s:i,s:O,s:O,s:i}", "group", group, "previous",
            previous, "acked", (unsigned long)s->acked_count, "acked_bytes", (unsigned long long)s->acked_bytes,
            "acked_bps", acked_bps(s), "threshold", s->threshold, "accumulated", s->accumulated, "smoothed",
            s->smoothed, "first_arrival", first_arrival, "previous_trend", s->previous_trend, "deltas", s->deltas,
            "over_ms", s->over_ms, "over_count", s->over_count, "last_update_ms", last_update, "points", points,
            "state", s->state);
    Py_XDECREF(group);
    Py_XDECREF(previous);
    Py_XDECREF(first_arrival);
    Py_XDECREF(last_update);
    Py_DECREF(points);
done:
    PyBuffer_Release(&state);
    return result;
}
