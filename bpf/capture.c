// nodeagent eBPF capture (bcc). Attached once at the cgroup v2 root; which
// sockets are captured is decided by map lookups, so enrolling a workload is a
// map update, never a recompile or a new attachment.
//
//   na_connect4    cgroup/connect4: a selected workload's outbound TCP connect
//                  is rewritten to its proxy listener; the original destination
//                  is remembered by socket cookie.
//   na_sockops     sockops, ACTIVE_ESTABLISHED: the entry moves to a key the
//                  proxy can compute from the socket it accepted
//                  (netns cookie, client ip, client port, proxy port).
//   na_getsockopt  cgroup/getsockopt: getsockopt(SOL_IP, SO_ORIGINAL_DST) on
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

#define NA_SO_ORIGINAL_DST 80
#define NA_SOCK_STREAM 1
#define NA_BSWAP16(x) ((__u16)__builtin_bswap16((__u16)(x)))

struct wl_cfg {            // maps.WorkloadConfig
    __u32 id;              // workload slot, keys the exclusion maps
    __u32 proxy_ip4;       // network order
    __u16 proxy_port;      // host order
    __u16 flags;
    __u32 pad;
};

struct orig_dst {          // maps.OriginalDst
    __u32 ip4;             // network order
    __u16 port;            // host order
    __u16 pad;
    __u32 id;
    __u32 pad2;
    __u64 netns;
};

struct pair_key {          // maps.encode_pair_key
    __u64 netns;
    __u32 ip4;             // client ip, network order
    __u16 port;            // client port, host order
    __u16 proxy_port;      // host order
};

struct port_key {          // maps.encode_port_key
    __u32 id;
    __u16 port;            // host order
    __u16 pad;
};

struct cidr_key {          // maps.encode_cidr_key (LPM trie)
    __u32 prefixlen;       // 32 (id) + prefix length
    __u32 id;
    __u32 ip4;             // network order
};

#define NA_PIN(name) NA_PIN_DIR "/maps/" name

BPF_TABLE_PINNED("hash", __u64, struct wl_cfg, netns_cfg, 4096, NA_PIN("netns"));
BPF_TABLE_PINNED("hash", __u64, struct wl_cfg, cgroup_cfg, 4096, NA_PIN("cgroup"));
BPF_TABLE_PINNED("hash", struct port_key, __u8, excl_port, 16384, NA_PIN("excl_port"));
BPF_TABLE_PINNED("lpm_trie", struct cidr_key, __u8, excl_dst, 16384, NA_PIN("excl_dst"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", __u64, struct orig_dst, cookie_dst, 65536, NA_PIN("cookie_dst"));
BPF_TABLE_PINNED("lru_hash", struct pair_key, struct orig_dst, pair_dst, 65536, NA_PIN("pair_dst"));

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

int na_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != NA_SOCK_STREAM)
        return 1;
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct wl_cfg *cfg = select_workload(netns);
    if (!cfg)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    if (sk->mark == NA_SKIP_MARK)
        return 1;

    __u32 dip = ctx->user_ip4;
    __u16 dport = NA_BSWAP16(ctx->user_port);
    if ((dip & 0xff) == 127)  // 127.0.0.0/8 (network order: first octet lowest)
        return 1;
    if (dip == cfg->proxy_ip4 && dport == cfg->proxy_port)
        return 1;

    struct port_key pk = {.id = cfg->id, .port = dport};
    if (excl_port.lookup(&pk))
        return 1;
    struct cidr_key ck = {.prefixlen = 64, .id = cfg->id, .ip4 = dip};
    if (excl_dst.lookup(&ck))
        return 1;

    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst od = {.ip4 = dip, .port = dport, .id = cfg->id, .netns = netns};
    cookie_dst.update(&cookie, &od);
    ctx->user_ip4 = cfg->proxy_ip4;
    ctx->user_port = NA_BSWAP16(cfg->proxy_port);
    return 1;
}

int na_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || skops->family != AF_INET)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct orig_dst *od = cookie_dst.lookup(&cookie);
    if (!od)
        return 1;
    struct orig_dst copy = *od;
    cookie_dst.delete(&cookie);
    // The proxy port is where connect4 sent the socket; read it back from the
    // remote address rather than trusting that the workload config is unchanged.
    __u32 rport = skops->remote_port;  // network order, in the low or high half
    if (rport > 0xffff)
        rport >>= 16;
    struct pair_key key = {
        .netns = copy.netns,
        .ip4 = skops->local_ip4,
        .port = (__u16)skops->local_port,
        .proxy_port = NA_BSWAP16(rport),
    };
    pair_dst.update(&key, &copy);
    return 1;
}

int na_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->level != 0 /* SOL_IP */ || ctx->optname != NA_SO_ORIGINAL_DST)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->family != AF_INET)
        return 1;
    struct pair_key key = {
        .netns = bpf_get_netns_cookie(ctx),
        .ip4 = sk->dst_ip4,
        .port = NA_BSWAP16(sk->dst_port),
        .proxy_port = (__u16)sk->src_port,
    };
    struct orig_dst *od = pair_dst.lookup(&key);
    if (!od)
        return 1;
    struct sockaddr_in *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end)
        return 1;
    sa->sin_family = AF_INET;
    sa->sin_port = NA_BSWAP16(od->port);
    sa->sin_addr.s_addr = od->ip4;
    __builtin_memset(sa->__pad, 0, sizeof(sa->__pad));
    ctx->optlen = sizeof(*sa);
    // keep two 32-bit stores: the verifier refuses one merged 64-bit store
    asm volatile("" ::: "memory");
    ctx->retval = 0;
    return 1;
}
