/* The per-packet pipeline shared by both entry programs: parse, pass what is always allowed,
 * conntrack, policy, attribution, verdict.
 *
 * Verdicts: allow returns -1 (TC_ACT_UNSPEC for a legacy tc filter, TCX_NEXT for a tcx link), so
 * that programs after stockade's (the CNI's) still run; TC_ACT_OK would skip them. Deny returns
 * TC_ACT_SHOT.
 *
 * Always allowed: ARP, packets toward a pod whose destination is no endpoint of this node,
 * traffic the node's own stack sends from one of its addresses on INGRESS (policy.h,
 * from_host), replies and related ICMP errors of allowed flows (conntrack.h).
 * ICMPv6 neighbour discovery and MLD are never judged by policy: what RFC 4861 and RFC 3810 let
 * through on-link passes, the rest drops with REASON_NOT_ON_LINK (parse.h,
 * icmpv6_control_check: hop limit 255 for ND, 1 for MLD, link-local sources where required).
 * Always dropped from a pod (EGRESS), with REASON_NOT_A_ROUTER: ICMP and ICMPv6 redirects and
 * ICMPv6 router advertisements. A pod is no router; a redirect or advertisement from one can
 * only be spoofing (RFC 4861 §6, §8: only routers send them). ICMP redirects toward a pod are
 * never related to a flow: they are judged by policy.
 * A pending interface (the `pending` map, maps.h: attached before the pod's tables were
 * applied) is judged by its state alone, after the checks above and before any other: with
 * PENDING_OPEN everything passes; with PENDING_CLOSED only what is always allowed passes, that
 * is ARP and valid on-link ND (above), IP traffic the node's own stack sends (from_host) from
 * one of its addresses, and the pod's packets toward those addresses (its peer class carries
 * CLASS_FLAG_LOCAL_NODE), so that kubelet probes get their replies;
 * everything else drops with REASON_PENDING, rule 0. A packet from a CLOSED pending pod
 * whose source is an endpoint's address drops with REASON_SPOOFED first (the pod has no
 * endpoint yet, so that address is another pod's). Conntrack is neither consulted nor
 * written for it: a pod racing its own enforcement can plant nothing.
 * Always dropped from a pod, with REASON_SPOOFED, before conntrack: an IP packet whose source is
 * not an address of the endpoint the interface is bound to (the `bindings` map, maps.h); for
 * ICMPv6 link control, one whose source is neither that nor link-local nor unspecified (a
 * neighbour solicitation or advertisement from another pod's address).
 * Always dropped, before any lookup (there may be no addresses to look up), with their own
 * reason: frames that are neither ARP nor IP this program parses (REASON_UNPARSED: another
 * ethertype, VLAN tags it does not walk, IPv6 without STOCKADE_IPV6; parse.h says why), and
 * frames whose IP header cannot be parsed (REASON_MALFORMED).
 * Dropped whatever the policy, when the local address is an endpoint: packets whose transport
 * header cannot be parsed (one split across fragments included).
 * Dropped after the policy allowed it, with REASON_CT_BUDGET and the allowing rule: the first
 * packet of a new flow whose endpoint holds its budget of conntrack entries (conntrack.h).
 *
 * Non-first fragments carry no ports; only a datagram's first fragment does, and it is judged
 * like any packet. What happens to the others, when the local address is an endpoint:
 * - STOCKADE_FRAGMENTS_TRACK (the default): the verdict on the first fragment is recorded in the
 *   `fragments` map under the datagram (addresses, protocol, identification, hook direction);
 *   the non-first fragments of that datagram follow it: allowed ones pass, denied ones drop with
 *   REASON_FRAGMENT and the first fragment's rule. A non-first fragment with no recorded first
 *   fragment (reordered before it, expired, or crafted) drops with REASON_FRAGMENT, rule 0.
 *   Only a first fragment the hook judged is recorded: from a pod after the source check, to a
 *   pod only when its destination is an endpoint (conntrack entries belong to endpoints' flows).
 * - STOCKADE_FRAGMENTS_PASS: they pass unjudged.
 * - neither: they drop (REASON_FRAGMENT), and no fragmented datagram arrives.
 */
#pragma once

#include "parse.h"
#include "maps.h"
#include "policy.h"
#include "events.h"
#include "conntrack.h"

#define VERDICT_PASS (-1)
#define VERDICT_DROP 2

#if !defined(STOCKADE_FRAGMENTS_PASS) || !defined(STOCKADE_FRAGMENTS_TRACK)
#error "STOCKADE_FRAGMENTS_PASS and STOCKADE_FRAGMENTS_TRACK must be defined by the rendered program"
#endif

#if STOCKADE_FRAGMENTS_TRACK
static __always_inline void frag_key_set(struct frag_key *k, const struct flow *f, __u32 dir)
{
	__builtin_memcpy(k->saddr, f->t.saddr, 16);
	__builtin_memcpy(k->daddr, f->t.daddr, 16);
	k->id = f->frag_id;
	k->proto = f->t.proto;
	k->dir = dir;
	k->pad = 0;
}

/* Record the verdict on a first fragment for the rest of its datagram; other packets, nothing. */
static __always_inline void frag_record(const struct flow *f, __u32 dir, __u8 action,
					__u32 rule_id)
{
	struct frag_key k;
	struct frag_entry e = {};

	if (f->frag != FRAG_FIRST)
		return;
	frag_key_set(&k, f, dir);
	e.expires_ns = bpf_ktime_get_coarse_ns() + FRAG_TIMEOUT_NS;
	e.rule_id = rule_id;
	e.action = action;
	bpf_map_update_elem(&fragments, &k, &e, BPF_ANY);
}

/* The live verdict recorded for a non-first fragment's datagram, or NULL. */
static __always_inline struct frag_entry *frag_find(const struct flow *f, __u32 dir)
{
	struct frag_key k;
	struct frag_entry *e;

	frag_key_set(&k, f, dir);
	e = bpf_map_lookup_elem(&fragments, &k);
	if (!e)
		return NULL;
	if (e->expires_ns < bpf_ktime_get_coarse_ns()) {
		bpf_map_delete_elem(&fragments, &k);
		return NULL;
	}
	return e;
}
#else
static __always_inline void frag_record(const struct flow *f, __u32 dir, __u8 action,
					__u32 rule_id)
{
	(void)f, (void)dir, (void)action, (void)rule_id;
}
#endif

/* Whether the node's own network stack sent the packet: it arrived on no interface (a
 * forwarded packet, SNATed to a node address or not, carries the interface it came in on). */
static __always_inline __u8 from_host(const struct __sk_buff *skb)
{
	return skb->ingress_ifindex == 0;
}

/* The endpoint a packet leaving a pod comes from, or NULL when its source address is not one of
 * the endpoint its interface is bound to: a spoofed source would borrow another pod's egress
 * policy (or escape any, with an address that is no endpoint) and could plant a conntrack entry
 * that later passes as the reply of a flow. */
static __always_inline struct endpoint_value *bound_sender(struct __sk_buff *skb,
							  const struct flow *f)
{
	__u32 ifindex = skb->ifindex;
	__u32 *bound = bpf_map_lookup_elem(&bindings, &ifindex);
	struct endpoint_value *ep;

	if (!bound)
		return NULL;
	ep = endpoint_lookup(f->t.saddr);
	if (!ep || ep->id != *bound)
		return NULL;
	return ep;
}

/* The state of a pending interface: 0 when it is not pending. Most interfaces are not, and
 * their slot in `pending_hint` says so without a hash lookup (maps.h). */
static __always_inline __u32 pending_state(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	__u32 slot = ifindex % HINT_SLOTS;
	__u32 *hint = bpf_map_lookup_elem(&pending_hint, &slot);
	__u32 *state;

	if (hint && *hint == 0)
		return 0;
	state = bpf_map_lookup_elem(&pending, &ifindex);

	return state ? *state : 0;
}

/* A pending interface's verdict on an IP packet (the remote address is the node's own). */
static __always_inline int pending_verdict(struct __sk_buff *skb, const struct flow *f,
					   __u32 dir, __u32 state)
{
	struct class_value *cls;

	if (state == PENDING_OPEN)
		return VERDICT_PASS;
	/* A pending pod has no endpoint yet: a source that is some endpoint's is another pod's. */
	if (dir == DIR_EGRESS && endpoint_lookup(f->t.saddr)) {
		emit_drop(skb, f, dir, REASON_SPOOFED, 0, 0);
		return VERDICT_DROP;
	}
	cls = class_lookup(dir == DIR_EGRESS ? f->t.daddr : f->t.saddr);
	if (cls && (cls->flags & CLASS_FLAG_LOCAL_NODE) && (dir == DIR_EGRESS || from_host(skb)))
		return VERDICT_PASS;
	emit_drop(skb, f, dir, REASON_PENDING, 0, 0);
	return VERDICT_DROP;
}

/* Conntrack comes before the endpoint lookup: an established flow or a reply passes either
 * way, and most packets are one, so they pay one conntrack lookup and nothing else (from a pod,
 * the source check's two lookups come first). Time is the monotonic clock at one scheduler
 * tick of resolution, read from the jiffies count (conntrack.h, ct_now): entries live for
 * seconds, and the precise clock costs far more per call. */
static __always_inline int stockade_hook(struct __sk_buff *skb, __u32 dir)
{
	struct flow f = {};
	struct decision d;
	int svc = 0; /* 1: the Service fallback decided; 2: it found no ready backend */
	struct endpoint_value *ep = NULL;
	enum parse_result r = parse_packet(skb, &f);
	__u32 pending_st;

	if (dir == DIR_EGRESS && (r == PARSE_IP || r == PARSE_CONTROL) &&
	    icmp_is_redirect(f.t.proto, f.port >> 8)) {
		emit_drop(skb, &f, dir, REASON_NOT_A_ROUTER, 0, 0);
		return VERDICT_DROP;
	}
	if (r == PARSE_CONTROL) {
		enum control_check c = icmpv6_control_check(&f, dir == DIR_EGRESS);

		if (c == CONTROL_OK && dir == DIR_EGRESS && !addr_is_link_local(f.t.saddr) &&
		    !addr_is_unspecified(f.t.saddr) && !bound_sender(skb, &f)) {
			emit_drop(skb, &f, dir, REASON_SPOOFED, 0, 0);
			return VERDICT_DROP;
		}
		if (c == CONTROL_OK)
			return VERDICT_PASS;
		emit_drop(skb, &f, dir,
			  c == CONTROL_NOT_A_ROUTER ? REASON_NOT_A_ROUTER : REASON_NOT_ON_LINK, 0, 0);
		return VERDICT_DROP;
	}
	if (r == PARSE_PASS)
		return VERDICT_PASS;
	if (r == PARSE_UNPARSED) {
		emit_drop(skb, &f, dir, REASON_UNPARSED, 0, 0);
		return VERDICT_DROP;
	}
	if (r == PARSE_MALFORMED) {
		emit_drop(skb, &f, dir, REASON_MALFORMED, 0, 0);
		return VERDICT_DROP;
	}
	pending_st = pending_state(skb);
	if (pending_st)
		return pending_verdict(skb, &f, dir, pending_st);
	if (dir == DIR_EGRESS) {
		ep = bound_sender(skb, &f);
		if (!ep) {
			emit_drop(skb, &f, dir, REASON_SPOOFED, 0, 0);
			return VERDICT_DROP;
		}
	}
#if STOCKADE_CONNTRACK
	struct config *cfg = config_get();
	__u64 now = 0;

	if (cfg && r == PARSE_IP) {
		now = ct_now(cfg);
		if (ct_lookup(&f, dir, cfg, now) != CT_NEW) {
			frag_record(&f, dir, ACTION_ALLOW, 0);
			return VERDICT_PASS;
		}
	}
#endif
	if (dir != DIR_EGRESS)
		ep = endpoint_lookup(f.t.daddr);
	if (!ep)
		return VERDICT_PASS;
	if (r == PARSE_FRAGMENT) {
		__u32 frag_rule = 0;

#if STOCKADE_FRAGMENTS_TRACK
		struct frag_entry *fe = frag_find(&f, dir);

		if (fe) {
			if (fe->action == ACTION_ALLOW)
				return VERDICT_PASS;
			frag_rule = fe->rule_id;
		}
#else
		if (STOCKADE_FRAGMENTS_PASS)
			return VERDICT_PASS;
#endif
		emit_drop(skb, &f, dir, REASON_FRAGMENT, frag_rule, ep->id);
		return VERDICT_DROP;
	}
	if (r == PARSE_L4_MALFORMED) {
		emit_drop(skb, &f, dir, REASON_MALFORMED, 0, ep->id);
		return VERDICT_DROP;
	}
#if STOCKADE_CONNTRACK
	if (!cfg)
		return VERDICT_DROP;
#endif
#if STOCKADE_SERVICES
	/* a new flow to Service space is judged on its backend, after DNAT (service.h) */
	if (dir == DIR_EGRESS && r == PARSE_IP && svc_defer(&f, ep->id, now)) {
		frag_record(&f, dir, ACTION_ALLOW, 0);
		return VERDICT_PASS;
	}
#endif
#if STOCKADE_SERVICE_FALLBACK
	/* a new flow to a Service address: the operator's verdict over its backends (service.h) */
	svc = dir == DIR_EGRESS ? svc_fallback(ep->id, f.t.daddr, f.t.proto, f.port, &d) : 0;
	if (!svc)
#endif
		policy_decide_endpoint(ep->id, dir == DIR_EGRESS ? f.t.daddr : f.t.saddr,
				       f.t.proto, f.port, dir, from_host(skb), &d);
	account_decision(skb, &f, dir, &d);
	if (d.action == ACTION_DENY) {
		frag_record(&f, dir, ACTION_DENY, d.rule_id);
		emit_drop(skb, &f, dir,
			  svc == 2 ? REASON_SERVICE_NO_BACKENDS : svc ? REASON_SERVICE : REASON_POLICY,
			  d.rule_id, d.endpoint_id);
		return VERDICT_DROP;
	}
#if STOCKADE_CONNTRACK
	if (ct_create(&f, dir, &d, cfg, now) < 0) {
		frag_record(&f, dir, ACTION_DENY, d.rule_id);
		emit_drop(skb, &f, dir, REASON_CT_BUDGET, d.rule_id, d.endpoint_id);
		return VERDICT_DROP;
	}
#endif
	frag_record(&f, dir, ACTION_ALLOW, d.rule_id);
	return VERDICT_PASS;
}
