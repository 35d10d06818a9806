/* lmdbkit._speedups: the per-item steps of a read, in C (optional: lmdbkit runs the same steps in Python
 * without it, and LMDBKIT_PURE_PYTHON=1 makes it do so).
 *
 * Each function checks every offset it reads against its buffer's length and reports what it cannot take
 * (a malformed run or header) by returning a marker or raising ValueError; the Python code then takes that
 * item the slow way, which names the error (CorruptItemError). So these functions never decide what is
 * corrupt, only what is the common case, and they never read outside a buffer.
 *
 * Layouts (little-endian), see lmdbkit/runs.py and lmdbkit/codec.py:
 *   a run:  "LR" u8 version(2) u8 flags u32 n u64 checksum, then u32 starts[n + 1], ..., the items
 *   an item: "LK" u8 version(1) u8 flags u32 header length u64 checksum, then the msgpack header
 *            [key, fields, arrays] (a fixarray of 3 whose key is nil or a str), then the payload
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define XXH_INLINE_ALL /* xxHash 0.8.2 (third_party/xxhash, BSD 2-clause): the checksums python-xxhash computes */
#include "xxhash.h"

#define HEAD_SIZE 16   /* a run's head, and an item's prefix: the same size */
#define RUN_VERSION 2
#define ITEM_VERSION 1

static uint32_t u32le(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t u64le(const unsigned char *p) {
    return (uint64_t)u32le(p) | (uint64_t)u32le(p + 4) << 32;
}

/* Where item j of ``run`` (len bytes) starts and ends; 0 when the run's head or table does not allow it. */
static int run_span(const unsigned char *run, Py_ssize_t len, long long i, long long last,
                    Py_ssize_t *start, Py_ssize_t *end) {
    if (len < HEAD_SIZE || run[0] != 'L' || run[1] != 'R' || run[2] != RUN_VERSION)
        return 0;
    long long n = u32le(run + 4);
    long long j = i - last + n - 1;
    if (j < 0 || j >= n || HEAD_SIZE + 4 * (n + 1) > len)
        return 0;
    *start = u32le(run + HEAD_SIZE + 4 * j);
    *end = u32le(run + HEAD_SIZE + 4 * (j + 1));
    return HEAD_SIZE + 4 * (n + 1) <= *start && *start <= *end && *end <= len;
}

/* Where item i lies in ``f``, the (8-byte big-endian key, run) that a ranged lookup found for it: 1 with
 * *run filled (release it) and *start, *end set; 0 when the key or the run does not hold it as the common
 * case has it; -1 with an exception set. */
static int found_span(PyObject *f, long long i, Py_buffer *run, Py_ssize_t *start, Py_ssize_t *end) {
    if (i < 0 || !PyTuple_Check(f) || PyTuple_GET_SIZE(f) != 2 || !PyObject_CheckBuffer(PyTuple_GET_ITEM(f, 0))
        || !PyObject_CheckBuffer(PyTuple_GET_ITEM(f, 1)))
        return 0;
    Py_buffer key;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(f, 0), &key, PyBUF_SIMPLE) < 0)
        return -1;
    unsigned long long last = 0;
    int key_ok = key.len == 8;
    for (int b = 0; key_ok && b < 8; b++)
        last = last << 8 | ((const unsigned char *)key.buf)[b];
    PyBuffer_Release(&key);
    if (!key_ok || last >> 62)
        return 0;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(f, 1), run, PyBUF_SIMPLE) < 0)
        return -1;
    if (!run_span(run->buf, run->len, i, (long long)last, start, end)) {
        PyBuffer_Release(run);
        return 0;
    }
    return 1;
}

/* The bytes of item i in ``f`` (see found_span): a memoryview slice of the run (a new reference), or NULL with
 * ValueError set when the key or the run does not hold it as the common case has it. */
static PyObject *take(PyObject *f, long long i) {
    Py_buffer run;
    Py_ssize_t start, end;
    int ok = found_span(f, i, &run, &start, &end);
    if (ok < 0)
        return NULL;
    if (ok == 0) {
        PyErr_SetString(PyExc_ValueError, "not an item of its run as lmdbkit writes it");
        return NULL;
    }
    PyBuffer_Release(&run);
    PyObject *value = PyTuple_GET_ITEM(f, 1);
    if (PyMemoryView_Check(value))
        return PySequence_GetSlice(value, start, end);
    PyObject *view = PyMemoryView_FromObject(value);
    if (view == NULL)
        return NULL;
    PyObject *slice = PySequence_GetSlice(view, start, end);
    Py_DECREF(view);
    return slice;
}

/* item_in_run(found, i) -> memoryview: item i's bytes in the (key, run) found for it (runs.item); ValueError
 * when the key or the run does not hold it (runs.item names the error). */
static PyObject *item_in_run(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *f;
    long long i;
    if (!PyArg_ParseTuple(args, "OL", &f, &i))
        return NULL;
    return take(f, i);
}

/* items_in_runs(found, indices) -> list: item_in_run for each (key, run) found and its index; None stays
 * None (runs.slices). */
static PyObject *items_in_runs(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *found, *indices;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &found, &PyList_Type, &indices))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(found);
    if (PyList_GET_SIZE(indices) != count) {
        PyErr_SetString(PyExc_ValueError, "found and indices differ in length");
        return NULL;
    }
    PyObject *out = PyList_New(count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *f = PyList_GET_ITEM(found, k), *item;
        if (f == Py_None) {
            Py_INCREF(Py_None);
            item = Py_None;
        } else {
            long long i = PyLong_AsLongLong(PyList_GET_ITEM(indices, k));
            item = (i == -1 && PyErr_Occurred()) ? NULL : take(f, i);
        }
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, k, item);
    }
    return out;
}

/* Where the key of the header buf[HEAD_SIZE:end] ends, or 0 when it is not laid out as lmdbkit writes it
 * (headers.after_key). */
static Py_ssize_t after_key(const unsigned char *buf, Py_ssize_t end) {
    const Py_ssize_t b0 = HEAD_SIZE;
    if (end < b0 + 2 || buf[b0] != 0x93)
        return 0;
    unsigned char b = buf[b0 + 1];
    Py_ssize_t at;
    if (b == 0xC0)
        at = b0 + 2;
    else if (b >= 0xA0 && b <= 0xBF)
        at = b0 + 2 + (b - 0xA0);
    else if (b == 0xD9 && end > b0 + 2)
        at = b0 + 3 + buf[b0 + 2];
    else if (b == 0xDA && end > b0 + 3)
        at = b0 + 4 + ((Py_ssize_t)buf[b0 + 2] << 8 | buf[b0 + 3]);
    else
        return 0;
    return at < end ? at : 0;
}

/* The common case of an item's prefix and header: sets *start (where the payload starts), *stored (the
 * checksum) and *at (where the header's key ends); 0 when the item is not laid out that way. */
static int item_head(const unsigned char *p, Py_ssize_t len, Py_ssize_t *start, Py_ssize_t *at,
                     unsigned long long *stored) {
    if (len < HEAD_SIZE || p[0] != 'L' || p[1] != 'K' || p[2] != ITEM_VERSION)
        return 0;
    Py_ssize_t s = HEAD_SIZE + (Py_ssize_t)u32le(p + 4);
    if (s > len || (*at = after_key(p, s)) == 0)
        return 0;
    *start = s;
    *stored = u64le(p + 8);
    return 1;
}

/* head(buf) -> (payload start, stored checksum, where the key ends, the header's bytes after the key), or
 * None when the item is not laid out as lmdbkit writes it (codec._parse then unpacks it in full). */
static PyObject *head(PyObject *Py_UNUSED(self), PyObject *arg) {
    Py_buffer v;
    if (PyObject_GetBuffer(arg, &v, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t start, at;
    unsigned long long stored;
    PyObject *out;
    if (item_head(v.buf, v.len, &start, &at, &stored))
        out = Py_BuildValue("nKny#", start, stored, at, (const char *)v.buf + at, start - at);
    else
        out = (Py_INCREF(Py_None), Py_None);
    PyBuffer_Release(&v);
    return out;
}

/* A batch's distinct headers (each item's header bytes after its key), found again by their hash in an
 * open-addressed table: a batch of items of one schema has a few (one per label or category). */
#define GROUPS_MAX 256
#define SLOTS 1024 /* a power of two, at least 2 x GROUPS_MAX */

typedef struct {
    PyObject *rest;   /* the header's bytes after the key (a bytes object) */
    PyObject *fields; /* what resolve made of the header: the fields every item of it shares */
    Py_ssize_t shift; /* how far its items' arrays lie from the first item's */
} group_t;

/* A hash of n bytes, eight at a time (FNV-1a's constants over words; the table compares the bytes anyway). */
static uint64_t hash_bytes(const unsigned char *p, Py_ssize_t n) {
    uint64_t h = 1469598103934665603ULL ^ (uint64_t)n, w;
    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&w, p, 8);
        h = (h ^ w) * 1099511628211ULL;
        h ^= h >> 29;
    }
    w = 0;
    memcpy(&w, p, (size_t)n);
    h = (h ^ w) * 1099511628211ULL;
    return h ^ h >> 32;
}

/* Item k of a batch for gather: ``items[k]`` itself (a buffer), or with ``indices`` the bytes of item
 * indices[k] in the (key, run) items[k] that a ranged lookup found for it (found_span; ``verify``: its run's table
 * of starts checked against its checksum). Fills *v (release it) and sets *p, *len to the item's bytes; 1 on
 * success, 0 when a run does not hold it as the common case has it, -1 with an exception set. */
static int batch_item(PyObject *items, PyObject *indices, Py_ssize_t k, int verify, Py_buffer *v,
                      const unsigned char **p, Py_ssize_t *len) {
    PyObject *f = PyList_GET_ITEM(items, k);
    if (indices == Py_None) {
        if (PyObject_GetBuffer(f, v, PyBUF_SIMPLE) < 0)
            return -1;
        *p = v->buf;
        *len = v->len;
        return 1;
    }
    long long i = PyLong_AsLongLong(PyList_GET_ITEM(indices, k));
    if (i == -1 && PyErr_Occurred())
        return -1;
    Py_ssize_t start, end;
    int ok = found_span(f, i, v, &start, &end);
    if (ok != 1)
        return ok;
    const unsigned char *run = v->buf; /* found_span checked that its head and table fit */
    if (verify && XXH3_64bits(run + HEAD_SIZE, 4 * ((size_t)u32le(run + 4) + 1)) != u64le(run + 8)) {
        PyBuffer_Release(v);
        return 0; /* its table of starts does not match its checksum */
    }
    *p = run + start;
    *len = end - start;
    return 1;
}

/* gather(items, indices, copies, need, resolve, verify=False) -> list | None: decode_layout's common case in one
 * pass over a batch's items (``batch_item``: buffers, or with ``indices`` items in their runs). For each item b:
 * its prefix and header as head() takes them, and with ``verify`` its checksum (and its run's table's); the
 * first item of each distinct header (its bytes after the key) is passed to resolve(b, rest), which returns
 * (fields, shift) for a header that matches the batch's layout (its items' arrays lie ``shift`` bytes from the
 * first item's), or None; then each (destination, offset, length) in ``copies`` is copied from the item's
 * bytes [start + shift + offset:][:length] into the destination's bytes [b * length, (b + 1) * length).
 * Returns each item's fields (the items of a header share its fields object), or None as soon as an item is
 * not the common case (a run, prefix or header not laid out as lmdbkit writes it, a checksum that does not
 * match, more than GROUPS_MAX headers) or resolve returns None: the rows filled so far are then overwritten by
 * whoever takes the batch item by item (and names what is wrong). ValueError(b) for the first item whose arrays
 * would run outside its payload; resolve's exceptions pass on. */
static PyObject *gather(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *items, *indices, *copies, *resolve;
    Py_ssize_t need;
    int verify = 0;
    if (!PyArg_ParseTuple(args, "O!OO!nO|p", &PyList_Type, &items, &indices, &PyList_Type, &copies, &need, &resolve,
                          &verify))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items), ncopies = PyList_GET_SIZE(copies);
    if (need < 0 || ncopies > 64 || (indices != Py_None && (!PyList_Check(indices)
                                                            || PyList_GET_SIZE(indices) != count))) {
        PyErr_SetString(PyExc_ValueError, "gather: inconsistent arguments");
        return NULL;
    }
    Py_buffer dest[64];
    Py_ssize_t off[64], len[64], low = need;
    Py_ssize_t held = 0, ngroups = 0;
    group_t groups[GROUPS_MAX];
    int16_t slots[SLOTS];
    memset(slots, -1, sizeof slots);
    PyObject *out = PyList_New(count);
    if (out == NULL)
        return NULL;
    for (; held < ncopies; held++) {
        PyObject *c = PyList_GET_ITEM(copies, held);
        if (!PyTuple_Check(c) || PyTuple_GET_SIZE(c) != 3) {
            PyErr_SetString(PyExc_TypeError, "gather: copies are (destination, offset, length)");
            goto fail;
        }
        off[held] = PyLong_AsSsize_t(PyTuple_GET_ITEM(c, 1));
        len[held] = PyLong_AsSsize_t(PyTuple_GET_ITEM(c, 2));
        if (PyErr_Occurred())
            goto fail;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(c, 0), &dest[held], PyBUF_WRITABLE) < 0)
            goto fail;
        if (off[held] < 0 || len[held] < 0 || off[held] + len[held] > need || dest[held].len < count * len[held]) {
            PyBuffer_Release(&dest[held]);
            PyErr_SetString(PyExc_ValueError, "gather: a destination too small or a copy past need");
            goto fail;
        }
        if (off[held] < low)
            low = off[held];
    }
    for (Py_ssize_t b = 0; b < count; b++) {
        Py_buffer v;
        const unsigned char *p;
        Py_ssize_t size, start, at;
        unsigned long long stored;
        int got_item = batch_item(items, indices, b, verify, &v, &p, &size);
        if (got_item < 0)
            goto fail;
        if (got_item == 0)
            goto decline;
        if (!item_head(p, size, &start, &at, &stored)
            || (verify && XXH3_64bits(p + HEAD_SIZE, (size_t)(size - HEAD_SIZE)) != stored)) {
            PyBuffer_Release(&v);
            goto decline; /* (a checksum that does not match too: Python names the item) */
        }
        uint64_t h = hash_bytes(p + at, start - at);
        Py_ssize_t slot = (Py_ssize_t)(h & (SLOTS - 1));
        group_t *g = NULL;
        while (slots[slot] >= 0) {
            group_t *c = &groups[slots[slot]];
            if (PyBytes_GET_SIZE(c->rest) == start - at
                && memcmp(PyBytes_AS_STRING(c->rest), p + at, (size_t)(start - at)) == 0) {
                g = c;
                break;
            }
            slot = (slot + 1) & (SLOTS - 1);
        }
        if (g == NULL) { /* the first item of a header: resolve says what it is */
            if (ngroups == GROUPS_MAX) {
                PyBuffer_Release(&v);
                goto decline;
            }
            PyObject *rest = PyBytes_FromStringAndSize((const char *)p + at, start - at);
            PyBuffer_Release(&v); /* (resolve may read the item itself) */
            if (rest == NULL)
                goto fail;
            PyObject *got = PyObject_CallFunction(resolve, "nO", b, rest);
            if (got == NULL) {
                Py_DECREF(rest);
                goto fail;
            }
            Py_ssize_t shift = 0;
            if (got == Py_None || !PyTuple_Check(got) || PyTuple_GET_SIZE(got) != 2
                || ((shift = PyLong_AsSsize_t(PyTuple_GET_ITEM(got, 1))) == -1 && PyErr_Occurred())) {
                int bad = got != Py_None;
                Py_DECREF(got);
                Py_DECREF(rest);
                if (!bad)
                    goto decline;
                PyErr_Clear();
                PyErr_SetString(PyExc_TypeError, "gather: resolve returns (fields, shift) or None");
                goto fail;
            }
            g = &groups[ngroups];
            g->rest = rest;
            g->fields = Py_NewRef(PyTuple_GET_ITEM(got, 0));
            g->shift = shift;
            Py_DECREF(got);
            slots[slot] = (int16_t)ngroups++;
            got_item = batch_item(items, indices, b, 0, &v, &p, &size); /* (taken a moment ago: 1) */
            if (got_item < 0)
                goto fail;
            if (got_item == 0)
                goto decline;
        }
        Py_ssize_t base = start + g->shift; /* where the first item's offsets point in this one */
        if (base + low < start || base + need > size) {
            PyBuffer_Release(&v);
            PyObject *pos = PyLong_FromSsize_t(b);
            PyErr_SetObject(PyExc_ValueError, pos);
            Py_XDECREF(pos);
            goto fail;
        }
        for (Py_ssize_t c = 0; c < ncopies; c++)
            memcpy((char *)dest[c].buf + b * len[c], (const char *)p + base + off[c], len[c]);
        PyBuffer_Release(&v);
        PyList_SET_ITEM(out, b, Py_NewRef(g->fields));
    }
    goto done;
decline:
    Py_DECREF(out);
    out = Py_NewRef(Py_None);
    goto done;
fail:
    Py_CLEAR(out);
done:
    while (held > 0)
        PyBuffer_Release(&dest[--held]);
    for (Py_ssize_t k = 0; k < ngroups; k++) {
        Py_DECREF(groups[k].rest);
        Py_DECREF(groups[k].fields);
    }
    return out;
}

/* timed_lookups(find, take, keys, cold_ns) -> (values, slow, waited): for each key, ``take()`` if
 * ``find(key)`` else None (a cursor's set_range and item: prefetch.Prefetcher._runs), each lookup and take
 * timed together on the monotonic clock (what time.perf_counter_ns reads). Stops after the first that took
 * more than cold_ns: ``slow`` is its position and ``waited`` its nanoseconds (-1 and 0 when none was slow). */
static PyObject *timed_lookups(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *find, *take, *keys;
    long long cold_ns;
    if (!PyArg_ParseTuple(args, "OOO!L", &find, &take, &PyList_Type, &keys, &cold_ns))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(keys), slow = -1;
    long long waited = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        PyObject *found = PyObject_CallOneArg(find, PyList_GET_ITEM(keys, k));
        if (found == NULL)
            goto fail;
        int hit = PyObject_IsTrue(found);
        Py_DECREF(found);
        if (hit < 0)
            goto fail;
        PyObject *value = hit ? PyObject_CallNoArgs(take) : (Py_INCREF(Py_None), Py_None);
        if (value == NULL)
            goto fail;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        int appended = PyList_Append(out, value);
        Py_DECREF(value);
        if (appended < 0)
            goto fail;
        long long ns = (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
        if (ns > cold_ns) {
            slow = k;
            waited = ns;
            break;
        }
    }
    return Py_BuildValue("NnL", out, slow, waited);
fail:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"item_in_run", item_in_run, METH_VARARGS, "An item's bytes in the (key, run) found for it."},
    {"items_in_runs", items_in_runs, METH_VARARGS, "Each index's item bytes in the (key, run) found for it."},
    {"head", head, METH_O, "(payload start, checksum, key end, header bytes after the key) of an item."},
    {"gather", gather, METH_VARARGS, "A batch's headers grouped, resolved once each, and its arrays copied."},
    {"timed_lookups", timed_lookups, METH_VARARGS, "take() if find(key) else None for each key, each timed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&module); }
