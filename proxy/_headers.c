/* proxy._headers: the compiled twin of proxy.headers.to_client (that function is the spec).
 *
 * Why C: every proxied response passes through it; in Python it is a loop with a set lookup
 * per header, a token set built from Connection and a second filtering pass (about 1.2 us for
 * nginx's five headers); here it is one pass and one list. It takes what the codecs pass,
 * (bytes, bytes) tuples, and raises TypeError for anything else. tests/test_whole.py holds it
 * to the Python function.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *VIA;       /* proxy.headers.VIA; the Python module checks they agree */
static PyObject *VIA_NAME;  /* b"via" */
static PyObject *WEBSOCKET; /* proxy.headers._WEBSOCKET's pairs */

static int is(PyObject *b, const char *lit, Py_ssize_t n)
{
    return PyBytes_GET_SIZE(b) == n && memcmp(PyBytes_AS_STRING(b), lit, n) == 0;
}

#define IS(b, lit) is((b), lit, (Py_ssize_t)sizeof(lit) - 1)

/* proxy.headers._RESPONSE_SPECIAL minus via and connection: dropped outright */
static int hop_by_hop(PyObject *name)
{
    return IS(name, "keep-alive") || IS(name, "proxy-connection") || IS(name, "proxy-authenticate")
           || IS(name, "proxy-authorization") || IS(name, "te") || IS(name, "trailer")
           || IS(name, "transfer-encoding") || IS(name, "upgrade");
}

static int space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

/* name equals one of the value's comma-separated tokens, stripped and lowercased
 * (proxy.headers._tokens) */
static int listed_in(PyObject *name, PyObject *value)
{
    const unsigned char *v = (const unsigned char *)PyBytes_AS_STRING(value);
    const unsigned char *n = (const unsigned char *)PyBytes_AS_STRING(name);
    Py_ssize_t len = PyBytes_GET_SIZE(value), nlen = PyBytes_GET_SIZE(name);
    Py_ssize_t i = 0;
    while (i <= len) {
        Py_ssize_t j = i;
        while (j < len && v[j] != ',')
            j++;
        Py_ssize_t a = i, b = j;
        while (a < b && space(v[a]))
            a++;
        while (b > a && space(v[b - 1]))
            b--;
        if (b - a == nlen && nlen > 0) {
            Py_ssize_t k = 0;
            for (; k < nlen; k++) {
                unsigned char c = v[a + k];
                if (c >= 'A' && c <= 'Z')
                    c += 32;
                if (c != n[k])
                    break;
            }
            if (k == nlen)
                return 1;
        }
        i = j + 1;
    }
    return 0;
}

/* b", ".join(parts), parts a list of bytes */
static PyObject *join_comma(PyObject *parts)
{
    Py_ssize_t n = PyList_GET_SIZE(parts), total = n > 0 ? 2 * (n - 1) : 0;
    for (Py_ssize_t k = 0; k < n; k++)
        total += PyBytes_GET_SIZE(PyList_GET_ITEM(parts, k));
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    char *q = PyBytes_AS_STRING(out);
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *part = PyList_GET_ITEM(parts, k);
        if (k) {
            *q++ = ',';
            *q++ = ' ';
        }
        memcpy(q, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part));
        q += PyBytes_GET_SIZE(part);
    }
    return out;
}

static PyObject *to_client(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    PyObject *headers = NULL, *websocket_obj = Py_False;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs < 1 || nargs + nkw > 2 || (nkw == 1 && !PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0)))
        || (nkw == 1 && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "websocket") != 0)) {
        PyErr_SetString(PyExc_TypeError, "to_client(headers, websocket=False)");
        return NULL;
    }
    headers = args[0];
    if (nargs + nkw == 2)
        websocket_obj = args[1];
    int websocket = PyObject_IsTrue(websocket_obj);
    if (websocket < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(headers, "to_client: headers must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = NULL, *vias = NULL, *joined = NULL, *pair = NULL;
    Py_ssize_t connections = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *item = items[k];
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
            || !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "to_client: headers must be (bytes, bytes) tuples");
            goto fail;
        }
        if (IS(PyTuple_GET_ITEM(item, 0), "connection"))
            connections++;
    }
    out = PyList_New(0);
    vias = PyList_New(0);
    if (out == NULL || vias == NULL)
        goto fail;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *item = items[k], *name = PyTuple_GET_ITEM(item, 0);
        if (IS(name, "via")) {
            if (PyList_Append(vias, PyTuple_GET_ITEM(item, 1)) < 0)
                goto fail;
            continue;
        }
        if (IS(name, "connection") || hop_by_hop(name))
            continue;
        int drop = 0;
        for (Py_ssize_t c = 0; connections && c < count && !drop; c++) {
            PyObject *other = items[c];
            if (IS(PyTuple_GET_ITEM(other, 0), "connection"))
                drop = listed_in(name, PyTuple_GET_ITEM(other, 1));
        }
        if (!drop && PyList_Append(out, item) < 0)
            goto fail;
    }
    if (PyList_Append(vias, VIA) < 0)
        goto fail;
    joined = join_comma(vias);
    if (joined == NULL)
        goto fail;
    pair = PyTuple_Pack(2, VIA_NAME, joined);
    if (pair == NULL || PyList_Append(out, pair) < 0)
        goto fail;
    if (websocket) {
        for (Py_ssize_t w = 0; w < PyTuple_GET_SIZE(WEBSOCKET); w++)
            if (PyList_Append(out, PyTuple_GET_ITEM(WEBSOCKET, w)) < 0)
                goto fail;
    }
    Py_DECREF(vias);
    Py_DECREF(joined);
    Py_DECREF(pair);
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_XDECREF(vias);
    Py_XDECREF(joined);
    Py_XDECREF(pair);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"to_client", (PyCFunction)(void (*)(void))to_client, METH_FASTCALL | METH_KEYWORDS,
     "The response headers as the client should see them (proxy.headers.to_client)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy._headers",
    "Compiled twin of proxy.headers.to_client.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__headers(void)
{
    VIA = PyBytes_FromString("1.1 originpool");
    VIA_NAME = PyBytes_FromString("via");
    WEBSOCKET = Py_BuildValue("((y,y),(y,y))", "connection", "upgrade", "upgrade", "websocket");
    if (VIA == NULL || VIA_NAME == NULL || WEBSOCKET == NULL)
        return NULL;
    return PyModule_Create(&module);
}
