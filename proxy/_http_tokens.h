/* Shared by proxy/_whole.c and proxy/_headers.c: reading a comma-separated header list as
 * proxy.http1.comma_items and proxy.headers._tokens do (items split at ",", stripped of
 * bytes.strip()'s whitespace, compared lowercased; empty items never match). */
#ifndef ORIGINPOOL_HTTP_TOKENS_H
#define ORIGINPOOL_HTTP_TOKENS_H

#include <Python.h>

static inline int token_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

/* the list v[0:n] holds the item want[0:wlen] (want: lowercase, not empty) */
static inline int comma_list_has(const unsigned char *v, Py_ssize_t n, const unsigned char *want,
                                 Py_ssize_t wlen)
{
    if (wlen == 0)
        return 0;
    Py_ssize_t i = 0;
    while (i <= n) {
        Py_ssize_t j = i;
        while (j < n && v[j] != ',')
            j++;
        Py_ssize_t a = i, b = j;
        while (a < b && token_space(v[a]))
            a++;
        while (b > a && token_space(v[b - 1]))
            b--;
        if (b - a == wlen) {
            Py_ssize_t k = 0;
            for (; k < wlen; k++) {
                unsigned char c = v[a + k];
                if (c >= 'A' && c <= 'Z')
                    c += 32;
                if (c != want[k])
                    break;
            }
            if (k == wlen)
                return 1;
        }
        i = j + 1;
    }
    return 0;
}

#endif
