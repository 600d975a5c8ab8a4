cimport cython
cdef class ClusterState

cdef class ForwardPlan:
    cdef public object cluster
    cdef public object path
    cdef public object authority
    cdef public object request_ops
    cdef public object response_ops
    cdef public object timeout
    cdef public object per_try_timeout
    cdef public object retry
    cdef public object delay
    cdef public object abort
    cdef public object mirror
    cdef public object route_name
    cdef public object mirror_authority
    cdef public object retry_floor
    cdef public object abort_grpc
    cdef public object response_hook
    cdef public ClusterState state

cdef class _Attrs:
    cdef public object exchange
    cdef public object authority
    cdef public object path
    cdef public object port
    cdef public object source

cdef class _RouteEntry:
    cdef public object snapshot
    cdef public object source
    cdef public object src_ns
    cdef public object authority
    cdef public object port
    cdef public object table
    cdef public object fixed
    cdef public object plan
    cdef public object plans
    cdef public object attrs

cdef class UpstreamEndpoint:
    cdef public object id
    cdef public object addr
    cdef public object host
    cdef public object labels
    cdef public object cluster_endpoint

cdef class ClusterState:
    cdef public object key
    cdef public object source_namespace
    cdef public object version
    cdef public object policy
    cdef public object endpoints
    cdef public object by_id
    cdef public object picker
    cdef public object outlier
    cdef public object pool
    cdef public object service
    cdef public object rand
    cdef public object no_endpoint_labels
    cdef public object ejected
    cdef public object connector
    cdef public object succeeded
    cdef public object only
    cdef public object cookie_hook
    cdef public object retries
    cdef public object max_retries

    cpdef pick(self, exchange, tried)
    cpdef done(self, endpoint)
    cpdef record(self, endpoint, status, now)

cdef class ProxyRuntime:
    cdef public object snapshots
    cdef public object telemetry
    cdef public object limits
    cdef public object access_log
    cdef public object rand
    cdef public object loop
    cdef public object downstreams
    cdef public object clusters
    cdef public object _sources
    cdef public object _scopes
    cdef public object _fast_clusters
    cdef public object _paths
    cdef public object _sweeper
    cdef public object cluster_class
    cdef public object h2_pools

    @cython.locals(entry=_RouteEntry, plan=ForwardPlan)
    cpdef plan(self, exchange)
    @cython.locals(state=ClusterState)
    cpdef record_fields(self, exchange, down, ctx, dest, status, flags, double t0, req_bytes, resp_bytes,
                        endpoint, cluster)

cdef class MirrorExchange:
    cdef public object runtime
    cdef public object state
    cdef public object data
    cdef public object abandoned
    cdef public object endpoint
    cdef public object upstream
