/* The maps every stockade program on a node shares, pinned by name under the loader's pin root
 * (/sys/fs/bpf/stockade/ in production) so that a reload or an agent restart re-adopts them.
 * operator/stockade/compiler/abi.py mirrors every layout and constant here, checked against the
 * compiled object's BTF (tests/compile/test_abi.py); sizes come from the rendered Shape.
 */
#pragma once

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "parse.h"

#ifndef STOCKADE_ENDPOINTS_MAX
#error "map sizes must be defined by the rendered program"
#endif

/* endpoints: the address of a pod on this node -> its endpoint id. The key of peer_hosts too. */
struct endpoint_key {
	__u8 addr[16];
};

struct endpoint_value {
	__u32 id;
	__u32 flags;
};

/* peer_classes: remote address (LPM, IPv4-mapped IPv6) -> equivalence class of peer sets.
 * Host prefixes (/128, IPv4 /32) live in the peer_hosts hash instead: a host prefix is the
 * longest there is, so a hit there is what the trie would answer, and the trie keeps only the
 * shorter prefixes (CIDRs), whose count is what a trie lookup's depth grows with. */
struct class_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct class_value {
	__u32 class_id;
	__u32 flags;
};

#define CLASS_KEY_BITS 128 /* a whole address: the prefix of a host, the length of a lookup */

#define CLASS_FLAG_LOCAL_NODE 1

/* policy: (endpoint << 1 | direction, class, protocol, port) -> verdict, all big-endian.
 * Entries of the exact levels (/96: one port; /64: a whole class) live in the policy_exact hash
 * under the same key bytes. A level entry with POLICY_FLAG_LONGER has longer entries beneath it
 * that only the trie holds, so it stays in the trie too. policy.h has the lookup order. */
struct policy_key {
	__u32 prefixlen;
	__be32 endpoint_dir;
	__be32 class_id;
	__be16 proto;
	__be16 port;
};

struct policy_value {
	__u32 rule_id;
	__u32 audit_rule_id;
	__u8 action;
	__u8 audit_action;
	__u16 flags;
};

#define POLICY_KEY_BITS 96 /* a whole policy key: the length of a lookup */
#define POLICY_FLAG_LONGER 1 /* policy_exact: the trie holds longer entries beneath this one */
#define POLICY_EXACT_PORT 96  /* the exact levels, longest first */
#define POLICY_EXACT_CLASS 64

#define ACTION_NONE 0
#define ACTION_ALLOW 1
#define ACTION_DENY 2

#define DIR_INGRESS 0 /* to the pod: tc egress of its host-side veth */
#define DIR_EGRESS 1  /* from the pod: tc ingress of its host-side veth */

/* counters: per rule id, the packets and bytes of the decisions it made. */
struct rule_counter {
	__u64 packets;
	__u64 bytes;
};

/* config: one entry written by the agent. A zero timeout means the built-in default. */
struct config {
	__u32 epoch;		/* bumped by the agent on every policy or peer-class change */
	__u32 ct_mode;		/* enum ct_mode in conntrack.h */
	__u64 tcp_timeout_ns;
	__u64 tcp_closing_timeout_ns;
	__u64 udp_timeout_ns;
	__u64 icmp_timeout_ns;
	__u64 other_timeout_ns;
	/* The conntrack clock (conntrack.h, ct_now): jiffies * tick_ns - clock_base_ns is
	 * CLOCK_MONOTONIC to within a tick (operator/stockade/datapath/clock.py); tick_ns 0: the
	 * agent has not measured it, and the programs read the coarse clock. */
	__u64 tick_ns;
	__u64 clock_base_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STOCKADE_ENDPOINTS_MAX);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

/* bindings: the ifindex of a pod's host-side interface -> the endpoint id of that pod, written
 * by the agent before it attaches the programs there. A packet leaving a pod must carry an
 * address of the endpoint its interface is bound to (hook.h). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STOCKADE_ENDPOINTS_MAX);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bindings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, STOCKADE_CLASSES_MAX);
	__type(key, struct class_key);
	__type(value, struct class_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} peer_classes SEC(".maps");

/* Hashes without preallocation: memory follows the entries written, lookups cost the same. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STOCKADE_HOSTS_MAX);
	__type(key, struct endpoint_key);
	__type(value, struct class_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} peer_hosts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STOCKADE_POLICY_EXACT_MAX);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_exact SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, STOCKADE_POLICY_MAX);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STOCKADE_RULES_MAX);
	__type(key, __u32);
	__type(value, struct rule_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, STOCKADE_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

/* events_lost: drop and audit events the ring buffer had no room for; the agent sums the CPUs'
 * counts into stockade_agent_events_lost_total. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events_lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

#if STOCKADE_CONNTRACK
/* conntrack: one entry per pair of flows a packet may belong to, found with one lookup whatever
 * the packet's direction. A flow is its original tuple plus the direction of the hook that
 * judged it, so that the destination's INGRESS hook still judges a flow the source's EGRESS
 * allowed. The map's key is that tuple ordered (conntrack.h, ct_key_norm: the lower address and
 * port first) with `dir` = the hook's direction XOR whether the tuple was swapped; the two flows
 * that share a key, a tuple in one direction and its reverse in the other, are the entry's two
 * slots: slot 0 the flow whose original tuple is the key's order, slot 1 the reverse. A packet
 * and its reply thus meet the same entry. struct ct_key is also how a flow's original tuple is
 * written (svc_flows' key). */
struct ct_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

/* One flow of an entry; expires_ns 0: the slot is empty. */
struct ct_flow {
	__u64 expires_ns;	/* CLOCK_MONOTONIC (ct_now) after which the flow is dead */
	__u32 epoch;		/* config.epoch when the flow was last judged */
	__u32 rule_id;		/* the rule that allowed it */
	__u16 port;		/* the policy port of the flow, to judge it again */
	__u8 closing;		/* the short timeout applies (TCP: see conntrack.h) */
	__u8 tcp;		/* CT_TCP_* flags of a TCP flow (conntrack.h) */
	__u32 owner;		/* the endpoint whose budget holds the flow (ct_owned) */
};

struct ct_entry {
	struct ct_flow flow[2];	/* by slot: the key's order, its reverse */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, STOCKADE_CONNTRACK_MAX);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

/* ct_owned: endpoint id -> how many conntrack entries it holds, against the Shape's
 * STOCKADE_CONNTRACK_PER_ENDPOINT (conntrack.h), one per flow (slot). The programs count their
 * own creations and deletions; the LRU's evictions are silent, so the agent recounts from the
 * table now and then. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STOCKADE_ENDPOINTS_MAX);
	__type(key, __u32);
	__type(value, __s64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ct_owned SEC(".maps");
#endif

#if STOCKADE_FRAGMENTS_TRACK
/* fragments: the verdict on a fragmented datagram's first fragment (the one with the ports),
 * which its non-first fragments follow (hook.h). Keyed by what identifies a datagram (RFC 791,
 * RFC 8200: addresses, protocol, identification) plus the direction of the hook that judged it.
 * An entry lives FRAG_TIMEOUT_NS, the kernel's ipfrag_time: a datagram not reassembled by then
 * is gone from the destination's reassembly queue anyway. */
struct frag_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 id;		/* IPv4 identification (16 bits) or IPv6 fragment identification */
	__u8 proto;
	__u8 dir;
	__u16 pad;
};

struct frag_entry {
	__u64 expires_ns;	/* bpf_ktime_get_coarse_ns() after which the entry is dead */
	__u32 rule_id;		/* the rule that decided the first fragment; 0 for conntrack */
	__u8 action;		/* ACTION_ALLOW or ACTION_DENY */
	__u8 pad[3];
};

#define FRAG_TIMEOUT_NS 30000000000ULL /* 30 s */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, STOCKADE_FRAGMENTS_MAX);
	__type(key, struct frag_key);
	__type(value, struct frag_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fragments SEC(".maps");
#endif

/* pending: the ifindex of a pod's host-side interface the agent attached before that pod's
 * tables were applied (CNI ADD, or a pod veth it does not know) -> PENDING_CLOSED or
 * PENDING_OPEN. hook.h judges such an interface by this state alone; the agent deletes the entry
 * once the pod's endpoint, binding and policy entries are written. */
#define PENDING_CLOSED 1 /* only what is always allowed: ARP, ND, the node itself */
#define PENDING_OPEN 2	 /* everything passes unjudged (the fail-open setting) */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STOCKADE_ENDPOINTS_MAX);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pending SEC(".maps");

/* pending_hint: slot (ifindex % HINT_SLOTS) -> how many pending interfaces have an
 * ifindex of that slot. An interface whose slot counts none is not pending, and its packets
 * pay an array read (the verifier inlines it) instead of the `pending` lookup. The agent counts
 * an interface in before it marks it pending and out after it cleared it
 * (operator/stockade/datapath/maps.py, Pending), so a slot never counts fewer than its pending
 * interfaces; a count too high costs only the lookup. */
#define HINT_SLOTS 4096

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HINT_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pending_hint SEC(".maps");

static __always_inline struct config *config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config, &zero);
}
