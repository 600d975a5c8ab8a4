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
    cdef public object _warned
