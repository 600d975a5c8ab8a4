from nodeagent.proxy.runtime cimport ForwardPlan, ClusterState, UpstreamEndpoint, ProxyRuntime
cimport cython
from nodeagent.proxy.upstream cimport wire_write, UpstreamConnection, ClusterPool
from nodeagent.proxy.requestid cimport new_request_id_line

cdef dict _STATUS_LINES
cdef dict _REASONS

cdef class Exchange
cdef class HttpDownstream

@cython.locals(x=Exchange)
cpdef retire_endpoint(exchange, cluster)
@cython.locals(ep=UpstreamEndpoint, x=Exchange)
cpdef pick_endpoint(exchange, cluster, tried, ClusterState state=*)

cdef class RequestHeaders:
    cdef public object _pairs
    cdef public object _map

cdef class LocalReply:
    cdef public object status
    cdef public object flags
    cdef public object body
    cdef public object headers

cdef class HttpDownstream:
    cdef public object runtime
    cdef public object ctx
    cdef public object peer
    cdef public object transport
    cdef public object parser
    cdef public Exchange active
    cdef public object queue
    cdef public Exchange parsing
    cdef public object url
    cdef public object headers
    cdef public long head_bytes
    cdef public long raw_pending
    cdef public bint reading_head
    cdef public double head_age
    cdef public double idle_age
    cdef public long pauses
    cdef public bint write_paused
    cdef public bint closing
    cdef public object tunnel
    cdef public long error_status
    cdef public object target
    cdef public object routes
    cdef public long max_header_bytes
    cdef public long max_headers
    cdef public long head_room
    cdef public long chunk_len
    cdef public long head_fed
    cdef public bint exact_head
    cdef public object first_try
    cdef public long fd

    cpdef pause(self, reason)
    cpdef resume(self, reason)
    cpdef exchange_done(self, exchange, keep_alive)

cdef class Exchange:
    cdef public HttpDownstream down
    cdef public object runtime
    cdef public object method
    cdef public object headers
    cdef public object version
    cdef public bint keep_alive
    cdef public bint upgrade
    cdef public object path
    cdef public object authority
    cdef public long body_mode
    cdef public bint expect_continue
    cdef public object chunks
    cdef public long buffered
    cdef public object replay
    cdef public long replay_bytes
    cdef public bint request_done
    cdef public bint response_done
    cdef public object upstream
    cdef public ForwardPlan plan
    cdef public object endpoint
    cdef public object tried
    cdef public long attempt
    cdef public bint response_started
    cdef public bint out_chunked
    cdef public bint close_delimited
    cdef public long status
    cdef public object flags
    cdef public long req_bytes
    cdef public long resp_bytes
    cdef public double t0
    cdef public bint abandoned
    cdef public object timer
    cdef public object try_timer
    cdef public bint finished
    cdef public bint tunneling
    cdef public object dest
    cdef public object upstream_host
    cdef public object cluster
    cdef public object _hmap
    cdef public bint mirrored
    cdef public object out
    cdef public bint eof_body
    cdef public long retry_slot
    cdef public object failure_reason
    cdef public bytes request_id
    cdef public object id_line

    @cython.locals(plan=ForwardPlan)
    cpdef start(self)
    @cython.locals(pool=ClusterPool, plan=ForwardPlan, state=ClusterState, ep=UpstreamEndpoint)
    cpdef _attempt(self)
    cpdef request_complete(self)
    cpdef upstream_ready(self, UpstreamConnection conn)
    @cython.locals(state=ClusterState)
    cpdef upstream_head(self, UpstreamConnection conn, status, parts, length, hop)
    cpdef upstream_body(self, body)
    cpdef flush(self)
    cpdef upstream_complete(self, UpstreamConnection conn)
    cpdef local_reply(self, reply)
    cpdef record_in(self, ProxyRuntime runtime)
    cpdef _finish(self)
