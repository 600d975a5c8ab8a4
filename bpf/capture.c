// nodeagent eBPF capture (bcc). Attached once at the cgroup v2 root; which
// sockets are captured is decided by map lookups, so enrolling a workload is a
// map update, never a recompile or a new attachment.
//
//   na_connect4    cgroup/connect4 (and na_connect6, cgroup/connect6): a selected
//                  workload's outbound TCP connect is rewritten to its proxy
//                  listener (IPv4 and v4-mapped destinations to proxy_ip4:port,
//                  IPv6 ones to [::1]:port); the original destination is
//                  remembered by socket cookie.
//   na_sockops     sockops, ACTIVE_ESTABLISHED: the entry moves to a key the
//                  proxy can compute from the socket it accepted
//                  (netns cookie, client ip, client port, proxy port).
//   na_fast_sockops, na_fast_msg (optional, per workload flag): the captured
//                  client socket and the proxy's accepted socket go into a
//                  SOCKHASH, and sk_msg hands data between them directly
//                  (no TCP/IP loopback path).
//   na_inbound     sk_lookup, one instance per enrolled netns: inbound TCP to the
//                  pod goes to the proxy's inbound listener (15006); see below.
//   na_getsockopt  cgroup/getsockopt: getsockopt(SOL_IP, SO_ORIGINAL_DST) (or
//                  SOL_IPV6, IP6T_SO_ORIGINAL_DST) on
//                  that accepted socket answers from the map, so the proxy
//                  code is the same as with nftables/iptables REDIRECT.
//
// Selection: by network-namespace cookie (a pod: every process in its netns,
// whatever cgroup it runs in) or by cgroup v2 id (a host service and its
// sub-cgroups, the deepest enrolled ancestor wins).
// Skipped in the kernel: non-TCP, loopback destinations, the proxy's own
// sockets (SO_MARK NA_SKIP_MARK), the proxy address itself, and per-workload
// excluded ports and destination CIDRs.
//
// Build-time macros (set by loader.py): NA_PIN_DIR (bpffs directory holding
// the pinned maps), NA_SKIP_MARK, NA_MAX_CGROUP_DEPTH.

#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/socket.h>

#ifndef NA_PIN_DIR
#error "NA_PIN_DIR must name the bpffs directory of the pinned maps"
#endif
#ifndef NA_SKIP_MARK
#define NA_SKIP_MARK 0x539
#endif
#ifndef NA_MAX_CGROUP_DEPTH
#define NA_MAX_CGROUP_DEPTH 8
#endif

#define NA_SO_ORIGINAL_DST 80   // also IP6T_SO_ORIGINAL_DST
#define NA_SOL_IP 0
#define NA_SOL_IPV6 41
#define NA_SOCK_STREAM 1
#define NA_BSWAP16(x) ((__u16)__builtin_bswap16((__u16)(x)))
// ::ffff:0:0/96 word 2 and ::1 word 3, as the u32 the kernel hands over (network byte order)
#define NA_MAPPED_WORD ((__u32)__builtin_bswap32(0x0000ffff))
#define NA_V6_LOOPBACK_WORD ((__u32)__builtin_bswap32(1))

// Addresses are 16 bytes everywhere: IPv4 as ::ffff:a.b.c.d, so one map serves both.

struct wl_cfg {            // maps.WorkloadConfig
    __u32 id;              // workload slot, keys the exclusion maps
    __u32 proxy_ip4;       // network order; IPv6 destinations go to [::1]
    __u16 proxy_port;      // host order
    __u16 flags;
    __u32 pad;
};

#define NA_WL_FAST_PATH 1  // wl_cfg.flags / orig_dst.flags: same-node sk_msg fast path

struct orig_dst {          // maps.OriginalDst
    __u32 ip6[4];          // network order
    __u16 port;            // host order
    __u16 flags;           // the workload's flags when captured
    __u32 id;
    __u64 netns;
};

struct pair_key {          // maps.encode_pair_key
    __u64 netns;
    __u32 ip6[4];          // client ip
    __u16 port;            // client port, host order
    __u16 proxy_port;      // host order
    __u32 pad;
};

struct port_key {          // maps.encode_port_key
    __u32 id;
    __u16 port;            // host order
    __u16 pad;
};

struct cidr_key {          // maps.encode_cidr_key (LPM trie)
    __u32 prefixlen;       // 32 (id) + prefix length of the 128-bit address
    __u32 id;
    __u32 ip6[4];
};

#define NA_PIN(name) NA_PIN_DIR "/maps/" name

BPF_TABLE_PINNED("hash", __u64, struct wl_cfg, netns_cfg, 4096, NA_PIN("netns"));
BPF_TABLE_PINNED("hash", __u64, struct wl_cfg, cgroup_cfg, 4096, NA_PIN("cgroup"));
BPF_TABLE_PINNED("hash", struct port_key, __u8, excl_port, 16384, NA_PIN("excl_port"));
BPF_TABLE_PINNED("lpm_trie", struct cidr_key, __u8, excl_dst, 16384, NA_PIN("excl_dst"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", __u64, struct orig_dst, cookie_dst, 65536, NA_PIN("cookie_dst"));
BPF_TABLE_PINNED("lru_hash", struct pair_key, struct orig_dst, pair_dst, 65536, NA_PIN("pair_dst"));
// inbound connections steered by na_inbound (see below), same key as pair_dst
BPF_TABLE_PINNED("lru_hash", struct pair_key, struct orig_dst, in_dst, 65536, NA_PIN("in_dst"));

static __always_inline struct wl_cfg *select_workload(__u64 netns)
{
    struct wl_cfg *cfg = netns_cfg.lookup(&netns);
    if (cfg)
        return cfg;
    __u64 cg = bpf_get_current_cgroup_id();
    cfg = cgroup_cfg.lookup(&cg);
    if (cfg)
        return cfg;
#pragma unroll
    for (int level = NA_MAX_CGROUP_DEPTH; level >= 1; level--) {
        cg = bpf_get_current_ancestor_cgroup_id(level);
        if (cg == 0)
            continue;
        cfg = cgroup_cfg.lookup(&cg);
        if (cfg)
            return cfg;
    }
    return 0;
}

// The workload to capture this connect() for, or 0 (not selected, or the proxy's own socket).
static __always_inline struct wl_cfg *captured_workload(struct bpf_sock_addr *ctx, __u64 *netns)
{
    if (ctx->type != NA_SOCK_STREAM)
        return 0;
    *netns = bpf_get_netns_cookie(ctx);
    struct wl_cfg *cfg = select_workload(*netns);
    if (!cfg)
        return 0;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->mark == NA_SKIP_MARK)
        return 0;
    return cfg;
}

// Applies the exclusions; when the connection is captured, remembers its destination.
static __always_inline int remember(struct bpf_sock_addr *ctx, struct wl_cfg *cfg, __u64 netns,
                                    struct orig_dst *od)
{
    struct port_key pk = {.id = cfg->id, .port = od->port};
    if (excl_port.lookup(&pk))
        return 0;
    struct cidr_key ck = {.prefixlen = 32 + 128, .id = cfg->id};
    __builtin_memcpy(ck.ip6, od->ip6, sizeof(ck.ip6));
    if (excl_dst.lookup(&ck))
        return 0;
    od->id = cfg->id;
    od->flags = cfg->flags;
    od->netns = netns;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    cookie_dst.update(&cookie, od);
    return 1;
}

int na_connect4(struct bpf_sock_addr *ctx)
{
    __u64 netns = 0;
    struct wl_cfg *cfg = captured_workload(ctx, &netns);
    if (!cfg)
        return 1;
    __u32 dip = ctx->user_ip4;
    __u16 dport = NA_BSWAP16(ctx->user_port);
    if ((dip & 0xff) == 127)  // 127.0.0.0/8 (network order: first octet lowest)
        return 1;
    if (dip == cfg->proxy_ip4 && dport == cfg->proxy_port)
        return 1;
    struct orig_dst od = {.ip6 = {0, 0, NA_MAPPED_WORD, dip}, .port = dport};
    if (!remember(ctx, cfg, netns, &od))
        return 1;
    ctx->user_ip4 = cfg->proxy_ip4;
    ctx->user_port = NA_BSWAP16(cfg->proxy_port);
    return 1;
}

int na_connect6(struct bpf_sock_addr *ctx)
{
    __u64 netns = 0;
    struct wl_cfg *cfg = captured_workload(ctx, &netns);
    if (!cfg)
        return 1;
    struct orig_dst od = {.port = NA_BSWAP16(ctx->user_port)};
    od.ip6[0] = ctx->user_ip6[0];
    od.ip6[1] = ctx->user_ip6[1];
    od.ip6[2] = ctx->user_ip6[2];
    od.ip6[3] = ctx->user_ip6[3];
    int mapped = od.ip6[0] == 0 && od.ip6[1] == 0 && od.ip6[2] == NA_MAPPED_WORD;
    if (mapped) {             // an IPv4 destination on a dual-stack socket
        if ((od.ip6[3] & 0xff) == 127)
            return 1;
        if (od.ip6[3] == cfg->proxy_ip4 && od.port == cfg->proxy_port)
            return 1;
    } else if (od.ip6[0] == 0 && od.ip6[1] == 0 && od.ip6[2] == 0 && od.ip6[3] == NA_V6_LOOPBACK_WORD) {
        return 1;             // ::1
    }
    if (!remember(ctx, cfg, netns, &od))
        return 1;
    if (mapped) {
        ctx->user_ip6[3] = cfg->proxy_ip4;
    } else {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = 0;
        ctx->user_ip6[3] = NA_V6_LOOPBACK_WORD;
    }
    ctx->user_port = NA_BSWAP16(cfg->proxy_port);
    return 1;
}

int na_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    __u32 family = skops->family;
    if (family != AF_INET && family != AF_INET6)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct orig_dst *od = cookie_dst.lookup(&cookie);
    if (!od)
        return 1;
    struct orig_dst copy = *od;
    cookie_dst.delete(&cookie);
    // The proxy port is where connect4/6 sent the socket; read it back from the
    // remote address rather than trusting that the workload config is unchanged.
    __u32 rport = skops->remote_port;  // network order, in the low or high half
    if (rport > 0xffff)
        rport >>= 16;
    struct pair_key key = {
        .netns = copy.netns,
        .port = (__u16)skops->local_port,
        .proxy_port = NA_BSWAP16(rport),
    };
    // Read every context field unconditionally: loads chosen by a branch can
    // be merged into one load from a computed ctx address, which the verifier refuses.
    __u32 l4 = skops->local_ip4;
    __u32 l6_0 = skops->local_ip6[0], l6_1 = skops->local_ip6[1];
    __u32 l6_2 = skops->local_ip6[2], l6_3 = skops->local_ip6[3];
    asm volatile("" ::: "memory");
    if (family == AF_INET) {
        key.ip6[2] = NA_MAPPED_WORD;
        key.ip6[3] = l4;
    } else {   // a v4-mapped source reads as ::ffff:a.b.c.d here, as the proxy will see it
        key.ip6[0] = l6_0;
        key.ip6[1] = l6_1;
        key.ip6[2] = l6_2;
        key.ip6[3] = l6_3;
    }
    pair_dst.update(&key, &copy);
    return 1;
}

// getsockopt(SOL_IP, SO_ORIGINAL_DST) / getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)
// on the socket the proxy accepted, answered from pair_dst.
static __always_inline int na_sockopt_pass(struct bpf_sockopt *ctx)
{
    // Leave every other getsockopt as the kernel answered it. Buffers larger
    // than a page are only partly visible to BPF: optlen 0 tells the kernel to
    // keep the caller's original buffer (iptables-legacy reads big tables this
    // way; see Documentation/bpf/prog_cgroup_sockopt.rst).
    if (ctx->optlen > 4096)
        ctx->optlen = 0;
    return 1;
}

int na_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->optname != NA_SO_ORIGINAL_DST)
        return na_sockopt_pass(ctx);
    int level = ctx->level;
    if (level != NA_SOL_IP && level != NA_SOL_IPV6)
        return na_sockopt_pass(ctx);
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct pair_key key = {
        .netns = bpf_get_netns_cookie(ctx),
        .port = NA_BSWAP16(sk->dst_port),
        .proxy_port = (__u16)sk->src_port,
    };
    __u32 family = sk->family;
    __u32 d4 = sk->dst_ip4;   // all read unconditionally (see na_sockops)
    __u32 d6_0 = sk->dst_ip6[0], d6_1 = sk->dst_ip6[1], d6_2 = sk->dst_ip6[2], d6_3 = sk->dst_ip6[3];
    asm volatile("" ::: "memory");
    if (level == NA_SOL_IP && family == AF_INET) {
        key.ip6[2] = NA_MAPPED_WORD;
        key.ip6[3] = d4;
    } else if (level == NA_SOL_IPV6 && family == AF_INET6) {
        key.ip6[0] = d6_0;
        key.ip6[1] = d6_1;
        key.ip6[2] = d6_2;
        key.ip6[3] = d6_3;
    } else {
        return 1;
    }
    struct orig_dst *od = pair_dst.lookup(&key);
    if (!od)
        od = in_dst.lookup(&key);   // an inbound connection na_inbound steered to the proxy
    if (!od)
        return 1;
    if (level == NA_SOL_IP) {
        if (od->ip6[0] != 0 || od->ip6[1] != 0 || od->ip6[2] != NA_MAPPED_WORD)
            return 1;   // an IPv6 destination cannot be told as a sockaddr_in
        struct sockaddr_in *sa = ctx->optval;
        if ((void *)(sa + 1) > ctx->optval_end)
            return 1;
        sa->sin_family = AF_INET;
        sa->sin_port = NA_BSWAP16(od->port);
        sa->sin_addr.s_addr = od->ip6[3];
        __builtin_memset(sa->__pad, 0, sizeof(sa->__pad));
        ctx->optlen = sizeof(*sa);
    } else {
        struct sockaddr_in6 *sa6 = ctx->optval;
        if ((void *)(sa6 + 1) > ctx->optval_end)
            return 1;
        sa6->sin6_family = AF_INET6;
        sa6->sin6_port = NA_BSWAP16(od->port);
        sa6->sin6_flowinfo = 0;
        sa6->sin6_addr.in6_u.u6_addr32[0] = od->ip6[0];
        sa6->sin6_addr.in6_u.u6_addr32[1] = od->ip6[1];
        sa6->sin6_addr.in6_u.u6_addr32[2] = od->ip6[2];
        sa6->sin6_addr.in6_u.u6_addr32[3] = od->ip6[3];
        sa6->sin6_scope_id = 0;
        ctx->optlen = sizeof(*sa6);
    }
    // keep two 32-bit stores: the verifier refuses one merged 64-bit store
    asm volatile("" ::: "memory");
    ctx->retval = 0;
    return 1;
}

// ---- same-node fast path (optional) -------------------------------------------------
// Both ends of a captured client -> proxy connection live on this node. Once
// both sockets are in local_socks, sk_msg moves each sendmsg straight into the
// peer socket's receive queue. A sender whose message ever took the TCP path
// (its peer was not in the map yet) is marked in tcp_used and never redirected
// afterwards, so bytes can never overtake earlier bytes still in TCP.

struct sock_key {          // maps.encode_sock_key
    __u64 netns;
    __u32 local[4];        // IPv4 as ::ffff:a.b.c.d
    __u32 remote[4];
    __u16 local_port;      // host order
    __u16 remote_port;     // host order
    __u32 pad;
};

#define NA_SOCKHASH_PINNED(_name, _key_type, _max_entries, _pinned) \
struct _name##_table_t { \
    _key_type key; \
    int leaf; \
    int (*update) (_key_type *, int *); \
    int (*delete) (_key_type *); \
    int (*sock_hash_update) (void *, void *, u64); \
    int (*msg_redirect_hash) (void *, void *, u64); \
    int (*sk_redirect_hash) (void *, void *, u64); \
    u32 max_entries; \
}; \
__attribute__((section("maps/sockhash:" _pinned))) \
struct _name##_table_t _name = { .max_entries = (_max_entries) }; \
BPF_ANNOTATE_KV_PAIR(_name, _key_type, int)

NA_SOCKHASH_PINNED(local_socks, struct sock_key, 65536, NA_PIN("local_socks"));
BPF_TABLE_PINNED("lru_hash", struct sock_key, __u8, tcp_used, 65536, NA_PIN("tcp_used"));

static __always_inline __u16 na_port_from_be(__u32 port)
{
    if (port > 0xffff)   // some context fields carry the be16 in the high half
        port >>= 16;
    return NA_BSWAP16(port);
}

// sock_ops and sk_msg contexts share these field names. Every field is read
// unconditionally (branch-selected ctx loads can be merged into one load from
// a computed ctx address, which the verifier refuses).
#define NA_FILL_SOCK_KEY(ctx, key) do { \
    __u32 fam_ = (ctx)->family; \
    __u32 l4_ = (ctx)->local_ip4, r4_ = (ctx)->remote_ip4; \
    __u32 l0_ = (ctx)->local_ip6[0], l1_ = (ctx)->local_ip6[1], l2_ = (ctx)->local_ip6[2], l3_ = (ctx)->local_ip6[3]; \
    __u32 r0_ = (ctx)->remote_ip6[0], r1_ = (ctx)->remote_ip6[1], r2_ = (ctx)->remote_ip6[2], r3_ = (ctx)->remote_ip6[3]; \
    __u32 lp_ = (ctx)->local_port, rp_ = (ctx)->remote_port; \
    asm volatile("" ::: "memory"); \
    (key)->local_port = (__u16)lp_; \
    (key)->remote_port = na_port_from_be(rp_); \
    if (fam_ == AF_INET) { \
        (key)->local[2] = NA_MAPPED_WORD; (key)->local[3] = l4_; \
        (key)->remote[2] = NA_MAPPED_WORD; (key)->remote[3] = r4_; \
    } else { \
        (key)->local[0] = l0_; (key)->local[1] = l1_; (key)->local[2] = l2_; (key)->local[3] = l3_; \
        (key)->remote[0] = r0_; (key)->remote[1] = r1_; (key)->remote[2] = r2_; (key)->remote[3] = r3_; \
    } \
} while (0)

int na_fast_sockops(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;
    __u32 family = skops->family;
    if (family != AF_INET && family != AF_INET6)
        return 1;
    struct sock_key own = {.netns = bpf_get_netns_cookie(skops)};
    NA_FILL_SOCK_KEY(skops, &own);
    struct pair_key pk = {.netns = own.netns};
    struct orig_dst *od = 0;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        // the captured client: na_sockops may or may not have moved its entry yet
        __u64 cookie = bpf_get_socket_cookie(skops);
        od = cookie_dst.lookup(&cookie);
        __builtin_memcpy(pk.ip6, own.local, sizeof(pk.ip6));
        pk.port = own.local_port;
        pk.proxy_port = own.remote_port;
    } else {
        // the proxy's accepted socket: its peer is a captured client
        __builtin_memcpy(pk.ip6, own.remote, sizeof(pk.ip6));
        pk.port = own.remote_port;
        pk.proxy_port = own.local_port;
    }
    if (!od)
        od = pair_dst.lookup(&pk);
    if (!od || !(od->flags & NA_WL_FAST_PATH))
        return 1;
    tcp_used.delete(&own);
    local_socks.sock_hash_update(skops, &own, BPF_ANY);
    return 1;
}

int na_fast_msg(struct sk_msg_md *msg)
{
    struct sock_key own = {.netns = bpf_get_netns_cookie(msg)};
    NA_FILL_SOCK_KEY(msg, &own);
    if (tcp_used.lookup(&own))
        return SK_PASS;
    struct sock_key peer = {
        .netns = own.netns,
        .local_port = own.remote_port,
        .remote_port = own.local_port,
    };
    __builtin_memcpy(peer.local, own.remote, sizeof(peer.local));
    __builtin_memcpy(peer.remote, own.local, sizeof(peer.remote));
    if (local_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS) == SK_PASS)
        return SK_PASS;
    __u8 one = 1;   // peer unknown: this message goes by TCP, and so will all later ones
    tcp_used.update(&own, &one);
    return SK_PASS;
}

// ---- inbound capture (sk_lookup) ------------------------------------------------------
// TCP arriving at an enrolled pod is steered to the proxy's inbound listener
// (15006) by an sk_lookup program attached to the pod's network namespace:
// the kernel looks the listener up in in_listen and the connection is
// accepted by it with the ORIGINAL destination as its local address (as with
// TPROXY). The steering is recorded in in_dst under the pair key the
// getsockopt hook computes from the accepted socket, so SO_ORIGINAL_DST
// answers the same as for outbound captures and the proxy code is unchanged.
//
// sk_lookup programs cannot call bpf_get_netns_cookie, so the loader loads
// one instance of na_inbound per enrolled namespace with that namespace's
// cookie patched into the NA_NETNS_MAGIC immediate (one 64-bit load).
// Passed untouched, as in the nftables plan: non-TCP, loopback (the pod
// talking to itself - 127/8, ::1, or source == destination address - and the
// proxy's own connections to the application),
// the tunnel port and excluded ports (in_port), probe sources (in_src).
// With no listener registered (the agent is restarting), new connections are
// refused with a reset, as REDIRECT to a closed port: never a bypass to the
// application.

#define NA_NETNS_MAGIC "0x6e6174696e626e64"   // loader.INBOUND_MAGIC
#define NA_LOOPBACK_IFINDEX 1

struct in_sock_key {       // maps.encode_listen_key
    __u64 netns;
    __u32 family;
    __u32 pad;
};

struct in_port_key {       // maps.encode_in_port_key
    __u64 netns;
    __u16 port;            // host order
    __u16 pad;
    __u32 pad2;
};

struct in_src_key {        // maps.encode_in_src_key (LPM trie)
    __u32 prefixlen;       // 64 (netns) + prefix length of the 128-bit address
    __u32 netns[2];
    __u32 ip6[4];
};

struct in_listen_table_t {
    struct in_sock_key key;
    int leaf;
    struct bpf_sock *(*lookup) (struct in_sock_key *);
    int (*delete) (struct in_sock_key *);
    u32 max_entries;
};
__attribute__((section("maps/sockhash:" NA_PIN("in_listen"))))
struct in_listen_table_t in_listen = { .max_entries = 8192 };
BPF_ANNOTATE_KV_PAIR(in_listen, struct in_sock_key, int);

BPF_TABLE_PINNED("hash", struct in_port_key, __u8, in_port, 16384, NA_PIN("in_port"));
BPF_TABLE_PINNED("lpm_trie", struct in_src_key, __u8, in_src, 16384, NA_PIN("in_src"), BPF_F_NO_PREALLOC);

int na_inbound(struct bpf_sk_lookup *ctx)
{
    __u64 netns;
    asm volatile("%0 = " NA_NETNS_MAGIC " ll" : "=r"(netns));
    // every context field read unconditionally (see na_sockops)
    __u32 proto = ctx->protocol, family = ctx->family, ifindex = ctx->ingress_ifindex;
    __u32 lport = ctx->local_port, rport = ctx->remote_port;
    __u32 l4 = ctx->local_ip4, r4 = ctx->remote_ip4;
    __u32 l6_0 = ctx->local_ip6[0], l6_1 = ctx->local_ip6[1], l6_2 = ctx->local_ip6[2], l6_3 = ctx->local_ip6[3];
    __u32 r6_0 = ctx->remote_ip6[0], r6_1 = ctx->remote_ip6[1], r6_2 = ctx->remote_ip6[2], r6_3 = ctx->remote_ip6[3];
    asm volatile("" ::: "memory");
    if (proto != IPPROTO_TCP || ifindex == NA_LOOPBACK_IFINDEX)
        return SK_PASS;        // non-TCP; 127.0.0.0/8 and ::1 (ingress_ifindex is lo's)
    // The pod calling its own address (also the proxy's connection to the
    // application): ingress_ifindex is then the address's device, not lo, but
    // the source the kernel picks for a local destination is that destination.
    if (family == AF_INET ? r4 == l4
                          : (r6_0 == l6_0 && r6_1 == l6_1 && r6_2 == l6_2 && r6_3 == l6_3))
        return SK_PASS;
    struct in_port_key pk = {.netns = netns, .port = (__u16)lport};
    if (in_port.lookup(&pk))
        return SK_PASS;        // the tunnel port, or an excluded inbound port
    struct in_src_key sk_src = {.prefixlen = 64 + 128, .netns = {(__u32)netns, (__u32)(netns >> 32)}};
    struct orig_dst od = {.port = (__u16)lport, .netns = netns};
    struct pair_key key = {.netns = netns, .port = na_port_from_be(rport), .proxy_port = (__u16)lport};
    if (family == AF_INET) {
        sk_src.ip6[2] = NA_MAPPED_WORD;
        sk_src.ip6[3] = r4;
        od.ip6[2] = NA_MAPPED_WORD;
        od.ip6[3] = l4;
    } else {
        sk_src.ip6[0] = r6_0; sk_src.ip6[1] = r6_1; sk_src.ip6[2] = r6_2; sk_src.ip6[3] = r6_3;
        od.ip6[0] = l6_0; od.ip6[1] = l6_1; od.ip6[2] = l6_2; od.ip6[3] = l6_3;
    }
    if (in_src.lookup(&sk_src))
        return SK_PASS;        // a node probe source: straight to the application
    __builtin_memcpy(key.ip6, sk_src.ip6, sizeof(key.ip6));
    struct in_sock_key lk = {.netns = netns, .family = family};
    struct bpf_sock *sk = in_listen.lookup(&lk);
    if (!sk)
        return SK_DROP;        // no proxy listening: the SYN is answered with a reset (fail closed)
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return SK_DROP;
    in_dst.update(&key, &od);
    return SK_PASS;
}
