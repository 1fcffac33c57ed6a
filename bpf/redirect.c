// Trellis eBPF redirection: the same capture as nodeagent/iptables.py, with no
// netfilter in the pod. Compiled and loaded by bcc (nodeagent/ebpf.py), which
// passes PIN_DIR so every agent (and every restart of one) shares the maps.
//
// Outbound  cgroup/connect4 (pod cgroup): an enrolled pod's TCP connect is
//           rewritten to 127.0.0.1:15001 and the original destination is kept
//           under the socket's cookie.
//           sockops (pod cgroup): once that connect is established, the original
//           destination is re-keyed by (netns cookie, source address, source
//           port): the accepted socket's peer, which is what the proxy's side can
//           see of it, and which no other live connection to 15001 can share.
//           cgroup/getsockopt (the proxy's cgroup): SO_ORIGINAL_DST is answered
//           from that map, once, and the entry is deleted; so tunnel/netns.original_dst
//           works unchanged. A socket on 15001 with no entry (a direct connect to
//           127.0.0.1:15001, a second read) is refused (EPERM), never answered
//           with the listener's own address or another connection's destination.
//           Entries of connections that never connect, are reset, or that the
//           proxy closed are deleted by the sockops state callback; both maps are
//           LRU-bounded.
// Inbound   tc ingress (pod eth0): a TCP packet that belongs to no established
//           socket is handed to the proxy's 15006 listener with bpf_sk_assign.
//           The addresses stay as they are (the client's IP is kept), so the
//           accepted socket's own local address *is* the original destination,
//           and getsockopt answers SO_ORIGINAL_DST with it.
//
// The proxy's own sockets are excluded by scoping, not by inspection: it runs in
// the agent's cgroup, so the pod-cgroup programs never see its connects. Its
// mark (0x539) is checked as well, for a proxy that one day runs in the pod.
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

#ifndef PIN_DIR
#error "PIN_DIR must name the bpffs directory for the shared maps"
#endif

#define OUTBOUND_PORT 15001
#define INBOUND_PLAINTEXT_PORT 15006
#define INBOUND_HBONE_PORT 15008
#define PROXY_MARK 0x539
#define MARK_MASK 0xfff
#define SO_ORIGINAL_DST 80
#define LOOPBACK 0x7f000001          // 127.0.0.1
#define PROBE_SOURCE 0xa9fe077f      // 169.254.7.127, where kubelet probes come from

struct orig_dst {
    u32 ip;    // network order
    u16 port;  // network order
    u16 pad;
};

struct peer_key {
    u64 netns;   // netns cookie of the pod
    u32 ip;      // the app's source address (network order), towards 127.0.0.1:15001
    u32 port;    // the app's source port (host order)
};

struct pod_info {
    u32 ip;      // the pod's IP, network order
    u32 pad;
};

// connect4 → sockops: original destination by the app socket's cookie.
BPF_TABLE_PINNED("lru_hash", u64, struct orig_dst, trellis_orig, 65536, PIN_DIR "/orig");
// sockops → getsockopt: original destination by what the proxy's side can see.
// (Pinned as "peer": the older "pair" map had another key, and a restarted agent
// must never open a pin of the old shape.)
BPF_TABLE_PINNED("lru_hash", struct peer_key, struct orig_dst, trellis_peer, 65536,
                 PIN_DIR "/peer");
// Enrolled pods by netns cookie, filled by the loader: nothing happens elsewhere.
BPF_TABLE_PINNED("hash", u64, struct pod_info, trellis_pods, 4096, PIN_DIR "/pods");

int trellis_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return 1;
    u32 dst = ctx->user_ip4;
    u16 port = (u16)ctx->user_port;
    // No exception for connects *to* the probe source: a probe's replies belong to
    // the accepted socket, and a connect the app makes there is the app's own.
    if ((bpf_ntohl(dst) >> 24) == 127 || port == bpf_htons(INBOUND_HBONE_PORT))
        return 1;
    u64 netns = bpf_get_netns_cookie(ctx);
    struct pod_info *pod = trellis_pods.lookup(&netns);
    if (!pod || dst == pod->ip)  // not enrolled, or the pod talking to itself
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (sk && (sk->mark & MARK_MASK) == PROXY_MARK)
        return 1;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst orig = {.ip = dst, .port = port};
    trellis_orig.update(&cookie, &orig);
    ctx->user_ip4 = bpf_htonl(LOOPBACK);
    ctx->user_port = bpf_htons(OUTBOUND_PORT);
    return 1;
}

int trellis_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != 2 /* AF_INET */)
        return 1;
    u64 cookie = bpf_get_socket_cookie(skops);
    struct peer_key key = {.netns = bpf_get_netns_cookie(skops), .ip = skops->local_ip4,
                           .port = skops->local_port};
    switch (skops->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
        // A connect we rewrote: follow its states, so that its entries go with it
        // even when it never connects or the proxy never reads them.
        if (trellis_orig.lookup(&cookie))
            bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
        struct orig_dst *orig = trellis_orig.lookup(&cookie);
        if (!orig)
            return 1;
        struct orig_dst copy = *orig;
        trellis_peer.update(&key, &copy);
        trellis_orig.delete(&cookie);
        return 1;
    }
    case BPF_SOCK_OPS_STATE_CB: {
        // args[0] is the old state, args[1] the new one.
        if (skops->args[1] != BPF_TCP_CLOSE)
            return 1;
        trellis_orig.delete(&cookie);  // a connect that never got through
        u32 was = skops->args[0];
        // The app closed first, gracefully: its data and FIN may still wait in the
        // proxy's accept queue, and the proxy still needs the entry for them. It is
        // deleted when read, or by the LRU; only this pod, from this same address
        // and port, could ever meet it again. Every other way to CLOSE (a reset,
        // the proxy closing first, no connection at all) means nobody will read it.
        if (was == BPF_TCP_FIN_WAIT1 || was == BPF_TCP_FIN_WAIT2 || was == BPF_TCP_CLOSING
            || was == BPF_TCP_TIME_WAIT)
            return 1;
        trellis_peer.delete(&key);
        return 1;
    }
    }
    return 1;
}

int trellis_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->level != 0 /* SOL_IP */ || ctx->optname != SO_ORIGINAL_DST)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    u64 netns = bpf_get_netns_cookie(ctx);
    if (!trellis_pods.lookup(&netns))
        return 1;  // not a socket in an enrolled pod: leave the kernel's answer
    struct sockaddr_in *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end)
        return 1;
    struct orig_dst found = {};
    if (sk->src_port == OUTBOUND_PORT) {
        struct peer_key key = {.netns = netns, .ip = sk->dst_ip4,
                               .port = bpf_ntohs((u16)sk->dst_port)};
        struct orig_dst *orig = trellis_peer.lookup(&key);
        if (!orig)
            return 0;  // EPERM: no rewritten connect is behind this socket (fail closed)
        found = *orig;
        trellis_peer.delete(&key);  // one answer per connection
    } else {
        // Handed over by tc: the accepted socket kept the packet's addresses.
        found.ip = sk->src_ip4;
        found.port = bpf_htons((u16)sk->src_port);
    }
    sa->sin_family = 2;  // AF_INET
    sa->sin_port = found.port;
    sa->sin_addr.s_addr = found.ip;
    ctx->optlen = sizeof(*sa);
    // Two 4-byte stores: the verifier rejects the one 8-byte store clang would merge them into.
    asm volatile("" ::: "memory");
    ctx->retval = 0;
    return 1;
}

int trellis_tc_ingress(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    struct iphdr *iph = (void *)(eth + 1);
    if ((void *)(iph + 1) > data_end || iph->protocol != IPPROTO_TCP)
        return TC_ACT_OK;
    // Options are allowed (ihl > 5): passing such a packet through untouched would
    // let a client reach the app around the proxy, so a short header is dropped.
    u32 ihl = iph->ihl;
    if (ihl < 5)
        return TC_ACT_SHOT;
    struct tcphdr *tcp = (void *)iph + ihl * 4;
    if ((void *)(tcp + 1) > data_end)
        return TC_ACT_SHOT;
    if (tcp->dest == bpf_htons(INBOUND_HBONE_PORT))
        return TC_ACT_OK;
    // A kubelet probe (SNATed to PROBE_SOURCE by the node, nodeagent/host_probe.py)
    // goes to the app untouched, as the iptables rules let it; never to a port of
    // the proxy's, where it would skip the redirect and land on a listener directly.
    if (iph->saddr == bpf_htonl(PROBE_SOURCE) && tcp->dest != bpf_htons(OUTBOUND_PORT)
        && tcp->dest != bpf_htons(INBOUND_PLAINTEXT_PORT))
        return TC_ACT_OK;
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = iph->saddr;
    tuple.ipv4.daddr = iph->daddr;
    tuple.ipv4.sport = tcp->source;
    tuple.ipv4.dport = tcp->dest;
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
                                             BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        // Part of a connection already (the proxy's accepted one, a handshake in
        // flight, or the pod's own outgoing one): the stack finds it unaided.
        int listening = sk->state == BPF_TCP_LISTEN;
        bpf_sk_release(sk);
        if (!listening)
            return TC_ACT_OK;
    }
    tuple.ipv4.dport = bpf_htons(INBOUND_PLAINTEXT_PORT);
    sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return TC_ACT_SHOT;  // fail closed: with no proxy, no plaintext reaches the app
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return TC_ACT_SHOT;
    }
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    return err == 0 ? TC_ACT_OK : TC_ACT_SHOT;
}
