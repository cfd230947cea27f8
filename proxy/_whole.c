/* proxy._whole: the compiled twin of proxy/whole.py (read that file first: it is the spec).
 *
 * Why C: these three functions are the per-request parsing and serialising no layer above
 * can drop. In Python each is a few regex calls plus a loop that builds tuples, 3 to 5 us
 * apiece; here each is one pass over the bytes. Every function returns exactly what its
 * Python twin returns, or None where the twin returns None, and None as well for argument
 * types the twin was never meant to see (the codec's general path then decides).
 * tests/test_whole.py holds the two to the same results.
 */
#define _GNU_SOURCE /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <string.h>

#include "_http_tokens.h"

/* byte classes, filled in module init */
static unsigned char TOKEN[256];  /* RFC 9110 tchar */
static unsigned char LINE[256];   /* a whole line's value: HTAB, SP-~, obs-text */
static unsigned char REASON[256]; /* any byte but NUL, LF, CR, VT, FF */
static unsigned char EDGE[256];   /* a field value's first/last byte: REASON minus SP, HTAB */

static void fill_classes(void)
{
    const char *tchar = "-!#$%&'*+.^_`|~";
    for (int c = 0; c < 256; c++) {
        TOKEN[c] = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
                   || (c != 0 && strchr(tchar, c) != NULL);
        LINE[c] = c == '\t' || (c >= 0x20 && c <= 0x7e) || c >= 0x80;
        REASON[c] = !(c == 0 || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c);
        EDGE[c] = REASON[c] && c != ' ' && c != '\t';
    }
}

/* name (length len, token chars) equals the lowercase literal lit */
static int name_is(const unsigned char *name, Py_ssize_t len, const char *lit, Py_ssize_t litlen)
{
    if (len != litlen)
        return 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned char c = name[i];
        if (c >= 'A' && c <= 'Z')
            c += 32;
        if (c != (unsigned char)lit[i])
            return 0;
    }
    return 1;
}

#define NAME_IS(p, n, lit) name_is((p), (n), lit, (Py_ssize_t)sizeof(lit) - 1)

/* proxy.http1.comma_items(value) holds b"close" */
static int has_close(const unsigned char *v, Py_ssize_t n)
{
    return comma_list_has(v, n, (const unsigned char *)"close", 5);
}

static PyObject *lower_bytes(const unsigned char *p, Py_ssize_t n)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL)
        return NULL;
    unsigned char *q = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        q[i] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
    }
    return out;
}

/* One header line of the narrowest grammar at p[*at], bounded by end: name, value (leading
 * and trailing SP/HTAB dropped). 1 on a line, 0 where the block ends (CRLF exactly at end),
 * -1 on anything else. */
static int next_line(const unsigned char *p, Py_ssize_t *at, Py_ssize_t end, Py_ssize_t *ns,
                     Py_ssize_t *ne, Py_ssize_t *vs, Py_ssize_t *ve)
{
    Py_ssize_t i = *at;
    if (i < end && p[i] == '\r')
        return (i + 2 == end && p[i + 1] == '\n') ? 0 : -1;
    *ns = i;
    while (i < end && TOKEN[p[i]])
        i++;
    if (i == *ns || i >= end || p[i] != ':')
        return -1;
    *ne = i++;
    while (i < end && (p[i] == ' ' || p[i] == '\t'))
        i++;
    *vs = i;
    while (i < end && LINE[p[i]])
        i++;
    if (i + 1 >= end || p[i] != '\r' || p[i + 1] != '\n')
        return -1;
    Py_ssize_t v = i;
    while (v > *vs && (p[v - 1] == ' ' || p[v - 1] == '\t'))
        v--;
    *ve = v;
    *at = i + 2;
    return 1;
}

static int append_field(PyObject *list, const unsigned char *p, Py_ssize_t ns, Py_ssize_t ne,
                        Py_ssize_t vs, Py_ssize_t ve)
{
    PyObject *name = lower_bytes(p + ns, ne - ns);
    if (name == NULL)
        return -1;
    PyObject *value = PyBytes_FromStringAndSize((const char *)p + vs, ve - vs);
    if (value == NULL) {
        Py_DECREF(name);
        return -1;
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_DECREF(name);
        Py_DECREF(value);
        return -1;
    }
    PyTuple_SET_ITEM(pair, 0, name);
    PyTuple_SET_ITEM(pair, 1, value);
    int rc = PyList_Append(list, pair);
    Py_DECREF(pair);
    return rc;
}

/* -- parse_request(data, max_line) ------------------------------------------------------- */

static PyObject *parse_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse_request(data, max_line)");
        return NULL;
    }
    if (!PyBytes_Check(args[0]))
        Py_RETURN_NONE;
    Py_ssize_t max_line = PyLong_AsSsize_t(args[1]);
    if (max_line == -1 && PyErr_Occurred())
        return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);

    Py_ssize_t i = 0;
    while (i < n && TOKEN[p[i]])
        i++;
    if (i == 0 || i >= n || p[i] != ' ')
        Py_RETURN_NONE;
    Py_ssize_t mlen = i++;
    Py_ssize_t ts = i;
    if (i >= n || p[i] != '/')
        Py_RETURN_NONE;
    i++;
    while (i < n && p[i] >= 0x21 && p[i] <= 0x7e)
        i++;
    Py_ssize_t tlen = i - ts;
    if (n - i < 11 || memcmp(p + i, " HTTP/1.", 8) != 0 || (p[i + 8] != '0' && p[i + 8] != '1')
        || p[i + 9] != '\r' || p[i + 10] != '\n')
        Py_RETURN_NONE;
    int http11 = p[i + 8] == '1';
    i += 11;
    if ((mlen == 7 && memcmp(p, "CONNECT", 7) == 0) || mlen + tlen + 11 > max_line)
        Py_RETURN_NONE;

    PyObject *headers = PyList_New(0);
    if (headers == NULL)
        return NULL;
    int hosts = 0, must_close = !http11, rc;
    Py_ssize_t ns, ne, vs, ve;
    while ((rc = next_line(p, &i, n, &ns, &ne, &vs, &ve)) == 1) {
        const unsigned char *name = p + ns;
        Py_ssize_t len = ne - ns;
        if (NAME_IS(name, len, "content-length") || NAME_IS(name, len, "transfer-encoding")
            || NAME_IS(name, len, "upgrade") || NAME_IS(name, len, "expect"))
            goto none;
        if (NAME_IS(name, len, "host"))
            hosts++;
        else if (NAME_IS(name, len, "connection"))
            must_close = must_close || has_close(p + vs, ve - vs);
        if (append_field(headers, p, ns, ne, vs, ve) < 0) {
            Py_DECREF(headers);
            return NULL;
        }
    }
    if (rc < 0 || hosts != 1)
        goto none;
    return Py_BuildValue("(y#y#ONO)", p, mlen, p + ts, tlen, http11 ? Py_True : Py_False,
                         headers, must_close ? Py_True : Py_False);
none:
    Py_DECREF(headers);
    Py_RETURN_NONE;
}

/* -- parse_response(data, head_request) --------------------------------------------------- */

static Py_ssize_t find_crlfcrlf(const unsigned char *p, Py_ssize_t n)
{
    const unsigned char *hit = memmem(p, (size_t)n, "\r\n\r\n", 4);
    return hit == NULL ? -1 : hit - p;
}

#define DIGIT(c) ((c) >= '0' && (c) <= '9')

static PyObject *parse_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "parse_response(data, head_request)");
        return NULL;
    }
    if (!PyBytes_Check(args[0]))
        Py_RETURN_NONE;
    int head_request = PyObject_IsTrue(args[1]);
    if (head_request < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);

    Py_ssize_t end = find_crlfcrlf(p, n);
    if (end < 0)
        Py_RETURN_NONE;
    /* HTTP/d.d SP ddd [SP reason] CRLF */
    if (n < 14 || memcmp(p, "HTTP/", 5) != 0 || !DIGIT(p[5]) || p[6] != '.' || !DIGIT(p[7])
        || p[8] != ' ' || !DIGIT(p[9]) || !DIGIT(p[10]) || !DIGIT(p[11]))
        Py_RETURN_NONE;
    Py_ssize_t i = 12, rs = 12, re = 12;
    if (p[i] == ' ') {
        rs = ++i;
        while (i < n && REASON[p[i]])
            i++;
        re = i;
    }
    if (i + 1 >= n || p[i] != '\r' || p[i + 1] != '\n')
        Py_RETURN_NONE;
    i += 2;
    int status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    Py_ssize_t limit = end + 4;
    /* the block must be whole lines up to the first CRLFCRLF: checked before any object */
    Py_ssize_t at = i, ns, ne, vs, ve;
    int rc;
    while ((rc = next_line(p, &at, limit, &ns, &ne, &vs, &ve)) == 1)
        ;
    if (rc < 0 || status < 200)
        Py_RETURN_NONE;

    PyObject *headers = PyList_New(0);
    if (headers == NULL)
        return NULL;
    int close = 0, big = 0;
    long long length = -1;
    at = i;
    while (next_line(p, &at, limit, &ns, &ne, &vs, &ve) == 1) {
        const unsigned char *name = p + ns;
        Py_ssize_t len = ne - ns;
        if (NAME_IS(name, len, "connection")) {
            close = close || has_close(p + vs, ve - vs);
        }
        else if (NAME_IS(name, len, "content-length")) {
            Py_ssize_t digits = ve - vs;
            if (length >= 0 || big || digits < 1 || digits > 20)
                goto none;
            unsigned long long v = 0;
            for (Py_ssize_t k = vs; k < ve; k++) {
                if (!DIGIT(p[k]))
                    goto none;
                if (!big && v > (unsigned long long)(LLONG_MAX - 9) / 10)
                    big = 1; /* past any body this buffer holds; the value no longer matters */
                v = v * 10 + (unsigned long long)(p[k] - '0');
            }
            if (!big)
                length = (long long)v;
        }
        else if (NAME_IS(name, len, "transfer-encoding")) {
            goto none;
        }
        if (append_field(headers, p, ns, ne, vs, ve) < 0) {
            Py_DECREF(headers);
            return NULL;
        }
    }
    Py_ssize_t body_at = end + 4;
    if (status == 204 || status == 304 || head_request) {
        if (n != body_at)
            goto none;
    }
    else if (big || length < 0 || (long long)(n - body_at) != length) {
        goto none;
    }
    int old = memcmp(p + 5, "1.1", 3) < 0;
    return Py_BuildValue("(y#iy#NOn)", p + 5, (Py_ssize_t)3, status, p + rs, re - rs, headers,
                         (close || old) ? Py_True : Py_False, body_at);
none:
    Py_DECREF(headers);
    Py_RETURN_NONE;
}

/* -- request_head(method, target, headers) ------------------------------------------------ */

/* "name: value\r\n" of a (bytes, bytes) tuple at q, where the caller counted room for it */
static char *write_field(char *q, PyObject *pair)
{
    PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
    Py_ssize_t nlen = PyBytes_GET_SIZE(name), vlen = PyBytes_GET_SIZE(value);
    memcpy(q, PyBytes_AS_STRING(name), nlen);
    q += nlen;
    *q++ = ':';
    *q++ = ' ';
    memcpy(q, PyBytes_AS_STRING(value), vlen);
    q += vlen;
    *q++ = '\r';
    *q++ = '\n';
    return q;
}

static int is_token(const unsigned char *p, Py_ssize_t n)
{
    if (n == 0)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!TOKEN[p[i]])
            return 0;
    return 1;
}

static int is_value(const unsigned char *p, Py_ssize_t n)
{
    if (n == 0)
        return 1;
    if (!EDGE[p[0]] || !EDGE[p[n - 1]])
        return 0;
    for (Py_ssize_t i = 1; i < n - 1; i++)
        if (!REASON[p[i]])
            return 0;
    return 1;
}

static PyObject *request_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "request_head(method, target, headers)");
        return NULL;
    }
    PyObject *method = args[0], *target = args[1], *headers = args[2];
    if (!PyBytes_Check(method) || !PyBytes_Check(target)
        || !(PyList_Check(headers) || PyTuple_Check(headers)))
        Py_RETURN_NONE;
    PyObject *seq = PySequence_Fast(headers, "headers");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t host = -1, total;
    const unsigned char *m = (const unsigned char *)PyBytes_AS_STRING(method);
    const unsigned char *t = (const unsigned char *)PyBytes_AS_STRING(target);
    Py_ssize_t mlen = PyBytes_GET_SIZE(method), tlen = PyBytes_GET_SIZE(target);
    if (!is_token(m, mlen) || tlen == 0)
        goto none;
    for (Py_ssize_t k = 0; k < tlen; k++)
        if (t[k] < 0x21 || t[k] > 0x7e)
            goto none;
    total = mlen + 1 + tlen + 11 + 2;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *pair = items[k];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
            || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1)))
            goto none;
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        const unsigned char *np = (const unsigned char *)PyBytes_AS_STRING(name);
        Py_ssize_t nlen = PyBytes_GET_SIZE(name), vlen = PyBytes_GET_SIZE(value);
        if (!is_token(np, nlen)
            || !is_value((const unsigned char *)PyBytes_AS_STRING(value), vlen))
            goto none;
        if (NAME_IS(np, nlen, "content-length") || NAME_IS(np, nlen, "transfer-encoding")
            || NAME_IS(np, nlen, "connection") || NAME_IS(np, nlen, "upgrade"))
            goto none;
        if (NAME_IS(np, nlen, "host")) {
            if (host >= 0)
                goto none;
            host = k;
        }
        total += nlen + 2 + vlen + 2;
    }
    if (host < 0)
        goto none;

    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    char *q = PyBytes_AS_STRING(out);
    memcpy(q, m, mlen);
    q += mlen;
    *q++ = ' ';
    memcpy(q, t, tlen);
    q += tlen;
    memcpy(q, " HTTP/1.1\r\n", 11);
    q += 11;
    for (Py_ssize_t r = -1; r < count; r++) { /* Host first, as h11 writes it */
        Py_ssize_t k = r < 0 ? host : r;
        if (r == host)
            continue;
        q = write_field(q, items[k]);
    }
    *q++ = '\r';
    *q++ = '\n';
    Py_DECREF(seq);
    return out;
none:
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* -- response_head(status, reason, headers) ------------------------------------------------ */

static PyObject *response_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "response_head(status, reason, headers)");
        return NULL;
    }
    long status = PyLong_AsLong(args[0]);
    if (status == -1 && PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "response_head: reason must be bytes");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[2], "response_head: headers must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    char line[48];
    int llen = snprintf(line, sizeof line, "HTTP/1.1 %ld ", status);
    Py_ssize_t rlen = PyBytes_GET_SIZE(args[1]);
    Py_ssize_t total = llen + rlen + 2 + 2;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *pair = items[k];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
            || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "response_head: headers must be (bytes, bytes) tuples");
            return NULL;
        }
        total += PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 0)) + PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 1)) + 4;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    char *q = PyBytes_AS_STRING(out);
    memcpy(q, line, llen);
    q += llen;
    memcpy(q, PyBytes_AS_STRING(args[1]), rlen);
    q += rlen;
    *q++ = '\r';
    *q++ = '\n';
    for (Py_ssize_t k = 0; k < count; k++) {
        q = write_field(q, items[k]);
    }
    *q++ = '\r';
    *q++ = '\n';
    Py_DECREF(seq);
    return out;
}

static PyMethodDef methods[] = {
    {"parse_request", (PyCFunction)(void (*)(void))parse_request, METH_FASTCALL,
     "The common request head, or None (proxy.whole.parse_request)."},
    {"parse_response", (PyCFunction)(void (*)(void))parse_response, METH_FASTCALL,
     "The common response, or None (proxy.whole.parse_response)."},
    {"request_head", (PyCFunction)(void (*)(void))request_head, METH_FASTCALL,
     "A bodiless request head as h11 writes it, or None (proxy.whole.request_head)."},
    {"response_head", (PyCFunction)(void (*)(void))response_head, METH_FASTCALL,
     "Status line and header block (proxy.whole.response_head)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy._whole",
    "Compiled twin of proxy.whole: the fast codecs' whole-message shortcuts.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__whole(void)
{
    fill_classes();
    return PyModule_Create(&module);
}
