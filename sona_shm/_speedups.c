/* Optional C fast paths for the two per-request calls of a producer.
 *
 * fill_slot() writes a trajectory that is already in the common form (float32 numpy
 * arrays, Python floats and ints) into a lane slot, checking everything
 * check_trajectory() checks; adapt() applies the adapter to one float32 vector. Both
 * return -1 / None -- never raise -- for anything else, and the caller then takes the
 * pure-Python path, which converts what it can and raises the precise error
 * otherwise. So this file never decides on its own what is valid: it accepts a subset
 * of what the Python path accepts, with byte-identical results (tests/test_speedups.py
 * checks both). The slot layout is documented in layout.py.
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

/* Copy a float32 vector to dst; 0 if every value is finite, else -1. */
static int copy_finite(float *dst, PyArrayObject *a) {
    npy_intp n = PyArray_DIM(a, 0), stride = PyArray_STRIDE(a, 0);
    const char *src = PyArray_BYTES(a);
    uint32_t all_exp = 0;
    if (stride == 4) {
        memcpy(dst, src, (size_t)n * 4);
    } else {
        for (npy_intp i = 0; i < n; i++) memcpy(dst + i, src + i * stride, 4);
    }
    /* NaN and +-Inf are the values whose exponent bits are all ones. */
    for (npy_intp i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, dst + i, 4);
        all_exp |= ((bits & 0x7f800000u) == 0x7f800000u);
    }
    return all_exp ? -1 : 0;
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

/* SlotWriter(lane, hidden_dim, max_steps, attention_dim, payload_offset, route_offset,
 *            step_bytes): fills slots of one lane ring (a writable buffer, held until
 * close()). Geometry is checked once here, so fill() only checks the trajectory. */
typedef struct {
    PyObject_HEAD
    Py_buffer lane;
    int has_lane;
    Py_ssize_t hidden, max_steps, att_dim, payload_off, route_off, step_bytes, slot_span;
} SlotWriter;

static int SlotWriter_init(SlotWriter *self, PyObject *args, PyObject *kwds) {
    PyObject *lane;
    if (!PyArg_ParseTuple(args, "Onnnnnn", &lane, &self->hidden, &self->max_steps, &self->att_dim, &self->payload_off,
                          &self->route_off, &self->step_bytes))
        return -1;
    if (self->hidden < 1 || self->max_steps < 0 || self->max_steps > 0xFFFF || self->att_dim < 0 ||
        self->step_bytes < 4 * (self->hidden + self->att_dim) || self->route_off < SLOT_HEAD_BYTES + 8 * self->max_steps ||
        self->route_off + ROUTE_MAX_BYTES > self->payload_off) {
        PyErr_SetString(PyExc_ValueError, "SlotWriter: inconsistent slot geometry");
        return -1;
    }
    if (self->has_lane) {
        PyBuffer_Release(&self->lane);
        self->has_lane = 0;
    }
    if (PyObject_GetBuffer(lane, &self->lane, PyBUF_WRITABLE) < 0) return -1;
    self->has_lane = 1;
    self->slot_span = self->payload_off + 4 * self->hidden + self->max_steps * self->step_bytes;
    return 0;
}

static void SlotWriter_dealloc(SlotWriter *self) {
    if (self->has_lane) PyBuffer_Release(&self->lane);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *SlotWriter_close(SlotWriter *self, PyObject *unused) {
    if (self->has_lane) {
        PyBuffer_Release(&self->lane);
        self->has_lane = 0;
    }
    Py_RETURN_NONE;
}

/* fill(offset, traj, default_id) -> int
 * Fills the slot at byte ``offset`` of the lane -- payload and head, all but ``seq``.
 * Returns 2 * n_steps + (1 if ``default_id`` was used), or -1: take the Python path
 * (whatever was written is private to the unpublished slot). */
static PyObject *SlotWriter_fill(SlotWriter *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "fill() takes 3 arguments");
        return NULL;
    }
    if (!self->has_lane) {
        PyErr_SetString(PyExc_ValueError, "SlotWriter is closed");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[0]);
    if (offset == -1 && PyErr_Occurred()) return NULL;
    PyObject *traj = args[1], *default_id = args[2];
    long result = -1;
    PyObject *query = NULL, *steps = NULL, *quality = NULL, *latency = NULL, *route = NULL, *tid_obj = NULL;
    Py_ssize_t hidden = self->hidden, payload_off = self->payload_off, route_off = self->route_off;

    if (offset < 0 || offset % 8 || offset > self->lane.len - self->slot_span) goto done;
    if (trajectory_type == NULL || Py_TYPE(traj) != trajectory_type) goto done;
    char *slot = (char *)self->lane.buf + offset;
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
    uint64_t lat, tid;
    int used_default = 0;
    if (get_float(quality, &qual) < 0 || get_u64(latency, &lat) < 0) goto done;
    if (tid_obj == Py_None) {
        if (get_u64(default_id, &tid) < 0) goto done;
        used_default = 1;
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
    result = 2 * (long)n + used_default;

done:
    Py_XDECREF(query);
    Py_XDECREF(steps);
    Py_XDECREF(quality);
    Py_XDECREF(latency);
    Py_XDECREF(route);
    Py_XDECREF(tid_obj);
    return PyLong_FromLong(result);
}

static PyMethodDef SlotWriter_methods[] = {
    {"fill", (PyCFunction)(void (*)(void))SlotWriter_fill, METH_FASTCALL,
     "fill(offset, traj, default_id) -> 2*n_steps + used_default, or -1: take the Python path."},
    {"close", (PyCFunction)SlotWriter_close, METH_NOARGS, "Release the lane buffer."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SlotWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sona_shm._speedups.SlotWriter",
    .tp_basicsize = sizeof(SlotWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Fills the slots of one lane ring with common-form trajectories.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SlotWriter_init,
    .tp_dealloc = (destructor)SlotWriter_dealloc,
    .tp_methods = SlotWriter_methods,
};

/* Four interleaved partial sums: no loop-carried dependency on one register, as BLAS. */
static float dot(const float *a, const float *b, npy_intp n) {
    float p0 = 0.0f, p1 = 0.0f, p2 = 0.0f, p3 = 0.0f;
    npy_intp i = 0;
    for (; i + 4 <= n; i += 4) {
        p0 += a[i] * b[i];
        p1 += a[i + 1] * b[i + 1];
        p2 += a[i + 2] * b[i + 2];
        p3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) p0 += a[i] * b[i];
    return (p0 + p1) + (p2 + p3);
}

/* adapt(x, down, up_scaled) -> float32[h] or None (x is not a finite native float32[h]:
 * take the Python path). down, up_scaled: C-contiguous float32[R, h], R in {1, 2}.
 * Returns x + (down @ x) @ up_scaled. */
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
    PyArrayObject *x = as_f32(args[0], h, h);
    if (x == NULL) Py_RETURN_NONE;
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, &h, NPY_FLOAT32);
    if (out == NULL) return NULL;
    float *o = (float *)PyArray_DATA(out);
    if (copy_finite(o, x) < 0) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    const float *D = (const float *)PyArray_DATA(d), *U = (const float *)PyArray_DATA(u);
    float c0 = dot(D, o, h), c1 = rank == 2 ? dot(D + h, o, h) : 0.0f;
    if (rank == 2) {
        for (npy_intp i = 0; i < h; i++) o[i] += c0 * U[i] + c1 * U[h + i];
    } else {
        for (npy_intp i = 0; i < h; i++) o[i] += c0 * U[i];
    }
    return (PyObject *)out;
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
    if (PyType_Ready(&SlotWriterType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "SlotWriter", (PyObject *)&SlotWriterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
