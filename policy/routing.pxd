cdef class HeaderOps:
    cdef public object ops

cdef class _Level:
    cdef public object removes
    cdef public object adds
    cdef public object authority

cdef class _Route:
    cdef public object name
    cdef public object matches
    cdef public object destinations
    cdef public object cum
    cdef public object total
    cdef public object timeout
    cdef public object retry
    cdef public object rewrite_uri
    cdef public object regex_rewrite
    cdef public object rewrite_authority
    cdef public object delay
    cdef public object delay_pct
    cdef public object abort
    cdef public object abort_grpc
    cdef public object abort_pct
    cdef public object mirrors
    cdef public object reject
    cdef public object redirect
    cdef public object service
    cdef public object service_port
    cdef public object virtual_service
    cdef public object cors

cdef class RoutePlan:
    cdef public object _route
    cdef public object _dest
    cdef public object path
    cdef public object authority
    cdef public object fault_delay
    cdef public object fault_abort
    cdef public object fault_grpc_status
    cdef public object mirrors

cdef class _Match:
    cdef public object checks
    cdef public object test
    cdef public object uri_kind
    cdef public object uri_value
    cdef public object name
    cdef public object uri_only
