/* Service traffic judged on the backend (netfilter mode).
 *
 * kube-proxy rewrites a Service address to a backend (DNAT) after the client's veth program has
 * seen the packet, so the veth cannot judge a flow to a Service on the pod it really reaches.
 * With STOCKADE_SERVICES:
 * - the `svc_space` trie holds the Service address space (Service CIDRs, external and load
 *   balancer IPs, node addresses with the NodePort range), written by the agent;
 * - the veth program (hook.h) defers a new TCP/UDP/SCTP flow from a pod to that space: it
 *   records the flow's original destination in `svc_deferred` under what DNAT leaves unchanged
 *   (client address, client port, protocol), counts no verdict and lets the packet go on;
 * - the netfilter program (service.c.j2), attached at NF_INET_POST_ROUTING priority 95 (after
 *   DNAT at -100, before SNAT at 100) and NF_INET_LOCAL_IN priority 101, finds the deferred
 *   entry and judges the translated packet: egress of the client toward the backend address and
 *   port, and ingress of the backend when it is an endpoint of this node, from the client as it
 *   is (before any masquerade). A denied flow is dropped there; an allowed one is recorded in
 *   conntrack under the original tuple (client -> Service, EGRESS: the client's later packets
 *   are established, the replies un-DNATed at its veth are replies) and, for a local backend,
 *   under the translated tuple (client -> backend, INGRESS). `svc_flows` keeps the backend of
 *   each original tuple so that a policy change judges the flow again on it (conntrack.h).
 * - the second netfilter program (stockade_service_nat), at NF_INET_POST_ROUTING priority 101
 *   (after SNAT), finds a flow allowed into a local backend (`svc_masq`) that kube-proxy
 *   masqueraded to node address N and moves the INGRESS entry to N:ns -> B:bp, with the real
 *   client in `svc_flows` for revalidation.
 *
 * Which tuple each hook sees, for client C, Service V:vp, backend B:bp:
 *   client veth, tc ingress:    C:cs -> V:vp       (deferred, then established)
 *   POST_ROUTING 95 / LOCAL_IN: C:cs -> B:bp       (judged here)
 *   POST_ROUTING 101:           N:ns -> B:bp       (if masqueraded: the INGRESS entry moved)
 *   backend veth, tc egress:    C:cs -> B:bp       (established: INGRESS entry; or N:ns)
 *   backend veth, tc ingress:   B:bp -> C:cs       (reply of the INGRESS entry; or -> N:ns)
 *   client veth, tc egress:     V:vp -> C:cs       (reply of the EGRESS entry, after un-DNAT)
 */
#pragma once

#include "maps.h"
#include "policy.h"

#ifndef STOCKADE_SERVICES
#error "STOCKADE_SERVICES must be defined by the rendered program"
#endif
#ifndef STOCKADE_SERVICE_FALLBACK
#error "STOCKADE_SERVICE_FALLBACK must be defined by the rendered program"
#endif

#if STOCKADE_SERVICES || STOCKADE_SERVICE_FALLBACK
/* svc_space: Service address prefix (LPM, IPv4-mapped IPv6, the key of peer_classes) -> the
 * destination ports that count there: [port_min, port_max], 0/0 for every port. */
struct svc_space_value {
	__u16 port_min;
	__u16 port_max;
	__u32 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, STOCKADE_SERVICE_PREFIXES_MAX);
	__type(key, struct class_key);
	__type(value, struct svc_space_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} svc_space SEC(".maps");
#endif

#if STOCKADE_SERVICES
#if !STOCKADE_CONNTRACK
#error "STOCKADE_SERVICES needs STOCKADE_CONNTRACK"
#endif

/* svc_deferred: a pod's new flow to Service space, by what DNAT does not change. */
struct svc_defer_key {
	__u32 saddr[4];
	__be16 sport;
	__u8 proto;
	__u8 pad;
};

struct svc_defer_value {
	__u64 expires_ns;	/* bpf_ktime_get_coarse_ns() after which it is stale */
	__u32 daddr[4];		/* the Service address and port the client sent to */
	__be16 dport;
	__u16 pad;
	__u32 endpoint_id;	/* the client's endpoint */
};

/* svc_flows: the original tuple of an allowed Service flow (its conntrack key) -> the other
 * end it was judged against:
 * - EGRESS key (client -> Service address): `peer` is the backend, `endpoint_id` the client;
 * - INGRESS key (the masqueraded client -> a local backend, as the backend's veth sees it):
 *   `peer` is the client as it really is, `endpoint_id` the backend. */
struct svc_flow_value {
	__u32 peer[4];
	__u16 port;		/* the backend's policy port (host order) */
	__u16 pad;
	__u32 endpoint_id;	/* the endpoint whose policy judged the flow */
};

/* svc_masq: a flow that the netfilter program allowed into a local backend, by the key of its
 * deferral (client address and port, protocol), until the program after SNAT has seen it: if
 * kube-proxy masqueraded it (a hairpin, a NodePort), the backend's conntrack entry moves to the
 * tuple the backend's veth sees. */
struct svc_masq_value {
	__u64 expires_ns;
	__u32 baddr[4];		/* the backend, as DNAT left it */
	__be16 bport;
	__u16 port;		/* the backend's policy port (host order) */
	__u32 rule_id;		/* the backend's ingress rule that allowed it */
	__u32 endpoint_id;	/* the backend's endpoint */
	__u32 pad;
};

#define SVC_DEFER_NS 2000000000ULL /* 2 s: the first packet reaches POST_ROUTING long before */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, STOCKADE_CONNTRACK_MAX);
	__type(key, struct svc_defer_key);
	__type(value, struct svc_defer_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} svc_deferred SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, STOCKADE_CONNTRACK_MAX);
	__type(key, struct ct_key);
	__type(value, struct svc_flow_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} svc_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, STOCKADE_CONNTRACK_MAX);
	__type(key, struct svc_defer_key);
	__type(value, struct svc_masq_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} svc_masq SEC(".maps");

/* Veth side: defer a new flow from endpoint `endpoint_id` when its destination is Service
 * space. Returns 1 when deferred (the packet passes, unjudged here). */
static __always_inline int svc_defer(const struct flow *f, __u32 endpoint_id, __u64 now)
{
	const struct tuple *t = &f->t;
	struct class_key ck;
	struct svc_space_value *sv;
	struct svc_defer_key dk;
	struct svc_defer_value dv;
	__u16 port = bpf_ntohs(t->dport);

	if (!is_ported(t->proto))
		return 0;
	ck.prefixlen = CLASS_KEY_BITS;
	__builtin_memcpy(ck.addr, t->daddr, 16);
	sv = bpf_map_lookup_elem(&svc_space, &ck);
	if (!sv)
		return 0;
	if (sv->port_max && (port < sv->port_min || port > sv->port_max))
		return 0;
	__builtin_memcpy(dk.saddr, t->saddr, 16);
	dk.sport = t->sport;
	dk.proto = t->proto;
	dk.pad = 0;
	dv.expires_ns = now + SVC_DEFER_NS;
	__builtin_memcpy(dv.daddr, t->daddr, 16);
	dv.dport = t->dport;
	dv.pad = 0;
	dv.endpoint_id = endpoint_id;
	bpf_map_update_elem(&svc_deferred, &dk, &dv, BPF_ANY);
	return 1;
}

/* Both judgements of a Service flow on its backend: egress of the client, then ingress of the
 * backend when it is an endpoint here. `d` receives the deciding one (the denial, or the
 * client's egress decision when both allow); `ingress` the backend's when it was judged. */
static __always_inline void svc_decide(__u32 client_id, const __u32 *caddr, const __u32 *baddr,
				       __u8 proto, __u16 port, struct decision *d,
				       struct decision *ingress)
{
	struct endpoint_value *backend;

	ingress->judged = 0;
	policy_decide_endpoint(client_id, baddr, proto, port, DIR_EGRESS, 0, d);
	if (d->action == ACTION_DENY)
		return;
	backend = endpoint_lookup(baddr);
	if (backend)
		policy_decide_endpoint(backend->id, caddr, proto, port, DIR_INGRESS, 0, ingress);
}

/* conntrack.h, revalidating an entry after a policy change: the client's entry of a Service
 * flow is judged again on its backend, a masqueraded flow's entry at a local backend on the
 * client it really came from. Returns 1 when `k` is one (and `d` is set). */
static __always_inline int svc_revalidate(const struct ct_key *k, struct decision *d)
{
	struct svc_flow_value *v;
	struct decision in;

	v = bpf_map_lookup_elem(&svc_flows, k);
	if (!v)
		return 0;
	if (k->dir == DIR_INGRESS) {
		policy_decide_endpoint(v->endpoint_id, v->peer, k->proto, v->port, DIR_INGRESS, 0, d);
		return 1;
	}
	svc_decide(v->endpoint_id, k->saddr, v->peer, k->proto, v->port, d, &in);
	if (d->action != ACTION_DENY && in.judged && in.action == ACTION_DENY)
		*d = in;
	return 1;
}

#endif /* STOCKADE_SERVICES */

/* Service traffic judged at the client's veth (fallback mode, kernels without BPF netfilter).
 *
 * With STOCKADE_SERVICE_FALLBACK, the `svc_space` trie holds the Service address space as in
 * netfilter mode, and the `svc_verdict` hash holds the operator's verdict for each
 * (client endpoint, Service address, protocol, Service port): ALLOW only when the client's
 * egress allows every ready backend of that Service port on its target port, DENY otherwise
 * (stockade.compiler.fallback). The veth program looks it up for a new TCP/UDP/SCTP flow from
 * a pod to Service space, before the policy lookups: a hit decides the flow (a drop event says
 * REASON_SERVICE or REASON_SERVICE_NO_BACKENDS), a miss is judged by policy as any flow.
 * Established packets never reach it. The backend's ingress is judged at its own veth after
 * DNAT, as for any flow. */
#if STOCKADE_SERVICE_FALLBACK
#define SVC_VERDICT_NO_BACKENDS 1

struct svc_verdict_key {
	__u32 endpoint_id;
	__u8 proto;
	__u8 pad;
	__u16 port;	/* host order */
	__u32 addr[4];	/* the Service address, IPv4-mapped for IPv4 */
};

struct svc_verdict_value {
	__u32 rule_id;
	__u8 action;
	__u8 flags;	/* SVC_VERDICT_* */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STOCKADE_SERVICE_VERDICTS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_verdict_key);
	__type(value, struct svc_verdict_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} svc_verdict SEC(".maps");

/* The fallback's verdict for endpoint `endpoint_id`'s flow to `daddr` (port in host order).
 * Returns 0 when there is none, else 1 (with no ready backend: 2) and sets `d`. */
static __always_inline int svc_fallback(__u32 endpoint_id, const __u32 *daddr, __u8 proto,
					__u16 port, struct decision *d)
{
	struct svc_verdict_key k = {};
	struct svc_verdict_value *v;
	struct svc_space_value *sv;
	struct class_key ck;

	if (!is_ported(proto))
		return 0;
	/* Service space first: a trie of a few prefixes, cheaper than the hash below for the
	 * flows that go elsewhere (most) */
	ck.prefixlen = CLASS_KEY_BITS;
	__builtin_memcpy(ck.addr, daddr, 16);
	sv = bpf_map_lookup_elem(&svc_space, &ck);
	if (!sv || (sv->port_max && (port < sv->port_min || port > sv->port_max)))
		return 0;
	k.endpoint_id = endpoint_id;
	k.proto = proto;
	k.port = port;
	__builtin_memcpy(k.addr, daddr, 16);
	v = bpf_map_lookup_elem(&svc_verdict, &k);
	if (!v)
		return 0;
	d->endpoint_id = endpoint_id;
	d->rule_id = v->rule_id;
	d->action = v->action;
	d->audit_rule_id = 0;
	d->audit_action = ACTION_NONE;
	d->judged = 1;
	return v->flags & SVC_VERDICT_NO_BACKENDS ? 2 : 1;
}

/* conntrack.h, revalidating an entry after a policy change: a flow to a Service address is
 * judged again by the fallback's verdict. Returns 1 when there is one (and `d` is set). */
static __always_inline int svc_fallback_revalidate(const struct ct_key *k, __u16 port,
						   struct decision *d)
{
	struct endpoint_value *ep;

	if (k->dir != DIR_EGRESS)
		return 0;
	ep = endpoint_lookup(k->saddr);
	return ep && svc_fallback(ep->id, k->daddr, k->proto, port, d);
}
#endif /* STOCKADE_SERVICE_FALLBACK */
