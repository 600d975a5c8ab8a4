cdef extern from "sys/socket.h" nogil:
    ssize_t c_send "send"(int fd, const char *buf, size_t n, int flags)
    int MSG_NOSIGNAL

cpdef wire_write(transport, long fd, data)
cdef Py_ssize_t _send(long fd, bytes data)

cdef class ClusterPool

cdef class UpstreamConnection:
    cdef public ClusterPool pool
    cdef public object endpoint
    cdef public object transport
    cdef public object parser
    cdef public object exchange
    cdef public long requests
    cdef public double idle_since
    cdef public bint closed
    cdef public bint raw
    cdef public bint head_only
    cdef public long status
    cdef public object headers
    cdef public bint keep_alive
    cdef public object length
    cdef public object hop
    cdef public long fd

cdef class ClusterPool:
    cdef public object key
    cdef public object limits
    cdef public object connector
    cdef public dict idle
    cdef public object open
    cdef public object pending
    cdef public object loop
    cdef public object _counted
    cdef public object retired
    cdef public object tcp_open

    cpdef acquire(self, exchange, endpoint)
    cpdef release(self, UpstreamConnection conn, reusable)
