/* The C twin of sona_shm's hot paths, optional: sona_shm/native.py loads it (or, without a C
 * compiler at install time, runs the Python twins, with the same results). Its interface is
 * declared in _speedups.pyi, which mypy.stubtest checks against this module in CI.
 *
 *   Geometry            a segment's slot and lane geometry (shm/layout.py builds it: Layout.geometry),
 *                       checked once when it is made; every call below that reads slots takes one.
 *   LaneWriter          the producer's side of one lane (shm/lane.py's PyLaneWriter is its twin):
 *                       record() writes a trajectory in the common form into the head slot and
 *                       publishes it; anything else is handed back (-1) to the Python path.
 *   adapt               forward() of float32 vectors (learn/routes.py's adapt, in float64).
 *   route               routes.choose() for one float32 vector: scores, the greedy choice, exploration.
 *   learn_slots         the reference rule over a block of lane slots (learn/learner.py's numpy twin).
 *   learn_routing,      the routing rule (learn/routing.py's step, Learner's windows) over a block of
 *   learn_routing_rows  lane slots, or over arrays of rows (InstantLoop's).
 *   write_window,       a sealed fleet window of the reference rule (SFW1): its bytes, and applying
 *   apply_window        them (fleet/window.py's twins; SFW2 windows are written in numpy);
 *   apply_deltas_window applying a routing rule's window (SFW2).
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
#include <pthread.h>
#include <sys/random.h>

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
#define COMMIT_LINE 1088       /* u64 commit: ledger copy commit & 1 is current */
#define FL_IDLE 24             /* u64: 1 while the flusher sleeps on its doorbell */
#define WINDOW_HEAD_BYTES 64   /* a sealed window's header */
#define MAX_ROUTES_C 256       /* config.MAX_ROUTES */

/* The routing rule's constants (learn/routing.py writes them down; tests/test_routing_c.py compares these module
 * constants of the same names with it), and route()'s (learn/routes.py). */
#define BETA 1.0
/* The version of this module's interface: bumped with every change of a function's arguments, results or set,
 * so that native.py runs the Python twins, not an out-of-date build (an editable install does not rebuild). */
#define INTERFACE 2
#define OFFSET 3.0
#define BIAS_LR 0.1
#define CENTRE 1000
#define PROTECT 0.5
#define SPARSE 0.01
#define GROWTH 20
#define GRADIENT_FLOOR 0.1
#define MIN_ADAPTED_NORM 1e-6
#define TIE 0.0 /* routes.TIE: scores within it of the best are a tie, won by the lowest index (0: the maximal ones) */
#define ACTIVE 1 /* routes.ACTIVE: a route_state that may be chosen and learned */

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
 *          payload_offset, route_offset, step_bytes, routes, lanes_offset, slots_offset, unit_reward,
 *          routes_used_offset0, routes_used_offset1)
 * A segment's slot and lane geometry, built by shm/layout.py (Layout.geometry) and checked
 * once here, so the calls that take it (LaneWriter, learn_slots, learn_routing) need not.
 * ``routes``: Km, the rows reserved for routes (0: no table); ``unit_reward``: the routing rule's
 * bandit rewards must lie in [0, 1]; ``routes_used_offset0/1``: the byte offsets of the ledger
 * copies' ``routes_used`` (0: no table), which a producer reads to refuse a route index the
 * engine does not have yet (layout.py, ``Layout.routes_used_words``). Read-only attributes of the same names. */
typedef struct {
    PyObject_HEAD
    Py_ssize_t hidden, rank, max_steps, att_dim, lanes, lane_slots, slot_bytes, payload_off, route_off, step_bytes, n_routes;
    Py_ssize_t lanes_off, slots_off, used_off[2];
    int unit_reward;
} Geometry;

static PyTypeObject GeometryType;

static int Geometry_init(Geometry *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"hidden_dim", "rank", "max_steps", "attention_dim", "lanes", "lane_slots", "slot_bytes",
                             "payload_offset", "route_offset", "step_bytes", "routes", "lanes_offset", "slots_offset",
                             "unit_reward", "routes_used_offset0", "routes_used_offset1", NULL};
    Geometry g;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$nnnnnnnnnnnnnpnn", kwlist, &g.hidden, &g.rank, &g.max_steps, &g.att_dim,
                                     &g.lanes, &g.lane_slots, &g.slot_bytes, &g.payload_off, &g.route_off, &g.step_bytes,
                                     &g.n_routes, &g.lanes_off, &g.slots_off, &g.unit_reward, &g.used_off[0], &g.used_off[1]))
        return -1;
    if (PyTuple_GET_SIZE(args) != 0 || kwds == NULL || PyDict_GET_SIZE(kwds) != 16) {
        PyErr_SetString(PyExc_TypeError, "Geometry() takes its 16 fields as keyword arguments");
        return -1;
    }
    Py_ssize_t span = slot_span(g.payload_off, g.hidden, g.max_steps, g.step_bytes);
    /* Lengths are stored as uint16 (act_len <= hidden, att_len <= attention_dim, n_steps <=
     * max_steps), so each is bounded by 0xFFFF; 4 * (hidden + att_dim) cannot overflow then. */
    int ok = g.hidden >= 1 && g.hidden <= 0xFFFF && g.rank >= 1 && g.rank <= 2 && g.max_steps >= 0 && g.max_steps <= 0xFFFF &&
             g.att_dim >= 0 && g.att_dim <= 0xFFFF && span >= 0 && g.step_bytes >= 4 * (g.hidden + g.att_dim) &&
             g.route_off >= SLOT_HEAD_BYTES + 8 * g.max_steps && g.route_off <= g.payload_off - ROUTE_MAX_BYTES && span <= g.slot_bytes &&
             g.slot_bytes % 8 == 0 && g.lanes >= 1 && g.lane_slots >= 1 && g.n_routes >= 0 && g.n_routes <= MAX_ROUTES_C &&
             g.lanes_off >= 0 && g.lanes_off % 8 == 0 && g.slots_off >= 0 && g.slots_off % 8 == 0 &&
             (g.n_routes == 0 ? g.used_off[0] == 0 && g.used_off[1] == 0
                              : g.used_off[0] > COMMIT_LINE && g.used_off[0] % 8 == 0 && g.used_off[1] > g.used_off[0] &&
                                    g.used_off[1] % 8 == 0 && g.used_off[1] + 8 <= g.lanes_off);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "Geometry: inconsistent slot geometry");
        return -1;
    }
    self->hidden = g.hidden, self->rank = g.rank, self->max_steps = g.max_steps, self->att_dim = g.att_dim;
    self->lanes = g.lanes, self->lane_slots = g.lane_slots, self->slot_bytes = g.slot_bytes, self->payload_off = g.payload_off;
    self->route_off = g.route_off, self->step_bytes = g.step_bytes, self->n_routes = g.n_routes;
    self->lanes_off = g.lanes_off, self->slots_off = g.slots_off, self->unit_reward = g.unit_reward;
    self->used_off[0] = g.used_off[0], self->used_off[1] = g.used_off[1];
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
    {"routes_used_offset0", T_PYSSIZET, offsetof(Geometry, used_off[0]), READONLY, NULL},
    {"routes_used_offset1", T_PYSSIZET, offsetof(Geometry, used_off[1]), READONLY, NULL},
    {"unit_reward", T_BOOL, offsetof(Geometry, unit_reward), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject GeometryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sona_shm._speedups.Geometry",
    .tp_basicsize = sizeof(Geometry),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Geometry(*, hidden_dim, rank, max_steps, attention_dim, lanes, lane_slots, slot_bytes, payload_offset, route_offset, "
              "step_bytes, routes, lanes_offset, slots_offset, unit_reward, routes_used_offset0, routes_used_offset1)\n--\n\n"
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
    Py_ssize_t n_routes; /* route indices must be below it and below the live routes_used (0: no route table) */
    int unit_reward;     /* routing rule: a bandit feedback's quality (its reward) must be in [0, 1] */
    uint64_t *head_word, *next_id_word, *idle_word, *commit_word, *used_word[2]; /* used_word: NULL without a table */
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
    self->commit_word = (uint64_t *)(base + COMMIT_LINE);
    for (int i = 0; i < 2; i++) self->used_word[i] = g->n_routes ? (uint64_t *)(base + g->used_off[i]) : NULL;
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
    Py_ssize_t routes = 0;                    /* the routes the engine has now (routes_used only grows: any copy will do) */
    if (self->used_word[0] != NULL && (ri_obj != Py_None || bi_obj != Py_None)) {
        uint64_t used = __atomic_load_n(self->used_word[__atomic_load_n(self->commit_word, __ATOMIC_ACQUIRE) & 1], __ATOMIC_RELAXED);
        routes = used < (uint64_t)self->n_routes ? (Py_ssize_t)used : self->n_routes;
    }
    if (get_route_index(ri_obj, routes, &route_index) < 0 || get_route_index(bi_obj, routes, &best_index) < 0) goto done;
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

/* Stamp the filled head slot, publish it, note the time: 2 if the flusher sleeps and this producer is the one to
 * ring its doorbell (the caller rings), else 1. */
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
    if (!__atomic_load_n(self->idle_word, __ATOMIC_RELAXED)) return 1;
    /* The flusher sleeps. One ring wakes it: the producer that takes the idle word back to 0 rings, and the
     * others, finding 0, do not (every producer used to ring until the woken flusher cleared the word -- under
     * load, thousands of sem_post calls per wake-up, each a system call, and as many for the flusher to swallow).
     * A producer that finds 0 published before its compare-exchange (a locked instruction: a full fence), and
     * the flusher reads every head after the ring it was given, or after its own next store of idle = 1. */
    uint64_t sleeping = 1;
    return __atomic_compare_exchange_n(self->idle_word, &sleeping, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED) ? 2 : 1;
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

/* Float64 arithmetic for the routing rule and route(), in the discipline of dot(): sixteen partial sums
 * (lane j adds elements j, j + 16, ...) in four 4-double vectors -- four independent chains of additions, so
 * a dot product runs at the adder's throughput, not its latency -- added in one fixed order, so the same bits
 * on every CPU and in both WIDE_VECTORS clones (in ISO C mode GCC fuses no multiply-add). Element-wise loops
 * need nothing of the kind: each element is rounded alone. (Vectors pass by pointer: a 32-byte vector by value
 * changes the ABI where AVX is not enabled.) */
typedef double f64x4 __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) void f64_load(f64x4 *v, const double *p) { memcpy(v, p, sizeof *v); }

/* (Built from the four floats, this compiles to one vcvtps2pd from memory; a converted f32x4 to two halves.) */
static inline __attribute__((always_inline)) void f32_widen(f64x4 *v, const float *p) { *v = (f64x4){p[0], p[1], p[2], p[3]}; }

/* The sum of the sixteen lanes and of the tail (the elements past the last whole sixteen, added in order). */
static inline __attribute__((always_inline)) double f64_lanes(const f64x4 acc[4], double tail) {
    f64x4 v = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    double p[4];
    memcpy(p, &v, sizeof v);
    return ((p[0] + p[1]) + (p[2] + p[3])) + tail;
}

/* a . b for float64 a, b. */
static inline __attribute__((always_inline)) double dot_dd(const double *a, const double *b, npy_intp n) {
    f64x4 acc[4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
    npy_intp i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 4; j++) {
            f64x4 x, y;
            f64_load(&x, a + i + 4 * j), f64_load(&y, b + i + 4 * j);
            acc[j] += x * y;
        }
    double tail = 0.0;
    for (; i < n; i++) tail += a[i] * b[i];
    return f64_lanes(acc, tail);
}

/* a . b for float64 a and float32 b, in float64. */
static inline __attribute__((always_inline)) double dot_df(const double *a, const float *b, npy_intp n) {
    f64x4 acc[4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
    npy_intp i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 4; j++) {
            f64x4 x, y;
            f64_load(&x, a + i + 4 * j), f32_widen(&y, b + i + 4 * j);
            acc[j] += x * y;
        }
    double tail = 0.0;
    for (; i < n; i++) tail += a[i] * (double)b[i];
    return f64_lanes(acc, tail);
}

/* dot_df(a, b0, n) and dot_df(a, b1, n), the same bits, in one pass: each load of a serves both. */
static inline __attribute__((always_inline)) void dot2_df(const double *a, const float *b0, const float *b1, npy_intp n, double *out0,
                                                          double *out1) {
    f64x4 acc0[4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}}, acc1[4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
    npy_intp i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 4; j++) {
            f64x4 x, y0, y1;
            f64_load(&x, a + i + 4 * j), f32_widen(&y0, b0 + i + 4 * j), f32_widen(&y1, b1 + i + 4 * j);
            acc0[j] += x * y0;
            acc1[j] += x * y1;
        }
    double tail0 = 0.0, tail1 = 0.0;
    for (; i < n; i++) {
        tail0 += a[i] * (double)b0[i];
        tail1 += a[i] * (double)b1[i];
    }
    *out0 = f64_lanes(acc0, tail0);
    *out1 = f64_lanes(acc1, tail1);
}

/* out[on[j]] = a . (row on[j] of V, float32[., n]) for the m rows listed, two at a time (dot2_df). */
static inline __attribute__((always_inline)) void dots_of_rows(const double *a, const float *V, const npy_intp *on, npy_intp m, npy_intp n,
                                                               double *out) {
    for (npy_intp j = 0; j < m; j += 2) {
        if (j + 1 < m)
            dot2_df(a, V + on[j] * n, V + on[j + 1] * n, n, out + on[j], out + on[j + 1]);
        else
            out[on[j]] = dot_df(a, V + on[j] * n, n);
    }
}

/* a . b for float32 a, b, in float64 (every product exact). */
static inline __attribute__((always_inline)) double dot_ff(const float *a, const float *b, npy_intp n) {
    f64x4 acc[4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
    npy_intp i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 4; j++) {
            f64x4 x, y;
            f32_widen(&x, a + i + 4 * j), f32_widen(&y, b + i + 4 * j);
            acc[j] += x * y;
        }
    double tail = 0.0;
    for (; i < n; i++) tail += (double)a[i] * (double)b[i];
    return f64_lanes(acc, tail);
}

static inline __attribute__((always_inline)) float saturated(double v) {
    return (float)(v > FLT_MAX_D ? FLT_MAX_D : v < -FLT_MAX_D ? -FLT_MAX_D : v);
}

/* The adapter's coefficients c_r = x . d_r of float32 x (routes.adapt computes x @ down.T in float64). */
static inline __attribute__((always_inline)) void coefficients(const float *x, const float *D, npy_intp rank, npy_intp h, double c[2]) {
    c[0] = dot_ff(x, D, h);
    c[1] = rank == 2 ? dot_ff(x, D + h, h) : 0.0;
}

typedef int64_t i64x4 __attribute__((vector_size(32)));

/* out = f32(saturate(x + sum_r c_r u_r)) in float64, in place (out may be x); a, if not NULL, gets the float64
 * values before the cast. Four at a time in explicit vectors, the saturation a bitwise select (a branch per
 * element keeps the compiler from vectorising it); each element rounds as saturated() would round it. */
static inline __attribute__((always_inline)) void adapted_row(float *out, const float *x, const float *U, npy_intp rank, npy_intp h,
                                                              const double c[2], double *a) {
    const f64x4 c0 = {c[0], c[0], c[0], c[0]}, c1 = {c[1], c[1], c[1], c[1]}, top = {FLT_MAX_D, FLT_MAX_D, FLT_MAX_D, FLT_MAX_D};
    npy_intp i = 0;
    for (; i + 4 <= h; i += 4) {
        f64x4 xi, u0, u1, v;
        f32_widen(&xi, x + i), f32_widen(&u0, U + i);
        if (rank == 2) {
            f32_widen(&u1, U + h + i);
            v = xi + (c0 * u0 + c1 * u1);
        } else {
            v = xi + c0 * u0;
        }
        if (a != NULL) memcpy(a + i, &v, sizeof v);
        i64x4 above = v > top, below = v < -top;
        f64x4 clamped = (f64x4)(((i64x4)v & ~(above | below)) | ((i64x4)top & above) | ((i64x4)(-top) & below));
        f32x4 narrow = __builtin_convertvector(clamped, f32x4);
        memcpy(out + i, &narrow, sizeof narrow);
    }
    for (; i < h; i++) {
        double v = rank == 2 ? (double)x[i] + (c[0] * (double)U[i] + c[1] * (double)U[h + i]) : (double)x[i] + c[0] * (double)U[i];
        if (a != NULL) a[i] = v;
        out[i] = saturated(v);
    }
}

/* routes.adapt of one row, in place. */
WIDE_VECTORS static void adapt_row(float *o, const float *D, const float *U, npy_intp rank, npy_intp h) {
    double c[2];
    coefficients(o, D, rank, h, c);
    adapted_row(o, o, U, rank, h, c, NULL);
}

/* down and up_scaled as adapt() and route() read them: native, aligned, C-contiguous float32[R, h], R in {1, 2}; 0, else
 * -1 with a ValueError naming ``name``. */
static int adapter_arrays(PyObject *down, PyObject *up, const char *name) {
    PyArrayObject *d = (PyArrayObject *)down, *u = (PyArrayObject *)up;
    if (!PyArray_CheckExact(down) || !PyArray_CheckExact(up) || PyArray_NDIM(d) != 2 || PyArray_NDIM(u) != 2 ||
        PyArray_TYPE(d) != NPY_FLOAT32 || PyArray_TYPE(u) != NPY_FLOAT32 || !PyArray_IS_C_CONTIGUOUS(d) || !PyArray_IS_C_CONTIGUOUS(u) ||
        !native(d) || !native(u) || PyArray_DIM(d, 0) != PyArray_DIM(u, 0) || PyArray_DIM(d, 1) != PyArray_DIM(u, 1) ||
        PyArray_DIM(d, 0) < 1 || PyArray_DIM(d, 0) > 2) {
        PyErr_Format(PyExc_ValueError, "%s(): down and up_scaled must be native, aligned, C-contiguous float32[R, h], R in {1, 2}", name);
        return -1;
    }
    return 0;
}

/* adapt(x, down, up_scaled) -> float32[h] / float32[n, h], or None (x is not a finite native float32 [h] or
 * [n, h] array: take the Python path). down, up_scaled: native, aligned, C-contiguous float32[R, h], R in
 * {1, 2}. routes.adapt: x + (x @ down.T) @ up_scaled in float64, saturated at the float32 limit, so no
 * finite x gives an infinity or NaN. */
static PyObject *adapt(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "adapt() takes 3 arguments");
        return NULL;
    }
    if (adapter_arrays(args[1], args[2], "adapt") < 0) return NULL;
    PyArrayObject *d = (PyArrayObject *)args[1], *u = (PyArrayObject *)args[2];
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
        adapt_row(o, D, U, rank, h);
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

/* What both slot learners take, parsed and checked once: the block of slots with its geometry, the
 * per-route counts, and (the reference rule's) lr, flush_threshold, pending, grad_up and up: the learner's
 * attributes of these names (learn/learner.py's Learner). The routing rule reads its state as a Routing. */
typedef struct {
    Py_buffer block;
    const char *base;
    Py_ssize_t count, slot_bytes, hidden, max_steps, payload_off, step_bytes, threshold, pending;
    Py_ssize_t n_routes; /* a slot's route indices must be below it */
    unsigned long long first_seq;
    double lr;
    PyObject *chosen, *best, *reward; /* per-route counts: uint64[Km], uint64[Km], float64[Km] (new references) */
    PyObject *grad_up, *up;           /* float64/float32[R, h] (new references) */
} Batch;

/* obj is an ndarray of ``type`` and shape (d0,) or (d0, d1) (ndim 1 or 2; d0 < 0: any), C-contiguous, native,
 * aligned and, if asked, writable. */
static int array_of(PyObject *obj, int type, int ndim, npy_intp d0, npy_intp d1, int writable) {
    if (!PyArray_Check(obj)) return 0;
    PyArrayObject *a = (PyArrayObject *)obj;
    return PyArray_TYPE(a) == type && PyArray_NDIM(a) == ndim && PyArray_IS_C_CONTIGUOUS(a) && (!writable || PyArray_ISWRITEABLE(a)) &&
           native(a) && (d0 < 0 || PyArray_DIM(a, 0) == d0) && (ndim == 1 || PyArray_DIM(a, 1) == d1);
}

/* The length of a 1-D array (-1 for anything else: a 0-d array has no shape to read). */
static npy_intp length_of(PyObject *obj) {
    return PyArray_Check(obj) && PyArray_NDIM((PyArrayObject *)obj) == 1 ? PyArray_DIM((PyArrayObject *)obj, 0) : -1;
}

static void batch_release(Batch *b) {
    if (b->block.obj != NULL) PyBuffer_Release(&b->block);
    Py_CLEAR(b->chosen);
    Py_CLEAR(b->best);
    Py_CLEAR(b->reward);
    Py_CLEAR(b->grad_up);
    Py_CLEAR(b->up);
}

static PyObject *learner_attr(PyObject *learner, const char *name) { return PyObject_GetAttrString(learner, name); }

/* args: block (count whole slots of geometry), geometry, first_seq, learner, stop. Reads the learner's
 * route_chosen, route_best and route_reward (uint64/uint64/float64[Km]) and, for the reference rule
 * (``routing`` 0), lr, flush_threshold, pending, grad_up and up. A slot's route indices must be below
 * the geometry's routes (and Km) for the reference rule; the routing rule sets n_routes itself. On failure
 * everything taken is released and -1 returned with an exception set. */
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
    if (!routing) {
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
        if (!(b->grad_up = learner_attr(learner, "grad_up")) || !(b->up = learner_attr(learner, "up"))) goto fail;
    }
    if (!(b->chosen = learner_attr(learner, "route_chosen")) || !(b->best = learner_attr(learner, "route_best")) ||
        !(b->reward = learner_attr(learner, "route_reward")))
        goto fail;
    npy_intp km = length_of(b->chosen);
    b->n_routes = km < g->n_routes ? km : g->n_routes;
    if ((!routing && (b->threshold < 1 || b->pending < 0 || b->pending >= b->threshold)) || km < 0 || km > MAX_ROUTES_C ||
        !array_of(b->chosen, NPY_UINT64, 1, km, 0, 1) || !array_of(b->best, NPY_UINT64, 1, km, 0, 1) ||
        !array_of(b->reward, NPY_FLOAT64, 1, km, 0, 1)) {
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

/* write_window(out, grad_up, seq, n, cum, sealed_at) -> size
 * fleet/window.py's SFW1 window (the reference rule's) in one call, the same bytes: the header, then
 * grad_up (one row when all its rows are the same bits) into ``out`` (writable, C-contiguous, large
 * enough; raises otherwise, writing nothing). The routing rule's SFW2 windows are written in numpy. */
static PyObject *write_window(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "write_window() takes 6 arguments");
        return NULL;
    }
    if (!array_of(args[1], NPY_FLOAT64, 2, -1, PyArray_Check(args[1]) && PyArray_NDIM((PyArrayObject *)args[1]) == 2 ? PyArray_DIM((PyArrayObject *)args[1], 1) : -1,
                  1)) {
        PyErr_SetString(PyExc_ValueError, "write_window(): grad_up must be a C-contiguous float64[R, h]");
        return NULL;
    }
    PyArrayObject *gu = (PyArrayObject *)args[1];
    npy_intp rank = PyArray_DIM(gu, 0), h = PyArray_DIM(gu, 1);
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[2]), n = PyLong_AsUnsignedLongLong(args[3]),
                       cum = PyLong_AsUnsignedLongLong(args[4]);
    double sealed_at = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred()) return NULL;
    if (rank < 1 || rank > 0xFFFF || h < 1 || h > 0xFFFFFFFFLL) {
        PyErr_SetString(PyExc_ValueError, "write_window(): bad shape");
        return NULL;
    }
    const double *G = (const double *)PyArray_DATA(gu);
    int same = rank > 1;
    for (npy_intp r = 1; same && r < rank; r++) same = memcmp(G, G + r * h, (size_t)h * sizeof(double)) == 0;
    uint16_t up_rows = same ? 1 : (uint16_t)rank, down_rows = 0;
    Py_ssize_t size = WINDOW_HEAD_BYTES + 8 * h * (Py_ssize_t)up_rows;
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
    PyBuffer_Release(&out);
    return PyLong_FromSsize_t(size);
}

/* x = f32(clamp((double)x + (double)d)): one value of a routing window applied (learner.py's apply_deltas). */
static inline float add_delta(float x, float d) {
    double val = (double)x + (double)d;
    return (float)(val > FLT_MAX_D ? FLT_MAX_D : val < -FLT_MAX_D ? -FLT_MAX_D : val);
}

/* apply_deltas_window(up, down, vectors, bias, window, hidden_dim, rank, max_routes) -> (seq, n, cum, sealed_at) or None
 * fleet/window.py's apply_sealed(read_window(window)) for an SFW2 window (the routing rule's) in one call: checks
 * everything read_window checks (length, magic, shape, at most max_routes routes, n >= 1, cum >= n, every value
 * finite, route rows distinct, ascending and below the routes carried), then adds the deltas to up, down
 * (float32[rank, h], when the window carries the adapter), bias[:routes] and the rows of vectors (float32[>= max_routes,
 * h], float32[>= max_routes]) in place, each x = f32(clamp((double)x + (double)delta)): the bits of the numpy path.
 * None: not such a window, nothing changed. */
static PyObject *apply_deltas_window(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "apply_deltas_window() takes 8 arguments");
        return NULL;
    }
    Py_ssize_t h = PyLong_AsSsize_t(args[5]), rank = PyLong_AsSsize_t(args[6]), max_routes = PyLong_AsSsize_t(args[7]);
    if ((h == -1 || rank == -1 || max_routes == -1) && PyErr_Occurred()) return NULL;
    if (h < 1 || rank < 1 || rank > 0xFFFF || max_routes < 0 || !array_of(args[0], NPY_FLOAT32, 2, rank, h, 1) ||
        !array_of(args[1], NPY_FLOAT32, 2, rank, h, 1) || !array_of(args[2], NPY_FLOAT32, 2, -1, h, 1) ||
        PyArray_DIM((PyArrayObject *)args[2], 0) < max_routes || !array_of(args[3], NPY_FLOAT32, 1, -1, 0, 1) ||
        PyArray_DIM((PyArrayObject *)args[3], 0) < max_routes) {
        PyErr_SetString(PyExc_ValueError, "apply_deltas_window(): up and down must be writable C-contiguous float32[rank, hidden_dim], "
                                          "vectors float32[>= max_routes, hidden_dim] and bias float32[>= max_routes]");
        return NULL;
    }
    Py_buffer w;
    if (PyObject_GetBuffer(args[4], &w, PyBUF_SIMPLE) < 0) return NULL;
    const char *raw = (const char *)w.buf;
    PyObject *result = NULL;
    uint32_t hidden, r;
    uint16_t up_rows, down_rows, routes, rows;
    uint64_t seq, n, cum;
    double sealed_at;
    if (w.len < WINDOW_HEAD_BYTES || memcmp(raw, "SFW2", 4) != 0) goto not_a_window;
    memcpy(&hidden, raw + 4, 4);
    memcpy(&r, raw + 8, 4);
    memcpy(&up_rows, raw + 12, 2);
    memcpy(&down_rows, raw + 14, 2);
    memcpy(&seq, raw + 16, 8);
    memcpy(&n, raw + 24, 8);
    memcpy(&cum, raw + 32, 8);
    memcpy(&sealed_at, raw + 40, 8);
    memcpy(&routes, raw + 48, 2);
    memcpy(&rows, raw + 50, 2);
    Py_ssize_t row_bytes = (2 * (Py_ssize_t)rows + 3) / 4 * 4;
    if ((Py_ssize_t)hidden != h || (Py_ssize_t)r != rank || up_rows != down_rows || (up_rows != 0 && up_rows != rank) ||
        routes > max_routes || rows > routes ||
        w.len != WINDOW_HEAD_BYTES + 4 * h * (Py_ssize_t)(up_rows + down_rows + rows) + 4 * (Py_ssize_t)routes + row_bytes || n < 1 ||
        cum < n || !isfinite(sealed_at))
        goto not_a_window;
    {
        const char *adapter = raw + WINDOW_HEAD_BYTES, *bias_d = adapter + 8 * h * up_rows, *index = bias_d + 4 * routes,
                   *vectors_d = index + row_bytes;
        Py_ssize_t values = 2 * h * up_rows;
        for (Py_ssize_t i = 0; i < values; i++) {
            float v;
            memcpy(&v, adapter + 4 * i, 4);
            if (!isfinite(v)) goto not_a_window;
        }
        for (Py_ssize_t i = 0; i < routes; i++) {
            float v;
            memcpy(&v, bias_d + 4 * i, 4);
            if (!isfinite(v)) goto not_a_window;
        }
        for (Py_ssize_t i = 0; i < h * rows; i++) {
            float v;
            memcpy(&v, vectors_d + 4 * i, 4);
            if (!isfinite(v)) goto not_a_window;
        }
        for (Py_ssize_t j = 0; j < rows; j++) {
            uint16_t k, before;
            memcpy(&k, index + 2 * j, 2);
            if (k >= routes) goto not_a_window;
            if (j > 0) {
                memcpy(&before, index + 2 * (j - 1), 2);
                if (k <= before) goto not_a_window;
            }
        }
        float *U = (float *)PyArray_DATA((PyArrayObject *)args[0]), *D = (float *)PyArray_DATA((PyArrayObject *)args[1]),
              *V = (float *)PyArray_DATA((PyArrayObject *)args[2]), *B = (float *)PyArray_DATA((PyArrayObject *)args[3]);
        for (Py_ssize_t i = 0; up_rows && i < rank * h; i++) {
            float du, dd;
            memcpy(&du, adapter + 4 * i, 4);
            memcpy(&dd, adapter + 4 * (rank * h + i), 4);
            U[i] = add_delta(U[i], du);
            D[i] = add_delta(D[i], dd);
        }
        for (Py_ssize_t i = 0; i < routes; i++) {
            float d;
            memcpy(&d, bias_d + 4 * i, 4);
            B[i] = add_delta(B[i], d);
        }
        for (Py_ssize_t j = 0; j < rows; j++) {
            uint16_t k;
            memcpy(&k, index + 2 * j, 2);
            float *row = V + (Py_ssize_t)k * h;
            for (Py_ssize_t i = 0; i < h; i++) {
                float d;
                memcpy(&d, vectors_d + 4 * (j * h + i), 4);
                row[i] = add_delta(row[i], d);
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

/* apply_window(up, window, lr, hidden_dim, rank) -> (seq, n, cum, sealed_at) or None
 * fleet/window.py's apply_sealed(read_window(window)) for an SFW1 window (the reference rule's) in one
 * call: checks that ``window`` has this fleet's shape, n >= 1, cum >= n and only finite values, then
 * applies it to up, float32[rank, hidden_dim] in place, with apply_row's arithmetic:
 * x = f32(clamp((double)x + g * (lr / n))), no fused multiply-add, so the same bits as the numpy
 * path. None: not such a window, nothing changed (the caller's read_window says why). */
static PyObject *apply_window(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "apply_window() takes 5 arguments");
        return NULL;
    }
    double lr = PyFloat_AsDouble(args[2]);
    if (lr == -1.0 && PyErr_Occurred()) return NULL;
    Py_ssize_t h = PyLong_AsSsize_t(args[3]), rank = PyLong_AsSsize_t(args[4]);
    if ((h == -1 || rank == -1) && PyErr_Occurred()) return NULL;
    if (h < 1 || rank < 1 || rank > 0xFFFF || !array_of(args[0], NPY_FLOAT32, 2, rank, h, 1)) {
        PyErr_SetString(PyExc_ValueError, "apply_window(): up must be a writable C-contiguous float32[rank, hidden_dim]");
        return NULL;
    }
    Py_buffer w;
    if (PyObject_GetBuffer(args[1], &w, PyBUF_SIMPLE) < 0) return NULL;
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
    if ((Py_ssize_t)hidden != h || (Py_ssize_t)r != rank || (up_rows != 1 && up_rows != rank) || down_rows != 0 ||
        w.len != WINDOW_HEAD_BYTES + 8 * h * (Py_ssize_t)up_rows || n < 1 || cum < n || !isfinite(sealed_at))
        goto not_a_window;
    {
        const char *g = raw + WINDOW_HEAD_BYTES;
        Py_ssize_t values = h * up_rows;
        for (Py_ssize_t i = 0; i < values; i++) {
            double v;
            memcpy(&v, g + 8 * i, 8);
            if (!isfinite(v)) goto not_a_window;
        }
        double step = lr / (double)n;
        float *U = (float *)PyArray_DATA((PyArrayObject *)args[0]);
        for (Py_ssize_t row = 0; row < rank; row++) {
            const char *gu = g + 8 * h * (up_rows == 1 ? 0 : row);
            for (Py_ssize_t i = 0; i < h; i++) {
                double v;
                memcpy(&v, gu + 8 * i, 8);
                double val = (double)U[row * h + i] + v * step;
                U[row * h + i] = (float)(val > FLT_MAX_D ? FLT_MAX_D : val < -FLT_MAX_D ? -FLT_MAX_D : val);
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

/* learn_slots(block, geometry, first_seq, learner, stop) -> (pending, flushes, applied, width, learned, corrupt, consumed)
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
 * its index is listed in ``corrupt``. ``applied``: the signals of the windows it applied
 * (flushes * flush_threshold); ``width``: the most steps a learned slot had; ``learned``:
 * consumed - len(corrupt), every one a signal; ``consumed``: the slots it went through
 * (``count`` unless it stopped).
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
    if (!array_of(b.grad_up, NPY_FLOAT64, 2, -1, h, 1) || !array_of(b.up, NPY_FLOAT32, 2, PyArray_DIM((PyArrayObject *)b.grad_up, 0), h, 1)) {
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
            result = Py_BuildValue("(nlninNn)", pending, flushes, (Py_ssize_t)flushes * b.threshold, width, learned, corrupt, consumed);
    }
release:
    batch_release(&b);
    return result;
}

/* ------------------------------------------------------------------ the routing rule */

/* 2^(j/32), j = 0..31, correctly rounded (exp_d's table). */
static const double EXP2_32[32] = {
    0x1.0000000000000p+0, 0x1.059b0d3158574p+0, 0x1.0b5586cf9890fp+0, 0x1.11301d0125b51p+0, 0x1.172b83c7d517bp+0, 0x1.1d4873168b9aap+0,
    0x1.2387a6e756238p+0, 0x1.29e9df51fdee1p+0, 0x1.306fe0a31b715p+0, 0x1.371a7373aa9cbp+0, 0x1.3dea64c123422p+0, 0x1.44e086061892dp+0,
    0x1.4bfdad5362a27p+0, 0x1.5342b569d4f82p+0, 0x1.5ab07dd485429p+0, 0x1.6247eb03a5585p+0, 0x1.6a09e667f3bcdp+0, 0x1.71f75e8ec5f74p+0,
    0x1.7a11473eb0187p+0, 0x1.82589994cce13p+0, 0x1.8ace5422aa0dbp+0, 0x1.93737b0cdc5e5p+0, 0x1.9c49182a3f090p+0, 0x1.a5503b23e255dp+0,
    0x1.ae89f995ad3adp+0, 0x1.b7f76f2fb5e47p+0, 0x1.c199bdd85529cp+0, 0x1.cb720dcef9069p+0, 0x1.d5818dcfba487p+0, 0x1.dfc97337b9b5fp+0,
    0x1.ea4afa2a490dap+0, 0x1.f50765b6e4540p+0,
};

/* 2^k as a double, for a normal one (-1022 <= k <= 1023): built from its bits. */
static inline __attribute__((always_inline)) double two_to(int k) {
    uint64_t bits = (uint64_t)(k + 1023) << 52;
    double v;
    memcpy(&v, &bits, 8);
    return v;
}

/* exp(x) for the learner's and route()'s softmax and sigmoid, the same bits on every CPU (the C library's exp may
 * take another path on another CPU: glibc has FMA variants): x = (32k + j) ln2/32 + t (Cody-Waite: ln2/32 in two
 * parts, the first with 32 significant bits so n ln2/32_hi is exact), |t| <= ln2/64, e^t by its Taylor series to
 * t^6 (error below 4e-18), times the table's 2^(j/32) and 2^k: within about two ulps of the exact value. NaN stays
 * NaN; below the smallest subnormal it is 0, above DBL_MAX infinity. Inlined: called out of line from a WIDE_VECTORS
 * clone, its legacy-SSE code would stall on the clone's dirty AVX state. */
static inline __attribute__((always_inline)) double exp_d(double x) {
    if (x > 709.782712893384) return INFINITY;
    if (!(x >= -745.2)) return x != x ? x : 0.0;
    double n = floor(x * 0x1.71547652b82fep+5 + 0.5); /* x * 32/ln2, rounded */
    double t = (x - n * 0x1.62e42fee00000p-6) - n * 0x1.a39ef35793c76p-38;
    double p = 1.0 + t * (1.0 + t * (0.5 + t * (1.0 / 6 + t * (1.0 / 24 + t * (1.0 / 120 + t * (1.0 / 720))))));
    int m = (int)n, j = m & 31, k = (m - j) / 32;
    double y = EXP2_32[j] * p;
    if (k > 1023) return y * two_to(k - 1) * 2.0;
    if (k < -1022) return y * two_to(k + 54) * 0x1p-54; /* a subnormal result: rounded once, by the last product */
    return y * two_to(k);
}

/* A routing learner's state: the attributes of these names of learn/learner.py's Learner, checked once per call
 * (routing_open), the open window's progress, and scratch for one feedback. */
typedef struct {
    npy_intp h, R, K, Km;                                  /* hidden_dim, rank, routes_used, max_routes */
    float *up, *down, *vectors, *bias;                     /* published: up, down, route_vectors, route_bias */
    float *work_up, *work_down, *work_vectors, *work_bias; /* the working copy every feedback moves */
    double *centre;                                        /* route_centre: mu, float64[h] */
    const uint8_t *state;                                  /* route_state: ACTIVE, or free/retired */
    double lr, adapter_lr, tau, s;                         /* s = 1/sqrt(R) */
    Py_ssize_t threshold;                                  /* flush_threshold: the largest window */
    long long before;                                      /* signals_accumulated when the call began */
    Py_ssize_t pending, opened, target, signals, flushes, applied; /* the window (see routing_feedback) */
    double *q, *f, *x, *g; /* scratch, float64[h]: the unit query, the adapted one, f^ - mu, the adapter's gradient */
    double *vf, *c;        /* float64[Km]: v_k . f^, the slopes */
    uint8_t *touched;      /* uint8[Km]: route rows the open window may have moved */
    PyObject *held[10];    /* the state arrays (new references) */
} Routing;

/* The state arrays, in the order of Routing.held: name, dtype, ndim, and the shape the error message names. */
static const struct {
    const char *name;
    int type, ndim;
    const char *shape;
} ROUTING_ARRAYS[10] = {
    {"up", NPY_FLOAT32, 2, "float32[R, h], R in {1, 2}"},
    {"down", NPY_FLOAT32, 2, "float32[R, h] like up"},
    {"work_up", NPY_FLOAT32, 2, "float32[R, h] like up"},
    {"work_down", NPY_FLOAT32, 2, "float32[R, h] like up"},
    {"route_vectors", NPY_FLOAT32, 2, "float32[max_routes, h]"},
    {"work_vectors", NPY_FLOAT32, 2, "float32[max_routes, h]"},
    {"route_bias", NPY_FLOAT32, 1, "float32[max_routes]"},
    {"work_bias", NPY_FLOAT32, 1, "float32[max_routes]"},
    {"route_centre", NPY_FLOAT64, 1, "float64[h]"},
    {"route_state", NPY_UINT8, 1, "uint8[max_routes], 1 <= max_routes <= 256"},
};

static void routing_release(Routing *r) {
    for (int i = 0; i < 10; i++) Py_CLEAR(r->held[i]);
    PyMem_Free(r->q);
    r->q = NULL;
}

/* A scalar attribute of the learner: an integer (long long) or a float (double); -1 with an exception set. */
static int learner_int(PyObject *learner, const char *name, long long *out) {
    PyObject *v = learner_attr(learner, name);
    if (v == NULL) return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int learner_float(PyObject *learner, const char *name, double *out) {
    PyObject *v = learner_attr(learner, name);
    if (v == NULL) return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* min(flush_threshold, max(1, opened // GROWTH)): routing.window_size, the signals of the window that opens after
 * ``opened`` signals. */
static Py_ssize_t window_size(long long opened, Py_ssize_t threshold) {
    long long n = opened / GROWTH;
    return n < 1 ? 1 : n < threshold ? (Py_ssize_t)n : threshold;
}

/* Read and check the routing learner's state (h: its hidden_dim, from the caller's queries or geometry) and open
 * its window where the learner left it. 0, or -1 with a ValueError naming what is wrong (everything released). */
static int routing_open(PyObject *learner, npy_intp h, const char *name, Routing *r) {
    memset(r, 0, sizeof *r);
    for (int i = 0; i < 10; i++)
        if (!(r->held[i] = learner_attr(learner, ROUTING_ARRAYS[i].name))) goto fail;
    long long used, threshold, pending, signals;
    double lr, adapter_lr, tau;
    if (learner_int(learner, "routes_used", &used) < 0 || learner_int(learner, "flush_threshold", &threshold) < 0 ||
        learner_int(learner, "pending", &pending) < 0 || learner_int(learner, "signals_accumulated", &signals) < 0 ||
        learner_float(learner, "lr", &lr) < 0 || learner_float(learner, "adapter_lr", &adapter_lr) < 0 ||
        learner_float(learner, "temperature", &tau) < 0)
        goto fail;
    npy_intp rank = PyArray_Check(r->held[0]) && PyArray_NDIM((PyArrayObject *)r->held[0]) == 2 ? PyArray_DIM((PyArrayObject *)r->held[0], 0) : -1;
    npy_intp km = length_of(r->held[9]);
    if (rank < 1 || rank > 2) rank = -1;
    if (km < 1 || km > MAX_ROUTES_C) km = -1;
    for (int i = 0; i < 10; i++) {
        npy_intp d0 = i < 4 ? rank : i == 8 ? h : km, d1 = ROUTING_ARRAYS[i].ndim == 2 ? h : 0;
        if (d0 < 0 || !array_of(r->held[i], ROUTING_ARRAYS[i].type, ROUTING_ARRAYS[i].ndim, d0, d1, i != 9)) {
            int bad = d0 >= 0 ? i : i < 4 ? 0 : 9; /* a length no array can match: name the array it is read from */
            PyErr_Format(PyExc_ValueError, "%s(): the learner's %s must be a%s native, aligned, C-contiguous %s (h = %zd, max_routes = "
                         "len(route_state) = %zd)", name, ROUTING_ARRAYS[bad].name, bad != 9 ? " writable," : "", ROUTING_ARRAYS[bad].shape,
                         (Py_ssize_t)h, (Py_ssize_t)km);
            goto fail;
        }
    }
    if (used < 1 || used > km) {
        PyErr_Format(PyExc_ValueError, "%s(): the learner's routes_used must be in [1, max_routes = %zd], got %lld", name, (Py_ssize_t)km, used);
        goto fail;
    }
    if (!(tau > 0 && tau <= FLT_MAX_D) || !isfinite(lr) || !isfinite(adapter_lr) || threshold < 1 || threshold > PY_SSIZE_T_MAX ||
        pending < 0 || pending > PY_SSIZE_T_MAX || signals < pending) {
        PyErr_Format(PyExc_ValueError,
                     "%s(): the learner's temperature must be finite and > 0, lr and adapter_lr finite, flush_threshold >= 1 and "
                     "0 <= pending <= signals_accumulated",
                     name);
        goto fail;
    }
    r->h = h, r->R = rank, r->K = (npy_intp)used, r->Km = km;
    float **f32[8] = {&r->up, &r->down, &r->work_up, &r->work_down, &r->vectors, &r->work_vectors, &r->bias, &r->work_bias};
    for (int i = 0; i < 8; i++) *f32[i] = (float *)PyArray_DATA((PyArrayObject *)r->held[i]);
    r->centre = (double *)PyArray_DATA((PyArrayObject *)r->held[8]);
    r->state = (const uint8_t *)PyArray_DATA((PyArrayObject *)r->held[9]);
    r->lr = lr, r->adapter_lr = adapter_lr, r->tau = tau, r->s = 1.0 / sqrt((double)rank);
    r->threshold = (Py_ssize_t)threshold, r->before = signals, r->pending = (Py_ssize_t)pending;
    r->opened = signals - pending;
    r->target = window_size(r->opened, r->threshold);
    r->q = PyMem_Malloc((size_t)(4 * h + 2 * km) * sizeof(double) + (size_t)km);
    if (r->q == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    r->f = r->q + h, r->x = r->f + h, r->g = r->x + h, r->vf = r->g + h, r->c = r->vf + km;
    r->touched = (uint8_t *)(r->c + km);
    /* A window left open by an earlier call may have moved any row; one opened here, only those it learns. */
    memset(r->touched, pending > 0, (size_t)km);
    return 0;
fail:
    routing_release(r);
    return -1;
}

/* The largest magnitude among q's n values (0: a zero query), or -1 if one is NaN or infinite. */
WIDE_VECTORS static float query_top(const float *q, npy_intp n) {
    int32_t top = 0;
    for (npy_intp i = 0; i < n; i++) {
        int32_t bits;
        memcpy(&bits, q + i, 4);
        bits &= 0x7fffffff; /* |q_i|: non-negative floats order as their bits (NaN above infinity) */
        top = bits > top ? bits : top;
    }
    if (top >= 0x7f800000) return -1.0f;
    float t;
    memcpy(&t, &top, 4);
    return t;
}

/* routing.step for one feedback, on the working state: query q (top: its largest magnitude, 0 for a zero query),
 * the route served and the right one (-1: none; any given is active), the bandit reward, and n, the signals so
 * far, this one included. In float64 (float32 only where the state is stored), every sum in the dot_* order:
 * numpy's step up to the order of its sums, and the same bits on every CPU. */
WIDE_VECTORS static void routing_step(Routing *r, const float *q32, float top, int route, int best, double reward, long long n) {
    npy_intp h = r->h, R = r->R, K = r->K;
    double *q = r->q, *f = r->f, *x = r->x, *mu = r->centre, *vf = r->vf, *c = r->c, tau = r->tau;
    float *U = r->work_up, *D = r->work_down, *V = r->work_vectors, *bias = r->work_bias;
    if (!(top > 0)) return; /* a zero query teaches nothing */
    /* q^ = q / |q|, q scaled by its largest magnitude first (no finite query overflows); f = q^ + s sum_r (d_r . q^) u_r */
    double inv_top = 1.0 / (double)top;
    for (npy_intp i = 0; i < h; i++) q[i] = (double)q32[i] * inv_top;
    double inv_q = 1.0 / sqrt(dot_dd(q, q, h));
    for (npy_intp i = 0; i < h; i++) q[i] *= inv_q;
    double kappa[2] = {dot_df(q, D, h), R == 2 ? dot_df(q, D + h, h) : 0.0};
    double sk0 = r->s * kappa[0], sk1 = r->s * kappa[1];
    if (R == 2)
        for (npy_intp i = 0; i < h; i++) f[i] = q[i] + (sk0 * (double)U[i] + sk1 * (double)U[h + i]);
    else
        for (npy_intp i = 0; i < h; i++) f[i] = q[i] + sk0 * (double)U[i];
    double fn = sqrt(dot_dd(f, f, h));
    if (!(fn > MIN_ADAPTED_NORM)) return; /* the adapter maps the query to (almost) zero */
    double inv_f = 1.0 / fn;
    for (npy_intp i = 0; i < h; i++) f[i] *= inv_f; /* f^ */
    /* z_k = tau f^ . v_k + BETA b_k over the active routes (kept in c), p = softmax(z), then the slopes c = dL/dz */
    npy_intp on[MAX_ROUTES_C], m = 0; /* the active routes */
    for (npy_intp k = 0; k < K; k++)
        if (r->state[k] == ACTIVE) on[m++] = k;
    dots_of_rows(f, V, on, m, h, vf);
    double top_z = -INFINITY, za = 0.0;
    for (npy_intp j = 0; j < m; j++) {
        npy_intp k = on[j];
        c[k] = tau * vf[k] + BETA * (double)bias[k];
        top_z = c[k] > top_z ? c[k] : top_z;
    }
    if (route >= 0) za = c[route];
    double sum = 0.0;
    for (npy_intp k = 0; k < K; k++)
        if (r->state[k] == ACTIVE) sum += (c[k] = exp_d(c[k] - top_z));
    for (npy_intp k = 0; k < K; k++) {
        double p = r->state[k] == ACTIVE ? c[k] / sum : 0.0;
        c[k] = best >= 0 ? -p : -reward * p;
    }
    if (best >= 0) /* full information: L = log p_y, c = e_y - p */
        c[best] += 1.0;
    else /* bandit: L = r log p_a + (1 - r) log(1 - sigmoid(z_a - OFFSET)) */
        c[route] += reward - (1.0 - reward) / (1.0 + exp_d(-(za - OFFSET)));
    int rows = 0;
    for (npy_intp k = 0; k < K; k++) {
        if (fabs(c[k]) < SPARSE || r->state[k] != ACTIVE) c[k] = 0.0; /* dropped: the row is left alone */
        rows += c[k] != 0.0;
    }
    if (!rows) return;
    if (r->adapter_lr != 0.0) {
        /* g = (tau / max(|f|, GRADIENT_FLOOR)) (I - f^ f^T) sum_k c_k v_k (the old rows); dU_r = s kappa_r g, dD_r = s (u_r . g) q^ */
        double *g = r->g, t = tau / (fn > GRADIENT_FLOOR ? fn : GRADIENT_FLOOR);
        memset(g, 0, (size_t)h * sizeof(double));
        for (npy_intp k = 0; k < K; k++)
            if (c[k] != 0.0)
                for (npy_intp i = 0; i < h; i++) g[i] += c[k] * (double)V[k * h + i];
        double fw = dot_dd(f, g, h);
        for (npy_intp i = 0; i < h; i++) g[i] = t * (g[i] - f[i] * fw);
        double ug[2] = {dot_df(g, U, h), R == 2 ? dot_df(g, U + h, h) : 0.0};
        for (npy_intp j = 0; j < R; j++) {
            double au = r->adapter_lr * (r->s * kappa[j]), ad = r->adapter_lr * (r->s * ug[j]);
            float *u = U + j * h, *d = D + j * h;
            for (npy_intp i = 0; i < h; i++) {
                u[i] = (float)((double)u[i] + au * g[i]);
                d[i] = (float)((double)d[i] + ad * q[i]);
            }
        }
    }
    /* mu += (f^ - mu) / min(n, CENTRE); x = f^ - mu */
    double inv_n = 1.0 / (double)(n < CENTRE ? n : CENTRE);
    for (npy_intp i = 0; i < h; i++) {
        mu[i] += (f[i] - mu[i]) * inv_n;
        x[i] = f[i] - mu[i];
    }
    double xmu = dot_dd(x, mu, h);
    /* dv_k = lr tau c_k (x - PROTECT [c_k < 0] (x . v^_k) v^_k) with the old v_k; db_k = BIAS_LR BETA c_k - (tau / BETA) dv_k . mu.
     * As dv_k = a (x - pi v_k): x . v_k = v_k . f^ - v_k . mu, and dv_k . mu = a (x . mu - pi v_k . mu). */
    for (npy_intp k = 0; k < K; k++) {
        if (c[k] == 0.0) continue;
        float *v = V + k * h;
        double a = r->lr * tau * c[k], pi = 0.0, dvmu = a * xmu;
        if (c[k] < 0) { /* a push-down keeps PROTECT less of its component along the route's own direction */
            f64x4 vv_acc[4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}}, vm_acc[4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
            npy_intp i = 0;
            for (; i + 16 <= h; i += 16) /* v . v and v . mu in one pass, each in dot_*'s order */
                for (int j = 0; j < 4; j++) {
                    f64x4 vj, mj;
                    f32_widen(&vj, v + i + 4 * j), f64_load(&mj, mu + i + 4 * j);
                    vv_acc[j] += vj * vj;
                    vm_acc[j] += vj * mj;
                }
            double vv_tail = 0.0, vm_tail = 0.0;
            for (; i < h; i++) {
                vv_tail += (double)v[i] * (double)v[i];
                vm_tail += (double)v[i] * mu[i];
            }
            double vv = f64_lanes(vv_acc, vv_tail), vmu = f64_lanes(vm_acc, vm_tail);
            pi = vv > 0 ? PROTECT * (vf[k] - vmu) / vv : 0.0;
            dvmu = a * (xmu - pi * vmu);
        }
        for (npy_intp i = 0; i < h; i++) v[i] = (float)((double)v[i] + a * (x[i] - pi * (double)v[i]));
        bias[k] = (float)((double)bias[k] + (BIAS_LR * BETA * c[k] - (tau / BETA) * dvmu));
        r->touched[k] = 1;
    }
}

/* One published value per element: d = f32(W - P), P = f32(saturate(P + d)), W = P (in float64: learner.apply_deltas
 * and Learner._reset_working, bit for bit). */
static void publish_values(float *P, float *W, npy_intp n) {
    for (npy_intp i = 0; i < n; i++) {
        float d = (float)((double)W[i] - (double)P[i]);
        W[i] = P[i] = saturated((double)P[i] + (double)d);
    }
}

/* Close the open window and apply it (Learner.close_window + apply): the adapter when it learns (adapter_lr > 0),
 * every bias, the route rows it moved; then the working copy is the published state and the next window opens. */
static void routing_apply(Routing *r) {
    npy_intp h = r->h, rh = r->R * h;
    if (r->adapter_lr > 0) {
        publish_values(r->up, r->work_up, rh);
        publish_values(r->down, r->work_down, rh);
    } else {
        memmove(r->work_up, r->up, (size_t)rh * sizeof(float));
        memmove(r->work_down, r->down, (size_t)rh * sizeof(float));
    }
    publish_values(r->bias, r->work_bias, r->Km);
    for (npy_intp k = 0; k < r->K; k++) {
        if (!r->touched[k]) continue;
        float *P = r->vectors + k * h, *W = r->work_vectors + k * h;
        int moved = 0;
        for (npy_intp i = 0; i < h && !moved; i++) moved = W[i] != P[i];
        if (moved) /* a row the window carries (numpy compares the rows alike) */
            publish_values(P, W, h);
        else
            memmove(W, P, (size_t)h * sizeof(float));
        r->touched[k] = 0;
    }
    r->flushes++;
    r->applied += r->pending;
    r->opened += r->pending;
    r->pending = 0;
    r->target = window_size(r->opened, r->threshold);
}

/* One feedback of either entry point (the route served and the right one, below routes_used; -1: none): a signal,
 * learned unless it names a route that is not active, that fills the open window up to its size (window_size) and
 * then closes it: applied here, or with ``stop`` left full for the caller, returning 1. */
static int routing_feedback(Routing *r, const float *q, float top, int route, int best, double reward, int stop) {
    r->signals++;
    r->pending++;
    if ((route < 0 || r->state[route] == ACTIVE) && (best < 0 || r->state[best] == ACTIVE))
        routing_step(r, q, top, route, best, reward, r->before + r->signals);
    if (r->pending < r->target) return 0;
    if (stop) return 1;
    routing_apply(r);
    return 0;
}

/* learn_routing(block, geometry, first_seq, learner, stop) -> (pending, flushes, applied, width, signals, corrupt, consumed)
 * The routing rule over the consecutive slots of ``block`` (whole slots of ``geometry``, slot i stamped
 * first_seq + i): Learner._learn_feedback + count_routes, with the state read from ``learner`` (Routing). A slot
 * with a route_index or best_index is a feedback (a signal); others are counted per route and kept (``width``: the
 * most steps a learned slot had) but teach nothing. A slot that fails slots.check() -- its stamp, a bound, a route
 * index not below routes_used, a feedback's query not finite or a bandit reward outside [0, 1] -- is not learned
 * and its index is listed in ``corrupt``. The window (routing.window_size of the signals before it) closes when
 * ``pending`` reaches its size: applied (``flushes``, ``applied``: their signals), or with ``stop`` the call
 * returns at once, the window full, ``consumed`` slots gone through. */
static PyObject *learn_routing(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Batch b;
    int stop;
    if (batch_open(args, nargs, "learn_routing", 1, &b, &stop) < 0) return NULL;
    PyObject *result = NULL;
    Routing r;
    if (routing_open(args[3], b.hidden, "learn_routing", &r) < 0) goto release;
    if (length_of(b.chosen) != r.Km) {
        PyErr_SetString(PyExc_ValueError, "learn_routing(): the learner's per-route counts must have max_routes entries, like route_state");
        goto done;
    }
    b.n_routes = r.K;
    Marks marks = {NULL, 0, 0};
    int width = 0, failed = 0;
    Py_ssize_t consumed = b.count;
    PyThreadState *unlocked = b.count >= NOGIL_SLOTS ? PyEval_SaveThread() : NULL; /* no Python object is used below */
    for (Py_ssize_t k = 0; k < b.count && !failed; k++) {
        const char *slot = b.base + k * b.slot_bytes;
        SlotHead head = slot_head(slot);
        int feedback = head.route >= 0 || head.best >= 0;
        const float *q = (const float *)(slot + b.payload_off);
        if (k + 1 < b.count) /* the next query is read while this one is learned */
            for (Py_ssize_t at = 0; at < 4 * b.hidden; at += 64) __builtin_prefetch((const char *)q + b.slot_bytes + at);
        float top = 0.0f;
        int ok = slot_ok(&b, slot, k) && (!feedback || head.best >= 0 || (head.quality >= 0.0f && head.quality <= 1.0f));
        if (ok && feedback) ok = (top = query_top(q, b.hidden)) >= 0;
        if (!ok) {
            failed = mark_corrupt(&marks, k) < 0;
            continue;
        }
        if (head.n_steps > width) width = head.n_steps;
        count_route(&b, head);
        if (feedback && routing_feedback(&r, q, top, head.route, head.best, head.quality, stop)) {
            consumed = k + 1;
            break;
        }
    }
    if (unlocked != NULL) PyEval_RestoreThread(unlocked);
    PyObject *corrupt = marks_list(&marks);
    if (failed || corrupt == NULL) {
        Py_XDECREF(corrupt);
        if (!PyErr_Occurred()) PyErr_NoMemory();
    } else
        result = Py_BuildValue("(nnninNn)", r.pending, r.flushes, r.applied, width, r.signals, corrupt, consumed);
done:
    routing_release(&r);
release:
    batch_release(&b);
    return result;
}

/* learn_routing_rows(query, route_index, best_index, quality, start, learner, stop) -> (consumed, pending, flushes, applied, signals)
 * The routing rule over rows[start:] of arrays (Learner._learn_feedback's C twin, with learn_routing's kernel and
 * windows): query native C-contiguous float32[n, h], route_index/best_index int64[n] (-1, or any negative: none;
 * else below the learner's routes_used, or ValueError before anything is learned), quality float32[n] (a bandit
 * feedback's reward). Rows with neither index are skipped (not signals); a query that is not finite teaches
 * nothing (still a signal). Nothing is counted per route (the caller does). ``consumed``: rows gone through,
 * all unless ``stop`` made it return at a full window. */
static PyObject *learn_routing_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "learn_routing_rows() takes 7 arguments (query, route_index, best_index, quality, start, learner, stop)");
        return NULL;
    }
    PyObject *query = args[0];
    npy_intp n = PyArray_Check(query) && PyArray_NDIM((PyArrayObject *)query) == 2 ? PyArray_DIM((PyArrayObject *)query, 0) : -1;
    npy_intp h = n >= 0 ? PyArray_DIM((PyArrayObject *)query, 1) : -1;
    if (n < 0 || h < 1 || !array_of(query, NPY_FLOAT32, 2, n, h, 0) || !array_of(args[1], NPY_INT64, 1, n, 0, 0) ||
        !array_of(args[2], NPY_INT64, 1, n, 0, 0) || !array_of(args[3], NPY_FLOAT32, 1, n, 0, 0)) {
        PyErr_SetString(PyExc_ValueError, "learn_routing_rows(): expected native, aligned, C-contiguous query float32[n, h >= 1], "
                                          "route_index and best_index int64[n], quality float32[n]");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[4]);
    if (start == -1 && PyErr_Occurred()) return NULL;
    int stop = PyObject_IsTrue(args[6]);
    if (stop < 0) return NULL;
    if (start < 0 || start > n) {
        PyErr_Format(PyExc_ValueError, "learn_routing_rows(): start must be in [0, %zd], got %zd", (Py_ssize_t)n, start);
        return NULL;
    }
    Routing r;
    if (routing_open(args[5], h, "learn_routing_rows", &r) < 0) return NULL;
    const float *Q = (const float *)PyArray_DATA((PyArrayObject *)query), *quality = (const float *)PyArray_DATA((PyArrayObject *)args[3]);
    const int64_t *ri = (const int64_t *)PyArray_DATA((PyArrayObject *)args[1]), *bi = (const int64_t *)PyArray_DATA((PyArrayObject *)args[2]);
    for (npy_intp i = start; i < n; i++)
        if (ri[i] >= r.K || bi[i] >= r.K) {
            PyErr_Format(PyExc_ValueError, "learn_routing_rows(): row %zd names route %lld, expected one below routes_used = %zd",
                         (Py_ssize_t)i, (long long)(ri[i] >= r.K ? ri[i] : bi[i]), (Py_ssize_t)r.K);
            routing_release(&r);
            return NULL;
        }
    Py_ssize_t consumed = n - start;
    PyThreadState *unlocked = n - start >= NOGIL_SLOTS ? PyEval_SaveThread() : NULL; /* no Python object is used below */
    for (npy_intp i = start; i < n; i++) {
        if (ri[i] < 0 && bi[i] < 0) continue; /* an ordinary trajectory: not a signal */
        const float *q = Q + i * h;
        float top = query_top(q, h);
        if (routing_feedback(&r, q, top < 0 ? 0.0f : top, ri[i] < 0 ? -1 : (int)ri[i], bi[i] < 0 ? -1 : (int)bi[i], quality[i], stop)) {
            consumed = i + 1 - start;
            break;
        }
    }
    if (unlocked != NULL) PyEval_RestoreThread(unlocked);
    PyObject *result = Py_BuildValue("(nnnnn)", consumed, r.pending, r.flushes, r.applied, r.signals);
    routing_release(&r);
    return result;
}

/* ------------------------------------------------------------------ route() */

/* route()'s own draws (u < 0): xoshiro256** (Blackman and Vigna), seeded from getrandom() at import and again in a
 * forked child before its first draw (pthread_atfork sets rng_forked), so gunicorn's workers, forked from one
 * master, draw apart. Used with the GIL held. */
static uint64_t rng_state[4];
static volatile int rng_forked = 1;

static void rng_after_fork(void) { rng_forked = 1; }

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rng_seed(void) {
    uint64_t seed[4];
    if (getrandom(seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed) { /* no entropy yet (early boot): the clock and pid */
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        uint64_t x = (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec + ((uint64_t)getpid() << 40);
        for (int i = 0; i < 4; i++) seed[i] = splitmix64(&x);
    }
    if (!(seed[0] | seed[1] | seed[2] | seed[3])) seed[0] = 1; /* the one state xoshiro cannot leave */
    memcpy(rng_state, seed, sizeof seed);
    rng_forked = 0;
}

/* A uniform double in [0, 1) (53 random bits). */
static double rng_uniform(void) {
    if (rng_forked) rng_seed();
    uint64_t *s = rng_state, x = s[1] * 5;
    uint64_t result = ((x << 7) | (x >> 57)) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return (double)(result >> 11) * 0x1.0p-53;
}

/* routes.adapt and routes.scores of one finite float32 x, in float64: adapted = f32(saturate(a)), a = x + sum_r
 * (x . d_r) u_r, and s_k = a^ . v_k + (BETA / tau) b_k for the active routes (-inf for the others; a zero a scores
 * the bias alone). a is proportional to numpy's q^ + sum_r (d_r . q^) u_r, so a^ is its f^. x may be adapted. */
WIDE_VECTORS static void route_scores(const float *x, const float *D, const float *U, npy_intp rank, npy_intp h, const float *V,
                                      const float *bias, const uint8_t *active, npy_intp K, double tau, double *a, float *adapted,
                                      double *s) {
    double c[2];
    coefficients(x, D, rank, h, c);
    adapted_row(adapted, x, U, rank, h, c, a);
    double norm = sqrt(dot_dd(a, a, h)), inv = norm > 0 ? 1.0 / norm : 0.0, scale = BETA / tau;
    npy_intp on[MAX_ROUTES_C], m = 0;
    for (npy_intp k = 0; k < K; k++)
        if (active[k]) on[m++] = k;
    dots_of_rows(a, V, on, m, h, s);
    for (npy_intp k = 0; k < K; k++) s[k] = active[k] ? s[k] * inv + (double)bias[k] * scale : -INFINITY;
}

enum { GREEDY, EPSILON, SOFTMAX, SQUARECB }; /* route()'s modes */

/* routes.policy: the probability of choosing each route (pi, float64[K]; 0 for inactive ones) under ``mode`` with its
 * parameter (epsilon, or SquareCB's gamma), around the greedy choice ``best``, k_active of the K routes active. */
static void policy(const double *s, npy_intp K, npy_intp best, npy_intp k_active, int mode, double parameter, double tau, double *pi) {
    if (mode == GREEDY || k_active == 1) {
        for (npy_intp k = 0; k < K; k++) pi[k] = k == best;
        return;
    }
    if (mode == EPSILON) {
        for (npy_intp k = 0; k < K; k++) pi[k] = isfinite(s[k]) ? parameter / (double)k_active : 0.0;
        pi[best] += 1.0 - parameter;
        return;
    }
    double sum = 0.0, zb = tau * s[best];
    for (npy_intp k = 0; k < K; k++) sum += (pi[k] = isfinite(s[k]) ? exp_d(tau * s[k] - zb) : 0.0);
    for (npy_intp k = 0; k < K; k++) pi[k] /= sum; /* p = softmax(tau s) */
    if (mode == SOFTMAX) return;
    double pb = pi[best], rest = 0.0; /* SquareCB: 1 / (k + gamma (p_best - p_k)) for the others, the best the rest */
    for (npy_intp k = 0; k < K; k++) {
        pi[k] = k != best && isfinite(s[k]) ? 1.0 / ((double)k_active + parameter * (pb - pi[k])) : 0.0;
        rest += pi[k];
    }
    pi[best] = 1.0 - rest;
}

/* routes._draw: a route drawn with probabilities pi, by the uniform u in [0, 1). */
static npy_intp draw(const double *pi, npy_intp K, double u) {
    double total = 0.0;
    for (npy_intp k = 0; k < K; k++) total += pi[k];
    u *= total;
    for (npy_intp k = 0; k < K; k++) {
        u -= pi[k];
        if (u < 0 && pi[k] > 0) return k;
    }
    for (npy_intp k = K - 1; k > 0; k--)
        if (pi[k] > 0) return k;
    return 0;
}

/* route(x, down, up_scaled, vectors, bias, active, names, mode, parameter, temperature, u) -> RouteChoice or None
 * routes.choose for one vector: ``x`` a finite native float32[h] (anything else: None, take the Python path);
 * down, up_scaled as adapt(); ``vectors`` float32[K, h] (the published route vectors), ``bias`` float32[K] (the raw
 * b_k: the score adds (BETA / temperature) b_k), ``active`` uint8 or bool[K], ``names`` a tuple of K str (native,
 * C-contiguous arrays, read only); ``mode`` 0 greedy, 1 epsilon-greedy (``parameter``: epsilon), 2 softmax of
 * temperature * scores, 3 SquareCB (``parameter``: gamma); ``u``: the uniform draw in [0, 1) to explore with, or < 0
 * for one of this module's own. Scores and the greedy choice (the lowest index within TIE of the best) are
 * float64, as numpy's; returns RouteChoice(index, name, scores (float32[K], -inf for inactive routes), adapted
 * (adapt(x)), explored (index != the greedy choice), probability (pi[index]; 1.0 greedy)). None too when no route
 * is active or x is zero (the Python path raises). Every sum in the fixed order routes._ordered_sum mirrors: the
 * same scores, to the bit, as routes.scores. */
static PyObject *route(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "route() takes 11 arguments");
        return NULL;
    }
    if (adapter_arrays(args[1], args[2], "route") < 0) return NULL;
    PyArrayObject *d = (PyArrayObject *)args[1];
    npy_intp rank = PyArray_DIM(d, 0), h = PyArray_DIM(d, 1);
    PyObject *vectors = args[3], *names = args[6];
    npy_intp K = PyArray_Check(vectors) && PyArray_NDIM((PyArrayObject *)vectors) == 2 ? PyArray_DIM((PyArrayObject *)vectors, 0) : -1;
    PyObject *active = args[5];
    int active_type = PyArray_Check(active) && PyArray_TYPE((PyArrayObject *)active) == NPY_BOOL ? NPY_BOOL : NPY_UINT8;
    if (route_choice_type == NULL || K < 1 || K > MAX_ROUTES_C || !array_of(vectors, NPY_FLOAT32, 2, K, h, 0) ||
        !array_of(args[4], NPY_FLOAT32, 1, K, 0, 0) || !array_of(active, active_type, 1, K, 0, 0) || !PyTuple_CheckExact(names) ||
        PyTuple_GET_SIZE(names) != K) {
        PyErr_SetString(PyExc_ValueError, "route(): vectors must be native, aligned, C-contiguous float32[K, h] (1 <= K <= 256), bias "
                                          "float32[K], active uint8 or bool[K], and names a tuple of K names");
        return NULL;
    }
    long mode = PyLong_AsLong(args[7]);
    double parameter = PyFloat_AsDouble(args[8]), tau = PyFloat_AsDouble(args[9]), u = PyFloat_AsDouble(args[10]);
    if (PyErr_Occurred()) return NULL;
    if (mode < GREEDY || mode > SQUARECB || !(tau > 0 && tau <= FLT_MAX_D) || (mode == EPSILON && !(parameter >= 0 && parameter <= 1)) ||
        (mode == SQUARECB && !(parameter > 0 && parameter <= FLT_MAX_D)) || !(u < 1.0)) {
        PyErr_SetString(PyExc_ValueError, "route(): mode must be 0 (greedy), 1 (epsilon: parameter in [0, 1]), 2 (softmax) or 3 "
                                          "(squarecb: parameter > 0), temperature finite and > 0, u < 1");
        return NULL;
    }
    PyArrayObject *x = (PyArrayObject *)args[0];
    if (!PyArray_CheckExact(args[0]) || PyArray_NDIM(x) != 1 || PyArray_TYPE(x) != NPY_FLOAT32 || !PyArray_ISNOTSWAPPED(x) ||
        PyArray_DIM(x, 0) != h)
        Py_RETURN_NONE;
    PyObject *adapted = PyArray_SimpleNew(1, &h, NPY_FLOAT32);
    if (adapted == NULL) return NULL;
    float *o = (float *)PyArray_DATA((PyArrayObject *)adapted);
    if (copy_row(o, PyArray_BYTES(x), h, PyArray_STRIDE(x, 0)) < 0) {
        Py_DECREF(adapted);
        Py_RETURN_NONE;
    }
    npy_intp nonzero = 0;
    while (nonzero < h && o[nonzero] == 0.0f) nonzero++;
    if (nonzero == h) { /* a zero query: the Python path refuses it, naming x */
        Py_DECREF(adapted);
        Py_RETURN_NONE;
    }
    PyObject *scores = PyArray_SimpleNew(1, &K, NPY_FLOAT32);
    double *a = scores ? PyMem_Malloc((size_t)(h + 2 * K) * sizeof(double)) : NULL;
    if (a == NULL) {
        Py_XDECREF(scores);
        Py_DECREF(adapted);
        return scores ? PyErr_NoMemory() : NULL;
    }
    double *s = a + h, *pi = s + K;
    const uint8_t *on = (const uint8_t *)PyArray_DATA((PyArrayObject *)active);
    route_scores(o, (const float *)PyArray_DATA(d), (const float *)PyArray_DATA((PyArrayObject *)args[2]), rank, h,
                 (const float *)PyArray_DATA((PyArrayObject *)vectors), (const float *)PyArray_DATA((PyArrayObject *)args[4]), on, K, tau, a, o, s);
    double top = -INFINITY;
    npy_intp k_active = 0, best = -1, index;
    for (npy_intp k = 0; k < K; k++) {
        k_active += on[k] != 0;
        if (on[k] && s[k] > top) top = s[k];
    }
    for (npy_intp k = 0; k < K && best < 0; k++)
        if (on[k] && s[k] >= top - TIE) best = k; /* routes.best_of */
    float *shown = (float *)PyArray_DATA((PyArrayObject *)scores);
    for (npy_intp k = 0; k < K; k++) shown[k] = (float)s[k];
    double probability = 1.0;
    index = best;
    if (best >= 0 && mode != GREEDY) {
        policy(s, K, best, k_active, (int)mode, parameter, tau, pi);
        index = draw(pi, K, u < 0 ? rng_uniform() : u);
        probability = pi[index];
    }
    PyMem_Free(a);
    if (best < 0) { /* no route is active: the Python path says so */
        Py_DECREF(scores);
        Py_DECREF(adapted);
        Py_RETURN_NONE;
    }
    /* What tuple.__new__(RouteChoice, fields) does (tuple_subtype_new): allocate the subclass
     * instance with room for its 6 items, then fill it; RouteChoice has no fields of its own. */
    PyObject *number = PyLong_FromSsize_t(index);
    PyObject *chance = number ? PyFloat_FromDouble(probability) : NULL;
    PyObject *choice = chance ? route_choice_type->tp_alloc(route_choice_type, 6) : NULL;
    if (choice == NULL) {
        Py_XDECREF(number);
        Py_XDECREF(chance);
        Py_DECREF(scores);
        Py_DECREF(adapted);
        return NULL;
    }
    PyTuple_SET_ITEM(choice, 0, number); /* each steals its reference */
    PyTuple_SET_ITEM(choice, 1, Py_NewRef(PyTuple_GET_ITEM(names, index)));
    PyTuple_SET_ITEM(choice, 2, scores);
    PyTuple_SET_ITEM(choice, 3, adapted);
    PyTuple_SET_ITEM(choice, 4, Py_NewRef(index != best ? Py_True : Py_False));
    PyTuple_SET_ITEM(choice, 5, chance);
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
     "Routing rule: learn consecutive lane slots into the learner's working state, applying the windows it fills."},
    {"learn_routing_rows", (PyCFunction)(void (*)(void))learn_routing_rows, METH_FASTCALL,
     "learn_routing_rows($module, query, route_index, best_index, quality, start, learner, stop, /)\n--\n\n"
     "Routing rule: learn rows[start:] of arrays into the learner's working state, applying the windows it fills."},
    {"write_window", (PyCFunction)(void (*)(void))write_window, METH_FASTCALL,
     "write_window($module, out, grad_up, seq, n, cum, sealed_at, /)\n--\n\n"
     "Encode a sealed window into a buffer (fleet/window.py's bytes); its length."},
    {"apply_window", (PyCFunction)(void (*)(void))apply_window, METH_FASTCALL,
     "apply_window($module, up, window, lr, hidden_dim, rank, /)\n--\n\n"
     "Apply an SFW1 window's bytes to up (fleet/window.py's arithmetic); None: not a window of this shape."},
    {"apply_deltas_window", (PyCFunction)(void (*)(void))apply_deltas_window, METH_FASTCALL,
     "apply_deltas_window($module, up, down, vectors, bias, window, hidden_dim, rank, max_routes, /)\n--\n\n"
     "Apply an SFW2 window's bytes to up, down, vectors and bias (fleet/window.py's arithmetic); None: not a window of this shape."},
    {"route", (PyCFunction)(void (*)(void))route, METH_FASTCALL,
     "route($module, x, down, up_scaled, vectors, bias, active, names, mode, parameter, temperature, u, /)\n--\n\n"
     "routes.choose() for one finite float32 vector: a RouteChoice; None: take the Python path."},
    {"adapt", (PyCFunction)(void (*)(void))adapt, METH_FASTCALL,
     "adapt($module, x, down, up_scaled, /)\n--\n\nx + adapter(x) for finite float32 [h] or [n, h]; None: take the Python path."},
    {NULL, NULL, 0, NULL},
};

static int add_float(PyObject *m, const char *name, double value) {
    PyObject *v = PyFloat_FromDouble(value);
    int done = v == NULL ? -1 : PyModule_AddObjectRef(m, name, v);
    Py_XDECREF(v);
    return done;
}

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
    CONSTANT(COMMIT_LINE);
    CONSTANT(FL_IDLE);
    CONSTANT(WINDOW_HEAD_BYTES);
    if (PyModule_AddIntConstant(m, "MAX_ROUTES", MAX_ROUTES_C) < 0) goto fail;
    CONSTANT(INTERFACE);
    CONSTANT(CENTRE);
    CONSTANT(GROWTH);
    CONSTANT(ACTIVE);
#define FLOAT_CONSTANT(name) \
    if (add_float(m, #name, name) < 0) goto fail
    FLOAT_CONSTANT(BETA);
    FLOAT_CONSTANT(OFFSET);
    FLOAT_CONSTANT(BIAS_LR);
    FLOAT_CONSTANT(PROTECT);
    FLOAT_CONSTANT(SPARSE);
    FLOAT_CONSTANT(GRADIENT_FLOOR);
    FLOAT_CONSTANT(MIN_ADAPTED_NORM);
    FLOAT_CONSTANT(TIE);
    rng_seed();
    if (pthread_atfork(NULL, NULL, rng_after_fork) != 0) {
        PyErr_SetString(PyExc_OSError, "_speedups: pthread_atfork() failed");
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
