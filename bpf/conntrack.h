/* Connection tracking: replies and related ICMP errors of allowed flows pass without a policy
 * lookup; established flows skip it too.
 *
 * - An allowed new flow is recorded under its original tuple and the direction of the hook
 *   that judged it. A packet whose tuple is recorded for this direction is established; a
 *   packet whose reverse tuple is recorded for the opposite direction is a reply. A new
 *   connection in the reverse direction is therefore still judged.
 * - One lookup finds both: a flow and the reverse tuple's flow in the opposite direction share
 *   one map entry (maps.h: the tuple ordered, its two slots), so an established packet and a
 *   reply each cost one lookup. Only a tuple equal to its own reverse (same address and port
 *   at both ends) needs a second one for a reply; ICMP errors look up the flow they quote.
 * - An established packet writes the entry only when its TCP state changes or its expiry
 *   moves by more than a 64th of the timeout (ct_refresh).
 * - ICMP echo is tracked by identifier: an echo reply matches the request it answers.
 * - An ICMP error is related when the packet it quotes belongs to a recorded flow and the error
 *   travels back along that flow: from the quoted packet's destination to its source (outer
 *   source == inner destination, outer destination == inner source), judged in the direction of
 *   the flow's replies or originals it answers. An error from anyone else (a router on the path
 *   included: an intermediate hop's "packet too big" or "time exceeded") is not related and is
 *   judged by policy like any other ICMP, so a policy that should let such errors in must allow
 *   those ICMP types from those sources. Without this check any address could reach a pod with an
 *   allowed flow by quoting that flow's tuple in front of an arbitrary payload.
 *   Redirects are no errors (parse.h) and never related.
 * - Entries expire after the timeout of their protocol (config map, 0 = built-in default), on
 *   the clock ct_now reads.
 * - TCP state, enough that one side's crafted segments cannot shape an entry:
 *   - A TCP entry has the long timeout only once the other side has replied (CT_TCP_REPLIED;
 *     an RST is no answer):
 *     until then (a SYN, or a mid-stream segment the policy allowed) the short closing timeout
 *     applies, refreshed by each packet. A bare ACK is thus judged as new, and if allowed makes
 *     a short-lived entry that a real peer's answer turns into an established one.
 *   - A SYN without ACK is never a reply: it is a new connection toward the side that sent the
 *     flow's first packet, judged by policy.
 *   - An RST opens nothing. An RST on an entry switches it to the closing timeout until the next
 *     packet without RST in either direction: a real reset ends the flow, so nothing comes
 *     after it and the entry expires; a forged one is undone by the flow's next packet.
 *   - FIN: the closing timeout once both sides have sent one (CT_TCP_FIN_ORIG and _REPLY); a
 *     FIN from one side (a half-close, or a forged one) changes nothing.
 * - Per-endpoint budget (STOCKADE_CONNTRACK_PER_ENDPOINT, 0 = none): an entry belongs to the
 *   endpoint whose hook created it (`owner`, the local endpoint). An endpoint holding its budget
 *   of entries creates no more: the packet of an allowed new flow is dropped (the hook's
 *   REASON_CT_BUDGET), so a pod that opens many flows fills its own budget and cannot make the
 *   LRU evict the other pods' entries. The counts (`ct_owned`) follow the programs' own
 *   creations and deletions; the LRU's evictions and expired entries nobody looked up again are
 *   recounted by the agent (operator/stockade/agent/conntrack.py).
 * - The LRU evicts the least recently used entries when the table is full.
 *
 * Policy changes (config.ct_mode):
 * - CT_MODE_REVALIDATE (0, the default): every entry carries the policy epoch it was judged in.
 *   The agent bumps config.epoch after each policy or peer-class write; the next packet of an
 *   entry with an older epoch re-runs the policy lookup for the flow's original tuple and
 *   direction. Still allowed: the entry is renewed. Now denied: the entry is deleted and the
 *   packet is judged as a new flow. A new deny therefore also cuts established connections,
 *   which is what an operator applying a deny expects; the cost is one lookup per flow per
 *   epoch.
 * - CT_MODE_KEEP (1): established flows stay allowed until they expire.
 */
#pragma once

#include "maps.h"
#include "policy.h"
#include "service.h"

#if STOCKADE_CONNTRACK

enum ct_mode {
	CT_MODE_REVALIDATE = 0,
	CT_MODE_KEEP = 1,
};

enum ct_state {
	CT_NEW = 0,
	CT_ESTABLISHED = 1,
	CT_REPLY = 2,
	CT_RELATED = 3,
};

#define CT_DEFAULT_TCP_NS (21600ULL * 1000000000ULL)
#define CT_DEFAULT_TCP_CLOSING_NS (10ULL * 1000000000ULL)
#define CT_DEFAULT_UDP_NS (60ULL * 1000000000ULL)
#define CT_DEFAULT_ICMP_NS (30ULL * 1000000000ULL)
#define CT_DEFAULT_OTHER_NS (60ULL * 1000000000ULL)

#ifndef STOCKADE_CONNTRACK_PER_ENDPOINT
#error "STOCKADE_CONNTRACK_PER_ENDPOINT must be defined by the rendered program"
#endif

/* ct_entry.tcp */
#define CT_TCP_REPLIED 1	/* the other side answered (not with a bare SYN nor an RST) */
#define CT_TCP_FIN_ORIG 2	/* FIN seen from the flow's originator */
#define CT_TCP_FIN_REPLY 4	/* FIN seen from the other side */
#define CT_TCP_RST 8		/* the last packet carried RST */

/* Whether a TCP entry in state `s` has the short timeout. */
static __always_inline __u8 ct_tcp_closing(__u8 s)
{
	return !(s & CT_TCP_REPLIED) || (s & CT_TCP_RST) ||
	       (s & (CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY)) == (CT_TCP_FIN_ORIG | CT_TCP_FIN_REPLY);
}

/* The TCP state after a packet with `flags`, in the flow's `reply` direction or not. */
static __always_inline __u8 ct_tcp_next(__u8 s, __u8 flags, int reply)
{
	if (reply && !(flags & TCP_FLAG_RST))
		s |= CT_TCP_REPLIED;
	if (flags & TCP_FLAG_RST)
		s |= CT_TCP_RST;
	else
		s &= ~CT_TCP_RST;
	if (flags & TCP_FLAG_FIN)
		s |= reply ? CT_TCP_FIN_REPLY : CT_TCP_FIN_ORIG;
	return s;
}

/* A bare SYN (no ACK): the opening of a connection, never a reply. */
static __always_inline int tcp_is_bare_syn(const struct flow *f)
{
	return f->t.proto == IPPROTO_TCP &&
	       (f->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

static __always_inline void ct_owned_add(__u32 owner, __s64 delta)
{
	__s64 *n = bpf_map_lookup_elem(&ct_owned, &owner);

	if (n) {
		__sync_fetch_and_add(n, delta);
	} else if (delta > 0) {
		bpf_map_update_elem(&ct_owned, &owner, &delta, BPF_NOEXIST);
	}
}

/* Now, in CLOCK_MONOTONIC nanoseconds at a tick's resolution. The jiffies count costs about a
 * nanosecond to read, the coarse clock about 17; the config says how one is the other
 * (maps.h, struct config). */
static __always_inline __u64 ct_now(const struct config *cfg)
{
	if (cfg->tick_ns)
		return bpf_jiffies64() * cfg->tick_ns - cfg->clock_base_ns;
	return bpf_ktime_get_coarse_ns();
}

static __always_inline __u64 ct_timeout(const struct config *cfg, __u8 proto, __u8 closing)
{
	__u64 t;

	if (proto == IPPROTO_TCP) {
		if (closing) {
			t = cfg->tcp_closing_timeout_ns;
			return t ? t : CT_DEFAULT_TCP_CLOSING_NS;
		}
		t = cfg->tcp_timeout_ns;
		return t ? t : CT_DEFAULT_TCP_NS;
	}
	if (proto == IPPROTO_UDP) {
		t = cfg->udp_timeout_ns;
		return t ? t : CT_DEFAULT_UDP_NS;
	}
	if (proto == IPPROTO_ICMP || proto == PROTO_ICMPV6) {
		t = cfg->icmp_timeout_ns;
		return t ? t : CT_DEFAULT_ICMP_NS;
	}
	t = cfg->other_timeout_ns;
	return t ? t : CT_DEFAULT_OTHER_NS;
}

static __always_inline void ct_key_set(struct ct_key *k, const __u32 *saddr, const __u32 *daddr,
				       __be16 sport, __be16 dport, __u8 proto, __u32 dir)
{
	__builtin_memcpy(k->saddr, saddr, 16);
	__builtin_memcpy(k->daddr, daddr, 16);
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->dir = dir;
	k->pad = 0;
}

/* Whether the tuple (saddr, sport) -> (daddr, dport) is out of the map key's order: the
 * addresses compared as four host-order words, first word first, then the ports as stored.
 * A tuple whose two ends are equal is in order. (maps.py, ct_normalize, mirrors it.) */
static __always_inline int ct_swapped(const __u32 *saddr, const __u32 *daddr, __be16 sport,
				      __be16 dport)
{
	if (saddr[0] != daddr[0])
		return saddr[0] > daddr[0];
	if (saddr[1] != daddr[1])
		return saddr[1] > daddr[1];
	if (saddr[2] != daddr[2])
		return saddr[2] > daddr[2];
	if (saddr[3] != daddr[3])
		return saddr[3] > daddr[3];
	return sport > dport;
}

/* The map key of the flow with original tuple (saddr, sport) -> (daddr, dport) judged in
 * direction `dir` (maps.h), into `k`; returns the flow's slot. */
static __always_inline int ct_key_norm(struct ct_key *k, const __u32 *saddr, const __u32 *daddr,
				       __be16 sport, __be16 dport, __u8 proto, __u32 dir)
{
	if (ct_swapped(saddr, daddr, sport, dport)) {
		ct_key_set(k, daddr, saddr, dport, sport, proto, dir ^ 1);
		return 1;
	}
	ct_key_set(k, saddr, daddr, sport, dport, proto, dir);
	return 0;
}

/* Whether the flow's tuple is its own reverse: both its flows then have slot 0, under keys
 * that differ in `dir` alone. */
static __always_inline int ct_key_symmetric(const struct ct_key *k)
{
	return addr_equal(k->saddr, k->daddr) && k->sport == k->dport;
}

static __always_inline struct ct_flow *ct_slot(struct ct_entry *e, int slot)
{
	return slot ? &e->flow[1] : &e->flow[0];
}

/* Empty a slot (the flow is gone); the entry goes when both are empty. Two CPUs emptying one
 * slot at once both uncount it: the agent's recount puts the count back. */
static __always_inline void ct_clear(const struct ct_key *k, struct ct_entry *e, int slot)
{
	struct ct_flow *fl = ct_slot(e, slot);
	__u32 owner = fl->owner;

	if (fl->expires_ns == 0)
		return;
	fl->expires_ns = 0;
	ct_owned_add(owner, -1);
	if (ct_slot(e, !slot)->expires_ns == 0)
		bpf_map_delete_elem(&conntrack, k);
}

/* The live flow in `slot` of entry `e` (key `k`), or NULL. A dead flow is cleared; in
 * revalidate mode a flow of an older epoch is judged again (and cleared when the policy now
 * denies it). */
static __always_inline struct ct_flow *ct_live(const struct ct_key *k, struct ct_entry *e,
					       int slot, const struct config *cfg, __u64 now)
{
	struct ct_flow *fl = ct_slot(e, slot);
	struct decision d;
	struct ct_key o;

	if (fl->expires_ns == 0)
		return NULL;
	if (fl->expires_ns < now) {
		ct_clear(k, e, slot);
		return NULL;
	}
	if (cfg->ct_mode != CT_MODE_KEEP && fl->epoch != cfg->epoch) {
		/* the flow's original tuple */
		if (slot)
			ct_key_set(&o, k->daddr, k->saddr, k->dport, k->sport, k->proto, k->dir ^ 1);
		else
			o = *k;
#if STOCKADE_SERVICES
		if (!svc_revalidate(&o, &d))
#elif STOCKADE_SERVICE_FALLBACK
		if (!svc_fallback_revalidate(&o, fl->port, &d))
#endif
			policy_decide(o.saddr, o.daddr, o.proto, fl->port, o.dir, &d);
		if (d.action == ACTION_DENY) {
			ct_clear(k, e, slot);
			return NULL;
		}
		fl->epoch = cfg->epoch;
		fl->rule_id = d.rule_id;
	}
	return fl;
}

/* The live flow with original tuple (saddr, sport) -> (daddr, dport) judged in `dir`, or NULL. */
static __always_inline struct ct_flow *ct_find(const __u32 *saddr, const __u32 *daddr,
					       __be16 sport, __be16 dport, __u8 proto, __u32 dir,
					       const struct config *cfg, __u64 now)
{
	struct ct_key k;
	struct ct_entry *e;
	int slot = ct_key_norm(&k, saddr, daddr, sport, dport, proto, dir);

	e = bpf_map_lookup_elem(&conntrack, &k);
	return e ? ct_live(&k, e, slot, cfg, now) : NULL;
}

/* The timeout after a packet of the flow, in its `reply` direction or not. The expiry is
 * written only when it moves by more than a 64th of the timeout (or the TCP state changed),
 * so that most packets of a busy flow read the entry and write nothing. */
static __always_inline void ct_refresh(struct ct_flow *e, const struct flow *f,
				       const struct config *cfg, __u64 now, int reply)
{
	__u64 timeout, expires;

	if (f->t.proto == IPPROTO_TCP) {
		__u8 s = ct_tcp_next(e->tcp, f->tcp_flags, reply);

		if (s != e->tcp) {
			e->tcp = s;
			e->closing = ct_tcp_closing(s);
		}
	}
	timeout = ct_timeout(cfg, f->t.proto, e->closing);
	expires = now + timeout;
	if (expires > e->expires_ns + (timeout >> 6) || expires < e->expires_ns)
		e->expires_ns = expires;
}

static __always_inline enum ct_state ct_lookup(const struct flow *f, __u32 dir,
					       const struct config *cfg, __u64 now)
{
	const struct tuple *t = &f->t;
	struct ct_key k;
	struct ct_entry *e;
	struct ct_flow *fl;
	int slot;

	if (t->icmp_kind == ICMP_KIND_ERROR) {
		const struct tuple *in = &f->inner;

		if (!addr_equal(t->daddr, in->saddr) || !addr_equal(t->saddr, in->daddr))
			return CT_NEW;
		/* the quoted packet was sent by the flow's originator, or is one of its replies */
		if (ct_find(in->saddr, in->daddr, in->sport, in->dport, in->proto, dir ^ 1, cfg, now))
			return CT_RELATED;
		if (ct_find(in->daddr, in->saddr, in->dport, in->sport, in->proto, dir, cfg, now))
			return CT_RELATED;
		return CT_NEW;
	}
	if (t->icmp_kind == ICMP_KIND_ECHO_REPLY) {
		fl = ct_find(t->daddr, t->saddr, t->sport, 0, t->proto, dir ^ 1, cfg, now);
		if (!fl)
			return CT_NEW;
		ct_refresh(fl, f, cfg, now, 1);
		return CT_REPLY;
	}
	/* One lookup: the packet's own flow (established) and the flow it answers (a reply) share
	 * the entry, in its two slots. */
	slot = ct_key_norm(&k, t->saddr, t->daddr, t->sport, t->dport, t->proto, dir);
	e = bpf_map_lookup_elem(&conntrack, &k);
	fl = e ? ct_live(&k, e, slot, cfg, now) : NULL;
	if (fl) {
		ct_refresh(fl, f, cfg, now, 0);
		return CT_ESTABLISHED;
	}
	if (t->icmp_kind == ICMP_KIND_ECHO_REQUEST || tcp_is_bare_syn(f))
		return CT_NEW;
	/* a tuple equal to its reverse: the flow it answers is under the other direction's key */
	if (ct_key_symmetric(&k))
		fl = ct_find(t->daddr, t->saddr, t->dport, t->sport, t->proto, dir ^ 1, cfg, now);
	else
		fl = e ? ct_live(&k, e, !slot, cfg, now) : NULL;
	if (!fl)
		return CT_NEW;
	ct_refresh(fl, f, cfg, now, 1);
	return CT_REPLY;
}

/* Record flow `fl` under its original tuple `o` (a ct_key as ct_key_set writes it).
 * `replace`: a live flow there already is overwritten (keeping its count), else kept. Returns 1
 * when the flow took an empty slot, which the caller counts against `fl->owner`, else 0. */
static __always_inline int ct_put(const struct ct_key *o, const struct ct_flow *fl, int replace)
{
	struct ct_key k;
	struct ct_entry fresh = {};
	struct ct_entry *e;
	struct ct_flow *dst;
	int slot = ct_key_norm(&k, o->saddr, o->daddr, o->sport, o->dport, o->proto, o->dir);

	/* most new flows have no entry yet: try to make it first, look it up when it exists */
	*ct_slot(&fresh, slot) = *fl;
	if (bpf_map_update_elem(&conntrack, &k, &fresh, BPF_NOEXIST) == 0)
		return 1;
	e = bpf_map_lookup_elem(&conntrack, &k);
	if (!e)
		return 0;
	dst = ct_slot(e, slot);
	if (dst->expires_ns) {
		if (replace)
			*dst = *fl;
		return 0;
	}
	*dst = *fl;
	return 1;
}

/* Remove the flow with original tuple `o` (a ct_key as ct_key_set writes it), if recorded. */
static __always_inline void ct_forget(const struct ct_key *o)
{
	struct ct_key k;
	struct ct_entry *e;
	int slot = ct_key_norm(&k, o->saddr, o->daddr, o->sport, o->dport, o->proto, o->dir);

	e = bpf_map_lookup_elem(&conntrack, &k);
	if (e)
		ct_clear(&k, e, slot);
}

/* Record an allowed new flow, against the budget of the endpoint that judged it (`d`). Echo
 * replies, ICMP errors and TCP resets start no flow. Returns -1 when the endpoint holds its
 * budget of entries already (the flow is then not recorded), else 0. */
static __always_inline int ct_create(const struct flow *f, __u32 dir, const struct decision *d,
				     const struct config *cfg, __u64 now)
{
	const struct tuple *t = &f->t;
	struct ct_key o;
	struct ct_flow e = {};
	__u32 owner = d->endpoint_id;

	if (t->icmp_kind == ICMP_KIND_ECHO_REPLY || t->icmp_kind == ICMP_KIND_ERROR)
		return 0;
	if (t->proto == IPPROTO_TCP && (f->tcp_flags & TCP_FLAG_RST))
		return 0;
#if STOCKADE_CONNTRACK_PER_ENDPOINT
	__s64 *held = bpf_map_lookup_elem(&ct_owned, &owner);

	if (held && *held >= STOCKADE_CONNTRACK_PER_ENDPOINT)
		return -1;
#endif
	ct_key_set(&o, t->saddr, t->daddr, t->sport, t->dport, t->proto, dir);
	if (t->proto == IPPROTO_TCP) {
		e.tcp = ct_tcp_next(0, f->tcp_flags, 0);
		e.closing = ct_tcp_closing(e.tcp);
	}
	e.expires_ns = now + ct_timeout(cfg, t->proto, e.closing);
	e.epoch = cfg->epoch;
	e.rule_id = d->rule_id;
	e.port = f->port;
	e.owner = owner;
	if (ct_put(&o, &e, 0)) {
#if STOCKADE_CONNTRACK_PER_ENDPOINT
		if (held) {
			__sync_fetch_and_add(held, 1);
			return 0;
		}
#endif
		ct_owned_add(owner, 1);
	}
	return 0;
}

#endif /* STOCKADE_CONNTRACK */
