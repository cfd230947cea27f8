/* proxy._headers: the compiled twins of proxy.headers.to_client and to_origin (those
 * functions are the spec).
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

#include "_http_tokens.h"

static PyObject *VIA;       /* proxy.headers.VIA; the Python module checks they agree */
static PyObject *VIA_NAME;  /* b"via" */
static PyObject *HOST_NAME, *XFF_NAME, *XFP_NAME, *XFH_NAME, *XRID_NAME;
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

/* name equals one of the value's comma-separated tokens, stripped and lowercased
 * (proxy.headers._tokens) */
static int listed_in(PyObject *name, PyObject *value)
{
    return comma_list_has((const unsigned char *)PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value),
                          (const unsigned char *)PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
}

/* a Connection header among items names this header: it is hop-by-hop for this message */
static int named_by_connection(PyObject *name, PyObject **items, Py_ssize_t count)
{
    for (Py_ssize_t c = 0; c < count; c++) {
        PyObject *other = items[c];
        if (IS(PyTuple_GET_ITEM(other, 0), "connection") && listed_in(name, PyTuple_GET_ITEM(other, 1)))
            return 1;
    }
    return 0;
}

/* (bytes, bytes) tuples only, as the codecs give them: the number of Connection headers, or
 * -1 with TypeError set */
static Py_ssize_t check_pairs(PyObject **items, Py_ssize_t count, const char *error)
{
    Py_ssize_t connections = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *item = items[k];
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
            || !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, error);
            return -1;
        }
        if (IS(PyTuple_GET_ITEM(item, 0), "connection"))
            connections++;
    }
    return connections;
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

static int append_pair(PyObject *out, PyObject *name, PyObject *value)
{
    PyObject *pair = PyTuple_Pack(2, name, value);
    if (pair == NULL)
        return -1;
    int rc = PyList_Append(out, pair);
    Py_DECREF(pair);
    return rc;
}

static int append_joined(PyObject *out, PyObject *name, PyObject *parts)
{
    PyObject *joined = join_comma(parts);
    if (joined == NULL)
        return -1;
    int rc = append_pair(out, name, joined);
    Py_DECREF(joined);
    return rc;
}

/* proxy.headers._WEBSOCKET's pairs appended: the upgrade stays asked for on this hop */
static int extend_websocket(PyObject *out)
{
    for (Py_ssize_t w = 0; w < PyTuple_GET_SIZE(WEBSOCKET); w++)
        if (PyList_Append(out, PyTuple_GET_ITEM(WEBSOCKET, w)) < 0)
            return -1;
    return 0;
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
    PyObject *out = NULL, *vias = NULL;
    Py_ssize_t connections = check_pairs(items, count, "to_client: headers must be (bytes, bytes) tuples");
    if (connections < 0)
        goto fail;
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
        if (!(connections && named_by_connection(name, items, count))
            && PyList_Append(out, item) < 0)
            goto fail;
    }
    if (PyList_Append(vias, VIA) < 0 || append_joined(out, VIA_NAME, vias) < 0
        || (websocket && extend_websocket(out) < 0))
        goto fail;
    Py_DECREF(vias);
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_XDECREF(vias);
    Py_DECREF(seq);
    return NULL;
}

/* proxy.headers._REQUEST_SPECIAL minus what to_origin keeps a value of: dropped outright */
static int request_dropped(PyObject *name)
{
    return IS(name, "keep-alive") || IS(name, "proxy-connection") || IS(name, "proxy-authenticate")
           || IS(name, "proxy-authorization") || IS(name, "te") || IS(name, "trailer")
           || IS(name, "transfer-encoding") || IS(name, "upgrade") || IS(name, "expect")
           || IS(name, "host") || IS(name, "x-request-id");
}

static const char *const TO_ORIGIN_KW[] = {"client_ip", "scheme", "trusted_peer", "host",
                                           "request_id", "websocket"};

static PyObject *to_origin(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    PyObject *kw[6] = {NULL, NULL, NULL, NULL, NULL, Py_False};
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "to_origin(headers, *, client_ip, scheme, "
                                         "trusted_peer, host, request_id, websocket=False)");
        return NULL;
    }
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int found = 0;
        for (int j = 0; j < 6; j++) {
            if (PyUnicode_CompareWithASCIIString(key, TO_ORIGIN_KW[j]) == 0) {
                kw[j] = args[nargs + k];
                found = 1;
                break;
            }
        }
        if (!found) {
            PyErr_Format(PyExc_TypeError, "to_origin() got an unexpected keyword argument %R", key);
            return NULL;
        }
    }
    for (int j = 0; j < 5; j++) {
        if (kw[j] == NULL) {
            PyErr_Format(PyExc_TypeError, "to_origin() missing keyword argument '%s'",
                         TO_ORIGIN_KW[j]);
            return NULL;
        }
    }
    PyObject *client_ip = kw[0], *scheme = kw[1], *host = kw[3], *request_id = kw[4];
    if (!PyBytes_Check(client_ip) || !PyBytes_Check(scheme) || !PyBytes_Check(host)
        || !PyBytes_Check(request_id)) {
        PyErr_SetString(PyExc_TypeError, "to_origin: client_ip, scheme, host and request_id "
                                         "must be bytes");
        return NULL;
    }
    int trusted = PyObject_IsTrue(kw[2]), websocket = PyObject_IsTrue(kw[5]);
    if (trusted < 0 || websocket < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "to_origin: headers must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = NULL, *vias = NULL, *forwarded = NULL;
    PyObject *proto = NULL, *fwd_host = NULL; /* borrowed: the first non-empty value */
    Py_ssize_t connections = check_pairs(items, count, "to_origin: headers must be (bytes, bytes) tuples");
    if (connections < 0)
        goto fail;
    out = PyList_New(0);
    vias = PyList_New(0);
    forwarded = PyList_New(0);
    if (out == NULL || vias == NULL || forwarded == NULL)
        goto fail;
    /* Host first: inserted before anything else, as the Python function does after its
     * Connection filter (a Connection header naming "host" drops nothing) */
    if (append_pair(out, HOST_NAME, host) < 0)
        goto fail;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *item = items[k], *name = PyTuple_GET_ITEM(item, 0), *value = PyTuple_GET_ITEM(item, 1);
        if (IS(name, "via")) {
            if (PyList_Append(vias, value) < 0)
                goto fail;
            continue;
        }
        if (IS(name, "x-forwarded-for")) {
            if (PyList_Append(forwarded, value) < 0)
                goto fail;
            continue;
        }
        if (IS(name, "x-forwarded-proto")) {
            if (proto == NULL && PyBytes_GET_SIZE(value))
                proto = value;
            continue;
        }
        if (IS(name, "x-forwarded-host")) {
            if (fwd_host == NULL && PyBytes_GET_SIZE(value))
                fwd_host = value;
            continue;
        }
        if (IS(name, "connection") || request_dropped(name))
            continue;
        if (!(connections && named_by_connection(name, items, count))
            && PyList_Append(out, item) < 0)
            goto fail;
    }
    if (!trusted) {
        if (PyList_SetSlice(forwarded, 0, PyList_GET_SIZE(forwarded), NULL) < 0)
            goto fail;
        proto = fwd_host = NULL;
    }
    if (PyList_Append(forwarded, client_ip) < 0 || append_joined(out, XFF_NAME, forwarded) < 0
        || append_pair(out, XFP_NAME, proto ? proto : scheme) < 0
        || append_pair(out, XFH_NAME, fwd_host ? fwd_host : host) < 0
        || PyList_Append(vias, VIA) < 0 || append_joined(out, VIA_NAME, vias) < 0
        || append_pair(out, XRID_NAME, request_id) < 0)
        goto fail;
    if (websocket && extend_websocket(out) < 0)
        goto fail;
    Py_DECREF(vias);
    Py_DECREF(forwarded);
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_XDECREF(vias);
    Py_XDECREF(forwarded);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"to_client", (PyCFunction)(void (*)(void))to_client, METH_FASTCALL | METH_KEYWORDS,
     "The response headers as the client should see them (proxy.headers.to_client)."},
    {"to_origin", (PyCFunction)(void (*)(void))to_origin, METH_FASTCALL | METH_KEYWORDS,
     "The request headers as the origin should see them (proxy.headers.to_origin)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy._headers",
    "Compiled twins of proxy.headers.to_client and to_origin.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__headers(void)
{
    VIA = PyBytes_FromString("1.1 originpool");
    VIA_NAME = PyBytes_FromString("via");
    HOST_NAME = PyBytes_FromString("host");
    XFF_NAME = PyBytes_FromString("x-forwarded-for");
    XFP_NAME = PyBytes_FromString("x-forwarded-proto");
    XFH_NAME = PyBytes_FromString("x-forwarded-host");
    XRID_NAME = PyBytes_FromString("x-request-id");
    if (HOST_NAME == NULL || XFF_NAME == NULL || XFP_NAME == NULL || XFH_NAME == NULL
        || XRID_NAME == NULL)
        return NULL;
    WEBSOCKET = Py_BuildValue("((y,y),(y,y))", "connection", "upgrade", "upgrade", "websocket");
    if (VIA == NULL || VIA_NAME == NULL || WEBSOCKET == NULL)
        return NULL;
    return PyModule_Create(&module);
}
