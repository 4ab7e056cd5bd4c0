/* The C twin of sona_shm's hot paths, optional: sona_shm/native.py loads it (or, without a C
 * compiler at install time, runs the Python twins, with the same results). Its interface is
 * declared in _speedups.pyi, which mypy.stubtest checks against this module in CI.
 *
 *   Geometry            a segment's slot and lane geometry (shm/layout.py builds it: Layout.geometry),
 *                       checked once when it is made; every call below that reads slots takes one.
 *   LaneWriter          the producer's side of one lane (shm/lane.py's PyLaneWriter is its twin):
 *                       record() writes a trajectory in the common form into the head slot and
 *                       publishes it; anything else is handed back (-1) to the Python path.
 *   adapt, route        forward() of one float32 vector; route()'s greedy choice (cosines, argmax).
 *   learn_slots         the reference rule over a block of lane slots (learn/learner.py's numpy twin).
 *   learn_routing       the routing rule over a block of lane slots (learn/routing.py's numpy twin).
 *   write_window,       a sealed fleet window's bytes, and applying them (fleet/window.py's twins).
 *   apply_window
 *   set_types           registers the Trajectory, Step and RouteChoice classes (sona_shm/native.py).
 *
 * The byte offsets it uses are defined once below and exported as module constants;
 * tests/test_speedups.py compares them with shm/layout.py, where the layout is written down.
 * Nothing here decides on its own what is valid: the C paths accept a subset of what the Python
 * paths accept (None / -1: take the Python path, which converts or raises the precise error),
 * and the tests compare the bytes written and the weights learned both ways.
 *
 * Why C at all: a record() in Python pays ~16k instructions of interpreter and ~5k per numpy
 * call for ~2 KB of copying; here the whole call is a few hundred instructions. The learners
 * touch no Python object while they run, so they release the GIL for batches.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

#define FLT_MAX_D 3.4028234663852886e38
/* The layout (shm/layout.py is the one place it is written down; these must equal it, and
 * tests/test_speedups.py checks that they do through the module constants of the same names). */
#define ROUTE_MAX_BYTES 64     /* trajectory.ROUTE_MAX_BYTES */
#define SLOT_HEAD_BYTES 40     /* the slot's fixed head; then max_steps * (f32 reward, u16 act_len, u16 att_len) */
#define SLOT_TRAJ_ID 8         /* u64 */
#define SLOT_LATENCY_US 16     /* u64 */
#define SLOT_QUALITY 24        /* f32 */
#define SLOT_N_STEPS 28        /* u16 */
#define SLOT_ROUTE_LEN 30      /* u16 */
#define SLOT_ROUTE_INDEX 32    /* u16: route_index + 1, 0 for none */
#define SLOT_BEST_INDEX 34     /* u16: best_index + 1, 0 for none */
#define SLOT_PROBABILITY 36    /* f32: the probability the route taken was chosen with, in (0, 1]; 0: not recorded */
#define LANE_CONTROL_BYTES 128 /* per lane, at lanes_offset + lane * LANE_CONTROL_BYTES */
#define LANE_HEAD 0            /* u64, in the lane's producer line */
#define LANE_NEXT_ID 16        /* u64 */
#define LANE_LAST_AT 32        /* f64 */
#define FLUSHER_LINE 1024      /* the flusher's control line */
#define FL_IDLE 24             /* u64: 1 while the flusher sleeps on its doorbell */
#define WINDOW_HEAD_BYTES 64   /* a sealed window's header */
#define MAX_ROUTES_C 256       /* config.MAX_ROUTES */

/* The routing learner's per-signal loop and route()'s scores are dot products and updates of
 * length h: with AVX2 (x86-64-v3) they run about twice as fast as with the SSE2 every x86-64
 * has. GCC compiles both and the loader picks one for the CPU at hand (an ifunc), so the
 * module still runs anywhere. Both round alike: in ISO C mode (-std=c11) GCC does not fuse
 * a * b + c into one FMA, and the sums keep their order whatever the vector width. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define WIDE_VECTORS __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define WIDE_VECTORS
#endif

static PyTypeObject *trajectory_type, *step_type, *route_choice_type; /* set once by set_types() */
static PyObject *s_query, *s_steps, *s_quality, *s_latency_us, *s_route, *s_id, *s_route_index, *s_best_index, *s_probability;
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

/* An array whose elements may be read (and written) in place as native C floats/ints: in the
 * machine's byte order ('>f4' is NPY_FLOAT32 too) and aligned. */
static int native(PyArrayObject *a) { return PyArray_ISNOTSWAPPED(a) && PyArray_ISALIGNED(a); }

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

/* A trajectory's route_index / best_index: None -> 0, an int in [0, n_routes) -> index + 1; -1 otherwise. */
static int get_route_index(PyObject *obj, Py_ssize_t n_routes, uint16_t *out) {
    if (obj == Py_None) {
        *out = 0;
        return 0;
    }
    uint64_t v;
    if (get_u64(obj, &v) < 0 || v >= (uint64_t)n_routes) return -1;
    *out = (uint16_t)(v + 1);
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

/* Geometry(*, hidden_dim, rank, max_steps, attention_dim, lanes, lane_slots, slot_bytes,
 *          payload_offset, route_offset, step_bytes, routes, lanes_offset, slots_offset, unit_reward)
 * A segment's slot and lane geometry, built by shm/layout.py (Layout.geometry) and checked
 * once here, so the calls that take it (LaneWriter, learn_slots, learn_routing) need not.
 * ``routes``: K, the route table's length (0: none); ``unit_reward``: the routing rule's
 * bandit rewards must lie in [0, 1]. Read-only attributes of the same names. */
typedef struct {
    PyObject_HEAD
    Py_ssize_t hidden, rank, max_steps, att_dim, lanes, lane_slots, slot_bytes, payload_off, route_off, step_bytes, n_routes;
    Py_ssize_t lanes_off, slots_off;
    int unit_reward;
} Geometry;

static PyTypeObject GeometryType;

static int Geometry_init(Geometry *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"hidden_dim", "rank", "max_steps", "attention_dim", "lanes", "lane_slots", "slot_bytes",
                             "payload_offset", "route_offset", "step_bytes", "routes", "lanes_offset", "slots_offset",
                             "unit_reward", NULL};
    Geometry g;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$nnnnnnnnnnnnnp", kwlist, &g.hidden, &g.rank, &g.max_steps, &g.att_dim,
                                     &g.lanes, &g.lane_slots, &g.slot_bytes, &g.payload_off, &g.route_off, &g.step_bytes,
                                     &g.n_routes, &g.lanes_off, &g.slots_off, &g.unit_reward))
        return -1;
    if (PyTuple_GET_SIZE(args) != 0 || kwds == NULL || PyDict_GET_SIZE(kwds) != 14) {
        PyErr_SetString(PyExc_TypeError, "Geometry() takes its 14 fields as keyword arguments");
        return -1;
    }
    Py_ssize_t span = slot_span(g.payload_off, g.hidden, g.max_steps, g.step_bytes);
    /* Lengths are stored as uint16 (act_len <= hidden, att_len <= attention_dim, n_steps <=
     * max_steps), so each is bounded by 0xFFFF; 4 * (hidden + att_dim) cannot overflow then. */
    int ok = g.hidden >= 1 && g.hidden <= 0xFFFF && g.rank >= 1 && g.rank <= 2 && g.max_steps >= 0 && g.max_steps <= 0xFFFF &&
             g.att_dim >= 0 && g.att_dim <= 0xFFFF && span >= 0 && g.step_bytes >= 4 * (g.hidden + g.att_dim) &&
             g.route_off >= SLOT_HEAD_BYTES + 8 * g.max_steps && g.route_off <= g.payload_off - ROUTE_MAX_BYTES && span <= g.slot_bytes &&
             g.slot_bytes % 8 == 0 && g.lanes >= 1 && g.lane_slots >= 1 && g.n_routes >= 0 && g.n_routes <= MAX_ROUTES_C &&
             g.lanes_off >= 0 && g.lanes_off % 8 == 0 && g.slots_off >= 0 && g.slots_off % 8 == 0;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "Geometry: inconsistent slot geometry");
        return -1;
    }
    self->hidden = g.hidden, self->rank = g.rank, self->max_steps = g.max_steps, self->att_dim = g.att_dim;
    self->lanes = g.lanes, self->lane_slots = g.lane_slots, self->slot_bytes = g.slot_bytes, self->payload_off = g.payload_off;
    self->route_off = g.route_off, self->step_bytes = g.step_bytes, self->n_routes = g.n_routes;
    self->lanes_off = g.lanes_off, self->slots_off = g.slots_off, self->unit_reward = g.unit_reward;
    return 0;
}

static PyMemberDef Geometry_members[] = {
    {"hidden_dim", T_PYSSIZET, offsetof(Geometry, hidden), READONLY, NULL},
    {"rank", T_PYSSIZET, offsetof(Geometry, rank), READONLY, NULL},
    {"max_steps", T_PYSSIZET, offsetof(Geometry, max_steps), READONLY, NULL},
    {"attention_dim", T_PYSSIZET, offsetof(Geometry, att_dim), READONLY, NULL},
    {"lanes", T_PYSSIZET, offsetof(Geometry, lanes), READONLY, NULL},
    {"lane_slots", T_PYSSIZET, offsetof(Geometry, lane_slots), READONLY, NULL},
    {"slot_bytes", T_PYSSIZET, offsetof(Geometry, slot_bytes), READONLY, NULL},
    {"payload_offset", T_PYSSIZET, offsetof(Geometry, payload_off), READONLY, NULL},
    {"route_offset", T_PYSSIZET, offsetof(Geometry, route_off), READONLY, NULL},
    {"step_bytes", T_PYSSIZET, offsetof(Geometry, step_bytes), READONLY, NULL},
    {"routes", T_PYSSIZET, offsetof(Geometry, n_routes), READONLY, NULL},
    {"lanes_offset", T_PYSSIZET, offsetof(Geometry, lanes_off), READONLY, NULL},
    {"slots_offset", T_PYSSIZET, offsetof(Geometry, slots_off), READONLY, NULL},
    {"unit_reward", T_BOOL, offsetof(Geometry, unit_reward), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject GeometryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sona_shm._speedups.Geometry",
    .tp_basicsize = sizeof(Geometry),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Geometry(*, hidden_dim, rank, max_steps, attention_dim, lanes, lane_slots, slot_bytes, payload_offset, route_offset, "
              "step_bytes, routes, lanes_offset, slots_offset, unit_reward)\n--\n\n"
              "A segment's slot and lane geometry, checked once (shm/layout.py builds it).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Geometry_init,
    .tp_members = Geometry_members,
};

static Geometry *as_geometry(PyObject *obj) {
    if (Py_TYPE(obj) != &GeometryType) {
        PyErr_SetString(PyExc_TypeError, "expected a sona_shm._speedups.Geometry");
        return NULL;
    }
    return (Geometry *)obj;
}

/* LaneWriter(segment, geometry, lane)
 * The producer's side of one lane (layout.py, "Lane control" and "Slot"): the C twin of
 * lane.PyLaneWriter, with the same methods and the same publication order. ``segment`` is a
 * writable buffer over the whole mapping (held until close()); the lane's ring, control line
 * and the flusher's idle word are found from ``geometry`` and checked against it once here.
 * ``head`` starts at the lane's published head, ``tail`` at 0 (the owner sets the committed tail). */
typedef struct {
    PyObject_HEAD
    Py_buffer seg;
    int has_seg;
    Py_ssize_t slot0, ring_slots, slot_bytes, hidden, max_steps, att_dim, payload_off, route_off, step_bytes;
    Py_ssize_t n_routes; /* route indices must be below it (0: the engine has no route table) */
    int unit_reward;     /* routing rule: a bandit feedback's quality (its reward) must be in [0, 1] */
    uint64_t *head_word, *next_id_word, *idle_word;
    double *last_at_word;
    uint64_t lanes, lane, head, tail;
} LaneWriter;

static int LaneWriter_init(LaneWriter *self, PyObject *args, PyObject *kwds) {
    /* Parsed into locals and checked before anything of ``self`` changes: a failed
     * (re-)initialisation leaves the writer as it was. */
    PyObject *seg, *geometry;
    Py_ssize_t lane;
    if (!PyArg_ParseTuple(args, "OO!n", &seg, &GeometryType, &geometry, &lane)) return -1;
    Geometry *g = (Geometry *)geometry;
    Py_buffer view;
    if (PyObject_GetBuffer(seg, &view, PyBUF_WRITABLE) < 0) return -1;
    Py_ssize_t len = view.len, ring = g->lane_slots * g->slot_bytes, control = g->lanes_off + lane * LANE_CONTROL_BYTES;
    int ok = lane >= 0 && lane < g->lanes && g->slots_off + (lane + 1) * ring <= len && control + LANE_CONTROL_BYTES <= len &&
             FLUSHER_LINE + FL_IDLE + 8 <= len;
    if (!ok) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "LaneWriter: the lane does not fit the segment");
        return -1;
    }
    if (self->has_seg) PyBuffer_Release(&self->seg);
    self->seg = view;
    self->has_seg = 1;
    self->slot0 = g->slots_off + lane * ring;
    self->ring_slots = g->lane_slots;
    self->slot_bytes = g->slot_bytes;
    self->hidden = g->hidden;
    self->max_steps = g->max_steps;
    self->att_dim = g->att_dim;
    self->payload_off = g->payload_off;
    self->route_off = g->route_off;
    self->step_bytes = g->step_bytes;
    self->n_routes = g->n_routes;
    self->unit_reward = g->unit_reward;
    char *base = (char *)view.buf;
    self->head_word = (uint64_t *)(base + control + LANE_HEAD);
    self->next_id_word = (uint64_t *)(base + control + LANE_NEXT_ID);
    self->last_at_word = (double *)(base + control + LANE_LAST_AT);
    self->idle_word = (uint64_t *)(base + FLUSHER_LINE + FL_IDLE);
    self->lanes = (uint64_t)g->lanes;
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
    PyObject *ri_obj = NULL, *bi_obj = NULL, *p_obj = NULL;
    Py_ssize_t hidden = self->hidden, payload_off = self->payload_off, route_off = self->route_off;
    char *slot = head_slot(self);

    if (trajectory_type == NULL || Py_TYPE(traj) != trajectory_type) goto done;
    if (!(query = PyObject_GetAttr(traj, s_query)) || !(steps = PyObject_GetAttr(traj, s_steps)) ||
        !(quality = PyObject_GetAttr(traj, s_quality)) || !(latency = PyObject_GetAttr(traj, s_latency_us)) ||
        !(route = PyObject_GetAttr(traj, s_route)) || !(tid_obj = PyObject_GetAttr(traj, s_id)) ||
        !(ri_obj = PyObject_GetAttr(traj, s_route_index)) || !(bi_obj = PyObject_GetAttr(traj, s_best_index)) ||
        !(p_obj = PyObject_GetAttr(traj, s_probability))) {
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
    uint16_t route_index = 0, best_index = 0; /* index + 1; 0: none */
    if (get_route_index(ri_obj, self->n_routes, &route_index) < 0 || get_route_index(bi_obj, self->n_routes, &best_index) < 0) goto done;
    if (self->unit_reward && route_index && !best_index && !(qual >= 0.0 && qual <= 1.0)) goto done; /* the Python path names it */
    double prob = 0.0; /* not recorded */
    if (p_obj != Py_None && (get_float(p_obj, &prob) < 0 || !(prob > 0.0 && prob <= 1.0))) goto done;
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
    memcpy(slot + SLOT_TRAJ_ID, &tid, 8);
    memcpy(slot + SLOT_LATENCY_US, &lat, 8);
    memcpy(slot + SLOT_QUALITY, &q32, 4);
    memcpy(slot + SLOT_N_STEPS, &ns, 2);
    memcpy(slot + SLOT_ROUTE_LEN, &rl, 2);
    float p32 = (float)prob;
    memcpy(slot + SLOT_ROUTE_INDEX, &route_index, 2);
    memcpy(slot + SLOT_BEST_INDEX, &best_index, 2);
    memcpy(slot + SLOT_PROBABILITY, &p32, 4);
    if (use_next_id) __atomic_store_n(self->next_id_word, next_id + 1, __ATOMIC_RELAXED);
    result = 0;

done:
    Py_XDECREF(query);
    Py_XDECREF(steps);
    Py_XDECREF(quality);
    Py_XDECREF(latency);
    Py_XDECREF(route);
    Py_XDECREF(tid_obj);
    Py_XDECREF(ri_obj);
    Py_XDECREF(bi_obj);
    Py_XDECREF(p_obj);
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
    {"record", (PyCFunction)LaneWriter_record, METH_O, "record($self, traj, /)\n--\n\n1, 2 (ring), 0 (full) or -1 (Python path)."},
    {"fill", (PyCFunction)LaneWriter_fill, METH_O, "fill($self, traj, /)\n--\n\n0, or -1 (Python path); does not publish."},
    {"publish", (PyCFunction)LaneWriter_publish, METH_NOARGS, "publish($self, /)\n--\n\nPublish the filled head slot: 1, or 2 (ring)."},
    {"close", (PyCFunction)LaneWriter_close, METH_NOARGS, "close($self, /)\n--\n\nRelease the segment buffer."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LaneWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sona_shm._speedups.LaneWriter",
    .tp_basicsize = sizeof(LaneWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "LaneWriter(segment, geometry, lane, /)\n--\n\nThe producer's side of one lane: fills, stamps and publishes its slots.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)LaneWriter_init,
    .tp_dealloc = (destructor)LaneWriter_dealloc,
    .tp_methods = LaneWriter_methods,
    .tp_getset = LaneWriter_getset,
};

/* Descriptor(path, flags, /) or Descriptor.dup(fd, /)
 * An open file descriptor owned by an object from the instant the kernel returns it: the open
 * (or dup) happens in C and the number is stored before control returns to Python, where a
 * signal handler (KeyboardInterrupt, a time limit) may raise at any bytecode. The number is
 * closed exactly once -- by close(), which may be called any number of times, or when the
 * object is collected -- so an interruption can neither leak it nor close it twice (the
 * second os.close() of a number could close another file that got it meanwhile). */
typedef struct {
    PyObject_HEAD
    int fd; /* -1: closed */
} Descriptor;

static PyTypeObject DescriptorType;

static int Descriptor_init(Descriptor *self, PyObject *args, PyObject *kwds) {
    PyObject *path;
    int flags;
    if (!PyArg_ParseTuple(args, "O&i", PyUnicode_FSConverter, &path, &flags)) return -1;
    if (self->fd >= 0) {
        Py_DECREF(path);
        PyErr_SetString(PyExc_ValueError, "Descriptor: already open");
        return -1;
    }
    int fd;
    Py_BEGIN_ALLOW_THREADS fd = open(PyBytes_AS_STRING(path), flags | O_CLOEXEC);
    Py_END_ALLOW_THREADS if (fd < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        Py_DECREF(path);
        return -1;
    }
    Py_DECREF(path);
    self->fd = fd;
    return 0;
}

static PyObject *Descriptor_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Descriptor *self = (Descriptor *)type->tp_alloc(type, 0);
    if (self != NULL) self->fd = -1;
    return (PyObject *)self;
}

static void close_descriptor(Descriptor *self) {
    int fd = self->fd;
    self->fd = -1;
    if (fd >= 0) close(fd);
}

static void Descriptor_dealloc(Descriptor *self) {
    close_descriptor(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Descriptor_close(Descriptor *self, PyObject *unused) {
    close_descriptor(self);
    Py_RETURN_NONE;
}

static PyObject *Descriptor_fileno(Descriptor *self, PyObject *unused) {
    if (self->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "Descriptor is closed");
        return NULL;
    }
    return PyLong_FromLong(self->fd);
}

static PyObject *Descriptor_dup(PyTypeObject *type, PyObject *arg) {
    long value = PyLong_AsLong(arg);
    if (value == -1 && PyErr_Occurred()) return NULL;
    if (value < 0 || value > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "Descriptor.dup(): expected a file descriptor");
        return NULL;
    }
    int fd = (int)value;
    Descriptor *self = (Descriptor *)Descriptor_new(type, NULL, NULL);
    if (self == NULL) return NULL;
    self->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (self->fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *Descriptor_get_closed(Descriptor *self, void *closure) { return PyBool_FromLong(self->fd < 0); }

static PyMethodDef Descriptor_methods[] = {
    {"close", (PyCFunction)Descriptor_close, METH_NOARGS, "close($self, /)\n--\n\nClose the descriptor (again: nothing)."},
    {"fileno", (PyCFunction)Descriptor_fileno, METH_NOARGS, "fileno($self, /)\n--\n\nThe descriptor's number (ValueError once closed)."},
    {"dup", (PyCFunction)Descriptor_dup, METH_O | METH_CLASS, "dup($type, fd, /)\n--\n\nA new Descriptor of a close-on-exec duplicate of fd."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Descriptor_getset[] = {
    {"closed", (getter)Descriptor_get_closed, NULL, "True once closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DescriptorType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sona_shm._speedups.Descriptor",
    .tp_basicsize = sizeof(Descriptor),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Descriptor(path, flags, /)\n--\n\nAn open file descriptor owned from the instant it is opened; closed exactly once.",
    .tp_new = Descriptor_new,
    .tp_init = (initproc)Descriptor_init,
    .tp_dealloc = (destructor)Descriptor_dealloc,
    .tp_methods = Descriptor_methods,
    .tp_getset = Descriptor_getset,
};

/* Eight interleaved partial sums (lane j adds elements j, j + 8, ...) in two 4-float vectors
 * of the compiler's vector extension: no loop-carried dependency on one register, and SIMD
 * that every x86-64 has (SSE); the sums are added in one fixed order, so results never
 * depend on the CPU. */
typedef float f32x4 __attribute__((vector_size(16)));

static inline __attribute__((always_inline)) float dot(const float *a, const float *b, npy_intp n) {
    f32x4 lo = {0, 0, 0, 0}, hi = {0, 0, 0, 0};
    npy_intp i = 0;
    for (; i + 8 <= n; i += 8) {
        f32x4 a0, a1, b0, b1;
        memcpy(&a0, a + i, sizeof a0);
        memcpy(&a1, a + i + 4, sizeof a1);
        memcpy(&b0, b + i, sizeof b0);
        memcpy(&b1, b + i + 4, sizeof b1);
        lo += a0 * b0;
        hi += a1 * b1;
    }
    float p[8];
    memcpy(p, &lo, sizeof lo);
    memcpy(p + 4, &hi, sizeof hi);
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
 * native, aligned, C-contiguous float32[R, h], R in {1, 2}. Returns x + (x @ down.T) @ up_scaled. */
static PyObject *adapt(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "adapt() takes 3 arguments");
        return NULL;
    }
    PyArrayObject *d = (PyArrayObject *)args[1], *u = (PyArrayObject *)args[2];
    if (!PyArray_CheckExact(args[1]) || !PyArray_CheckExact(args[2]) || PyArray_NDIM(d) != 2 || PyArray_NDIM(u) != 2 ||
        PyArray_TYPE(d) != NPY_FLOAT32 || PyArray_TYPE(u) != NPY_FLOAT32 || !PyArray_IS_C_CONTIGUOUS(d) ||
        !PyArray_IS_C_CONTIGUOUS(u) || !native(d) || !native(u) || PyArray_DIM(d, 0) != PyArray_DIM(u, 0) || PyArray_DIM(d, 1) != PyArray_DIM(u, 1) ||
        PyArray_DIM(d, 0) < 1 || PyArray_DIM(d, 0) > 2) {
        PyErr_SetString(PyExc_ValueError, "adapt(): down and up_scaled must be native, aligned, C-contiguous float32[R, h], R in {1, 2}");
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

/* The L2 norm of n float32 values in float64: infinite or NaN exactly when one of them is. */
static double norm_of_f32(const float *v, npy_intp n) {
    double s = 0.0;
    for (npy_intp i = 0; i < n; i++) s += (double)v[i] * (double)v[i];
    return sqrt(s);
}

static float reward_of(const char *slot, int s) {
    float r;
    memcpy(&r, slot + SLOT_HEAD_BYTES + 8 * s, 4);
    return r;
}

/* learning.signal_parts() of one stepped slot in float64, normalised, into g: for the
 * rare trajectory whose float32 sums overflow (inputs near the float32 limit). -1 if the
 * signal is not finite even so: only a NaN or an infinity in the slot does that (float64
 * sums of float32 values cannot overflow), and such a slot is corrupt. */
static int signal_f64(const char *slot, Py_ssize_t payload_off, Py_ssize_t step_bytes, npy_intp h, int n, double *g64,
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
            if (!isfinite(norm)) return -1;
            double inv = norm > DEGENERATE_NORM ? 1.0 / norm : 1.0;
            for (npy_intp i = 0; i < h; i++) g[i] = (float)(g64[i] * inv);
            return 0;
        }
    }
    return 0; /* not reached: pass 1 always returns */
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

/* What both learners take, parsed and checked once: the block of slots with its geometry,
 * and the learner's state (learn/learner.py's Learner: its attributes of these names). */
typedef struct {
    Py_buffer block;
    const char *base;
    Py_ssize_t count, slot_bytes, hidden, max_steps, payload_off, step_bytes, threshold, pending, n_routes;
    unsigned long long first_seq;
    double lr;
    PyObject *chosen, *best, *reward; /* per-route counts: uint64[K], uint64[K], float64[K] (new references) */
    PyObject *grad_up, *up, *grad_down, *down, *unit; /* float64/float32[R, h]; unit float32[K, h] (new references) */
    double temperature;
} Batch;

static int f64_matrix(PyObject *obj, npy_intp rows, npy_intp cols, int type) {
    if (!PyArray_Check(obj)) return 0;
    PyArrayObject *a = (PyArrayObject *)obj;
    return PyArray_TYPE(a) == type && PyArray_NDIM(a) == 2 && PyArray_IS_C_CONTIGUOUS(a) && PyArray_ISWRITEABLE(a) && native(a) &&
           (rows < 0 || PyArray_DIM(a, 0) == rows) && PyArray_DIM(a, 1) == cols;
}

static int vector_of(PyObject *obj, npy_intp n, int type) {
    if (!PyArray_Check(obj)) return 0;
    PyArrayObject *a = (PyArrayObject *)obj;
    return PyArray_TYPE(a) == type && PyArray_NDIM(a) == 1 && PyArray_IS_C_CONTIGUOUS(a) && PyArray_ISWRITEABLE(a) && native(a) &&
           PyArray_DIM(a, 0) == n;
}

static void batch_release(Batch *b) {
    if (b->block.obj != NULL) PyBuffer_Release(&b->block);
    Py_CLEAR(b->chosen);
    Py_CLEAR(b->best);
    Py_CLEAR(b->reward);
    Py_CLEAR(b->grad_up);
    Py_CLEAR(b->up);
    Py_CLEAR(b->grad_down);
    Py_CLEAR(b->down);
    Py_CLEAR(b->unit);
}

static PyObject *learner_attr(PyObject *learner, const char *name) { return PyObject_GetAttrString(learner, name); }

/* args: block (count whole slots of geometry), geometry, first_seq, learner, stop. Reads the
 * learner's lr, flush_threshold, pending, route_chosen, route_best, route_reward, grad_up and up
 * (and, with ``routing``, grad_down, down, unit and temperature). On failure everything taken
 * is released and -1 returned with an exception set. */
static int batch_open(PyObject *const *args, Py_ssize_t nargs, const char *name, int routing, Batch *b, int *stop) {
    memset(b, 0, sizeof(Batch));
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "%s() takes 5 arguments (block, geometry, first_seq, learner, stop)", name);
        return -1;
    }
    Geometry *g = as_geometry(args[1]);
    if (g == NULL) return -1;
    PyObject *learner = args[3];
    b->hidden = g->hidden, b->max_steps = g->max_steps, b->payload_off = g->payload_off, b->step_bytes = g->step_bytes;
    b->slot_bytes = g->slot_bytes;
    b->first_seq = PyLong_AsUnsignedLongLong(args[2]);
    if (b->first_seq == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if ((*stop = PyObject_IsTrue(args[4])) < 0) return -1;
    PyObject *lr = learner_attr(learner, "lr"), *threshold = lr ? learner_attr(learner, "flush_threshold") : NULL;
    PyObject *pending = threshold ? learner_attr(learner, "pending") : NULL;
    if (pending != NULL) {
        b->lr = PyFloat_AsDouble(lr);
        b->threshold = PyLong_AsSsize_t(threshold);
        b->pending = PyLong_AsSsize_t(pending);
    }
    Py_XDECREF(lr);
    Py_XDECREF(threshold);
    Py_XDECREF(pending);
    if (pending == NULL || PyErr_Occurred()) return -1;
    if (!(b->chosen = learner_attr(learner, "route_chosen")) || !(b->best = learner_attr(learner, "route_best")) ||
        !(b->reward = learner_attr(learner, "route_reward")) || !(b->grad_up = learner_attr(learner, "grad_up")) ||
        !(b->up = learner_attr(learner, "up")))
        goto fail;
    if (routing) {
        PyObject *tau;
        if (!(b->grad_down = learner_attr(learner, "grad_down")) || !(b->down = learner_attr(learner, "down")) ||
            !(b->unit = learner_attr(learner, "unit")) || !(tau = learner_attr(learner, "temperature")))
            goto fail;
        b->temperature = PyFloat_AsDouble(tau);
        Py_DECREF(tau);
        if (PyErr_Occurred()) goto fail;
    }
    /* The length of route_chosen, read only from a 1-D array: a 0-d one has no shape (NULL). */
    b->n_routes = PyArray_Check(b->chosen) && PyArray_NDIM((PyArrayObject *)b->chosen) == 1 ? PyArray_DIM((PyArrayObject *)b->chosen, 0) : -1;
    if (b->threshold < 1 || b->pending < 0 || b->pending >= b->threshold || b->n_routes < 0 || b->n_routes > g->n_routes ||
        !vector_of(b->chosen, b->n_routes, NPY_UINT64) || !vector_of(b->best, b->n_routes, NPY_UINT64) ||
        !vector_of(b->reward, b->n_routes, NPY_FLOAT64)) {
        PyErr_Format(PyExc_ValueError, "%s(): the learner's counters or per-route counts do not fit the geometry", name);
        goto fail;
    }
    if (PyObject_GetBuffer(args[0], &b->block, PyBUF_SIMPLE) < 0) goto fail;
    b->base = (const char *)b->block.buf;
    b->count = b->block.len / b->slot_bytes;
    if (b->block.len % b->slot_bytes) {
        PyErr_Format(PyExc_ValueError, "%s(): block is not whole slots", name);
        goto fail;
    }
    return 0;
fail:
    batch_release(b);
    return -1;
}

typedef struct {
    uint16_t n_steps;
    int route, best; /* -1: none */
    float quality;
} SlotHead;

static SlotHead slot_head(const char *slot) {
    SlotHead h;
    uint16_t ri, bi;
    memcpy(&h.n_steps, slot + SLOT_N_STEPS, 2);
    memcpy(&h.quality, slot + SLOT_QUALITY, 4);
    memcpy(&ri, slot + SLOT_ROUTE_INDEX, 2);
    memcpy(&bi, slot + SLOT_BEST_INDEX, 2);
    h.route = (int)ri - 1;
    h.best = (int)bi - 1;
    return h;
}

/* The checks of slots.check() that need no computing: slot k of the batch carries
 * its stamp, a step count, route length and step lengths within their bounds, route indices
 * below K, and a finite quality and rewards. (Whether the values a rule learns from are
 * finite is seen while learning: see the learners.) */
static int slot_ok(const Batch *b, const char *slot, Py_ssize_t k) {
    uint64_t seq;
    uint16_t route_len;
    memcpy(&seq, slot, 8);
    memcpy(&route_len, slot + SLOT_ROUTE_LEN, 2);
    SlotHead h = slot_head(slot);
    float prob;
    memcpy(&prob, slot + SLOT_PROBABILITY, 4);
    if (seq != b->first_seq + (uint64_t)k || h.n_steps > b->max_steps || route_len > ROUTE_MAX_BYTES || h.route >= b->n_routes ||
        h.best >= b->n_routes || !isfinite(h.quality) || !(prob == 0.0f || (prob > 0.0f && prob <= 1.0f)))
        return 0;
    Py_ssize_t att_dim = b->step_bytes / 4 - b->hidden;
    for (int s = 0; s < h.n_steps; s++) {
        uint16_t act_len, att_len;
        memcpy(&act_len, slot + SLOT_HEAD_BYTES + 8 * s + 4, 2);
        memcpy(&att_len, slot + SLOT_HEAD_BYTES + 8 * s + 6, 2);
        if (act_len > b->hidden || att_len > att_dim || !isfinite(reward_of(slot, s))) return 0;
    }
    return 1;
}

/* The indices of corrupt slots, gathered without the GIL (the learners release it while they
 * learn, so that a fleet's Redis threads run meanwhile) and handed over as a list afterwards. */
typedef struct {
    Py_ssize_t *at, n, cap;
} Marks;

/* Note slot k as corrupt; -1 on a memory error. Needs no GIL. */
static int mark_corrupt(Marks *m, Py_ssize_t k) {
    if (m->n == m->cap) {
        Py_ssize_t cap = m->cap ? 2 * m->cap : 16;
        Py_ssize_t *at = PyMem_RawRealloc(m->at, (size_t)cap * sizeof(Py_ssize_t));
        if (at == NULL) return -1;
        m->at = at, m->cap = cap;
    }
    m->at[m->n++] = k;
    return 0;
}

/* The marks as a new list (needs the GIL), freeing them; NULL on a memory error. */
static PyObject *marks_list(Marks *m) {
    PyObject *list = PyList_New(m->n);
    for (Py_ssize_t i = 0; list != NULL && i < m->n; i++) {
        PyObject *index = PyLong_FromSsize_t(m->at[i]);
        if (index == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, index);
    }
    PyMem_RawFree(m->at);
    m->at = NULL, m->n = m->cap = 0;
    return list;
}

/* Batches at least this long are learned without holding the GIL. */
#define NOGIL_SLOTS 8

/* Learner.count_routes for one slot. */
static void count_route(const Batch *b, SlotHead h) {
    if (h.route >= 0) {
        ((uint64_t *)PyArray_DATA((PyArrayObject *)b->chosen))[h.route] += 1;
        ((double *)PyArray_DATA((PyArrayObject *)b->reward))[h.route] += h.best >= 0 ? (double)(h.route == h.best) : (double)h.quality;
    }
    if (h.best >= 0) ((uint64_t *)PyArray_DATA((PyArrayObject *)b->best))[h.best] += 1;
}

/* x[i] = saturate(x[i] + g[i] * step) in float32, g[i] = 0: one row of Learner.flush(). */
static void apply_row(float *x, double *g, npy_intp h, double step) {
    for (npy_intp i = 0; i < h; i++) {
        double val = (double)x[i] + g[i] * step;
        x[i] = (float)(val > FLT_MAX_D ? FLT_MAX_D : val < -FLT_MAX_D ? -FLT_MAX_D : val);
        g[i] = 0.0;
    }
}

/* write_window(out, grad_up, grad_down, seq, n, cum, sealed_at) -> size
 * sealed.write_window in one call (the same bytes): the header, then grad_up (one row when all its
 * rows are the same bits), then grad_down (None: no rows) into ``out`` (writable, C-contiguous,
 * large enough; raises otherwise, writing nothing). */
static PyObject *write_window(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "write_window() takes 7 arguments");
        return NULL;
    }
    if (!f64_matrix(args[1], -1, PyArray_Check(args[1]) && PyArray_NDIM((PyArrayObject *)args[1]) == 2 ? PyArray_DIM((PyArrayObject *)args[1], 1) : -1,
                    NPY_FLOAT64)) {
        PyErr_SetString(PyExc_ValueError, "write_window(): grad_up must be a C-contiguous float64[R, h]");
        return NULL;
    }
    PyArrayObject *gu = (PyArrayObject *)args[1];
    npy_intp rank = PyArray_DIM(gu, 0), h = PyArray_DIM(gu, 1);
    PyArrayObject *gd = NULL;
    if (args[2] != Py_None) {
        if (!f64_matrix(args[2], rank, h, NPY_FLOAT64)) {
            PyErr_SetString(PyExc_ValueError, "write_window(): grad_down must be None or a C-contiguous float64[R, h] like grad_up");
            return NULL;
        }
        gd = (PyArrayObject *)args[2];
    }
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[3]), n = PyLong_AsUnsignedLongLong(args[4]),
                       cum = PyLong_AsUnsignedLongLong(args[5]);
    double sealed_at = PyFloat_AsDouble(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (rank < 1 || rank > 0xFFFF || h < 1 || h > 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_ValueError, "write_window(): bad shape");
        return NULL;
    }
    const double *G = (const double *)PyArray_DATA(gu);
    int same = rank > 1;
    for (npy_intp r = 1; same && r < rank; r++) same = memcmp(G, G + r * h, (size_t)h * sizeof(double)) == 0;
    uint16_t up_rows = same ? 1 : (uint16_t)rank, down_rows = gd ? (uint16_t)rank : 0;
    Py_ssize_t size = WINDOW_HEAD_BYTES + 8 * h * (Py_ssize_t)(up_rows + down_rows);
    Py_buffer out;
    if (PyObject_GetBuffer(args[0], &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (out.len < size) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "write_window(): out is too small for the window");
        return NULL;
    }
    char *o = (char *)out.buf;
    uint32_t hidden32 = (uint32_t)h, rank32 = (uint32_t)rank;
    memset(o, 0, WINDOW_HEAD_BYTES);
    memcpy(o, "SFW1", 4);
    memcpy(o + 4, &hidden32, 4);
    memcpy(o + 8, &rank32, 4);
    memcpy(o + 12, &up_rows, 2);
    memcpy(o + 14, &down_rows, 2);
    memcpy(o + 16, &seq, 8);
    memcpy(o + 24, &n, 8);
    memcpy(o + 32, &cum, 8);
    memcpy(o + 40, &sealed_at, 8);
    memcpy(o + WINDOW_HEAD_BYTES, G, (size_t)(8 * h * up_rows));
    if (gd) memcpy(o + WINDOW_HEAD_BYTES + 8 * h * up_rows, PyArray_DATA(gd), (size_t)(8 * h * down_rows));
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(size);
}

/* apply_window(up, down, window, lr, hidden_dim, rank, routing) -> (seq, n, cum, sealed_at) or None
 * sealed.apply_window(read_window(window)) in one call: checks that ``window`` (bytes of a sealed
 * window, sealed.py) has this fleet's shape, n >= 1, cum >= n and only finite values, then applies
 * it to up (and down when it carries grad_down), float32[rank, hidden_dim] in place, with
 * apply_row's arithmetic: x = f32(clamp((double)x + g * (lr / n))), no fused multiply-add, so the
 * same bits as the numpy path. None: not such a window, nothing changed (the caller's
 * read_window says why). */
static PyObject *apply_window(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "apply_window() takes 7 arguments");
        return NULL;
    }
    double lr = PyFloat_AsDouble(args[3]);
    if (lr == -1.0 && PyErr_Occurred()) return NULL;
    Py_ssize_t h = PyLong_AsSsize_t(args[4]), rank = PyLong_AsSsize_t(args[5]);
    if ((h == -1 || rank == -1) && PyErr_Occurred()) return NULL;
    int routing = PyObject_IsTrue(args[6]);
    if (routing < 0) return NULL;
    if (h < 1 || rank < 1 || rank > 2 || !f64_matrix(args[0], rank, h, NPY_FLOAT32) || !f64_matrix(args[1], rank, h, NPY_FLOAT32)) {
        PyErr_SetString(PyExc_ValueError, "apply_window(): up and down must be writable C-contiguous float32[rank, hidden_dim]");
        return NULL;
    }
    Py_buffer w;
    if (PyObject_GetBuffer(args[2], &w, PyBUF_SIMPLE) < 0) return NULL;
    const char *raw = (const char *)w.buf;
    PyObject *result = NULL;
    uint32_t hidden, r;
    uint16_t up_rows, down_rows;
    uint64_t seq, n, cum;
    double sealed_at;
    if (w.len < WINDOW_HEAD_BYTES || memcmp(raw, "SFW1", 4) != 0) goto not_a_window;
    memcpy(&hidden, raw + 4, 4);
    memcpy(&r, raw + 8, 4);
    memcpy(&up_rows, raw + 12, 2);
    memcpy(&down_rows, raw + 14, 2);
    memcpy(&seq, raw + 16, 8);
    memcpy(&n, raw + 24, 8);
    memcpy(&cum, raw + 32, 8);
    memcpy(&sealed_at, raw + 40, 8);
    if ((Py_ssize_t)hidden != h || (Py_ssize_t)r != rank || (up_rows != 1 && up_rows != rank) || down_rows != (routing ? rank : 0) ||
        w.len != WINDOW_HEAD_BYTES + 8 * h * (Py_ssize_t)(up_rows + down_rows) || n < 1 || cum < n || !isfinite(sealed_at))
        goto not_a_window;
    {
        const char *g = raw + WINDOW_HEAD_BYTES;
        Py_ssize_t values = h * (up_rows + down_rows);
        for (Py_ssize_t i = 0; i < values; i++) {
            double v;
            memcpy(&v, g + 8 * i, 8);
            if (!isfinite(v)) goto not_a_window;
        }
        double step = lr / (double)n;
        float *U = (float *)PyArray_DATA((PyArrayObject *)args[0]), *D = (float *)PyArray_DATA((PyArrayObject *)args[1]);
        for (Py_ssize_t row = 0; row < rank; row++) {
            const char *gu = g + 8 * h * (up_rows == 1 ? 0 : row);
            for (Py_ssize_t i = 0; i < h; i++) {
                double v;
                memcpy(&v, gu + 8 * i, 8);
                double val = (double)U[row * h + i] + v * step;
                U[row * h + i] = (float)(val > FLT_MAX_D ? FLT_MAX_D : val < -FLT_MAX_D ? -FLT_MAX_D : val);
            }
            if (down_rows) {
                const char *gd = g + 8 * h * (up_rows + row);
                for (Py_ssize_t i = 0; i < h; i++) {
                    double v;
                    memcpy(&v, gd + 8 * i, 8);
                    double val = (double)D[row * h + i] + v * step;
                    D[row * h + i] = (float)(val > FLT_MAX_D ? FLT_MAX_D : val < -FLT_MAX_D ? -FLT_MAX_D : val);
                }
            }
        }
        result = Py_BuildValue("(KKKd)", (unsigned long long)seq, (unsigned long long)n, (unsigned long long)cum, sealed_at);
    }
    PyBuffer_Release(&w);
    return result;
not_a_window:
    PyBuffer_Release(&w);
    Py_RETURN_NONE;
}

/* learn_slots(block, geometry, first_seq, learner, stop) -> (pending, flushes, width, learned, corrupt, consumed)
 * The reference rule. Learns the consecutive slots of ``block`` (a buffer of whole slots of
 * ``geometry``, slot i stamped first_seq + i) into ``learner``'s arrays (learn/learner.py's
 * Learner: grad_up, up, route counts; lr, flush_threshold and pending read from it) as Learner.learn(learning_signals(...)) does, up
 * to float32 rounding (norms and sums are added in another order; a REINFORCE norm within
 * rounding of the 1e-8 threshold may take the other branch -- as it may between any two
 * implementations of the reference's float32 arithmetic): each signal times its quality is
 * added to every row of grad_up (float64[R, h], in place), and every time ``pending`` reaches
 * ``flush_threshold`` the rows are applied, ``up += grad_up * lr / pending`` (float32[R, h],
 * saturated at the float32 limit), and the sums reset. Feedback is counted per route as
 * Learner.count_routes does. A slot that fails slots.check() -- its stamp, a bound,
 * or a NaN or infinity among the values its signal is made of -- is learned from nothing and
 * its index is listed in ``corrupt``. ``width``: the most steps a learned slot had;
 * ``learned``: consumed - len(corrupt); ``consumed``: the slots it went through (``count``
 * unless it stopped).
 * With ``stop`` true (the fleet's sealing mode), reaching ``flush_threshold`` applies nothing:
 * the window's sums are complete in grad_up, and the call returns at once with ``pending`` ==
 * flush_threshold (the caller seals the window, zeroes the sums and calls again for the
 * rest). Up to that point the sums are the same, bit for bit, as without ``stop``. */
static PyObject *learn_slots(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Batch b;
    int stop;
    if (batch_open(args, nargs, "learn_slots", 0, &b, &stop) < 0) return NULL;
    PyObject *result = NULL;
    npy_intp h = b.hidden;
    if (!f64_matrix(b.grad_up, -1, h, NPY_FLOAT64) || !f64_matrix(b.up, PyArray_DIM((PyArrayObject *)b.grad_up, 0), h, NPY_FLOAT32)) {
        PyErr_SetString(PyExc_ValueError, "learn_slots(): grad_up and up must be writable, native, aligned, C-contiguous float64/float32[R, h]");
        goto release;
    }
    Marks marks = {NULL, 0, 0};
    int width = 0;
    {
        PyArrayObject *grad = (PyArrayObject *)b.grad_up, *up = (PyArrayObject *)b.up;
        npy_intp rank = PyArray_DIM(grad, 0);
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
        Py_ssize_t pending = b.pending, consumed = b.count;
        long flushes = 0;
        int dirty = 0, failed = 0; /* dirty: acc holds sums not yet added to G */
        PyThreadState *unlocked = b.count >= NOGIL_SLOTS ? PyEval_SaveThread() : NULL; /* no Python object is used below */
        for (Py_ssize_t k = 0; k < b.count && !failed; k++) {
            const char *slot = b.base + k * b.slot_bytes;
            SlotHead head = slot_head(slot);
            int n = head.n_steps, ok = slot_ok(&b, slot, k);
            float scale = 1.0f;
            const float *sig = g;
            if (!ok) {
            } else if (n == 0) {
                sig = (const float *)(slot + b.payload_off); /* the query itself, not normalised */
                ok = isfinite(norm_of_f32(sig, h));
            } else if (signal_f32(slot, b.payload_off, b.step_bytes, h, n, g, &scale) < 0) {
                ok = signal_f64(slot, b.payload_off, b.step_bytes, h, n, g64, g) == 0;
                scale = 1.0f;
            }
            if (!ok) { /* learned from nothing, counted by the caller */
                failed = mark_corrupt(&marks, k) < 0;
                continue;
            }
            if (n > width) width = n;
            count_route(&b, head);
            double w = (double)head.quality * (double)scale; /* float64: a huge quality times a big scale cannot overflow */
            for (npy_intp i = 0; i < h; i++) acc[i] += w * sig[i];
            dirty = 1;
            if (++pending == b.threshold && stop) { /* sealing: the window is complete, apply nothing */
                for (npy_intp r = 0; r < rank; r++)
                    for (npy_intp i = 0; i < h; i++) G[r * h + i] += acc[i];
                dirty = 0;
                consumed = k + 1;
                break;
            }
            if (pending == b.threshold) {
                for (npy_intp r = 0; r < rank; r++) {
                    for (npy_intp i = 0; i < h; i++) G[r * h + i] += acc[i];
                    apply_row(U + r * h, G + r * h, h, b.lr / (double)pending);
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
        if (unlocked != NULL) PyEval_RestoreThread(unlocked);
        PyMem_Free(g);
        PyMem_Free(acc);
        PyMem_Free(g64);
        Py_ssize_t learned = consumed - marks.n;
        PyObject *corrupt = marks_list(&marks);
        if (failed || corrupt == NULL) {
            Py_XDECREF(corrupt);
            if (!PyErr_Occurred()) PyErr_NoMemory();
            result = NULL;
        } else
            result = Py_BuildValue("(nlinNn)", pending, flushes, width, learned, corrupt, consumed);
    }
release:
    batch_release(&b);
    return result;
}

/* A float64 dot product with four partial sums (a shape the compiler vectorises). */
static inline __attribute__((always_inline)) double dot_d(const double *a, const double *b, npy_intp n) {
    double p0 = 0, p1 = 0, p2 = 0, p3 = 0;
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

/* y += a * x over n doubles. */
static inline __attribute__((always_inline)) void axpy_d(double *y, double a, const double *x, npy_intp n) {
    for (npy_intp i = 0; i < n; i++) y[i] += a * x[i];
}

/* The routing learner's float64 view of one flush window: U, D and V (unit routes) as
 * doubles, their cross products, and gradient terms kept as coefficients until folded. */
typedef struct {
    npy_intp h, K, R;
    double s, tau;
    double *U, *D, *V, *q;
    double VU[MAX_ROUTES_C][2], UU[2][2];
    double A[2][MAX_ROUTES_C]; /* G_U[r] += sum_k A[r][k] v_k  (folded later) */
    double C[2][2];            /* G_U[r] += sum_r' C[r][r'] u_r' (folded later) */
    double z[MAX_ROUTES_C], c[MAX_ROUTES_C], vq[MAX_ROUTES_C];
} Window;

/* Load U and D (after a flush: the new ones) and their products with V and each other. */
static void window_load(Window *w, const float *U32, const float *D32) {
    npy_intp h = w->h;
    for (npy_intp i = 0; i < w->R * h; i++) {
        w->U[i] = U32[i];
        w->D[i] = D32[i];
    }
    for (npy_intp r = 0; r < w->R; r++) {
        for (npy_intp k = 0; k < w->K; k++) w->VU[k][r] = dot_d(w->V + k * h, w->U + r * h, h);
        for (npy_intp r2 = 0; r2 < w->R; r2++) w->UU[r][r2] = dot_d(w->U + r * h, w->U + r2 * h, h);
    }
}

/* Add the coefficient terms into G_U (float64[R, h]) and clear them; exact, as U and V are
 * fixed within a window. */
static void window_fold(Window *w, double *GU) {
    npy_intp h = w->h;
    for (npy_intp r = 0; r < w->R; r++) {
        double *g = GU + r * h;
        for (npy_intp k = 0; k < w->K; k++) {
            if (w->A[r][k] != 0.0) axpy_d(g, w->A[r][k], w->V + k * h, h);
            w->A[r][k] = 0.0;
        }
        for (npy_intp r2 = 0; r2 < w->R; r2++) {
            if (w->C[r][r2] != 0.0) axpy_d(g, w->C[r][r2], w->U + r2 * h, h);
            w->C[r][r2] = 0.0;
        }
    }
}

/* One feedback signal (routing.gradients for one row), as the expansion of
 * g = (tau/|f|) (I - f^ f^T) sum_k c_k v_k over the window's fixed vectors: only the
 * query's terms are added to G_U and G_D here; the v_k and u_r terms go to A and C. */
WIDE_VECTORS static int window_signal(Window *w, const float *q32, SlotHead head, double *GU, double *GD) {
    npy_intp h = w->h, K = w->K, R = w->R;
    double *q = w->q, s = w->s, tau = w->tau;
    for (npy_intp i = 0; i < h; i++) q[i] = q32[i];
    double qq = dot_d(q, q, h);
    if (!isfinite(qq)) return -1; /* a NaN or an infinity in the query: corrupt, nothing added */
    if (!(qq > 0)) return 0;      /* a zero query teaches nothing */
    double inv = 1.0 / sqrt(qq);
    double kappa[2] = {0, 0}, uq[2] = {0, 0}, uf[2], ug[2];
    for (npy_intp r = 0; r < R; r++) {
        kappa[r] = dot_d(w->D + r * h, q, h) * inv; /* d_r . q^ */
        uq[r] = dot_d(w->U + r * h, q, h) * inv;    /* u_r . q^ */
    }
    double ff = qq * inv * inv; /* |f|^2 = |q^ + s sum_r kappa_r u_r|^2 */
    for (npy_intp r = 0; r < R; r++) {
        ff += 2.0 * s * kappa[r] * uq[r];
        for (npy_intp r2 = 0; r2 < R; r2++) ff += s * s * kappa[r] * kappa[r2] * w->UU[r][r2];
    }
    if (!(ff > 1e-12)) return 0; /* |f| <= routing.MIN_ADAPTED_NORM: mapped to (almost) zero */
    double fn = sqrt(ff);
    double top = -INFINITY;
    for (npy_intp k = 0; k < K; k++) {
        double vf = dot_d(w->V + k * h, q, h) * inv; /* v_k . f */
        for (npy_intp r = 0; r < R; r++) vf += s * kappa[r] * w->VU[k][r];
        w->vq[k] = vf;
        w->z[k] = tau * vf / fn;
        if (w->z[k] > top) top = w->z[k];
    }
    double sum = 0;
    for (npy_intp k = 0; k < K; k++) sum += (w->c[k] = exp(w->z[k] - top));
    for (npy_intp k = 0; k < K; k++) w->c[k] /= sum; /* p */
    if (head.best >= 0) { /* full information: c = e_y - p */
        for (npy_intp k = 0; k < K; k++) w->c[k] = -w->c[k];
        w->c[head.best] += 1.0;
    } else { /* bandit: c = r (e_a - p) - (1 - r) p_a (e_a - u), u uniform over the other routes */
        int a = head.route;
        double rw = head.quality, pa = w->c[a], u = 1.0 / (double)(K - 1);
        for (npy_intp k = 0; k < K; k++) {
            double toward = (k == a) - w->c[k], away = k == a ? 1.0 : -u;
            w->c[k] = rw * toward - (1.0 - rw) * pa * away;
        }
    }
    /* m = f^ . w with w = sum_k c_k v_k; u_r . w; then g = t w - (t m / |f|) f, t = tau / |f| */
    double t = tau / (fn > 0.1 ? fn : 0.1), m = 0, uw[2] = {0, 0}; /* routing.GRADIENT_FLOOR: a clip */
    for (npy_intp k = 0; k < K; k++) {
        m += w->c[k] * w->vq[k];
        for (npy_intp r = 0; r < R; r++) uw[r] += w->c[k] * w->VU[k][r];
    }
    m /= fn;
    double tm = t * m / fn;
    for (npy_intp r = 0; r < R; r++) {
        uf[r] = uq[r];
        for (npy_intp r2 = 0; r2 < R; r2++) uf[r] += s * kappa[r2] * w->UU[r][r2];
        ug[r] = t * uw[r] - tm * uf[r]; /* u_r . g */
    }
    /* G_U[r] += s kappa_r g = s kappa_r (t sum_k c_k v_k - tm q^ - tm s sum_r' kappa_r' u_r')
     * G_D[r] += s (u_r . g) q^ */
    for (npy_intp r = 0; r < R; r++) {
        double sk = s * kappa[r];
        for (npy_intp k = 0; k < K; k++) w->A[r][k] += sk * t * w->c[k];
        for (npy_intp r2 = 0; r2 < R; r2++) w->C[r][r2] -= sk * tm * s * kappa[r2];
        double *gu = GU + r * h, *gd = GD + r * h, bu = -sk * tm * inv, bd = s * ug[r] * inv;
        for (npy_intp i = 0; i < h; i++) {
            gu[i] += bu * q[i];
            gd[i] += bd * q[i];
        }
    }
    return 0;
}

/* learn_routing(block, geometry, first_seq, learner, stop) -> (pending, flushes, width, signals, corrupt, consumed)
 * The routing rule: Learner.learn_feedback + count_routes over the consecutive slots of ``block``
 * (learner: grad_up, grad_down, up, down, unit, temperature besides what learn_slots reads),
 * the same maths as routing.gradients() in float64, expanded so that a signal costs
 * (K + 2R + 1) dot products and 2R vector updates of length h (window_signal); sums are
 * added in another order than numpy's. grad_up/grad_down: float64[R, h]; up/down:
 * float32[R, h]; unit: float32[K, h] (2 <= K <= 256). A slot with neither route_index nor
 * best_index is not a signal. Flushes apply both U and D (Learner.flush). A slot that fails
 * slots.check() (its stamp, a bound, a feedback's query not finite or a bandit
 * reward outside [0, 1]) is not learned and its index is listed in ``corrupt``. ``stop``: as
 * for learn_slots (the window's G_U and G_D are complete, nothing applied, ``consumed`` returned). */
static PyObject *learn_routing(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Batch b;
    int stop;
    if (batch_open(args, nargs, "learn_routing", 1, &b, &stop) < 0) return NULL;
    PyObject *result = NULL;
    npy_intp h = b.hidden, K = b.n_routes;
    double tau = b.temperature;
    if (!f64_matrix(b.grad_up, -1, h, NPY_FLOAT64)) goto bad;
    npy_intp rank = PyArray_DIM((PyArrayObject *)b.grad_up, 0);
    PyArrayObject *unit = PyArray_Check(b.unit) ? (PyArrayObject *)b.unit : NULL;
    if (rank < 1 || rank > 2 || !f64_matrix(b.grad_down, rank, h, NPY_FLOAT64) || !f64_matrix(b.up, rank, h, NPY_FLOAT32) ||
        !f64_matrix(b.down, rank, h, NPY_FLOAT32) || unit == NULL || PyArray_TYPE(unit) != NPY_FLOAT32 || PyArray_NDIM(unit) != 2 ||
        !PyArray_IS_C_CONTIGUOUS(unit) || !native(unit) || PyArray_DIM(unit, 0) != K || PyArray_DIM(unit, 1) != h || K < 2 ||
        K > MAX_ROUTES_C || !(tau > 0))
        goto bad;
    Marks marks = {NULL, 0, 0};
    int width = 0;
    {
        double *GU = (double *)PyArray_DATA((PyArrayObject *)b.grad_up), *GD = (double *)PyArray_DATA((PyArrayObject *)b.grad_down);
        float *U32 = (float *)PyArray_DATA((PyArrayObject *)b.up), *D32 = (float *)PyArray_DATA((PyArrayObject *)b.down);
        const float *V32 = (const float *)PyArray_DATA(unit);
        Window *w = PyMem_Calloc(1, sizeof(Window));
        double *mem = PyMem_Malloc((size_t)(2 * rank * h + K * h + h) * sizeof(double));
        if (!w || !mem) {
            PyMem_Free(w);
            PyMem_Free(mem);
            PyErr_NoMemory();
            goto release;
        }
        w->h = h, w->K = K, w->R = rank, w->s = 1.0 / sqrt((double)rank), w->tau = tau;
        w->U = mem, w->D = w->U + rank * h, w->V = w->D + rank * h, w->q = w->V + K * h;
        for (npy_intp i = 0; i < K * h; i++) w->V[i] = V32[i];
        window_load(w, U32, D32);
        Py_ssize_t pending = b.pending, signals = 0, consumed = b.count;
        long flushes = 0;
        int failed = 0;
        PyThreadState *unlocked = b.count >= NOGIL_SLOTS ? PyEval_SaveThread() : NULL; /* no Python object is used below */
        for (Py_ssize_t k = 0; k < b.count && !failed; k++) {
            const char *slot = b.base + k * b.slot_bytes;
            SlotHead head = slot_head(slot);
            int feedback = head.route >= 0 || head.best >= 0;
            const float *q = (const float *)(slot + b.payload_off);
            /* A feedback teaches from its query (window_signal refuses a NaN or an infinity in it
             * before it adds anything) and, when it is a bandit one, its reward in [0, 1]. */
            int ok = slot_ok(&b, slot, k) && (!feedback || head.best >= 0 || (head.quality >= 0.0f && head.quality <= 1.0f));
            if (ok && feedback) ok = window_signal(w, q, head, GU, GD) == 0;
            if (!ok) {
                failed = mark_corrupt(&marks, k) < 0;
                continue;
            }
            if (head.n_steps > width) width = head.n_steps;
            count_route(&b, head);
            if (!feedback) continue; /* an ordinary trajectory: not a signal */
            signals++;
            if (++pending == b.threshold && stop) { /* sealing: fold below, apply nothing */
                consumed = k + 1;
                break;
            }
            if (pending == b.threshold) {
                window_fold(w, GU);
                for (npy_intp r = 0; r < rank; r++) {
                    apply_row(U32 + r * h, GU + r * h, h, b.lr / (double)pending);
                    apply_row(D32 + r * h, GD + r * h, h, b.lr / (double)pending);
                }
                window_load(w, U32, D32);
                pending = 0;
                flushes++;
            }
        }
        window_fold(w, GU);
        if (unlocked != NULL) PyEval_RestoreThread(unlocked);
        PyMem_Free(w);
        PyMem_Free(mem);
        PyObject *corrupt = marks_list(&marks);
        if (failed || corrupt == NULL) {
            Py_XDECREF(corrupt);
            if (!PyErr_Occurred()) PyErr_NoMemory();
            result = NULL;
        } else
            result = Py_BuildValue("(nlinNn)", pending, flushes, width, signals, corrupt, consumed);
    }
    goto release;
bad:
    PyErr_SetString(PyExc_ValueError,
                    "learn_routing(): grad_up/grad_down float64[R, h], up/down float32[R, h], unit float32[2 <= K <= 256, h] "
                    "(native, aligned, C-contiguous), temperature > 0");
release:
    batch_release(&b);
    return result;
}

/* dot() with its eight partial sums in one 8-float vector: the same lanes, so the same sums in
 * the same order, but one AVX register where the CPU has it (in a WIDE_VECTORS clone). */
typedef float f32x8 __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) float dot8(const float *a, const float *b, npy_intp n) {
    f32x8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
    npy_intp i = 0;
    for (; i + 8 <= n; i += 8) {
        f32x8 x, y;
        memcpy(&x, a + i, sizeof x);
        memcpy(&y, b + i, sizeof y);
        acc += x * y;
    }
    float p[8];
    memcpy(p, &acc, sizeof p);
    for (; i < n; i++) p[0] += a[i] * b[i];
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

/* out[k] = cosine of f (float32[h]) with unit route k (V: float32[K, h]); 0 for a zero f; |f| in float64
 * when float32 would overflow or underflow, so that scores depend on f's direction only. The index of
 * the best (the first of equal maxima, as numpy.argmax). Up to eight routes at a time share each
 * load of f; every sum is dot8()'s, in dot8()'s order. */
WIDE_VECTORS static npy_intp score_routes(const float *f, const float *V, npy_intp K, npy_intp h, float *out) {
    float ff = dot8(f, f, h);
    double norm = sqrt((double)ff);
    if (!(ff >= 1e-30f && ff <= 1e30f)) { /* |f|^2 near or past float32's range (|f| > 1e15 or < 1e-15): redo it in float64 */
        double sum = 0.0;
        for (npy_intp i = 0; i < h; i++) sum += (double)f[i] * (double)f[i];
        norm = sqrt(sum);
    }
    npy_intp body = h - h % 8;
    for (npy_intp k0 = 0; k0 < K; k0 += 8) {
        int m = (int)(K - k0 < 8 ? K - k0 : 8);
        f32x8 acc[8];
        memset(acc, 0, sizeof acc);
        for (npy_intp i = 0; i < body; i += 8) {
            f32x8 x;
            memcpy(&x, f + i, sizeof x);
            for (int j = 0; j < m; j++) {
                f32x8 v;
                memcpy(&v, V + (k0 + j) * h + i, sizeof v);
                acc[j] += v * x;
            }
        }
        for (int j = 0; j < m; j++) {
            float p[8];
            memcpy(p, &acc[j], sizeof p);
            for (npy_intp i = body; i < h; i++) p[0] += V[(k0 + j) * h + i] * f[i];
            float d = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
            out[k0 + j] = norm > 0 ? (float)((double)d / norm) : 0.0f;
        }
    }
    npy_intp best = 0;
    for (npy_intp k = 1; k < K; k++)
        if (out[k] > out[best]) best = k;
    return best;
}

/* route(x, down, up_scaled, unit, names) -> RouteChoice(index, names[index], scores, adapted, False) or None
 * forward() of one finite native float32 vector, then the cosine of the result with every
 * unit route (float32[K, h]) and the best of them: the greedy choice, built here as a
 * routes.RouteChoice (a tuple subclass made by tuple's own constructor). ``names``: a
 * tuple of K names. None: not that form (take the Python path). */
static PyObject *route(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "route() takes 5 arguments");
        return NULL;
    }
    if (!PyArray_CheckExact(args[0]) || PyArray_NDIM((PyArrayObject *)args[0]) != 1) Py_RETURN_NONE;
    PyArrayObject *v = (PyArrayObject *)args[3];
    PyObject *names = args[4];
    PyObject *adapted = adapt(self, args, 3);
    if (adapted == NULL || adapted == Py_None) return adapted;
    if (route_choice_type == NULL || !PyArray_CheckExact(args[3]) || PyArray_TYPE(v) != NPY_FLOAT32 || PyArray_NDIM(v) != 2 ||
        !PyArray_IS_C_CONTIGUOUS(v) || !native(v) || PyArray_DIM(v, 1) != PyArray_DIM((PyArrayObject *)adapted, 0) || PyArray_DIM(v, 0) < 1 ||
        !PyTuple_CheckExact(names) || PyTuple_GET_SIZE(names) != PyArray_DIM(v, 0)) {
        Py_DECREF(adapted);
        PyErr_SetString(PyExc_ValueError, "route(): unit must be native, aligned, C-contiguous float32[K, h] and names a tuple of K names");
        return NULL;
    }
    npy_intp K = PyArray_DIM(v, 0), h = PyArray_DIM(v, 1);
    PyObject *scores = PyArray_SimpleNew(1, &K, NPY_FLOAT32);
    if (scores == NULL) {
        Py_DECREF(adapted);
        return NULL;
    }
    npy_intp best = score_routes((const float *)PyArray_DATA((PyArrayObject *)adapted), (const float *)PyArray_DATA(v), K, h,
                                 (float *)PyArray_DATA((PyArrayObject *)scores));
    /* What tuple.__new__(RouteChoice, fields) does (tuple_subtype_new): allocate the subclass
     * instance with room for its 6 items, then fill it; RouteChoice has no fields of its own. */
    PyObject *index = PyLong_FromSsize_t(best);
    PyObject *one = index ? PyFloat_FromDouble(1.0) : NULL; /* greedy: chosen with probability 1 */
    PyObject *choice = one ? route_choice_type->tp_alloc(route_choice_type, 6) : NULL;
    if (choice == NULL) {
        Py_XDECREF(index);
        Py_XDECREF(one);
        Py_DECREF(scores);
        Py_DECREF(adapted);
        return NULL;
    }
    PyTuple_SET_ITEM(choice, 0, index); /* each steals its reference */
    PyTuple_SET_ITEM(choice, 1, Py_NewRef(PyTuple_GET_ITEM(names, best)));
    PyTuple_SET_ITEM(choice, 2, scores);
    PyTuple_SET_ITEM(choice, 3, adapted);
    PyTuple_SET_ITEM(choice, 4, Py_NewRef(Py_False));
    PyTuple_SET_ITEM(choice, 5, one);
    return choice;
}

/* set_types(Trajectory, Step, RouteChoice): the exact classes LaneWriter.record accepts (instances of
 * subclasses take the Python path), and the class route() returns (a tuple subclass). */
static PyObject *set_types(PyObject *self, PyObject *args) {
    PyObject *t, *s, *c;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyType_Type, &t, &PyType_Type, &s, &PyType_Type, &c)) return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)c, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "set_types(): RouteChoice must be a tuple subclass");
        return NULL;
    }
    Py_XSETREF(trajectory_type, (PyTypeObject *)Py_NewRef(t));
    Py_XSETREF(step_type, (PyTypeObject *)Py_NewRef(s));
    Py_XSETREF(route_choice_type, (PyTypeObject *)Py_NewRef(c));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_types", set_types, METH_VARARGS,
     "set_types($module, trajectory, step, route_choice, /)\n--\n\nRegister the Trajectory, Step and RouteChoice classes."},
    {"learn_slots", (PyCFunction)(void (*)(void))learn_slots, METH_FASTCALL,
     "learn_slots($module, block, geometry, first_seq, learner, stop, /)\n--\n\n"
     "Reference rule: learn consecutive lane slots into the learner's grad_up/up, flushing at the threshold."},
    {"learn_routing", (PyCFunction)(void (*)(void))learn_routing, METH_FASTCALL,
     "learn_routing($module, block, geometry, first_seq, learner, stop, /)\n--\n\n"
     "Routing rule: learn consecutive lane slots into the learner's grad_up/grad_down, flushing U and D at the threshold."},
    {"write_window", (PyCFunction)(void (*)(void))write_window, METH_FASTCALL,
     "write_window($module, out, grad_up, grad_down, seq, n, cum, sealed_at, /)\n--\n\n"
     "Encode a sealed window into a buffer (fleet/window.py's bytes); its length."},
    {"apply_window", (PyCFunction)(void (*)(void))apply_window, METH_FASTCALL,
     "apply_window($module, up, down, window, lr, hidden_dim, rank, routing, /)\n--\n\n"
     "Apply a sealed window's bytes to up/down (fleet/window.py's arithmetic); None: not a window of this shape."},
    {"route", (PyCFunction)(void (*)(void))route, METH_FASTCALL,
     "route($module, x, down, up_scaled, unit, names, /)\n--\n\n"
     "The greedy RouteChoice for one finite float32 vector; None: take the Python path."},
    {"adapt", (PyCFunction)(void (*)(void))adapt, METH_FASTCALL,
     "adapt($module, x, down, up_scaled, /)\n--\n\nx + adapter(x) for finite float32 [h] or [n, h]; None: take the Python path."},
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
    INTERN(s_route_index, "route_index");
    INTERN(s_best_index, "best_index");
    INTERN(s_probability, "probability");
    INTERN(s_activations, "activations");
    INTERN(s_attention, "attention");
    INTERN(s_reward, "reward");
    if (PyType_Ready(&LaneWriterType) < 0 || PyType_Ready(&GeometryType) < 0 || PyType_Ready(&DescriptorType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "LaneWriter", (PyObject *)&LaneWriterType) < 0 ||
        PyModule_AddObjectRef(m, "Geometry", (PyObject *)&GeometryType) < 0 ||
        PyModule_AddObjectRef(m, "Descriptor", (PyObject *)&DescriptorType) < 0)
        goto fail;
#define CONSTANT(name) \
    if (PyModule_AddIntConstant(m, #name, name) < 0) goto fail
    CONSTANT(ROUTE_MAX_BYTES);
    CONSTANT(SLOT_HEAD_BYTES);
    CONSTANT(SLOT_TRAJ_ID);
    CONSTANT(SLOT_LATENCY_US);
    CONSTANT(SLOT_QUALITY);
    CONSTANT(SLOT_N_STEPS);
    CONSTANT(SLOT_ROUTE_LEN);
    CONSTANT(SLOT_ROUTE_INDEX);
    CONSTANT(SLOT_BEST_INDEX);
    CONSTANT(SLOT_PROBABILITY);
    CONSTANT(LANE_CONTROL_BYTES);
    CONSTANT(LANE_HEAD);
    CONSTANT(LANE_NEXT_ID);
    CONSTANT(LANE_LAST_AT);
    CONSTANT(FLUSHER_LINE);
    CONSTANT(FL_IDLE);
    CONSTANT(WINDOW_HEAD_BYTES);
    if (PyModule_AddIntConstant(m, "MAX_ROUTES", MAX_ROUTES_C) < 0) goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
