from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_FromStringAndSize

from nodeagent.proxy.upstream cimport wire_write

cdef bytes _copy_out(bytearray buf, Py_ssize_t n)

cdef class _TlsCore:
    cdef public object ctx
    cdef public object app
    cdef public object feed
    cdef public object tcp
    cdef public object incoming
    cdef public object outgoing
    cdef public object sslobj
    cdef public object raw
    cdef public bint handshaking
    cdef public object timer
    cdef public object handshake_timeout
    cdef public object on_handshake
    cdef public bint closing
    cdef public bint paused
    cdef public bint lost
    cdef public object drain_handle
    cdef public bint started
    cdef public bint ready
    cdef public object cipher
    cdef public bytearray plain
    cdef public object bio_in
    cdef public object ssl_read
    cdef public object ssl_write
    cdef public object bio_out
    cdef public object tcp_write
    cdef public long fd

    cpdef write(self, data)
    cpdef _deliver(self)
    cpdef _flush(self)

cdef class TunnelConnector:
    cdef public object tls
    cdef public object source
    cdef public object directory
    cdef public object plain
    cdef public object mark
    cdef public object netns
    cdef public object source_address
    cdef public object tunnel_port
    cdef public object tls_mode
    cdef public object handshake_timeout

