/* Attribution: per-rule counters of decisions and a ring buffer of drop and audit events that
 * name the deciding rule id, the direction and the 5-tuple. The agent maps rule ids back to
 * policies with the RuleInfo table that only the Python side holds.
 */
#pragma once

#include "maps.h"
#include "policy.h"

#ifndef STOCKADE_DROP_EVENTS
#error "STOCKADE_DROP_EVENTS must be defined by the rendered program"
#endif
#ifndef STOCKADE_AUDIT_EVENTS
#error "STOCKADE_AUDIT_EVENTS must be defined by the rendered program"
#endif

enum event_kind {
	EVENT_DROP = 1,		/* the packet was dropped */
	EVENT_AUDIT = 2,	/* an Audit-mode policy would have dropped it; it passed */
};

enum drop_reason {
	REASON_POLICY = 0,	/* a policy entry denied it: rule_id names the rule */
	REASON_MALFORMED = 1,	/* headers could not be parsed */
	REASON_FRAGMENT = 2,	/* a non-first fragment, with fragments set to drop */
	REASON_UNPARSED = 3,	/* neither ARP nor IP the program parses (parse.h): another
				 * ethertype, unwalked VLAN tags, IPv6 when disabled */
	REASON_NOT_A_ROUTER = 4,	/* a pod sent what only a router may send: an ICMP or
					 * ICMPv6 redirect, an ICMPv6 router advertisement */
	REASON_SPOOFED = 5,	/* a pod sent from an address that is not its own */
	REASON_NOT_ON_LINK = 6,	/* ICMPv6 neighbour discovery or MLD that RFC 4861 / RFC 3810
				 * do not let through on-link (parse.h) */
	REASON_CT_BUDGET = 7,	/* a new flow of an endpoint that holds its budget of conntrack
				 * entries (conntrack.h) */
	REASON_PENDING = 8,	/* the pod's interface is pending: its tables are not applied */
	REASON_SERVICE = 9,	/* the Service fallback denied a flow to a Service address: a
				 * ready backend is denied by rule_id (service.h) */
	REASON_SERVICE_NO_BACKENDS = 10,	/* the Service fallback: no ready backend */
};

/* Layout mirrored by operator/stockade/compiler/abi.py. */
struct event {
	__u64 timestamp_ns;
	__u32 rule_id;
	__u32 endpoint_id;
	__u32 ifindex;
	__u8 kind;
	__u8 direction;
	__u8 proto;
	__u8 reason;
	__be16 sport;
	__be16 dport;
	__u16 port;
	__u16 pad;
	__u32 saddr[4];
	__u32 daddr[4];
};

static __always_inline void count_rule(__u32 rule_id, __u32 bytes)
{
	struct rule_counter *c = bpf_map_lookup_elem(&counters, &rule_id);

	if (c) {
		c->packets += 1;
		c->bytes += bytes;
	}
}

static __always_inline void emit_event(struct __sk_buff *skb, const struct flow *f, __u32 dir,
				       __u8 kind, __u8 reason, __u32 rule_id, __u32 endpoint_id)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	__u32 zero = 0;
	__u64 *lost;

	if (!e) {
		/* ring full: the rule counters still count the decision; the event is counted lost */
		lost = bpf_map_lookup_elem(&events_lost, &zero);
		if (lost)
			*lost += 1;
		return;
	}
	e->timestamp_ns = bpf_ktime_get_ns();
	e->rule_id = rule_id;
	e->endpoint_id = endpoint_id;
	e->ifindex = skb->ifindex;
	e->kind = kind;
	e->direction = dir;
	e->proto = f->t.proto;
	e->reason = reason;
	e->sport = f->t.sport;
	e->dport = f->t.dport;
	e->port = f->port;
	e->pad = 0;
	__builtin_memcpy(e->saddr, f->t.saddr, 16);
	__builtin_memcpy(e->daddr, f->t.daddr, 16);
	bpf_ringbuf_submit(e, 0);
}

static __always_inline void emit_drop(struct __sk_buff *skb, const struct flow *f, __u32 dir,
				      __u8 reason, __u32 rule_id, __u32 endpoint_id)
{
#if STOCKADE_DROP_EVENTS
	emit_event(skb, f, dir, EVENT_DROP, reason, rule_id, endpoint_id);
#else
	(void)skb, (void)f, (void)dir, (void)reason, (void)rule_id, (void)endpoint_id;
#endif
}

/* Count a decision for its rule and, when an Audit-mode policy had another opinion, for the
 * audit rule too; emit the audit event when the audit opinion is a drop that did not happen. */
static __always_inline void account_decision(struct __sk_buff *skb, const struct flow *f,
					     __u32 dir, const struct decision *d)
{
	count_rule(d->rule_id, skb->len);
	if (d->audit_action != ACTION_NONE && d->audit_rule_id != d->rule_id)
		count_rule(d->audit_rule_id, skb->len);
#if STOCKADE_AUDIT_EVENTS
	if (d->action != ACTION_DENY && d->audit_action == ACTION_DENY)
		emit_event(skb, f, dir, EVENT_AUDIT, REASON_POLICY, d->audit_rule_id,
			   d->endpoint_id);
#else
	(void)f, (void)dir;
#endif
}
