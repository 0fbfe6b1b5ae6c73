/* The per-packet pipeline shared by both entry programs: parse, pass what is always allowed,
 * conntrack, policy, attribution, verdict.
 *
 * Verdicts: allow returns -1 (TC_ACT_UNSPEC for a legacy tc filter, TCX_NEXT for a tcx link), so
 * that programs after stockade's (the CNI's) still run; TC_ACT_OK would skip them. Deny returns
 * TC_ACT_SHOT.
 *
 * Always allowed: ARP, ICMPv6 neighbour discovery and link-local control, packets toward a pod
 * whose destination is no endpoint of this node, traffic from the node itself on INGRESS
 * (policy.h), replies and related ICMP errors of allowed flows (conntrack.h).
 * Always dropped from a pod (EGRESS), with REASON_NOT_A_ROUTER: ICMP and ICMPv6 redirects. A pod
 * is no router; a redirect from one can only be spoofing (RFC 4861 §8: only the first-hop router
 * sends them). Redirects toward a pod are never related to a flow: they are judged by policy.
 * Always dropped from a pod, with REASON_SPOOFED, before conntrack: an IP packet whose source is
 * not an address of the endpoint the interface is bound to (the `bindings` map, maps.h).
 * Always dropped, before any lookup (there may be no addresses to look up), with their own
 * reason: frames that are neither ARP nor IP this program parses (REASON_UNPARSED: another
 * ethertype, VLAN tags it does not walk, IPv6 without STOCKADE_IPV6; parse.h says why), and
 * frames whose IP header cannot be parsed (REASON_MALFORMED).
 * Dropped whatever the policy, when the local address is an endpoint: packets whose transport
 * header cannot be parsed (one split across fragments included), and non-first fragments unless
 * STOCKADE_FRAGMENTS_PASS (their first fragment carries the ports and is judged; without it the
 * destination cannot reassemble the datagram).
 */
#pragma once

#include "parse.h"
#include "maps.h"
#include "policy.h"
#include "events.h"
#include "conntrack.h"

#define VERDICT_PASS (-1)
#define VERDICT_DROP 2

#ifndef STOCKADE_FRAGMENTS_PASS
#error "STOCKADE_FRAGMENTS_PASS must be defined by the rendered program"
#endif

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

/* Conntrack comes before the endpoint lookup: an established flow or a reply passes either
 * way, and most packets are one, so they pay one conntrack lookup and nothing else (from a pod,
 * the source check's two lookups come first). Time is the coarse monotonic clock (one scheduler
 * tick of resolution): entries live for seconds, and the precise clock costs about twice as
 * much per call. */
static __always_inline int stockade_hook(struct __sk_buff *skb, __u32 dir)
{
	struct flow f = {};
	struct decision d;
	struct endpoint_value *ep = NULL;
	enum parse_result r = parse_packet(skb, &f);

	if (dir == DIR_EGRESS && (r == PARSE_IP || r == PARSE_CONTROL) &&
	    icmp_is_redirect(f.t.proto, f.port >> 8)) {
		emit_drop(skb, &f, dir, REASON_NOT_A_ROUTER, 0, 0);
		return VERDICT_DROP;
	}
	if (r == PARSE_PASS || r == PARSE_CONTROL)
		return VERDICT_PASS;
	if (r == PARSE_UNPARSED) {
		emit_drop(skb, &f, dir, REASON_UNPARSED, 0, 0);
		return VERDICT_DROP;
	}
	if (r == PARSE_MALFORMED) {
		emit_drop(skb, &f, dir, REASON_MALFORMED, 0, 0);
		return VERDICT_DROP;
	}
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
		now = bpf_ktime_get_coarse_ns();
		if (ct_lookup(&f, dir, cfg, now) != CT_NEW)
			return VERDICT_PASS;
	}
#endif
	if (dir != DIR_EGRESS)
		ep = endpoint_lookup(f.t.daddr);
	if (!ep)
		return VERDICT_PASS;
	if (r == PARSE_FRAGMENT) {
		if (STOCKADE_FRAGMENTS_PASS)
			return VERDICT_PASS;
		emit_drop(skb, &f, dir, REASON_FRAGMENT, 0, ep->id);
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
	policy_decide_endpoint(ep->id, dir == DIR_EGRESS ? f.t.daddr : f.t.saddr, f.t.proto, f.port,
			       dir, &d);
	account_decision(skb, &f, dir, &d);
	if (d.action == ACTION_DENY) {
		emit_drop(skb, &f, dir, REASON_POLICY, d.rule_id, d.endpoint_id);
		return VERDICT_DROP;
	}
#if STOCKADE_CONNTRACK
	ct_create(&f, dir, &d, cfg, now);
#endif
	return VERDICT_PASS;
}
