/* Optional C fast paths for the two per-request calls of a producer.
 *
 * LaneWriter.record() writes a trajectory that is already in the common form (float32
 * numpy arrays, Python floats and ints) into a lane slot, checking everything
 * check_trajectory() checks, and publishes it in the order lane.PyLaneWriter does;
 * adapt() applies the adapter to one float32 vector. Both hand back -1 / None -- never
 * raise -- for anything else, and the caller then takes the pure-Python path, which
 * converts what it can and raises the precise error otherwise. So this file never
 * decides on its own what is valid: it accepts a subset of what the Python path
 * accepts, with byte-identical slots (tests/test_speedups.py checks both). The
 * layout is documented in layout.py.
 *
 * Why C at all: a record() in Python pays ~16k instructions of interpreter and ~5k per
 * numpy call for ~2 KB of copying; here the whole call is a few hundred instructions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define FLT_MAX_D 3.4028234663852886e38
#define ROUTE_MAX_BYTES 64
#define SLOT_HEAD_BYTES 32

static PyTypeObject *trajectory_type, *step_type; /* set once by set_types() */
static PyObject *s_query, *s_steps, *s_quality, *s_latency_us, *s_route, *s_id;
static PyObject *s_activations, *s_attention, *s_reward;

/* A 1-D native float32 ndarray of at most max_len items (exactly exact_len if >= 0). */
static PyArrayObject *as_f32(PyObject *obj, Py_ssize_t exact_len, Py_ssize_t max_len) {
    if (!PyArray_CheckExact(obj)) return NULL;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_NDIM(a) != 1 || PyArray_TYPE(a) != NPY_FLOAT32 || !PyArray_ISNOTSWAPPED(a)) return NULL;
    npy_intp n = PyArray_DIM(a, 0);
    if ((exact_len >= 0 && n != exact_len) || n > max_len) return NULL;
    return a;
}

static int copy_row(float *dst, const char *src, npy_intp n, npy_intp stride);

/* Copy a float32 vector to dst; 0 if every value is finite, else -1. */
static int copy_finite(float *dst, PyArrayObject *a) {
    return copy_row(dst, PyArray_BYTES(a), PyArray_DIM(a, 0), PyArray_STRIDE(a, 0));
}

static int get_float(PyObject *obj, double *out) {
    if (!PyFloat_CheckExact(obj)) return -1;
    double v = PyFloat_AS_DOUBLE(obj);
    if (!(v >= -FLT_MAX_D && v <= FLT_MAX_D)) return -1; /* also NaN */
    *out = v;
    return 0;
}

static int get_u64(PyObject *obj, uint64_t *out) {
    if (!PyLong_CheckExact(obj)) return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* Write the steps of ``steps`` (a list or tuple) into the slot; n_steps, or -1. */
static Py_ssize_t fill_steps(char *slot, PyObject *steps, Py_ssize_t hidden, Py_ssize_t max_steps, Py_ssize_t att_dim,
                             Py_ssize_t payload_off, Py_ssize_t step_bytes) {
    if (!PyList_CheckExact(steps) && !PyTuple_CheckExact(steps)) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(steps);
    if (n > max_steps) return -1;
    PyObject **items = PySequence_Fast_ITEMS(steps);
    char *meta = slot + SLOT_HEAD_BYTES;
    for (Py_ssize_t s = 0; s < n; s++) {
        PyObject *step = items[s];
        if (Py_TYPE(step) != step_type) return -1;
        float *act_dst = (float *)(slot + payload_off + 4 * hidden + s * step_bytes);
        PyObject *act = PyObject_GetAttr(step, s_activations);
        PyObject *att = act ? PyObject_GetAttr(step, s_attention) : NULL;
        PyObject *rew = att ? PyObject_GetAttr(step, s_reward) : NULL;
        int ok = rew != NULL;
        if (!ok) PyErr_Clear();
        double reward = 0;
        npy_intp n_act = 0, n_att = 0;
        PyArrayObject *a = NULL;
        ok = ok && get_float(rew, &reward) == 0 && (a = as_f32(act, -1, hidden)) != NULL && copy_finite(act_dst, a) == 0;
        if (ok) {
            n_act = PyArray_DIM(a, 0);
            if (n_act < hidden) memset(act_dst + n_act, 0, (size_t)(hidden - n_act) * 4);
            if (att != Py_None && !(PyTuple_CheckExact(att) && PyTuple_GET_SIZE(att) == 0)) {
                PyArrayObject *t = as_f32(att, -1, att_dim);
                ok = t != NULL && copy_finite(act_dst + hidden, t) == 0;
                if (ok) n_att = PyArray_DIM(t, 0);
            }
        }
        Py_XDECREF(act);
        Py_XDECREF(att);
        Py_XDECREF(rew);
        if (!ok) return -1;
        float r32 = (float)reward;
        uint16_t al = (uint16_t)n_act, tl = (uint16_t)n_att;
        memcpy(meta + 8 * s, &r32, 4);
        memcpy(meta + 8 * s + 4, &al, 2);
        memcpy(meta + 8 * s + 6, &tl, 2);
    }
    return n;
}

/* LaneWriter(segment, slot0, ring_slots, slot_bytes, hidden_dim, max_steps, attention_dim,
 *            payload_offset, route_offset, step_bytes, head_offset, next_id_offset,
 *            last_at_offset, idle_offset, lanes, lane)
 * The producer's side of one lane (layout.py, "Lane control" and "Slot"): the C twin of
 * lane.PyLaneWriter, with the same methods and the same publication order. Offsets are
 * bytes into ``segment`` (a writable buffer over the whole mapping, held until
 * close()); they are checked once here. ``head`` starts at the lane's published head,
 * ``tail`` at 0 (the owner sets the committed tail). */
typedef struct {
    PyObject_HEAD
    Py_buffer seg;
    int has_seg;
    Py_ssize_t slot0, ring_slots, slot_bytes, hidden, max_steps, att_dim, payload_off, route_off, step_bytes;
    uint64_t *head_word, *next_id_word, *idle_word;
    double *last_at_word;
    uint64_t lanes, lane, head, tail;
} LaneWriter;

/* payload_off + 4 * hidden + max_steps * step_bytes (the bytes of a slot a trajectory may
 * use), or -1 if a term is negative or the sum overflows. */
static Py_ssize_t slot_span(Py_ssize_t payload_off, Py_ssize_t hidden, Py_ssize_t max_steps, Py_ssize_t step_bytes) {
    Py_ssize_t query, steps, span;
    if (payload_off < 0 || hidden < 0 || max_steps < 0 || step_bytes < 0 || __builtin_mul_overflow(hidden, (Py_ssize_t)4, &query) ||
        __builtin_mul_overflow(max_steps, step_bytes, &steps) || __builtin_add_overflow(payload_off, query, &span) ||
        __builtin_add_overflow(span, steps, &span))
        return -1;
    return span;
}

static int LaneWriter_init(LaneWriter *self, PyObject *args, PyObject *kwds) {
    /* Parsed into locals and checked before anything of ``self`` changes: a failed
     * (re-)initialisation leaves the writer as it was. */
    PyObject *seg;
    Py_ssize_t slot0, ring_slots, slot_bytes, hidden, max_steps, att_dim, payload_off, route_off, step_bytes;
    Py_ssize_t head_off, next_id_off, last_at_off, idle_off, lanes, lane;
    if (!PyArg_ParseTuple(args, "Onnnnnnnnnnnnnnn", &seg, &slot0, &ring_slots, &slot_bytes, &hidden, &max_steps, &att_dim,
                          &payload_off, &route_off, &step_bytes, &head_off, &next_id_off, &last_at_off, &idle_off, &lanes, &lane))
        return -1;
    Py_buffer view;
    if (PyObject_GetBuffer(seg, &view, PyBUF_WRITABLE) < 0) return -1;
    Py_ssize_t len = view.len;
    Py_ssize_t span = slot_span(payload_off, hidden, max_steps, step_bytes);
    /* Lengths are stored as uint16 (act_len <= hidden, att_len <= attention_dim, n_steps <=
     * max_steps), so each is bounded by 0xFFFF; 4 * (hidden + att_dim) cannot overflow then. */
    int ok = hidden >= 1 && hidden <= 0xFFFF && max_steps >= 0 && max_steps <= 0xFFFF && att_dim >= 0 && att_dim <= 0xFFFF &&
             span >= 0 && step_bytes >= 4 * (hidden + att_dim) && route_off >= SLOT_HEAD_BYTES + 8 * max_steps &&
             route_off <= payload_off - ROUTE_MAX_BYTES && span <= slot_bytes && slot_bytes % 8 == 0 && ring_slots >= 1 &&
             slot0 >= 0 && slot0 % 8 == 0 && ring_slots <= len / slot_bytes && slot0 <= len - ring_slots * slot_bytes &&
             lanes >= 1 && lane >= 0 && lane < lanes;
    Py_ssize_t words[4] = {head_off, next_id_off, last_at_off, idle_off};
    for (int i = 0; i < 4; i++) ok = ok && words[i] >= 0 && words[i] % 8 == 0 && words[i] <= len - 8;
    if (!ok) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "LaneWriter: inconsistent lane geometry");
        return -1;
    }
    if (self->has_seg) PyBuffer_Release(&self->seg);
    self->seg = view;
    self->has_seg = 1;
    self->slot0 = slot0;
    self->ring_slots = ring_slots;
    self->slot_bytes = slot_bytes;
    self->hidden = hidden;
    self->max_steps = max_steps;
    self->att_dim = att_dim;
    self->payload_off = payload_off;
    self->route_off = route_off;
    self->step_bytes = step_bytes;
    char *base = (char *)view.buf;
    self->head_word = (uint64_t *)(base + head_off);
    self->next_id_word = (uint64_t *)(base + next_id_off);
    self->last_at_word = (double *)(base + last_at_off);
    self->idle_word = (uint64_t *)(base + idle_off);
    self->lanes = (uint64_t)lanes;
    self->lane = (uint64_t)lane;
    self->head = __atomic_load_n(self->head_word, __ATOMIC_ACQUIRE); /* a previous owner's last publish */
    self->tail = 0;
    return 0;
}

static void LaneWriter_dealloc(LaneWriter *self) {
    if (self->has_seg) PyBuffer_Release(&self->seg);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *LaneWriter_close(LaneWriter *self, PyObject *unused) {
    if (self->has_seg) {
        PyBuffer_Release(&self->seg);
        self->has_seg = 0;
    }
    Py_RETURN_NONE;
}

static int closed(LaneWriter *self) {
    if (!self->has_seg) PyErr_SetString(PyExc_ValueError, "LaneWriter is closed");
    return !self->has_seg;
}

static char *head_slot(LaneWriter *self) {
    return (char *)self->seg.buf + self->slot0 + (Py_ssize_t)(self->head % (uint64_t)self->ring_slots) * self->slot_bytes;
}

/* Fill the head slot -- payload and head fields, all but ``seq`` -- taking the lane's
 * next id if the trajectory has none. 0 if filled; -1 if ``traj`` is not in the common
 * form (whatever was written is private to the unpublished slot). */
static int fill(LaneWriter *self, PyObject *traj) {
    int result = -1;
    PyObject *query = NULL, *steps = NULL, *quality = NULL, *latency = NULL, *route = NULL, *tid_obj = NULL;
    Py_ssize_t hidden = self->hidden, payload_off = self->payload_off, route_off = self->route_off;
    char *slot = head_slot(self);

    if (trajectory_type == NULL || Py_TYPE(traj) != trajectory_type) goto done;
    if (!(query = PyObject_GetAttr(traj, s_query)) || !(steps = PyObject_GetAttr(traj, s_steps)) ||
        !(quality = PyObject_GetAttr(traj, s_quality)) || !(latency = PyObject_GetAttr(traj, s_latency_us)) ||
        !(route = PyObject_GetAttr(traj, s_route)) || !(tid_obj = PyObject_GetAttr(traj, s_id))) {
        PyErr_Clear();
        goto done;
    }
    PyArrayObject *q = as_f32(query, hidden, hidden);
    if (q == NULL || copy_finite((float *)(slot + payload_off), q) < 0) goto done;
    Py_ssize_t n = fill_steps(slot, steps, hidden, self->max_steps, self->att_dim, payload_off, self->step_bytes);
    if (n < 0) goto done;

    double qual;
    uint64_t lat, tid, next_id = 0;
    int use_next_id = 0;
    if (get_float(quality, &qual) < 0 || get_u64(latency, &lat) < 0) goto done;
    if (tid_obj == Py_None) {
        next_id = __atomic_load_n(self->next_id_word, __ATOMIC_RELAXED); /* only this lane's owner writes it */
        tid = next_id * self->lanes + self->lane;
        use_next_id = 1;
    } else if (get_u64(tid_obj, &tid) < 0) {
        goto done;
    }
    Py_ssize_t route_len = 0;
    if (route != Py_None) {
        if (!PyUnicode_CheckExact(route)) goto done;
        const char *utf8 = PyUnicode_AsUTF8AndSize(route, &route_len);
        if (utf8 == NULL) {
            PyErr_Clear();
            goto done;
        }
        if (route_len > ROUTE_MAX_BYTES) goto done;
        memcpy(slot + route_off, utf8, (size_t)route_len);
    }
    float q32 = (float)qual;
    uint16_t ns = (uint16_t)n, rl = (uint16_t)route_len;
    memcpy(slot + 8, &tid, 8);
    memcpy(slot + 16, &lat, 8);
    memcpy(slot + 24, &q32, 4);
    memcpy(slot + 28, &ns, 2);
    memcpy(slot + 30, &rl, 2);
    if (use_next_id) __atomic_store_n(self->next_id_word, next_id + 1, __ATOMIC_RELAXED);
    result = 0;

done:
    Py_XDECREF(query);
    Py_XDECREF(steps);
    Py_XDECREF(quality);
    Py_XDECREF(latency);
    Py_XDECREF(route);
    Py_XDECREF(tid_obj);
    return result;
}

/* Stamp the filled head slot, publish it, note the time: 2 if the flusher sleeps (the
 * caller rings its doorbell), else 1. */
static long publish(LaneWriter *self) {
    uint64_t next = self->head + 1;
    __atomic_store_n((uint64_t *)head_slot(self), next, __ATOMIC_RELEASE); /* stamps the slot: its payload is complete */
    self->head = next;
    __atomic_store_n(self->head_word, next, __ATOMIC_RELEASE); /* publishes the slot to the flusher */
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    double at = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
    memcpy(self->last_at_word, &at, 8);
    /* The head store above and the idle load below are the two halves of a handshake
     * with the flusher, which stores idle = 1 and then reads the heads: without a full
     * fence x86 may let this load pass that store, and both sides could miss the other
     * (a wake-up lost until the flusher's 50 ms timeout). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return __atomic_load_n(self->idle_word, __ATOMIC_RELAXED) ? 2 : 1;
}

/* record(traj) -> 1 published, 2 published and the flusher sleeps, 0 the ring is full
 * (nothing written), -1 not the common form (take the Python path). */
static PyObject *LaneWriter_record(LaneWriter *self, PyObject *traj) {
    if (closed(self)) return NULL;
    if (self->head - self->tail >= (uint64_t)self->ring_slots) return PyLong_FromLong(0);
    if (fill(self, traj) < 0) return PyLong_FromLong(-1);
    return PyLong_FromLong(publish(self));
}

/* fill(traj) -> 0 filled, -1 not the common form. Fills the head slot without publishing. */
static PyObject *LaneWriter_fill(LaneWriter *self, PyObject *traj) {
    if (closed(self)) return NULL;
    return PyLong_FromLong(fill(self, traj));
}

/* publish() -> 1 or 2: publish a head slot filled by someone else (the Python path). */
static PyObject *LaneWriter_publish(LaneWriter *self, PyObject *unused) {
    if (closed(self)) return NULL;
    return PyLong_FromLong(publish(self));
}

static PyObject *LaneWriter_get_head(LaneWriter *self, void *closure) { return PyLong_FromUnsignedLongLong(self->head); }

static PyObject *LaneWriter_get_tail(LaneWriter *self, void *closure) { return PyLong_FromUnsignedLongLong(self->tail); }

static int LaneWriter_set_tail(LaneWriter *self, PyObject *value, void *closure) {
    uint64_t tail;
    if (value == NULL || get_u64(value, &tail) < 0) {
        PyErr_SetString(PyExc_ValueError, "tail: expected an int in [0, 2**64)");
        return -1;
    }
    self->tail = tail;
    return 0;
}

static PyObject *LaneWriter_get_slot_offset(LaneWriter *self, void *closure) {
    return PyLong_FromSsize_t(self->slot0 + (Py_ssize_t)(self->head % (uint64_t)self->ring_slots) * self->slot_bytes);
}

static PyGetSetDef LaneWriter_getset[] = {
    {"head", (getter)LaneWriter_get_head, NULL, "Slots published by this lane, ever.", NULL},
    {"tail", (getter)LaneWriter_get_tail, (setter)LaneWriter_set_tail, "The committed tail last read by the owner.", NULL},
    {"slot_offset", (getter)LaneWriter_get_slot_offset, NULL, "Byte offset in the segment of the head slot.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef LaneWriter_methods[] = {
    {"record", (PyCFunction)LaneWriter_record, METH_O, "record(traj) -> 1, 2 (ring), 0 (full) or -1 (Python path)."},
    {"fill", (PyCFunction)LaneWriter_fill, METH_O, "fill(traj) -> 0, or -1 (Python path); does not publish."},
    {"publish", (PyCFunction)LaneWriter_publish, METH_NOARGS, "Publish the filled head slot -> 1, or 2 (ring)."},
    {"close", (PyCFunction)LaneWriter_close, METH_NOARGS, "Release the segment buffer."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LaneWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sona_shm._speedups.LaneWriter",
    .tp_basicsize = sizeof(LaneWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The producer's side of one lane: fills, stamps and publishes its slots.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)LaneWriter_init,
    .tp_dealloc = (destructor)LaneWriter_dealloc,
    .tp_methods = LaneWriter_methods,
    .tp_getset = LaneWriter_getset,
};

/* Eight interleaved partial sums: no loop-carried dependency on one register, and a
 * shape the compiler turns into vector instructions (as BLAS does, in another order). */
static float dot(const float *a, const float *b, npy_intp n) {
    float p[8] = {0};
    npy_intp i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) p[j] += a[i + j] * b[i + j];
    for (; i < n; i++) p[0] += a[i] * b[i];
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

/* Copy n float32 from src (element stride ``stride`` bytes) to dst; -1 if one is not finite. */
static int copy_row(float *dst, const char *src, npy_intp n, npy_intp stride) {
    if (stride == 4) {
        memcpy(dst, src, (size_t)n * 4);
    } else {
        for (npy_intp i = 0; i < n; i++) memcpy(dst + i, src + i * stride, 4);
    }
    uint32_t bad = 0;
    for (npy_intp i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, dst + i, 4);
        bad |= (bits & 0x7f800000u) == 0x7f800000u; /* NaN or +-Inf: all exponent bits set */
    }
    return bad ? -1 : 0;
}

/* adapt(x, down, up_scaled) -> float32[h] / float32[n, h], or None (x is not a finite
 * native float32 [h] or [n, h] array: take the Python path). down, up_scaled:
 * C-contiguous float32[R, h], R in {1, 2}. Returns x + (x @ down.T) @ up_scaled. */
static PyObject *adapt(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "adapt() takes 3 arguments");
        return NULL;
    }
    PyArrayObject *d = (PyArrayObject *)args[1], *u = (PyArrayObject *)args[2];
    if (!PyArray_CheckExact(args[1]) || !PyArray_CheckExact(args[2]) || PyArray_NDIM(d) != 2 || PyArray_NDIM(u) != 2 ||
        PyArray_TYPE(d) != NPY_FLOAT32 || PyArray_TYPE(u) != NPY_FLOAT32 || !PyArray_IS_C_CONTIGUOUS(d) ||
        !PyArray_IS_C_CONTIGUOUS(u) || PyArray_DIM(d, 0) != PyArray_DIM(u, 0) || PyArray_DIM(d, 1) != PyArray_DIM(u, 1) ||
        PyArray_DIM(d, 0) < 1 || PyArray_DIM(d, 0) > 2) {
        PyErr_SetString(PyExc_ValueError, "adapt(): down and up_scaled must be C-contiguous float32[R, h], R in {1, 2}");
        return NULL;
    }
    npy_intp rank = PyArray_DIM(d, 0), h = PyArray_DIM(d, 1);
    if (!PyArray_CheckExact(args[0])) Py_RETURN_NONE;
    PyArrayObject *x = (PyArrayObject *)args[0];
    int ndim = PyArray_NDIM(x);
    if ((ndim != 1 && ndim != 2) || PyArray_TYPE(x) != NPY_FLOAT32 || !PyArray_ISNOTSWAPPED(x) || PyArray_DIM(x, ndim - 1) != h)
        Py_RETURN_NONE;
    npy_intp rows = ndim == 2 ? PyArray_DIM(x, 0) : 1;
    npy_intp row_stride = ndim == 2 ? PyArray_STRIDE(x, 0) : 0, col_stride = PyArray_STRIDE(x, ndim - 1);
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(ndim, PyArray_DIMS(x), NPY_FLOAT32);
    if (out == NULL) return NULL;
    const float *D = (const float *)PyArray_DATA(d), *U = (const float *)PyArray_DATA(u);
    const char *xb = PyArray_BYTES(x);
    float *o = (float *)PyArray_DATA(out);
    for (npy_intp r = 0; r < rows; r++, o += h) {
        if (copy_row(o, xb + r * row_stride, h, col_stride) < 0) {
            Py_DECREF(out);
            Py_RETURN_NONE;
        }
        float c0 = dot(D, o, h);
        if (rank == 2) {
            float c1 = dot(D + h, o, h);
            for (npy_intp i = 0; i < h; i++) o[i] += c0 * U[i] + c1 * U[h + i];
        } else {
            for (npy_intp i = 0; i < h; i++) o[i] += c0 * U[i];
        }
    }
    return (PyObject *)out;
}

/* ------------------------------------------------------------------ the learner */

#define DEGENERATE_NORM 1e-8

static double norm_f64(const double *g, npy_intp h) {
    double s = 0.0;
    for (npy_intp i = 0; i < h; i++) s += g[i] * g[i];
    return sqrt(s);
}

static float reward_of(const char *slot, int s) {
    float r;
    memcpy(&r, slot + SLOT_HEAD_BYTES + 8 * s, 4);
    return r;
}

/* learning.signal_parts() of one stepped slot in float64, normalised, into g: for the
 * rare trajectory whose float32 sums overflow (inputs near the float32 limit). */
static void signal_f64(const char *slot, Py_ssize_t payload_off, Py_ssize_t step_bytes, npy_intp h, int n, double *g64,
                       float *g) {
    const float *acts = (const float *)(slot + payload_off + 4 * h);
    double total = 0.0;
    for (int s = 0; s < n; s++) total += reward_of(slot, s);
    double baseline = total / n;
    for (int pass = 0; pass < 2; pass++) { /* pass 0: advantages; pass 1: the fallback, rewards */
        for (npy_intp i = 0; i < h; i++) g64[i] = 0.0;
        for (int s = 0; s < n; s++) {
            double w = pass == 0 ? (double)reward_of(slot, s) - baseline : (double)reward_of(slot, s);
            const float *a = (const float *)((const char *)acts + s * step_bytes);
            for (npy_intp i = 0; i < h; i++) g64[i] += w * a[i];
        }
        double norm = norm_f64(g64, h);
        if (norm > DEGENERATE_NORM || pass == 1) {
            double inv = norm > DEGENERATE_NORM ? 1.0 / norm : 1.0;
            for (npy_intp i = 0; i < h; i++) g[i] = (float)(g64[i] * inv);
            return;
        }
    }
}

/* The signal of one stepped slot as learning.signal_parts() computes it: g (not yet
 * normalised) and the scale that normalises it (1 when the norm is <= 1e-8). Rewards and
 * steps are added in order, in float32, like the reference, and the norm is compared
 * with 1e-8 in float32 as the reference does; -1 if the float32 sums overflowed. */
static int signal_f32(const char *slot, Py_ssize_t payload_off, Py_ssize_t step_bytes, npy_intp h, int n, float *g,
                      float *scale) {
    const float *acts = (const float *)(slot + payload_off + 4 * h);
    float baseline = 0.0f;
    if (n > 1) {
        float total = reward_of(slot, 0);
        for (int s = 1; s < n; s++) total += reward_of(slot, s);
        baseline = total / (float)n;
    }
    /* One step: the baseline is the reward, every advantage exactly 0, so the reference
     * always takes the fallback (pass 1). */
    for (int pass = n == 1; pass < 2; pass++) {
        for (int s = 0; s < n; s++) {
            float w = pass == 0 ? reward_of(slot, s) - baseline : reward_of(slot, s);
            const float *a = (const float *)((const char *)acts + s * step_bytes);
            if (s == 0) {
                for (npy_intp i = 0; i < h; i++) g[i] = w * a[i];
            } else {
                for (npy_intp i = 0; i < h; i++) g[i] += w * a[i];
            }
        }
        float norm = sqrtf(dot(g, g, h));
        if (!isfinite(norm)) return -1;
        if (norm > (float)DEGENERATE_NORM || pass == 1) {
            *scale = norm > (float)DEGENERATE_NORM ? 1.0f / norm : 1.0f;
            return 0;
        }
    }
    return 0; /* not reached: pass 1 always returns */
}

/* learn_slots(block, count, hidden_dim, max_steps, payload_offset, step_bytes, first_seq,
 *             grad_up, up, lr, flush_threshold, pending) -> (pending, flushes, width) or None
 * Learns ``count`` consecutive slots of ``block`` (a buffer of count * slot_bytes, slot i
 * stamped first_seq + i) as Learner.learn(learning_signals(...)) does, up to float32
 * rounding (norms and sums are added in another order; a REINFORCE norm within rounding
 * of the 1e-8 threshold may take the other branch -- as it may between any two
 * implementations of the reference's float32 arithmetic): each
 * signal times its quality is added to every row of grad_up (float64[R, h], in place),
 * and every time ``pending`` reaches ``flush_threshold`` the rows are applied,
 * ``up += grad_up * lr / pending`` (float32[R, h], saturated at the float32 limit), and
 * the sums reset. ``width`` is the most steps a slot had. None, with nothing changed, if
 * a slot fails its stamp or its step count: the caller's Python path then sorts the
 * slots out and logs them. */
static PyObject *learn_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "learn_slots() takes 12 arguments");
        return NULL;
    }
    Py_ssize_t v[12];
    int ints[] = {1, 2, 3, 4, 5, 10, 11};
    for (size_t k = 0; k < sizeof ints / sizeof *ints; k++) {
        v[ints[k]] = PyLong_AsSsize_t(args[ints[k]]);
        if (v[ints[k]] == -1 && PyErr_Occurred()) return NULL;
    }
    unsigned long long first_seq = PyLong_AsUnsignedLongLong(args[6]);
    if (first_seq == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    double lr = PyFloat_AsDouble(args[9]);
    if (lr == -1.0 && PyErr_Occurred()) return NULL;
    Py_ssize_t count = v[1], hidden = v[2], max_steps = v[3], payload_off = v[4], step_bytes = v[5], threshold = v[10],
               pending = v[11];
    PyArrayObject *grad = (PyArrayObject *)args[7], *up = (PyArrayObject *)args[8];
    if (!PyArray_Check(args[7]) || !PyArray_Check(args[8]) || PyArray_TYPE(grad) != NPY_FLOAT64 || PyArray_TYPE(up) != NPY_FLOAT32 ||
        PyArray_NDIM(grad) != 2 || PyArray_NDIM(up) != 2 || !PyArray_IS_C_CONTIGUOUS(grad) || !PyArray_IS_C_CONTIGUOUS(up) ||
        !PyArray_ISWRITEABLE(grad) || !PyArray_ISWRITEABLE(up) || PyArray_DIM(grad, 1) != hidden || PyArray_DIM(up, 1) != hidden ||
        PyArray_DIM(grad, 0) != PyArray_DIM(up, 0) || hidden < 1 || count < 0 || max_steps < 0 || max_steps > 0xFFFF ||
        threshold < 1 || pending < 0 || pending >= threshold || slot_span(payload_off, hidden, max_steps, step_bytes) < 0 ||
        step_bytes < 4 * hidden || payload_off < SLOT_HEAD_BYTES + 8 * max_steps) {
        PyErr_SetString(PyExc_ValueError, "learn_slots(): inconsistent arguments");
        return NULL;
    }
    Py_buffer block;
    if (PyObject_GetBuffer(args[0], &block, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *result = NULL;
    npy_intp rank = PyArray_DIM(grad, 0), h = hidden;
    Py_ssize_t slot_bytes = count ? block.len / count : 0;
    if (count && (block.len % count || slot_bytes < slot_span(payload_off, hidden, max_steps, step_bytes))) {
        PyErr_SetString(PyExc_ValueError, "learn_slots(): block is not count whole slots");
        goto release;
    }
    const char *base = (const char *)block.buf;
    int width = 0;
    for (Py_ssize_t k = 0; k < count; k++) { /* check every stamp before learning anything */
        uint64_t seq;
        uint16_t n;
        memcpy(&seq, base + k * slot_bytes, 8);
        memcpy(&n, base + k * slot_bytes + 28, 2);
        if (n > width) width = n;
        if (seq != first_seq + (uint64_t)k || n > max_steps) {
            Py_INCREF(Py_None);
            result = Py_None;
            goto release;
        }
    }
    {
        double *G = (double *)PyArray_DATA(grad);
        float *U = (float *)PyArray_DATA(up);
        float *g = PyMem_Malloc((size_t)h * sizeof(float));
        double *acc = PyMem_Calloc((size_t)h, sizeof(double));
        double *g64 = PyMem_Malloc((size_t)h * sizeof(double));
        if (!g || !acc || !g64) {
            PyMem_Free(g);
            PyMem_Free(acc);
            PyMem_Free(g64);
            PyErr_NoMemory();
            goto release;
        }
        long flushes = 0;
        int dirty = 0; /* acc holds sums not yet added to G */
        for (Py_ssize_t k = 0; k < count; k++) {
            const char *slot = base + k * slot_bytes;
            uint16_t n;
            float q, scale = 1.0f;
            memcpy(&n, slot + 28, 2);
            memcpy(&q, slot + 24, 4);
            const float *sig = g;
            if (n == 0) {
                sig = (const float *)(slot + payload_off); /* the query itself, not normalised */
            } else if (signal_f32(slot, payload_off, step_bytes, h, n, g, &scale) < 0) {
                signal_f64(slot, payload_off, step_bytes, h, n, g64, g);
                scale = 1.0f;
            }
            double w = (double)q * (double)scale; /* float64: a huge quality times a big scale cannot overflow */
            for (npy_intp i = 0; i < h; i++) acc[i] += w * sig[i];
            dirty = 1;
            if (++pending == threshold) {
                double step = lr / (double)pending;
                for (npy_intp r = 0; r < rank; r++)
                    for (npy_intp i = 0; i < h; i++) {
                        double val = (double)U[r * h + i] + (G[r * h + i] + acc[i]) * step;
                        U[r * h + i] = (float)(val > FLT_MAX_D ? FLT_MAX_D : val < -FLT_MAX_D ? -FLT_MAX_D : val);
                        G[r * h + i] = 0.0;
                    }
                memset(acc, 0, (size_t)h * sizeof(double));
                dirty = 0;
                pending = 0;
                flushes++;
            }
        }
        if (dirty)
            for (npy_intp r = 0; r < rank; r++)
                for (npy_intp i = 0; i < h; i++) G[r * h + i] += acc[i];
        PyMem_Free(g);
        PyMem_Free(acc);
        PyMem_Free(g64);
        result = Py_BuildValue("(nli)", pending, flushes, width);
    }
release:
    PyBuffer_Release(&block);
    return result;
}

/* set_types(Trajectory, Step): the exact classes fill_slot accepts (instances of
 * subclasses take the Python path). */
static PyObject *set_types(PyObject *self, PyObject *args) {
    PyObject *t, *s;
    if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &t, &PyType_Type, &s)) return NULL;
    Py_XSETREF(trajectory_type, (PyTypeObject *)Py_NewRef(t));
    Py_XSETREF(step_type, (PyTypeObject *)Py_NewRef(s));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_types", set_types, METH_VARARGS, "Register the Trajectory and Step classes."},
    {"learn_slots", (PyCFunction)(void (*)(void))learn_slots, METH_FASTCALL,
     "Learn consecutive lane slots into grad_up/up, flushing at the threshold; None: take the numpy path."},
    {"adapt", (PyCFunction)(void (*)(void))adapt, METH_FASTCALL,
     "x + adapter(x) for one finite float32 vector; None: take the Python path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    import_array();
#define INTERN(var, text) \
    if (!(var = PyUnicode_InternFromString(text))) return NULL
    INTERN(s_query, "query");
    INTERN(s_steps, "steps");
    INTERN(s_quality, "quality");
    INTERN(s_latency_us, "latency_us");
    INTERN(s_route, "route");
    INTERN(s_id, "id");
    INTERN(s_activations, "activations");
    INTERN(s_attention, "attention");
    INTERN(s_reward, "reward");
    if (PyType_Ready(&LaneWriterType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "LaneWriter", (PyObject *)&LaneWriterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
