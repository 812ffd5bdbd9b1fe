/* The compiled forwarding floor: SRTP protect (AES_CM_128_HMAC_SHA1_80, AEAD_AES_128_GCM, AEAD_AES_256_GCM),
 * RTP header rewrite per subscriber, and batched sends (sendmmsg) of everything one event-loop wake-up produced.
 *
 * The pure-Python path (pylibsrtp sessions, services/media/downtrack.py) is the reference: for the same master key,
 * salt and packets, `SrtpContext.protect`/`unprotect` return exactly what a pylibsrtp outbound session with window 1024 and
 * allow_repeat_tx returns, rollover counter included (tests/test_fastpath.py compares them byte for byte).
 *
 * Objects:
 *   SrtpContext(key_and_salt, profile)  per-SSRC SRTP state of one direction (48-bit index, 1024-packet window):
 *                                       `protect` like a pylibsrtp outbound session, `unprotect` like an inbound
 *   Batch(capacity, schedule, gso)      protected datagrams waiting for one sendmmsg per socket; `schedule()` is
 *                                       called when the batch becomes non-empty (the owner flushes it soon);
 *                                       with `gso`, a destination's run of equal-sized datagrams is one message
 *   Output(sender, batch, fd, host, port)   one destination: `send(rtp)` protects and queues
 *   Output.forward(packet, off, seq, ts, marker, pt, ssrc)  rewrite the 12-byte header of `packet` and send
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "_twcc.h"

#define PROFILE_AES128_CM_SHA1_80 1
#define PROFILE_AEAD_AES_128_GCM 7
#define PROFILE_AEAD_AES_256_GCM 8

#define WINDOW_BITS 1024
#define WINDOW_WORDS (WINDOW_BITS / 64)
#define SLOT_SIZE 2048
#define MAX_RTP (SLOT_SIZE - 16)
#define HORIZON 0x4000  /* a late packet further behind the newest is not forwarded (downtrack.HORIZON) */

static PyObject *FastpathError;

/* --- per-SSRC index and replay window (libsrtp's rdbx semantics) ------------------------------------------ */

typedef struct {
    uint32_t ssrc;
    int used;
    uint64_t index;                 /* 48-bit packet index of the newest packet */
    uint64_t seen[WINDOW_WORDS];    /* bit k: the packet k behind the newest one was protected */
} Stream;

static int64_t estimate_index(const Stream *s, uint16_t seq, uint64_t *guess) {
    if (s->index > 0x8000) {
        uint32_t local_roc = (uint32_t)(s->index >> 16);
        uint16_t local_seq = (uint16_t)s->index;
        uint32_t roc;
        int64_t diff;
        if (local_seq < 0x8000) {
            if ((int)seq - (int)local_seq > 0x8000) {
                roc = local_roc - 1;
                diff = (int64_t)seq - local_seq - 0x10000;
            } else {
                roc = local_roc;
                diff = (int64_t)seq - local_seq;
            }
        } else {
            if ((int)local_seq - 0x8000 > (int)seq) {
                roc = local_roc + 1;
                diff = (int64_t)seq - local_seq + 0x10000;
            } else {
                roc = local_roc;
                diff = (int64_t)seq - local_seq;
            }
        }
        *guess = (((uint64_t)roc) << 16) | seq;
        return diff;
    }
    *guess = seq;
    return (int64_t)seq - (int64_t)s->index;
}

static void window_advance(Stream *s, int64_t delta) {
    if (delta >= WINDOW_BITS) {
        memset(s->seen, 0, sizeof(s->seen));
    } else {
        int words = (int)(delta >> 6), bits = (int)(delta & 63);
        for (int i = WINDOW_WORDS - 1; i >= 0; i--) {
            uint64_t v = 0;
            if (i - words >= 0) {
                v = s->seen[i - words] << bits;
                if (bits && i - words - 1 >= 0)
                    v |= s->seen[i - words - 1] >> (64 - bits);
            }
            s->seen[i] = v;
        }
    }
    s->seen[0] |= 1;
    s->index = (s->index + (uint16_t)delta) & 0xFFFFFFFFFFFFULL;
}

/* --- SrtpSender ------------------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    int profile;
    int tag_len;
    uint8_t salt[14];
    EVP_CIPHER_CTX *cipher, *decipher;  /* decipher: GCM's decrypt direction */
    SHA_CTX hmac_inner, hmac_outer;
    Stream *streams;
    size_t nstreams, capacity;  /* open addressing, capacity a power of two */
    uint32_t last_ssrc;
    Stream *last;
} SrtpSender;

/* RFC 3711 4.3.1 key derivation (AES-CM PRF, key derivation rate 0), as libsrtp applies it to every profile:
 * the label is XORed into byte 7 of the (zero-padded) 14-byte salt. */
static int derive(const uint8_t *key, int key_len, const uint8_t *salt, int salt_len, uint8_t label, uint8_t *out,
                  int out_len) {
    uint8_t iv[16] = {0}, zeros[64] = {0};
    int len = 0;
    memcpy(iv, salt, salt_len);
    iv[7] ^= label;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx)
        return -1;
    int ok = EVP_EncryptInit_ex(ctx, key_len == 32 ? EVP_aes_256_ctr() : EVP_aes_128_ctr(), NULL, key, iv) &&
             EVP_EncryptUpdate(ctx, out, &len, zeros, out_len);
    EVP_CIPHER_CTX_free(ctx);
    return ok ? 0 : -1;
}

static void hmac_prepare(SrtpSender *self, const uint8_t *auth_key, int key_len) {
    uint8_t pad[64];
    memset(pad, 0x36, sizeof(pad));
    for (int i = 0; i < key_len; i++)
        pad[i] ^= auth_key[i];
    SHA1_Init(&self->hmac_inner);
    SHA1_Update(&self->hmac_inner, pad, 64);
    memset(pad, 0x5c, sizeof(pad));
    for (int i = 0; i < key_len; i++)
        pad[i] ^= auth_key[i];
    SHA1_Init(&self->hmac_outer);
    SHA1_Update(&self->hmac_outer, pad, 64);
}

static int SrtpSender_init(SrtpSender *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"key", "profile", NULL};
    Py_buffer key;
    int profile = PROFILE_AES128_CM_SHA1_80;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|i", kwlist, &key, &profile))
        return -1;
    int key_len, salt_len;
    const EVP_CIPHER *cipher;
    if (profile == PROFILE_AES128_CM_SHA1_80) {
        key_len = 16, salt_len = 14, cipher = EVP_aes_128_ctr(), self->tag_len = 10;
    } else if (profile == PROFILE_AEAD_AES_128_GCM) {
        key_len = 16, salt_len = 12, cipher = EVP_aes_128_gcm(), self->tag_len = 16;
    } else if (profile == PROFILE_AEAD_AES_256_GCM) {
        key_len = 32, salt_len = 12, cipher = EVP_aes_256_gcm(), self->tag_len = 16;
    } else {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "unsupported SRTP profile %d", profile);
        return -1;
    }
    if (key.len != key_len + salt_len) {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "key and salt must be %d bytes", key_len + salt_len);
        return -1;
    }
    const uint8_t *master = key.buf, *master_salt = (const uint8_t *)key.buf + key_len;
    uint8_t enc_key[32], auth_key[20];
    memset(self->salt, 0, sizeof(self->salt));
    int failed = derive(master, key_len, master_salt, salt_len, 0x00, enc_key, key_len) ||
                 derive(master, key_len, master_salt, salt_len, 0x02, self->salt, salt_len);
    if (!failed && profile == PROFILE_AES128_CM_SHA1_80) {
        failed = derive(master, key_len, master_salt, salt_len, 0x01, auth_key, 20);
        if (!failed)
            hmac_prepare(self, auth_key, 20);
    }
    PyBuffer_Release(&key);
    if (self->cipher == NULL)
        self->cipher = EVP_CIPHER_CTX_new();
    if (failed || self->cipher == NULL || !EVP_EncryptInit_ex(self->cipher, cipher, NULL, enc_key, NULL)) {
        PyErr_SetString(FastpathError, "SRTP key setup failed");
        return -1;
    }
    if (profile != PROFILE_AES128_CM_SHA1_80) {
        EVP_CIPHER_CTX_ctrl(self->cipher, EVP_CTRL_GCM_SET_IVLEN, 12, NULL);
        if (self->decipher == NULL)
            self->decipher = EVP_CIPHER_CTX_new();
        if (self->decipher == NULL || !EVP_DecryptInit_ex(self->decipher, cipher, NULL, enc_key, NULL)) {
            PyErr_SetString(FastpathError, "SRTP key setup failed");
            return -1;
        }
        EVP_CIPHER_CTX_ctrl(self->decipher, EVP_CTRL_GCM_SET_IVLEN, 12, NULL);
    }
    self->profile = profile;
    self->capacity = 16;
    self->nstreams = 0;
    PyMem_Free(self->streams);
    self->streams = PyMem_Calloc(self->capacity, sizeof(Stream));
    self->last = NULL;
    if (self->streams == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void SrtpSender_dealloc(SrtpSender *self) {
    if (self->cipher)
        EVP_CIPHER_CTX_free(self->cipher);
    if (self->decipher)
        EVP_CIPHER_CTX_free(self->decipher);
    PyMem_Free(self->streams);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Stream *stream_of(SrtpSender *self, uint32_t ssrc) {
    if (self->last != NULL && self->last_ssrc == ssrc)
        return self->last;
    if ((self->nstreams + 1) * 2 > self->capacity) {
        size_t capacity = self->capacity * 2;
        Stream *grown = PyMem_Calloc(capacity, sizeof(Stream));
        if (grown == NULL)
            return NULL;
        for (size_t i = 0; i < self->capacity; i++) {
            Stream *old = &self->streams[i];
            if (!old->used)
                continue;
            size_t j = (old->ssrc * 2654435761u) & (capacity - 1);
            while (grown[j].used)
                j = (j + 1) & (capacity - 1);
            grown[j] = *old;
        }
        PyMem_Free(self->streams);
        self->streams = grown;
        self->capacity = capacity;
    }
    size_t j = (ssrc * 2654435761u) & (self->capacity - 1);
    while (self->streams[j].used && self->streams[j].ssrc != ssrc)
        j = (j + 1) & (self->capacity - 1);
    Stream *s = &self->streams[j];
    if (!s->used) {
        memset(s, 0, sizeof(*s));
        s->used = 1;
        s->ssrc = ssrc;
        self->nstreams++;
    }
    self->last_ssrc = ssrc;
    self->last = s;
    return s;
}

/* Protect the RTP packet in `buf` (len bytes, room for the tag after it) in place; the protected length or -1. */
static Py_ssize_t protect_into(SrtpSender *self, uint8_t *buf, Py_ssize_t len) {
    if (len < 12 || (buf[0] >> 6) != 2) {
        PyErr_SetString(FastpathError, "not an RTP packet");
        return -1;
    }
    Py_ssize_t header = 12 + 4 * (buf[0] & 0x0F);
    if ((buf[0] & 0x10) && header + 4 <= len)
        header += 4 + 4 * (((Py_ssize_t)buf[header + 2] << 8) | buf[header + 3]);
    if (header > len) {
        PyErr_SetString(FastpathError, "RTP header longer than the packet");
        return -1;
    }
    uint16_t seq = (uint16_t)((buf[2] << 8) | buf[3]);
    uint32_t ssrc = ((uint32_t)buf[8] << 24) | ((uint32_t)buf[9] << 16) | ((uint32_t)buf[10] << 8) | buf[11];
    Stream *s = stream_of(self, ssrc);
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    uint64_t index;
    int64_t delta = estimate_index(s, seq, &index);
    if (delta > 0) {
        window_advance(s, delta);
    } else if (WINDOW_BITS - 1 + delta < 0) {
        PyErr_SetString(FastpathError, "SRTP protect failed: replay_old");
        return -1;
    } else {
        s->seen[(-delta) >> 6] |= 1ULL << ((-delta) & 63);  /* a repeat is allowed (allow_repeat_tx) */
    }
    uint32_t roc = (uint32_t)(index >> 16);
    int out = 0;
    if (self->profile == PROFILE_AES128_CM_SHA1_80) {
        uint8_t iv[16];
        memcpy(iv, self->salt, 14);
        iv[14] = iv[15] = 0;
        iv[4] ^= buf[8], iv[5] ^= buf[9], iv[6] ^= buf[10], iv[7] ^= buf[11];
        for (int i = 0; i < 6; i++)
            iv[8 + i] ^= (uint8_t)(index >> (40 - 8 * i));
        if (!EVP_EncryptInit_ex(self->cipher, NULL, NULL, NULL, iv) ||
            !EVP_EncryptUpdate(self->cipher, buf + header, &out, buf + header, (int)(len - header))) {
            PyErr_SetString(FastpathError, "AES-CM failed");
            return -1;
        }
        uint8_t roc_be[4] = {roc >> 24, roc >> 16, roc >> 8, roc}, digest[20];
        SHA_CTX ctx = self->hmac_inner;
        SHA1_Update(&ctx, buf, len);
        SHA1_Update(&ctx, roc_be, 4);
        SHA1_Final(digest, &ctx);
        ctx = self->hmac_outer;
        SHA1_Update(&ctx, digest, 20);
        SHA1_Final(digest, &ctx);
        memcpy(buf + len, digest, 10);
        return len + 10;
    }
    uint8_t iv[12] = {0, 0, buf[8], buf[9], buf[10], buf[11], roc >> 24, roc >> 16, roc >> 8, roc, buf[2], buf[3]};
    for (int i = 0; i < 12; i++)
        iv[i] ^= self->salt[i];
    int final = 0;
    if (!EVP_EncryptInit_ex(self->cipher, NULL, NULL, NULL, iv) ||
        !EVP_EncryptUpdate(self->cipher, NULL, &out, buf, (int)header) ||
        !EVP_EncryptUpdate(self->cipher, buf + header, &out, buf + header, (int)(len - header)) ||
        !EVP_EncryptFinal_ex(self->cipher, buf + header + out, &final) ||
        !EVP_CIPHER_CTX_ctrl(self->cipher, EVP_CTRL_GCM_GET_TAG, 16, buf + len)) {
        PyErr_SetString(FastpathError, "AES-GCM failed");
        return -1;
    }
    return len + 16;
}

static PyObject *SrtpSender_protect(SrtpSender *self, PyObject *arg) {
    Py_buffer packet;
    if (PyObject_GetBuffer(arg, &packet, PyBUF_SIMPLE) < 0)
        return NULL;
    if (packet.len > MAX_RTP) {
        PyBuffer_Release(&packet);
        PyErr_SetString(FastpathError, "RTP packet too large");
        return NULL;
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, packet.len + self->tag_len);
    if (result == NULL) {
        PyBuffer_Release(&packet);
        return NULL;
    }
    uint8_t *buf = (uint8_t *)PyBytes_AS_STRING(result);
    memcpy(buf, packet.buf, packet.len);
    Py_ssize_t n = protect_into(self, buf, packet.len);
    PyBuffer_Release(&packet);
    if (n < 0) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

/* Unprotect the SRTP packet in `buf` in place (libsrtp's inbound rules: window 1024, repeats refused, the
 * index committed only once the tag verified); the plain length or -1. */
static Py_ssize_t unprotect_into(SrtpSender *self, uint8_t *buf, Py_ssize_t len) {
    if (len < 12 + self->tag_len || (buf[0] >> 6) != 2) {
        PyErr_SetString(FastpathError, "SRTP unprotect failed: not an SRTP packet");
        return -1;
    }
    Py_ssize_t body = len - self->tag_len;
    Py_ssize_t header = 12 + 4 * (buf[0] & 0x0F);
    if ((buf[0] & 0x10) && header + 4 <= body)
        header += 4 + 4 * (((Py_ssize_t)buf[header + 2] << 8) | buf[header + 3]);
    if (header > body) {
        PyErr_SetString(FastpathError, "SRTP unprotect failed: header longer than the packet");
        return -1;
    }
    uint16_t seq = (uint16_t)((buf[2] << 8) | buf[3]);
    uint32_t ssrc = ((uint32_t)buf[8] << 24) | ((uint32_t)buf[9] << 16) | ((uint32_t)buf[10] << 8) | buf[11];
    Stream *s = stream_of(self, ssrc);
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    uint64_t index;
    int64_t delta = estimate_index(s, seq, &index);
    if (delta <= 0) {
        if (WINDOW_BITS - 1 + delta < 0) {
            PyErr_SetString(FastpathError, "SRTP unprotect failed: replay_old");
            return -1;
        }
        if ((s->seen[(-delta) >> 6] >> ((-delta) & 63)) & 1) {
            PyErr_SetString(FastpathError, "SRTP unprotect failed: replay_fail");
            return -1;
        }
    }
    uint32_t roc = (uint32_t)(index >> 16);
    int out = 0;
    if (self->profile == PROFILE_AES128_CM_SHA1_80) {
        uint8_t roc_be[4] = {roc >> 24, roc >> 16, roc >> 8, roc}, digest[20];
        SHA_CTX ctx = self->hmac_inner;
        SHA1_Update(&ctx, buf, body);
        SHA1_Update(&ctx, roc_be, 4);
        SHA1_Final(digest, &ctx);
        ctx = self->hmac_outer;
        SHA1_Update(&ctx, digest, 20);
        SHA1_Final(digest, &ctx);
        if (CRYPTO_memcmp(digest, buf + body, 10) != 0) {
            PyErr_SetString(FastpathError, "SRTP unprotect failed: auth_fail");
            return -1;
        }
        uint8_t iv[16];
        memcpy(iv, self->salt, 14);
        iv[14] = iv[15] = 0;
        iv[4] ^= buf[8], iv[5] ^= buf[9], iv[6] ^= buf[10], iv[7] ^= buf[11];
        for (int i = 0; i < 6; i++)
            iv[8 + i] ^= (uint8_t)(index >> (40 - 8 * i));
        if (!EVP_EncryptInit_ex(self->cipher, NULL, NULL, NULL, iv) ||
            !EVP_EncryptUpdate(self->cipher, buf + header, &out, buf + header, (int)(body - header))) {
            PyErr_SetString(FastpathError, "AES-CM failed");
            return -1;
        }
    } else {
        uint8_t iv[12] = {0, 0, buf[8], buf[9], buf[10], buf[11], roc >> 24, roc >> 16, roc >> 8, roc, buf[2], buf[3]};
        for (int i = 0; i < 12; i++)
            iv[i] ^= self->salt[i];
        int final = 0;
        if (!EVP_DecryptInit_ex(self->decipher, NULL, NULL, NULL, iv) ||
            !EVP_DecryptUpdate(self->decipher, NULL, &out, buf, (int)header) ||
            !EVP_DecryptUpdate(self->decipher, buf + header, &out, buf + header, (int)(body - header)) ||
            !EVP_CIPHER_CTX_ctrl(self->decipher, EVP_CTRL_GCM_SET_TAG, 16, buf + body) ||
            EVP_DecryptFinal_ex(self->decipher, buf + header + out, &final) <= 0) {
            PyErr_SetString(FastpathError, "SRTP unprotect failed: auth_fail");
            return -1;
        }
    }
    if (delta > 0)
        window_advance(s, delta);
    else
        s->seen[(-delta) >> 6] |= 1ULL << ((-delta) & 63);
    return body;
}

static PyObject *SrtpSender_unprotect(SrtpSender *self, PyObject *arg) {
    Py_buffer packet;
    if (PyObject_GetBuffer(arg, &packet, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *result = PyBytes_FromStringAndSize(packet.buf, packet.len);
    PyBuffer_Release(&packet);
    if (result == NULL)
        return NULL;
    Py_ssize_t n = unprotect_into(self, (uint8_t *)PyBytes_AS_STRING(result), PyBytes_GET_SIZE(result));
    if (n < 0) {
        Py_DECREF(result);
        return NULL;
    }
    Py_SET_SIZE(result, n);  /* shrink in place: the bytes object is new and ours alone */
    PyBytes_AS_STRING(result)[n] = 0;
    return result;
}

static PyMethodDef SrtpSender_methods[] = {
    {"protect", (PyCFunction)SrtpSender_protect, METH_O, "protect(rtp) -> srtp, like a pylibsrtp outbound Session"},
    {"unprotect", (PyCFunction)SrtpSender_unprotect, METH_O,
     "unprotect(srtp) -> rtp, like a pylibsrtp inbound Session (use one context per direction)"},
    {NULL},
};

static PyTypeObject SrtpSenderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "braid.services.media.fastpath._fastpath.SrtpContext",
    .tp_basicsize = sizeof(SrtpSender),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SRTP for any SSRC of one direction of a DTLS-SRTP association",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SrtpSender_init,
    .tp_dealloc = (destructor)SrtpSender_dealloc,
    .tp_methods = SrtpSender_methods,
};

/* --- Batch ----------------------------------------------------------------------------------------------- */

typedef struct {
    int fd;
    int order;
    uint16_t len;
    struct sockaddr_in addr;
} Entry;

#define GSO_MAX_SEGMENTS 64
#define GSO_MAX_BYTES 65000
#define GSO_CONTROL CMSG_SPACE(sizeof(uint16_t))
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103 /* older headers: the kernel says whether it has it, and the batch stops asking */
#endif

typedef struct {
    int fd, segments;
} Message;

typedef struct {
    PyObject_HEAD
    Py_ssize_t capacity, count;
    uint8_t *arena;
    Entry *entries;
    struct mmsghdr *msgs;
    struct iovec *iovs;
    uint8_t *controls;  /* a UDP_SEGMENT control message per message that carries several datagrams */
    Message *messages;  /* per message: its socket and how many datagrams it carries */
    PyObject *schedule;
    int gso;            /* send a destination's run of equal-sized datagrams as one message (UDP GSO) */
    unsigned long long sent, dropped, flushes, syscalls, gso_messages;
} Batch;

static int Batch_init(Batch *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"capacity", "schedule", "gso", NULL};
    Py_ssize_t capacity = 1024;
    PyObject *schedule = Py_None;
    int gso = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nOp", kwlist, &capacity, &schedule, &gso))
        return -1;
    if (capacity < 1 || capacity > 65536) {
        PyErr_SetString(PyExc_ValueError, "capacity must be in 1..65536");
        return -1;
    }
    if (self->arena != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Batch already initialised");
        return -1;
    }
    self->capacity = capacity;
    self->gso = gso;
    self->arena = PyMem_Malloc(capacity * SLOT_SIZE);
    self->entries = PyMem_Calloc(capacity, sizeof(Entry));
    self->msgs = PyMem_Calloc(capacity, sizeof(struct mmsghdr));
    self->iovs = PyMem_Calloc(capacity, sizeof(struct iovec));
    self->controls = PyMem_Calloc(capacity, GSO_CONTROL);
    self->messages = PyMem_Calloc(capacity, sizeof(Message));
    if (!self->arena || !self->entries || !self->msgs || !self->iovs || !self->controls || !self->messages) {
        PyErr_NoMemory();
        return -1;
    }
    Py_INCREF(schedule);
    Py_XSETREF(self->schedule, schedule);
    return 0;
}

static void Batch_dealloc(Batch *self) {
    PyMem_Free(self->arena);
    PyMem_Free(self->entries);
    PyMem_Free(self->msgs);
    PyMem_Free(self->iovs);
    PyMem_Free(self->controls);
    PyMem_Free(self->messages);
    Py_XDECREF(self->schedule);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* By socket, then destination, then the order they were queued in: each destination's datagrams leave in order. */
static int entry_order(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    if (x->fd != y->fd)
        return x->fd < y->fd ? -1 : 1;
    if (x->addr.sin_addr.s_addr != y->addr.sin_addr.s_addr)
        return x->addr.sin_addr.s_addr < y->addr.sin_addr.s_addr ? -1 : 1;
    if (x->addr.sin_port != y->addr.sin_port)
        return x->addr.sin_port < y->addr.sin_port ? -1 : 1;
    return x->order - y->order;
}

static int same_destination(const Entry *x, const Entry *y) {
    return x->fd == y->fd && x->addr.sin_addr.s_addr == y->addr.sin_addr.s_addr && x->addr.sin_port == y->addr.sin_port;
}

/* Message `m` as its datagrams one by one, after the kernel refused it as one GSO message (a device or path that
 * cannot segment): returns how many the kernel took. */
static int send_segments(Batch *self, int fd, struct msghdr *h, int segments) {
    int taken = 0;
    for (int k = 0; k < segments; k++) {
        struct msghdr one = {.msg_name = h->msg_name, .msg_namelen = h->msg_namelen, .msg_iov = &h->msg_iov[k],
                             .msg_iovlen = 1};
        self->syscalls++;
        if (sendmsg(fd, &one, MSG_DONTWAIT) >= 0)
            taken++;
    }
    return taken;
}

/* Hand every queued datagram to the kernel: one sendmmsg per socket (more only if the kernel takes part), where a
 * destination's consecutive datagrams of one size (the packets of a video frame, padding) travel as one message
 * that the kernel segments (UDP_SEGMENT): most of a send's kernel cost is per message, not per byte. */
static void batch_flush(Batch *self) {
    Py_ssize_t n = self->count;
    if (n == 0)
        return;
    self->flushes++;
    for (Py_ssize_t i = 0; i < n; i++)
        self->entries[i].order = (int)i;
    qsort(self->entries, n, sizeof(Entry), entry_order);
    for (Py_ssize_t i = 0; i < n; i++) {
        self->iovs[i].iov_base = self->arena + (Py_ssize_t)self->entries[i].order * SLOT_SIZE;
        self->iovs[i].iov_len = self->entries[i].len;
    }
    Py_ssize_t m = 0;  /* messages */
    for (Py_ssize_t i = 0; i < n; m++) {
        Entry *first = &self->entries[i];
        Py_ssize_t k = i + 1;
        size_t total = first->len;
        if (self->gso) {
            while (k < n && k - i < GSO_MAX_SEGMENTS && same_destination(&self->entries[k], first) &&
                   self->entries[k].len <= first->len && total + self->entries[k].len <= GSO_MAX_BYTES) {
                total += self->entries[k].len;
                k++;
                if (self->entries[k - 1].len < first->len)
                    break;  /* only the last segment may be shorter */
            }
        }
        struct msghdr *h = &self->msgs[m].msg_hdr;
        h->msg_name = &first->addr;
        h->msg_namelen = sizeof(struct sockaddr_in);
        h->msg_iov = &self->iovs[i];
        h->msg_iovlen = (size_t)(k - i);
        h->msg_flags = 0;
        self->messages[m] = (Message){first->fd, (int)(k - i)};
        if (k - i > 1) {
            uint8_t *control = self->controls + m * GSO_CONTROL;
            memset(control, 0, GSO_CONTROL);
            h->msg_control = control;
            h->msg_controllen = GSO_CONTROL;
            struct cmsghdr *c = CMSG_FIRSTHDR(h);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t size = first->len;
            memcpy(CMSG_DATA(c), &size, sizeof(size));
            self->gso_messages++;
        } else {
            h->msg_control = NULL;
            h->msg_controllen = 0;
        }
        i = k;
    }
    Py_ssize_t start = 0;
    while (start < m) {
        int fd = self->messages[start].fd;
        Py_ssize_t end = start;
        while (end < m && self->messages[end].fd == fd)
            end++;
        Py_ssize_t i = start;
        while (i < end) {
            unsigned int chunk = (unsigned int)(end - i > 1024 ? 1024 : end - i);
            int r = sendmmsg(fd, &self->msgs[i], chunk, MSG_DONTWAIT);
            self->syscalls++;
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EBADF || errno == ENOTSOCK) {
                    for (; i < end; i++)  /* a full or closed socket: the rest of its datagrams are lost */
                        self->dropped += self->messages[i].segments;
                    break;
                }
                if (self->messages[i].segments > 1 &&
                    (errno == EIO || errno == EINVAL || errno == ENOPROTOOPT || errno == EMSGSIZE)) {
                    if (errno != EMSGSIZE)
                        self->gso = 0;  /* the kernel cannot segment: from now on, a message per datagram */
                    /* EMSGSIZE: segments over this path's MTU, which one datagram at a time may still cross */
                    int taken = send_segments(self, fd, &self->msgs[i].msg_hdr, self->messages[i].segments);
                    self->sent += taken;
                    self->dropped += self->messages[i].segments - taken;
                    i++;
                    continue;
                }
                self->dropped += self->messages[i].segments;  /* this destination refused it: skip it */
                i++;
                continue;
            }
            for (int k = 0; k < r; k++)
                self->sent += self->messages[i + k].segments;
            i += r;
        }
        start = end;
    }
    self->count = 0;
}

static PyObject *Batch_flush(Batch *self, PyObject *unused) {
    unsigned long long before = self->sent;
    batch_flush(self);
    return PyLong_FromUnsignedLongLong(self->sent - before);
}

/* A slot for one more datagram, flushing first if the batch is full; schedules a flush when it was empty. */
static Entry *batch_slot(Batch *self, uint8_t **buf) {
    if (self->count == self->capacity)
        batch_flush(self);
    if (self->count == 0 && self->schedule != Py_None) {
        PyObject *r = PyObject_CallNoArgs(self->schedule);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    *buf = self->arena + self->count * SLOT_SIZE;
    return &self->entries[self->count];
}

static PyMemberDef Batch_members[] = {
    {"count", T_PYSSIZET, offsetof(Batch, count), READONLY, "datagrams waiting"},
    {"sent", T_ULONGLONG, offsetof(Batch, sent), READONLY, "datagrams the kernel accepted"},
    {"dropped", T_ULONGLONG, offsetof(Batch, dropped), READONLY, "datagrams a socket refused"},
    {"flushes", T_ULONGLONG, offsetof(Batch, flushes), READONLY, "flushes that sent something"},
    {"syscalls", T_ULONGLONG, offsetof(Batch, syscalls), READONLY, "sendmmsg calls"},
    {"gso_messages", T_ULONGLONG, offsetof(Batch, gso_messages), READONLY,
     "messages that carried several datagrams for the kernel to segment (UDP_SEGMENT)"},
    {"gso", T_INT, offsetof(Batch, gso), 0, "send runs of equal-sized datagrams to one destination as one message"},
    {NULL},
};

static PyMethodDef Batch_methods[] = {
    {"flush", (PyCFunction)Batch_flush, METH_NOARGS, "send everything queued; returns how many were sent"},
    {NULL},
};

static PyTypeObject BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "braid.services.media.fastpath._fastpath.Batch",
    .tp_basicsize = sizeof(Batch),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Datagrams queued during one wake-up, sent with one sendmmsg per socket",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Batch_init,
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_members = Batch_members,
    .tp_methods = Batch_methods,
};

/* --- Output ---------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    SrtpSender *sender;
    Batch *batch;
    int fd;
    struct sockaddr_in addr;
    unsigned long long packets, bytes, errors;
    int twcc_id;           /* the transport-wide sequence number's extension id, 0: not negotiated */
    PyObject *twcc_ring;   /* twcc.SentPackets.ring: the next number, then (send µs, size, seq) per packet */
} Output;

/* twcc.stamped on the packet in `buf`: add the next transport-wide sequence number to its header extensions and
 * record when it went and its size in the ring shared with twcc.SentPackets; the new length (len unchanged when
 * the packet's extensions cannot take one more, as in Python). */
static Py_ssize_t twcc_stamp(Output *self, uint8_t *buf, Py_ssize_t len) {
    uint8_t *ring = (uint8_t *)PyByteArray_AS_STRING(self->twcc_ring);
    uint32_t next;
    memcpy(&next, ring, 4);
    uint16_t seq = (uint16_t)next;
    uint8_t hi = (uint8_t)(seq >> 8), lo = (uint8_t)seq, id = (uint8_t)self->twcc_id;
    Py_ssize_t off = 12 + 4 * (buf[0] & 0x0F);
    if (off > len)
        return len;
    if (!(buf[0] & 0x10)) {
        if (len + 8 > MAX_RTP)
            return len;
        memmove(buf + off + 8, buf + off, len - off);
        uint8_t ext[8] = {0xBE, 0xDE, 0, 1, (uint8_t)((id << 4) | 1), hi, lo, 0};
        memcpy(buf + off, ext, 8);
        buf[0] |= 0x10;
        len += 8;
    } else {
        if (off + 4 > len || len + 4 > MAX_RTP)
            return len;
        unsigned int profile = ((unsigned int)buf[off] << 8) | buf[off + 1];
        unsigned int words = ((unsigned int)buf[off + 2] << 8) | buf[off + 3];
        Py_ssize_t end = off + 4 + 4 * (Py_ssize_t)words;
        if (end > len || words >= 0xFFFF)
            return len;
        uint8_t element[4];
        if (profile == 0xBEDE) {
            element[0] = (uint8_t)((id << 4) | 1), element[1] = hi, element[2] = lo, element[3] = 0;
        } else if ((profile & 0xFFF0) == 0x1000) {
            element[0] = id, element[1] = 2, element[2] = hi, element[3] = lo;
        } else {
            return len;
        }
        memmove(buf + end + 4, buf + end, len - end);
        memcpy(buf + end, element, 4);
        words++;
        buf[off + 2] = (uint8_t)(words >> 8), buf[off + 3] = (uint8_t)words;
        len += 4;
    }
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    uint32_t at = (uint32_t)((uint64_t)now.tv_sec * 1000000u + (uint64_t)now.tv_nsec / 1000u);
    uint16_t size = (uint16_t)len;
    uint8_t *entry = ring + 4 + (seq % TWCC_RING) * TWCC_ENTRY;
    memcpy(entry, &at, 4);
    memcpy(entry + 4, &size, 2);
    memcpy(entry + 6, &seq, 2);
    next = (uint16_t)(seq + 1);
    memcpy(ring, &next, 4);
    return len;
}

static int parse_destination(Output *self, int fd, const char *host, int port) {
    memset(&self->addr, 0, sizeof(self->addr));
    self->addr.sin_family = AF_INET;
    self->addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &self->addr.sin_addr) != 1 || port <= 0 || port > 65535) {
        PyErr_Format(PyExc_ValueError, "not an IPv4 address and port: %s:%d", host, port);
        return -1;
    }
    self->fd = fd;
    return 0;
}

/* Output(batch, sender=None, fd=-1, host=None, port=0): unbound (fanout leaves it to the Python path) until
 * `bind` gives it keys and a destination. */
static int Output_init(Output *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"batch", "sender", "fd", "host", "port", NULL};
    Batch *batch;
    PyObject *sender = Py_None;
    int fd = -1, port = 0;
    const char *host = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!|Oizi", kwlist, &BatchType, &batch, &sender, &fd, &host, &port))
        return -1;
    Py_INCREF(batch);
    Py_XSETREF(self->batch, batch);
    self->fd = -1;
    if (sender != Py_None) {
        if (!PyObject_TypeCheck(sender, &SrtpSenderType)) {
            PyErr_SetString(PyExc_TypeError, "sender must be an SrtpSender");
            return -1;
        }
        if (host == NULL || parse_destination(self, fd, host, port) < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a bound Output needs fd, host and port");
            return -1;
        }
        Py_INCREF(sender);
        Py_XSETREF(self->sender, (SrtpSender *)sender);
    }
    return 0;
}

static PyObject *Output_bind(Output *self, PyObject *args) {
    SrtpSender *sender;
    int fd, port;
    const char *host;
    if (!PyArg_ParseTuple(args, "O!isi", &SrtpSenderType, &sender, &fd, &host, &port))
        return NULL;
    if (parse_destination(self, fd, host, port) < 0) {
        self->fd = -1;
        return NULL;
    }
    Py_INCREF(sender);
    Py_XSETREF(self->sender, sender);
    Py_RETURN_NONE;
}

static PyObject *Output_unbind(Output *self, PyObject *unused) {
    self->fd = -1;
    Py_RETURN_NONE;
}

static PyObject *Output_bound(Output *self, void *closure) {
    return PyBool_FromLong(self->sender != NULL && self->fd >= 0);
}

/* set_twcc(ext_id, ring): number what it sends with the transport-wide sequence in `ring` (a SentPackets.ring);
 * set_twcc(0, None): stop. */
static PyObject *Output_set_twcc(Output *self, PyObject *args) {
    int ext_id;
    PyObject *ring;
    if (!PyArg_ParseTuple(args, "iO", &ext_id, &ring))
        return NULL;
    if (ext_id == 0) {
        self->twcc_id = 0;
        Py_CLEAR(self->twcc_ring);
        Py_RETURN_NONE;
    }
    if (ext_id < 1 || ext_id > 14 || !PyByteArray_Check(ring) ||
        PyByteArray_GET_SIZE(ring) < 4 + TWCC_RING * TWCC_ENTRY) {
        PyErr_SetString(PyExc_ValueError, "set_twcc(ext_id in 1..14, ring: bytearray of a SentPackets)");
        return NULL;
    }
    Py_INCREF(ring);
    Py_XSETREF(self->twcc_ring, ring);
    self->twcc_id = ext_id;
    Py_RETURN_NONE;
}

static void Output_dealloc(Output *self) {
    Py_XDECREF(self->twcc_ring);
    Py_XDECREF(self->sender);
    Py_XDECREF(self->batch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline PyObject *queue(Output *self, Entry *e, uint8_t *buf, Py_ssize_t len) {
    if (self->sender == NULL || self->fd < 0) {
        PyErr_SetString(FastpathError, "Output is not bound");
        return NULL;
    }
    if (self->twcc_id && self->twcc_ring != NULL)
        len = twcc_stamp(self, buf, len);
    Py_ssize_t n = protect_into(self->sender, buf, len);
    if (n < 0) {
        self->errors++;
        return NULL;
    }
    e->fd = self->fd;
    e->len = (uint16_t)n;
    e->addr = self->addr;
    self->batch->count++;
    self->packets++;
    self->bytes += n;
    Py_RETURN_NONE;
}

static PyObject *Output_send(Output *self, PyObject *arg) {
    Py_buffer packet;
    if (PyObject_GetBuffer(arg, &packet, PyBUF_SIMPLE) < 0)
        return NULL;
    if (packet.len > MAX_RTP) {
        PyBuffer_Release(&packet);
        PyErr_SetString(FastpathError, "RTP packet too large");
        return NULL;
    }
    uint8_t *buf;
    Entry *e = batch_slot(self->batch, &buf);
    if (e == NULL) {
        PyBuffer_Release(&packet);
        return NULL;
    }
    memcpy(buf, packet.buf, packet.len);
    Py_ssize_t len = packet.len;
    PyBuffer_Release(&packet);
    return queue(self, e, buf, len);
}

/* forward(packet, off, seq, ts, marker, pt, ssrc): a new 12-byte header (version 2, the packet's padding bit,
 * marker, pt, seq, ts, ssrc) in front of packet[off:], protected and queued. Same bytes as downtrack.DownTrack. */
static PyObject *Output_forward(Output *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "forward(packet, off, seq, ts, marker, pt, ssrc)");
        return NULL;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "packet must be bytes");
        return NULL;
    }
    const uint8_t *src = (const uint8_t *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    unsigned long seq = PyLong_AsUnsignedLongMask(args[2]);
    unsigned long ts = PyLong_AsUnsignedLongMask(args[3]);
    long marker = PyLong_AsLong(args[4]);
    long pt = PyLong_AsLong(args[5]);
    unsigned long ssrc = PyLong_AsUnsignedLongMask(args[6]);
    if (PyErr_Occurred())
        return NULL;
    if (off < 0 || off > size || size - off + 12 > MAX_RTP || size < 1) {
        PyErr_SetString(FastpathError, "bad payload offset or size");
        return NULL;
    }
    uint8_t *buf;
    Entry *e = batch_slot(self->batch, &buf);
    if (e == NULL)
        return NULL;
    buf[0] = 0x80 | (src[0] & 0x20);
    buf[1] = (uint8_t)((marker ? 0x80 : 0) | (pt & 0x7F));
    buf[2] = (uint8_t)(seq >> 8), buf[3] = (uint8_t)seq;
    buf[4] = (uint8_t)(ts >> 24), buf[5] = (uint8_t)(ts >> 16), buf[6] = (uint8_t)(ts >> 8), buf[7] = (uint8_t)ts;
    buf[8] = (uint8_t)(ssrc >> 24), buf[9] = (uint8_t)(ssrc >> 16), buf[10] = (uint8_t)(ssrc >> 8);
    buf[11] = (uint8_t)ssrc;
    memcpy(buf + 12, src + off, size - off);
    return queue(self, e, buf, 12 + size - off);
}

static PyMemberDef Output_members[] = {
    {"packets", T_ULONGLONG, offsetof(Output, packets), READONLY, "packets queued"},
    {"bytes", T_ULONGLONG, offsetof(Output, bytes), READONLY, "protected bytes queued"},
    {"errors", T_ULONGLONG, offsetof(Output, errors), READONLY, "packets SRTP refused"},
    {"fd", T_INT, offsetof(Output, fd), READONLY, "the socket"},
    {NULL},
};

static PyGetSetDef Output_getset[] = {
    {"bound", (getter)Output_bound, NULL, "whether it has keys and a destination", NULL},
    {NULL},
};

static PyMethodDef Output_methods[] = {
    {"bind", (PyCFunction)Output_bind, METH_VARARGS, "bind(sender, fd, host, port): keys and destination"},
    {"unbind", (PyCFunction)Output_unbind, METH_NOARGS, "forget the destination (its path changed)"},
    {"set_twcc", (PyCFunction)Output_set_twcc, METH_VARARGS,
     "set_twcc(ext_id, ring): add transport-wide sequence numbers from a twcc.SentPackets ring (0, None: stop)"},
    {"send", (PyCFunction)Output_send, METH_O, "send(rtp): protect and queue"},
    {"forward", (PyCFunction)(void (*)(void))Output_forward, METH_FASTCALL,
     "forward(packet, off, seq, ts, marker, pt, ssrc): rewrite the header, protect and queue"},
    {NULL},
};

static PyTypeObject OutputType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "braid.services.media.fastpath._fastpath.Output",
    .tp_basicsize = sizeof(Output),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One SRTP destination: a sender's keys, a socket and the peer's address",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Output_init,
    .tp_dealloc = (destructor)Output_dealloc,
    .tp_members = Output_members,
    .tp_methods = Output_methods,
    .tp_getset = Output_getset,
};

/* --- DownState and fanout -------------------------------------------------------------------------------
 *
 * DownState is the base class of downtrack.DownTrack: the fields its steady state reads and writes per packet live
 * in this C struct (Python code uses them as ordinary attributes), so `fanout` can run DownTrack.write's common
 * branch (the packet belongs to the layer it forwards, no switch pending) without entering Python: rewrite the
 * header, protect, queue, count. Everything else (a layer switch, waiting for a keyframe, an unbound Output)
 * calls the Python `write`, which stays the reference for all of it. */

typedef struct {
    PyObject_HEAD
    PyObject *output, *current, *target;
    char paused, bound, waiting_keyframe, video, vp8, python_only, last_marker;
    int pt, last_pid, last_tl0, pad_boundary;
    unsigned int ssrc, seq_off, ts_off, switch_seq, last_seq, last_ts, pid_off, tl0_off;
    double last_ts_at;
    unsigned long long packets, octets;
} DownState;

static int DownState_traverse(DownState *self, visitproc visit, void *arg) {
    Py_VISIT(self->output);
    Py_VISIT(self->current);
    Py_VISIT(self->target);
    return 0;
}

static int DownState_clear(DownState *self) {
    Py_CLEAR(self->output);
    Py_CLEAR(self->current);
    Py_CLEAR(self->target);
    return 0;
}

static void DownState_dealloc(DownState *self) {
    PyObject_GC_UnTrack(self);
    DownState_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *DownState_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    DownState *self = (DownState *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->bound = 1;
        self->last_pid = self->last_tl0 = self->pad_boundary = -1;
    }
    return (PyObject *)self;
}

static PyMemberDef DownState_members[] = {
    {"output", T_OBJECT, offsetof(DownState, output), 0, "the subscriber transport's Output, or None"},
    {"current", T_OBJECT, offsetof(DownState, current), 0, "the layer being forwarded"},
    {"target", T_OBJECT, offsetof(DownState, target), 0, "the layer wanted"},
    {"paused", T_BOOL, offsetof(DownState, paused), 0, NULL},
    {"bound", T_BOOL, offsetof(DownState, bound), 0, NULL},
    {"waiting_keyframe", T_BOOL, offsetof(DownState, waiting_keyframe), 0, NULL},
    {"video", T_BOOL, offsetof(DownState, video), 0, NULL},
    {"vp8", T_BOOL, offsetof(DownState, vp8), 0, NULL},
    {"python_only", T_BOOL, offsetof(DownState, python_only), 0,
     "every packet takes the Python write (it leaves some out: VP8 temporal layers)"},
    {"last_marker", T_BOOL, offsetof(DownState, last_marker), 0,
     "the last packet sent ended a frame: padding may follow it (inside a frame it would break the frame up)"},
    {"pid_off", T_UINT, offsetof(DownState, pid_off), 0, NULL},
    {"tl0_off", T_UINT, offsetof(DownState, tl0_off), 0, NULL},
    {"last_pid", T_INT, offsetof(DownState, last_pid), 0, NULL},
    {"last_tl0", T_INT, offsetof(DownState, last_tl0), 0, NULL},
    {"pad_boundary", T_INT, offsetof(DownState, pad_boundary), 0,
     "the publisher packet after which padding was last sent (-1: none): packets up to it take the Python path"},
    {"pt", T_INT, offsetof(DownState, pt), 0, NULL},
    {"ssrc", T_UINT, offsetof(DownState, ssrc), 0, NULL},
    {"seq_off", T_UINT, offsetof(DownState, seq_off), 0, NULL},
    {"ts_off", T_UINT, offsetof(DownState, ts_off), 0, NULL},
    {"switch_seq", T_UINT, offsetof(DownState, switch_seq), 0, NULL},
    {"last_seq", T_UINT, offsetof(DownState, last_seq), 0, NULL},
    {"last_ts", T_UINT, offsetof(DownState, last_ts), 0, NULL},
    {"last_ts_at", T_DOUBLE, offsetof(DownState, last_ts_at), 0, NULL},
    {"packets", T_ULONGLONG, offsetof(DownState, packets), 0, NULL},
    {"octets", T_ULONGLONG, offsetof(DownState, octets), 0, NULL},
    {NULL},
};

static PyTypeObject DownStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "braid.services.media.fastpath._fastpath.DownState",
    .tp_basicsize = sizeof(DownState),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The per-packet state of a down-track, shared by Python and fanout",
    .tp_new = DownState_new,
    .tp_traverse = (traverseproc)DownState_traverse,
    .tp_clear = (inquiry)DownState_clear,
    .tp_dealloc = (destructor)DownState_dealloc,
    .tp_members = DownState_members,
};

/* DownTrack._renumber on the copied payload `p`: the VP8 picture id and TL0PICIDX moved on by the down-track's
 * offsets; a truncated descriptor is left alone, as rtp.vp8_ids does. */
static void vp8_renumber(DownState *d, uint8_t *p, Py_ssize_t n, int newest) {
    if (n < 2 || !(p[0] & 0x80))
        return;
    Py_ssize_t pos = 2, pid_pos = -1, tl0_pos = -1;
    int wide = 0;
    if (p[1] & 0x80) {
        if (n <= pos)
            return;
        wide = (p[pos] & 0x80) != 0;
        if (wide && n <= pos + 1)
            return;
        pid_pos = pos;
        pos += wide ? 2 : 1;
    }
    if (p[1] & 0x40) {
        if (n <= pos)
            return;
        tl0_pos = pos;
    }
    if (pid_pos >= 0) {
        unsigned int pid;
        if (wide) {
            pid = ((((unsigned int)(p[pid_pos] & 0x7F) << 8) | p[pid_pos + 1]) + d->pid_off) & 0x7FFF;
            p[pid_pos] = (uint8_t)(0x80 | (pid >> 8)), p[pid_pos + 1] = (uint8_t)pid;
        } else {
            pid = (p[pid_pos] + d->pid_off) & 0x7F;
            p[pid_pos] = (uint8_t)pid;
        }
        if (newest)
            d->last_pid = (int)pid;
    }
    if (tl0_pos >= 0) {
        unsigned int tl0 = (p[tl0_pos] + d->tl0_off) & 0xFF;
        p[tl0_pos] = (uint8_t)tl0;
        if (newest)
            d->last_tl0 = (int)tl0;
    }
}

/* fanout(subs, layer, data, off, marker, seq, ts, keyframe, now): forward.UpTrack's loop over a layer's
 * subscribers, `down.write(layer, data[0], marker, seq, ts, data[off:], keyframe)` for each; `now` is the
 * time.monotonic() of the packet's arrival. */
static PyObject *fanout(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9 || !PyList_Check(args[0]) || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "fanout(subs: list, layer, data: bytes, off, marker, seq, ts, keyframe, now)");
        return NULL;
    }
    PyObject *subs = args[0], *layer = args[1], *data = args[2];
    Py_ssize_t off = PyLong_AsSsize_t(args[3]);
    long marker = PyLong_AsLong(args[4]);
    unsigned long seq = PyLong_AsUnsignedLongMask(args[5]) & 0xFFFF;
    unsigned long ts = PyLong_AsUnsignedLongMask(args[6]) & 0xFFFFFFFF;
    int keyframe = PyObject_IsTrue(args[7]);
    double now = PyFloat_AsDouble(args[8]);
    if (PyErr_Occurred() || keyframe < 0)
        return NULL;
    const uint8_t *src = (const uint8_t *)PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (off < 12 || off > size || size - off + 12 > MAX_RTP) {
        PyErr_SetString(FastpathError, "bad payload offset or size");
        return NULL;
    }
    PyObject *payload = NULL, *write_args = NULL, *result = NULL;
    Py_INCREF(subs);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(subs); i++) {
        PyObject *item = PyList_GET_ITEM(subs, i);
        int slow = 1;
        if (PyObject_TypeCheck(item, &DownStateType)) {
            DownState *d = (DownState *)item;
            if (d->paused || !d->bound)
                continue;
            if (d->current == layer && !d->waiting_keyframe) {
                unsigned long ahead = (seq - d->switch_seq) & 0xFFFF;
                if (ahead & 0x8000)
                    continue;  /* older than the point this layer was joined at */
                Output *out = (Output *)d->output;
                slow = ahead > HORIZON ||  /* the Python write moves the join point on (downtrack.HORIZON) */
                       d->python_only || out == NULL || (PyObject *)out == Py_None ||
                       !PyObject_TypeCheck(out, &OutputType) ||
                       out->sender == NULL || out->fd < 0 ||
                       (d->pad_boundary >= 0 && ((d->pad_boundary - seq) & 0xFFFF) < 0x8000);
                if (!slow) {
                    unsigned int out_seq = (unsigned int)((seq + d->seq_off) & 0xFFFF);
                    unsigned int out_ts = (unsigned int)((ts + d->ts_off) & 0xFFFFFFFF);
                    uint8_t *buf;
                    Entry *e = batch_slot(out->batch, &buf);
                    if (e == NULL)
                        goto done;
                    buf[0] = 0x80 | (src[0] & 0x20);
                    buf[1] = (uint8_t)((marker ? 0x80 : 0) | (d->pt & 0x7F));
                    buf[2] = (uint8_t)(out_seq >> 8), buf[3] = (uint8_t)out_seq;
                    buf[4] = (uint8_t)(out_ts >> 24), buf[5] = (uint8_t)(out_ts >> 16);
                    buf[6] = (uint8_t)(out_ts >> 8), buf[7] = (uint8_t)out_ts;
                    buf[8] = (uint8_t)(d->ssrc >> 24), buf[9] = (uint8_t)(d->ssrc >> 16);
                    buf[10] = (uint8_t)(d->ssrc >> 8), buf[11] = (uint8_t)d->ssrc;
                    memcpy(buf + 12, src + off, size - off);
                    int newest = ((out_seq - d->last_seq) & 0xFFFF) < 0x8000;
                    if (d->vp8)
                        vp8_renumber(d, buf + 12, size - off, newest);
                    PyObject *ok = queue(out, e, buf, 12 + size - off);
                    if (ok == NULL) {
                        PyErr_Clear();  /* counted in out->errors, as send_rtp counts SRTP failures */
                        continue;
                    }
                    Py_DECREF(ok);
                    d->packets++;
                    d->octets += size - off;
                    if (newest) {
                        d->last_seq = out_seq;
                        d->last_marker = marker ? 1 : 0;
                        if (out_ts != d->last_ts) {
                            d->last_ts = out_ts;
                            d->last_ts_at = now;
                        }
                    }
                    continue;
                }
            } else if (!(d->target == layer && (keyframe || !d->video))) {
                continue;  /* another layer's packet, or still waiting for a keyframe */
            }
        }
        if (slow) {
            if (write_args == NULL) {
                payload = PyBytes_FromStringAndSize((const char *)src + off, size - off);
                if (payload == NULL)
                    goto done;
                write_args = Py_BuildValue("(OilkkOO)", layer, (int)src[0], marker, seq, ts, payload,
                                           keyframe ? Py_True : Py_False);
                if (write_args == NULL)
                    goto done;
            }
            Py_INCREF(item);
            PyObject *write = PyObject_GetAttrString(item, "write");
            PyObject *r = write ? PyObject_Call(write, write_args, NULL) : NULL;
            Py_XDECREF(write);
            Py_DECREF(item);
            if (r == NULL)
                goto done;
            Py_DECREF(r);
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    Py_DECREF(subs);
    Py_XDECREF(payload);
    Py_XDECREF(write_args);
    return result;
}

/* --- receive ------------------------------------------------------------------------------------------- */

#define RECV_SLOTS 64
#define RECV_SIZE 4096

static uint8_t recv_arena[RECV_SLOTS][RECV_SIZE];

static PyObject *address_of(const struct sockaddr_storage *ss) {
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
        return Py_BuildValue("(sHkk)", host, ntohs(a->sin6_port), (unsigned long)ntohl(a->sin6_flowinfo),
                             (unsigned long)a->sin6_scope_id);
    }
    const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
    return Py_BuildValue("(sH)", host, ntohs(a->sin_port));
}

/* recv_batch(fd, limit) -> [(data, addr), ...]: every datagram ready on the non-blocking socket `fd`, up to
 * `limit`, with one recvmmsg per 64. Empty when nothing is ready; OSError for any other failure. */
static PyObject *recv_batch(PyObject *module, PyObject *args) {
    int fd, limit = 1024;
    if (!PyArg_ParseTuple(args, "i|i", &fd, &limit))
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    struct mmsghdr msgs[RECV_SLOTS];
    struct iovec iovs[RECV_SLOTS];
    struct sockaddr_storage addrs[RECV_SLOTS];
    struct sockaddr_storage last_addr;
    socklen_t last_len = 0;
    PyObject *last = NULL;
    while (PyList_GET_SIZE(out) < limit) {
        int want = limit - (int)PyList_GET_SIZE(out);
        if (want > RECV_SLOTS)
            want = RECV_SLOTS;
        for (int i = 0; i < want; i++) {
            iovs[i].iov_base = recv_arena[i];
            iovs[i].iov_len = RECV_SIZE;
            memset(&msgs[i].msg_hdr, 0, sizeof(struct msghdr));
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof(addrs[i]);
            msgs[i].msg_hdr.msg_iov = &iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(fd, msgs, (unsigned int)want, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (PyList_GET_SIZE(out) > 0)
                break;  /* report the error on the next call, after what was already read */
            Py_XDECREF(last);
            Py_DECREF(out);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < n; i++) {
            socklen_t alen = msgs[i].msg_hdr.msg_namelen;
            if (last == NULL || alen != last_len || memcmp(&addrs[i], &last_addr, alen) != 0) {
                Py_XDECREF(last);
                last = address_of(&addrs[i]);
                if (last == NULL) {
                    Py_DECREF(out);
                    return NULL;
                }
                memcpy(&last_addr, &addrs[i], alen);
                last_len = alen;
            }
            PyObject *data = PyBytes_FromStringAndSize((const char *)recv_arena[i], msgs[i].msg_len);
            PyObject *item = data ? PyTuple_Pack(2, data, last) : NULL;
            Py_XDECREF(data);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_XDECREF(last);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
        }
        if (n < want)
            break;
    }
    Py_XDECREF(last);
    return out;
}

static PyMethodDef module_methods[] = {
    {"fanout", (PyCFunction)(void (*)(void))fanout, METH_FASTCALL,
     "fanout(subs, layer, data, off, marker, seq, ts, keyframe, now): DownTrack.write for each subscriber"},
    {"recv_batch", recv_batch, METH_VARARGS, "recv_batch(fd, limit=1024) -> [(data, addr), ...] via recvmmsg"},
    {"twcc_feed", twcc_feed, METH_VARARGS,
     "twcc_feed(body, ring, state) -> (received, lost, acked_bps, trend_state) | None: bwe.ArrivalDelay.measure"},
    {"delay_snapshot", delay_snapshot, METH_VARARGS, "delay_snapshot(state) -> dict: bwe.ArrivalDelay.snapshot()"},
    {NULL},
};

/* --- module ---------------------------------------------------------------------------------------------- */

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "braid.services.media.fastpath._fastpath",
    "Compiled SRTP protect, header rewrite, sendmmsg batching and recvmmsg draining for the forwarding path.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&SrtpSenderType) < 0 || PyType_Ready(&BatchType) < 0 || PyType_Ready(&OutputType) < 0 ||
        PyType_Ready(&DownStateType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    FastpathError = PyErr_NewException("braid.services.media.fastpath._fastpath.Error", NULL, NULL);
    Py_INCREF(FastpathError);
    PyModule_AddObject(m, "Error", FastpathError);
    Py_INCREF(&SrtpSenderType);
    PyModule_AddObject(m, "SrtpContext", (PyObject *)&SrtpSenderType);
    Py_INCREF(&BatchType);
    PyModule_AddObject(m, "Batch", (PyObject *)&BatchType);
    Py_INCREF(&OutputType);
    PyModule_AddObject(m, "Output", (PyObject *)&OutputType);
    Py_INCREF(&DownStateType);
    PyModule_AddObject(m, "DownState", (PyObject *)&DownStateType);
    PyModule_AddIntConstant(m, "DELAY_STATE_SIZE", (long)delay_state_size());
    PyModule_AddIntConstant(m, "PROFILE_AES128_CM_SHA1_80", PROFILE_AES128_CM_SHA1_80);
    PyModule_AddIntConstant(m, "PROFILE_AEAD_AES_128_GCM", PROFILE_AEAD_AES_128_GCM);
    PyModule_AddIntConstant(m, "PROFILE_AEAD_AES_256_GCM", PROFILE_AEAD_AES_256_GCM);
    return m;
}
