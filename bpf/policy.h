/* The policy decision for the first packet of a flow, as specified by `lookup()` in
 * operator/stockade/compiler/ir.py.
 *
 * Precedence (highest first):
 *   1. The local address (source on the EGRESS hook, destination on the INGRESS hook) is not an
 *      endpoint of this node: allowed, unjudged (rule 0).
 *   2. INGRESS, the packet was sent by this node's own network stack (`from_host`: it arrived
 *      on no interface, hook.h) and the remote address's class carries CLASS_FLAG_LOCAL_NODE
 *      (an address of the node: its Node addresses from the lowering, and the addresses its
 *      stack uses toward pods, such as a CNI gateway, added by the agent): allowed (rule 0).
 *      Kubelet probes and the node's own traffic are; a packet forwarded by the node with a
 *      node address as source (SNAT, masquerade) is not, and is judged like any other.
 *   3. The longest-prefix policy entry for (endpoint, direction, class, protocol, port) decides:
 *      its action and rule id, plus the Audit-mode opinion (audit action and rule id). Tier
 *      order (Admin, namespace, Baseline) is already folded into the entries by the lowering.
 *   4. No entry at all for the endpoint and direction: no policy selects it, allowed (rule 0).
 * An address in no peer class has class 0.
 *
 * Lookups (each a kernel hash or trie walk; a trie walk grows with the trie's entries, a hash
 * lookup does not, so the common cases are answered by hashes):
 *   class:  peer_hosts (the remote address exactly), else the longest CIDR in peer_classes.
 *   policy: policy_exact at /96 (this port), else policy_exact at /64 (the whole class) unless
 *           it is flagged POLICY_FLAG_LONGER, else the longest prefix in the policy trie.
 * Both equal the longest-prefix match over all entries: a host entry is the longest class
 * prefix; a /96 entry is the longest policy prefix; a /64 entry without the flag has no longer
 * entry beneath it other than /96 ones, which missed; and the trie holds every entry that is
 * not answered by a hash, plus the flagged /64 entries themselves.
 */
#pragma once

#include "maps.h"

struct decision {
	__u32 endpoint_id;
	__u32 rule_id;
	__u32 audit_rule_id;
	__u8 action;
	__u8 audit_action;
	__u8 judged;	/* 0 when the local address is no endpoint of this node */
	__u8 pad;
};

/* `addr` points at 16 bytes on the stack: the address, IPv4-mapped for IPv4. */
static __always_inline struct endpoint_value *endpoint_lookup(const __u32 *addr)
{
	return bpf_map_lookup_elem(&endpoints, addr);
}

static __always_inline struct class_value *class_lookup(const __u32 *remote)
{
	struct class_value *cls = bpf_map_lookup_elem(&peer_hosts, remote);
	struct class_key ck;

	if (cls)
		return cls;
	ck.prefixlen = CLASS_KEY_BITS;
	__builtin_memcpy(ck.addr, remote, 16);
	return bpf_map_lookup_elem(&peer_classes, &ck);
}

/* `pk` holds a full key; its prefixlen and low fields are scratch. */
static __always_inline struct policy_value *policy_lookup(struct policy_key *pk)
{
	struct policy_value *pv;
	__be16 proto = pk->proto, port = pk->port;

	pk->prefixlen = POLICY_EXACT_PORT;
	pv = bpf_map_lookup_elem(&policy_exact, pk);
	if (pv)
		return pv;
	pk->prefixlen = POLICY_EXACT_CLASS;
	pk->proto = 0;
	pk->port = 0;
	pv = bpf_map_lookup_elem(&policy_exact, pk);
	if (pv && !(pv->flags & POLICY_FLAG_LONGER))
		return pv;
	pk->prefixlen = POLICY_KEY_BITS;
	pk->proto = proto;
	pk->port = port;
	return bpf_map_lookup_elem(&policy, pk);
}

/* Steps 2-4 for a known endpoint. */
static __always_inline void policy_decide_endpoint(__u32 endpoint_id, const __u32 *remote,
						   __u8 proto, __u16 port, __u32 dir,
						   __u8 from_host, struct decision *d)
{
	struct class_value *cls;
	struct policy_key pk;
	struct policy_value *pv;
	__u32 class_id = 0, class_flags = 0;

	d->action = ACTION_ALLOW;
	d->audit_action = ACTION_NONE;
	d->rule_id = 0;
	d->audit_rule_id = 0;
	d->judged = 1;
	d->endpoint_id = endpoint_id;

	cls = class_lookup(remote);
	if (cls) {
		class_id = cls->class_id;
		class_flags = cls->flags;
	}
	if (dir == DIR_INGRESS && from_host && (class_flags & CLASS_FLAG_LOCAL_NODE))
		return;

	pk.endpoint_dir = bpf_htonl(endpoint_id << 1 | dir);
	pk.class_id = bpf_htonl(class_id);
	pk.proto = bpf_htons(proto);
	pk.port = bpf_htons(port);
	pv = policy_lookup(&pk);
	if (!pv)
		return;
	d->action = pv->action;
	d->rule_id = pv->rule_id;
	d->audit_action = pv->audit_action;
	d->audit_rule_id = pv->audit_rule_id;
}

/* The whole decision for a tuple, steps 1-4, when a recorded flow is judged again: the packet
 * that opened it is gone, so a flow from a node address counts as sent by the node (a flow a
 * forwarded packet opened was judged by policy then, and allowed). */
static __always_inline void policy_decide(const __u32 *saddr, const __u32 *daddr, __u8 proto,
					  __u16 port, __u32 dir, struct decision *d)
{
	struct endpoint_value *ep = endpoint_lookup(dir == DIR_EGRESS ? saddr : daddr);

	if (!ep) {
		d->action = ACTION_ALLOW;
		d->audit_action = ACTION_NONE;
		d->rule_id = 0;
		d->audit_rule_id = 0;
		d->judged = 0;
		d->endpoint_id = 0;
		return;
	}
	policy_decide_endpoint(ep->id, dir == DIR_EGRESS ? daddr : saddr, proto, port, dir, 1, d);
}
