cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy

ctypedef const unsigned char *cuchar_p
ctypedef const char *cchar_p
ctypedef char *char_p

cdef bytes _pool
cdef Py_ssize_t _pos
cdef Py_ssize_t _LAST
cdef bint _compiled
cdef bytes _TEMPLATE
cdef bytes _LINE_TEMPLATE
cdef bytes _PAIRS

@cython.locals(pos=Py_ssize_t)
cdef Py_ssize_t _take() except -1

cpdef bytes new_request_id()
cpdef bytes new_request_id_line()

@cython.locals(out=bytes, dst=char_p, src=cuchar_p, pairs=cchar_p, offsets=cchar_p, variants=cchar_p, i=int)
cdef bytes _format_c(bytes template, Py_ssize_t at, bytes pool, Py_ssize_t pos)
