cimport cython
from nodeagent.proxy.http cimport Exchange
from nodeagent.proxy.runtime cimport ClusterState

cdef class AppCluster(ClusterState):
    cdef public object endpoint

    cpdef pick(self, exchange, tried)
    cpdef done(self, endpoint)
    cpdef record(self, endpoint, status, now)

cdef class _Policies:
    cdef public object version
    cdef public object snapshot
    cdef public object authz
    cdef public object peer
    cdef public object header_reads

cdef class InboundConnection:
    cdef public object admission
    cdef public object transport
    cdef public object inner

cdef class _HttpDecision:
    cdef public object version
    cdef public object refusal
    cdef public object policies
    cdef public object l7
    cdef public object verdict
    cdef public object conn
    cdef public AppCluster cluster
    cdef public object plan
    cdef public object memo

cdef class InboundPlane:
    cdef public object runtime
    cdef public object snapshots
    cdef public object h2_pools
    cdef public object record_exchange
    cdef public object _access_log
    cdef public object local
    cdef public object trust_domain
    cdef public object aliases
    cdef public object connections
    cdef public object clusters
    cdef public object _policies
    cdef public object _contexts
    cdef public object _watch
    cdef public object _checked_version
    cdef public dict _paths
    cdef public object _verdicts_version
    cdef public object _verdict_tokens
    cdef public dict _verdicts

    @cython.locals(x=Exchange, d=_HttpDecision, cluster=AppCluster)
    cpdef plan(self, exchange)
