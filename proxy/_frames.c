/* proxy._frames: the compiled twin of proxy/websocket.py's frame trackers (read
 * FrameTracker there first: it is the spec).
 *
 * Why C: a relayed WebSocket message is fed to a tracker on each of its two legs, and in
 * Python each feed is a loop of slicing and attribute stores, about 0.8-1 us apiece, a
 * seventh of the proxy's CPU per small echoed message. Here each feed is one pass over the
 * frame headers in the bytes (payloads are skipped, never read), and a tracker is a fixed
 * 64-byte object instead of an instance with seven slots and its bytes objects.
 *
 * Three types, FrameTracker (direction unknown), ClientFrames (every frame masked) and
 * OriginFrames (none masked), with the Python classes' attributes: feed(data), at_boundary,
 * lost, closed, close_code, masked. tests/test_frames.py holds them to the Python twins on
 * random and hostile streams cut at random places.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <structmember.h>

#define OP_CLOSE 0x8

typedef struct {
    PyObject_HEAD
    uint64_t remaining;       /* payload bytes of the current frame still to pass */
    int32_t close_code;       /* -1: None */
    unsigned char head[14];   /* an incomplete frame header (2 + 8 + 4 bytes at most) */
    unsigned char head_len;
    unsigned char mask[4];    /* the current frame's masking key, if masked */
    unsigned char has_mask;
    unsigned char code[2];    /* the first two bytes of a Close frame's payload */
    unsigned char close_got;  /* how many of those arrived (0, 1 or 2) */
    unsigned char in_close;
    unsigned char closed;     /* a complete Close frame went through */
    unsigned char lost;       /* the stream broke the framing rules: nothing is known */
    signed char masked;       /* -1: not known, 0: never masked, 1: always masked */
} Tracker;

static void lose(Tracker *t)
{
    t->lost = 1;
    t->remaining = 0;
    t->head_len = 0;
    t->in_close = 0;
    t->close_got = 0;
}

static void close_done(Tracker *t)
{
    t->closed = 1;
    t->in_close = 0;
    if (t->close_got >= 2) {
        unsigned char a = t->code[0], b = t->code[1];
        if (t->has_mask) {
            a ^= t->mask[0];
            b ^= t->mask[1];
        }
        t->close_code = (a << 8) | b;
    } else {
        t->close_code = 1005; /* no status code present */
    }
}

/* as FrameTracker.feed: follow the frame boundaries across data */
static void feed(Tracker *t, const unsigned char *data, Py_ssize_t end)
{
    Py_ssize_t pos = 0;
    if (t->lost)
        return;
    while (pos < end) {
        if (t->remaining) {
            uint64_t avail = (uint64_t)(end - pos);
            uint64_t take = t->remaining < avail ? t->remaining : avail;
            if (t->in_close) {
                for (uint64_t i = 0; i < take && t->close_got < 2; i++)
                    t->code[t->close_got++] = data[pos + (Py_ssize_t)i];
            }
            pos += (Py_ssize_t)take;
            t->remaining -= take;
            if (!t->remaining && t->in_close)
                close_done(t);
            continue;
        }
        while (t->head_len < 2 && pos < end)
            t->head[t->head_len++] = data[pos++];
        if (t->head_len < 2)
            return;
        unsigned char b1 = t->head[1];
        uint64_t size = b1 & 0x7F;
        unsigned header_len = 2 + (size == 126 ? 2 : size == 127 ? 8 : 0) + (b1 & 0x80 ? 4 : 0);
        while (t->head_len < header_len && pos < end)
            t->head[t->head_len++] = data[pos++];
        if (t->head_len < header_len)
            return;
        t->head_len = 0;
        unsigned char b0 = t->head[0];
        unsigned opcode = b0 & 0x0F;
        if (((opcode & 0x08) && (!(b0 & 0x80) || size > 125)) || (opcode == OP_CLOSE && size == 1)) {
            lose(t); /* a fragmented or long control frame, or a 1-byte Close */
            return;
        }
        if (t->masked >= 0 && t->masked != !!(b1 & 0x80)) {
            lose(t);
            return;
        }
        if (size == 126) {
            size = ((uint64_t)t->head[2] << 8) | t->head[3];
        } else if (size == 127) {
            size = 0;
            for (int i = 2; i < 10; i++)
                size = (size << 8) | t->head[i];
        }
        t->in_close = opcode == OP_CLOSE;
        t->has_mask = (b1 & 0x80) != 0;
        if (t->has_mask)
            memcpy(t->mask, t->head + header_len - 4, 4);
        t->close_got = 0;
        t->remaining = size;
        if (!size && t->in_close)
            close_done(t);
    }
}

static PyObject *Tracker_feed(Tracker *self, PyObject *arg)
{
    if (PyBytes_CheckExact(arg)) {
        feed(self, (const unsigned char *)PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg));
        Py_RETURN_NONE;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    feed(self, (const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *tracker_new(PyTypeObject *type, signed char masked)
{
    Tracker *t = (Tracker *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->close_code = -1;
    t->masked = masked;
    return (PyObject *)t;
}

static int no_arguments(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if ((args != NULL && PyTuple_GET_SIZE(args)) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_Format(PyExc_TypeError, "%s() takes no arguments", type->tp_name);
        return -1;
    }
    return 0;
}

static PyObject *FrameTracker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (no_arguments(type, args, kwds) < 0)
        return NULL;
    return tracker_new(type, -1);
}

static PyObject *ClientFrames_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (no_arguments(type, args, kwds) < 0)
        return NULL;
    return tracker_new(type, 1);
}

static PyObject *OriginFrames_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (no_arguments(type, args, kwds) < 0)
        return NULL;
    return tracker_new(type, 0);
}

static PyObject *get_at_boundary(Tracker *t, void *closure)
{
    return PyBool_FromLong(!t->lost && t->remaining == 0 && t->head_len == 0);
}

static PyObject *get_lost(Tracker *t, void *closure) { return PyBool_FromLong(t->lost); }

static PyObject *get_closed(Tracker *t, void *closure) { return PyBool_FromLong(t->closed); }

static PyObject *get_close_code(Tracker *t, void *closure)
{
    if (t->close_code < 0)
        Py_RETURN_NONE;
    return PyLong_FromLong(t->close_code);
}

static PyObject *get_masked(Tracker *t, void *closure)
{
    if (t->masked < 0)
        Py_RETURN_NONE;
    return PyBool_FromLong(t->masked);
}

static PyMethodDef Tracker_methods[] = {
    {"feed", (PyCFunction)Tracker_feed, METH_O,
     "Follow the frame boundaries across the next bytes of the stream."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Tracker_getset[] = {
    {"at_boundary", (getter)get_at_boundary, NULL, "No frame is partly through.", NULL},
    {"lost", (getter)get_lost, NULL, "The stream broke the framing rules.", NULL},
    {"closed", (getter)get_closed, NULL, "A complete Close frame went through.", NULL},
    {"close_code", (getter)get_close_code, NULL, "The last Close frame's code, or None.", NULL},
    {"masked", (getter)get_masked, NULL, "Whether this direction's frames must be masked.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FrameTrackerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy._frames.FrameTracker",
    .tp_basicsize = sizeof(Tracker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Follows frame boundaries in one direction of a relayed WebSocket stream "
              "(proxy.websocket.FrameTracker).",
    .tp_methods = Tracker_methods,
    .tp_getset = Tracker_getset,
    .tp_new = FrameTracker_new,
};

static PyTypeObject ClientFramesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy._frames.ClientFrames",
    .tp_basicsize = sizeof(Tracker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Client to origin: every frame masked (RFC 6455 5.1).",
    .tp_new = ClientFrames_new,
};

static PyTypeObject OriginFramesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy._frames.OriginFrames",
    .tp_basicsize = sizeof(Tracker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Origin to client: no frame masked (RFC 6455 5.1).",
    .tp_new = OriginFrames_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy._frames",
    "Compiled twin of proxy.websocket's frame trackers.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__frames(void)
{
    ClientFramesType.tp_base = &FrameTrackerType;
    OriginFramesType.tp_base = &FrameTrackerType;
    if (PyType_Ready(&FrameTrackerType) < 0 || PyType_Ready(&ClientFramesType) < 0
        || PyType_Ready(&OriginFramesType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "FrameTracker", (PyObject *)&FrameTrackerType) < 0
        || PyModule_AddObjectRef(m, "ClientFrames", (PyObject *)&ClientFramesType) < 0
        || PyModule_AddObjectRef(m, "OriginFrames", (PyObject *)&OriginFramesType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
