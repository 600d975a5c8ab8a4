cdef class Telemetry:
    cdef public object http
    cdef public object tcp
    cdef public object _src_cache
    cdef public object security_policy
    cdef public object _series
