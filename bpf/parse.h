/* Packet parsing for stockade's tc programs: Ethernet (optionally one or two VLAN tags), IPv4
 * (options, fragments), IPv6 (a bounded walk of extension headers), TCP, UDP, SCTP, ICMP and
 * ICMPv6, into a `struct flow` that the conntrack and policy headers read.
 *
 * Which frames are judged (parse_packet): IPv4, and IPv6 when STOCKADE_IPV6 is on, are parsed;
 * ARP is the one non-IP ethertype that passes (PARSE_PASS). Everything else is PARSE_UNPARSED,
 * which the hook drops: any other ethertype; a VLAN tag (802.1Q or 802.1ad) when STOCKADE_VLAN
 * is off, or a third tag when it is on (the walk parses two); IPv6 when STOCKADE_IPV6 is off.
 * Passing such a frame would let it through unjudged: the kernel strips tags of VLAN ID 0 after
 * tc and delivers the IP packet inside, and a pod with an IPv6 address on an IPv4-only shape
 * would be open over IPv6.
 *
 * Every read goes through pkt_load(): a direct packet read when the bytes are in the linear part
 * of the skb (the common case, nearly free), else bpf_skb_load_bytes (about 25 ns a call here),
 * so non-linear skbs parse the same as linear ones. Direct reads are word loads whatever the
 * packet's alignment (pkt_load), and only the fields used are read (of the Ethernet header, its
 * type): read byte by byte, the headers of an established packet cost a third of its parse.
 *
 * Addresses are stored as IPv6, IPv4 as IPv4-mapped (::ffff:a.b.c.d), as in the maps.
 * Policy "port": the destination port for TCP, UDP and SCTP; (type << 8 | code) for ICMP and
 * ICMPv6; 0 for every other protocol.
 */
#pragma once

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef STOCKADE_IPV6
#error "STOCKADE_IPV6 must be defined by the rendered program"
#endif
#ifndef STOCKADE_VLAN
#error "STOCKADE_VLAN must be defined by the rendered program"
#endif
#ifndef STOCKADE_IPV6_EXT_MAX
#error "STOCKADE_IPV6_EXT_MAX must be defined by the rendered program"
#endif

#define ETH_P_ARP_ 0x0806
#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8
#define IPV6_NEXTHDR_HOP 0
#define IPV6_NEXTHDR_ROUTING 43
#define IPV6_NEXTHDR_FRAGMENT 44
#define IPV6_NEXTHDR_AH 51
#define IPV6_NEXTHDR_NONE 59
#define IPV6_NEXTHDR_DEST 60
#define PROTO_ICMPV6 58
#define PROTO_SCTP 132

enum parse_result {
	PARSE_IP = 0,		/* an IP packet, fields filled in */
	PARSE_PASS = 1,		/* ARP, passed whatever the policy */
	PARSE_CONTROL = 2,	/* IPv6 neighbour discovery and other link-local ICMPv6 control */
	PARSE_MALFORMED = 3,	/* truncated or inconsistent headers: addresses may be unset */
	PARSE_L4_MALFORMED = 4,	/* addresses are set, the transport header is truncated */
	PARSE_FRAGMENT = 5,	/* a non-first fragment: addresses set, no transport header */
	PARSE_UNPARSED = 6,	/* not ARP and not an IP packet this program parses: dropped */
};

enum icmp_kind {
	ICMP_KIND_NONE = 0,
	ICMP_KIND_ECHO_REQUEST = 1,
	ICMP_KIND_ECHO_REPLY = 2,
	ICMP_KIND_ERROR = 3,	/* destination unreachable, time exceeded, ...: `inner` is set */
};

/* The transport identity of a flow: what conntrack keys on. */
struct tuple {
	__u32 saddr[4];
	__u32 daddr[4];
	__be16 sport;		/* TCP/UDP/SCTP source port; ICMP echo identifier */
	__be16 dport;		/* TCP/UDP/SCTP destination port; 0 for ICMP echo */
	__u8 proto;
	__u8 icmp_kind;		/* enum icmp_kind of an ICMP(v6) packet */
	__u16 pad;
};

/* Where a packet stands among the fragments of its datagram. */
enum frag_kind {
	FRAG_NONE = 0,		/* not fragmented (an IPv6 atomic fragment included) */
	FRAG_FIRST = 1,		/* offset 0, more fragments: carries the transport header */
	FRAG_LATER = 2,		/* a non-first fragment: no transport header */
};

struct flow {
	struct tuple t;
	struct tuple inner;	/* the packet an ICMP error is about, as that packet was sent */
	__u16 port;		/* the policy port (host order) */
	__u8 tcp_flags;
	__u8 family;		/* 4 or 6 */
	__u32 frag_id;		/* IPv4 identification or IPv6 fragment identification */
	__u8 frag;		/* enum frag_kind */
	__u8 hop_limit;		/* IPv6 hop limit (IPv4: 0, unused) */
	__u8 pad[2];
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

/* Offsets past this are read through the helper only, which keeps the verifier's range small. */
#define PKT_DIRECT_MAX 512

/* Copy `len` bytes at `off` into `to`. Packet data has no alignment clang can know (a header
 * sits wherever the link layer put it), so a plain copy is byte loads; the direct copy declares
 * the source aligned, which makes it word loads. The verifier lets a program read packet data
 * unaligned on kernels with efficient unaligned access (x86-64, arm64: no strict alignment for
 * packet pointers), and the loads are correct at any address there. */
static __always_inline int pkt_load(struct __sk_buff *skb, __u32 off, void *to, const __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off <= PKT_DIRECT_MAX && data + off + len <= end) {
		__builtin_memcpy(to, __builtin_assume_aligned(data + off, 8), len);
		return 0;
	}
	return bpf_skb_load_bytes(skb, off, to, len);
}

static __always_inline void addr_set_v4(__u32 *dst, __be32 addr)
{
	dst[0] = 0;
	dst[1] = 0;
	dst[2] = bpf_htonl(0x0000ffff);
	dst[3] = addr;
}

static __always_inline void addr_copy(__u32 *dst, const __u8 *src)
{
	__builtin_memcpy(dst, src, 16);
}

/* Errors quote the packet they are about and may be related to its flow (conntrack.h): ICMP
 * destination unreachable, source quench, time exceeded, parameter problem; ICMPv6 destination
 * unreachable, packet too big, time exceeded, parameter problem. A redirect (ICMP 5, ICMPv6 137)
 * quotes a packet too but is no error: it asks the receiver to change its routing, so it is never
 * related to anything (icmp_is_redirect). */
static __always_inline int icmp_is_error(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == 3 || type == 4 || type == 11 || type == 12;
	return type >= 1 && type <= 4;
}

static __always_inline int icmp_is_redirect(__u8 proto, __u8 type)
{
	return (proto == IPPROTO_ICMP && type == 5) || (proto == PROTO_ICMPV6 && type == 137);
}

static __always_inline int addr_equal(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* ICMPv6 link control, judged by the on-link rules of icmpv6_control_check() and never by
 * policy: MLD (130-132, 143), router and neighbour discovery and redirect (133-137). */
static __always_inline int icmpv6_is_control(__u8 type)
{
	return (type >= 130 && type <= 137) || type == 143;
}

enum control_check {
	CONTROL_OK = 0,		/* passes, whatever the policy */
	CONTROL_NOT_A_ROUTER = 1,	/* a pod sent a router advertisement or a redirect */
	CONTROL_NOT_ON_LINK = 2,	/* not what RFC 4861 / RFC 3810 let through on-link */
};

static __always_inline int addr_is_link_local(const __u32 *a)
{
	return (bpf_ntohl(a[0]) & 0xffc00000) == 0xfe800000;
}

static __always_inline int addr_is_unspecified(const __u32 *a)
{
	return (a[0] | a[1] | a[2] | a[3]) == 0;
}

/* The on-link rules for ICMPv6 link control (`f` parsed as PARSE_CONTROL; `from_pod` on the
 * hook of packets a pod sends):
 * - Router and neighbour discovery (133-137, RFC 4861 §6.1, §7.1, §8.1): hop limit 255, which
 *   no router forwards, so only an on-link sender can produce it. A router advertisement (134)
 *   or a redirect (137) from a pod: CONTROL_NOT_A_ROUTER (a pod is never a router). Toward a
 *   pod they need a link-local source too (only the node's router sends them).
 * - MLD (130-132, 143, RFC 3810 §5, RFC 2710 §3): hop limit 1 and a link-local source, or the
 *   unspecified address (a report sent before the interface has a link-local address).
 * Anything else of these types: CONTROL_NOT_ON_LINK, dropped. */
static __always_inline enum control_check icmpv6_control_check(const struct flow *f, int from_pod)
{
	__u8 type = f->port >> 8;

	if (type >= 133 && type <= 137) {
		if (from_pod && (type == 134 || type == 137))
			return CONTROL_NOT_A_ROUTER;
		if (f->hop_limit != 255)
			return CONTROL_NOT_ON_LINK;
		if ((type == 134 || type == 137) && !addr_is_link_local(f->t.saddr))
			return CONTROL_NOT_ON_LINK;
		return CONTROL_OK;
	}
	if (f->hop_limit != 1)
		return CONTROL_NOT_ON_LINK;
	if (!addr_is_link_local(f->t.saddr) && !addr_is_unspecified(f->t.saddr))
		return CONTROL_NOT_ON_LINK;
	return CONTROL_OK;
}

/* Parse the IPv4 header at `off`; returns the transport offset or a negative parse_result. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 off, struct tuple *t,
				      __u8 *fragment, __u32 *frag_id)
{
	struct iphdr ip;
	__u16 frag_off;

	if (pkt_load(skb, off, &ip, sizeof(ip)) < 0)
		return -PARSE_MALFORMED;
	if (ip.ihl < 5 || ip.version != 4)
		return -PARSE_MALFORMED;
	addr_set_v4(t->saddr, ip.saddr);
	addr_set_v4(t->daddr, ip.daddr);
	t->proto = ip.protocol;
	frag_off = bpf_ntohs(ip.frag_off);
	if (frag_off & 0x1fff)
		*fragment = FRAG_LATER;
	else if (frag_off & 0x2000)
		*fragment = FRAG_FIRST;
	else
		*fragment = FRAG_NONE;
	*frag_id = bpf_ntohs(ip.id);
	return off + ip.ihl * 4;
}

#if STOCKADE_IPV6
/* Parse the IPv6 header at `off` and walk at most STOCKADE_IPV6_EXT_MAX extension headers;
 * returns the transport offset or a negative parse_result. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 off, struct tuple *t,
				      __u8 *fragment, __u32 *frag_id, __u8 *hop_limit)
{
	struct ipv6hdr ip6;
	__u8 ext[8];
	__u8 next;
	__u16 frag_field = 0;	/* offset and M flag of the fragment headers seen, or-ed */
	__be32 id = 0;
	int i;

	if (pkt_load(skb, off, &ip6, sizeof(ip6)) < 0)
		return -PARSE_MALFORMED;
	if (ip6.version != 6)
		return -PARSE_MALFORMED;
	addr_copy(t->saddr, ip6.saddr.in6_u.u6_addr8);
	addr_copy(t->daddr, ip6.daddr.in6_u.u6_addr8);
	*hop_limit = ip6.hop_limit;
	next = ip6.nexthdr;
	off += sizeof(ip6);
	*fragment = 0;
#pragma unroll
	for (i = 0; i < STOCKADE_IPV6_EXT_MAX; i++) {
		if (next != IPV6_NEXTHDR_HOP && next != IPV6_NEXTHDR_ROUTING &&
		    next != IPV6_NEXTHDR_DEST && next != IPV6_NEXTHDR_FRAGMENT &&
		    next != IPV6_NEXTHDR_AH)
			break;
		if (pkt_load(skb, off, ext, sizeof(ext)) < 0)
			return -PARSE_MALFORMED;
		if (next == IPV6_NEXTHDR_FRAGMENT) {
			/* classified after the walk: fewer states for the verifier in the loop */
			frag_field |= (__u16)ext[2] << 8 | ext[3];
			__builtin_memcpy(&id, ext + 4, 4);
			off += 8;
		} else if (next == IPV6_NEXTHDR_AH) {
			off += ((__u32)ext[1] + 2) * 4;
		} else {
			off += ((__u32)ext[1] + 1) * 8;
		}
		next = ext[0];
	}
	if (next == IPV6_NEXTHDR_HOP || next == IPV6_NEXTHDR_ROUTING || next == IPV6_NEXTHDR_DEST ||
	    next == IPV6_NEXTHDR_FRAGMENT || next == IPV6_NEXTHDR_AH)
		return -PARSE_MALFORMED; /* more extension headers than the walk allows */
	if (frag_field & 0xfff8)
		*fragment = FRAG_LATER;
	else if (frag_field & 1)
		*fragment = FRAG_FIRST;
	*frag_id = bpf_ntohl(id);
	t->proto = next;
	return off;
}
#endif

/* The first 8 bytes of a transport header: ports, or ICMP type, code and echo identifier. */
struct l4_head {
	__be16 a;	/* source port, or ICMP type and code */
	__be16 b;	/* destination port, or ICMP checksum */
	__be16 c;	/* ICMP echo identifier */
	__be16 d;
};

static __always_inline int is_ported(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == PROTO_SCTP;
}

/* Fill the ports of `t` from the transport header at `off`; 0 on success. `port` and
 * `icmp_type` receive the policy port and the raw ICMP type. */
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, struct tuple *t,
				    __u16 *port, __u8 *icmp_type)
{
	struct l4_head h;
	__u8 type, code;

	t->sport = 0;
	t->dport = 0;
	t->icmp_kind = ICMP_KIND_NONE;
	*port = 0;
	*icmp_type = 0;
	if (is_ported(t->proto)) {
		if (pkt_load(skb, off, &h, 4) < 0)
			return -1;
		t->sport = h.a;
		t->dport = h.b;
		*port = bpf_ntohs(h.b);
		return 0;
	}
	if (t->proto != IPPROTO_ICMP && t->proto != PROTO_ICMPV6)
		return 0;
	if (pkt_load(skb, off, &h, sizeof(h)) < 0)
		return -1;
	type = bpf_ntohs(h.a) >> 8;
	code = bpf_ntohs(h.a) & 0xff;
	*port = (__u16)type << 8 | code;
	*icmp_type = type;
	if ((t->proto == IPPROTO_ICMP && type == 8) || (t->proto == PROTO_ICMPV6 && type == 128)) {
		t->icmp_kind = ICMP_KIND_ECHO_REQUEST;
		t->sport = h.c;
	} else if ((t->proto == IPPROTO_ICMP && type == 0) ||
		   (t->proto == PROTO_ICMPV6 && type == 129)) {
		t->icmp_kind = ICMP_KIND_ECHO_REPLY;
		t->sport = h.c;
	} else if (icmp_is_error(t->proto, type)) {
		t->icmp_kind = ICMP_KIND_ERROR;
	}
	return 0;
}

/* The packet quoted by an ICMP error starts 8 bytes into the ICMP header. Only its IP header
 * and first transport bytes are read (no IPv6 extension walk): what is needed to find the
 * connection it belongs to. Returns 0 when the quoted packet could be read. */
static __always_inline int parse_icmp_inner(struct __sk_buff *skb, __u32 off, __u8 family,
					    struct tuple *inner)
{
	__u16 port;
	__u8 type, frag;
	__u32 frag_id;
	int l4;

	off += 8;
	if (family == 4) {
		l4 = parse_ipv4(skb, off, inner, &frag, &frag_id);
	} else {
#if STOCKADE_IPV6
		struct ipv6hdr ip6;

		if (pkt_load(skb, off, &ip6, sizeof(ip6)) < 0)
			return -1;
		addr_copy(inner->saddr, ip6.saddr.in6_u.u6_addr8);
		addr_copy(inner->daddr, ip6.daddr.in6_u.u6_addr8);
		inner->proto = ip6.nexthdr;
		l4 = off + sizeof(ip6);
#else
		return -1;
#endif
	}
	if (l4 < 0)
		return -1;
	return parse_l4(skb, l4, inner, &port, &type);
}

/* Parse a whole frame. */
static __always_inline enum parse_result parse_packet(struct __sk_buff *skb, struct flow *f)
{
	__u32 off = sizeof(struct ethhdr);
	__u8 fragment = 0, icmp_type = 0;
	__be16 proto;
	int l4;

	/* the type, the header's last two bytes: a frame shorter than the header is malformed */
	if (pkt_load(skb, __builtin_offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) < 0)
		return PARSE_MALFORMED;
#if STOCKADE_VLAN
	{
		__be16 tag[2];
		int i;

#pragma unroll
		for (i = 0; i < 2; i++) {
			if (proto != bpf_htons(ETH_P_8021Q_) && proto != bpf_htons(ETH_P_8021AD_))
				break;
			if (pkt_load(skb, off, tag, sizeof(tag)) < 0)
				return PARSE_MALFORMED;
			proto = tag[1];
			off += sizeof(tag);
		}
	}
#endif
	if (proto == bpf_htons(ETH_P_IP)) {
		f->family = 4;
		l4 = parse_ipv4(skb, off, &f->t, &fragment, &f->frag_id);
#if STOCKADE_IPV6
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		f->family = 6;
		l4 = parse_ipv6(skb, off, &f->t, &fragment, &f->frag_id, &f->hop_limit);
#endif
	} else if (proto == bpf_htons(ETH_P_ARP_)) {
		return PARSE_PASS;
	} else {
		return PARSE_UNPARSED; /* includes a VLAN tag left unwalked, and IPv6 when disabled */
	}
	if (l4 < 0)
		return PARSE_MALFORMED;
	f->frag = fragment;
	if (fragment == FRAG_LATER)
		return PARSE_FRAGMENT;
	if (parse_l4(skb, l4, &f->t, &f->port, &icmp_type) < 0)
		return PARSE_L4_MALFORMED;
	if (f->t.proto == IPPROTO_TCP) {
		__u8 flags;

		if (pkt_load(skb, l4 + 13, &flags, 1) < 0)
			return PARSE_L4_MALFORMED;
		f->tcp_flags = flags;
	}
	if (f->t.proto == PROTO_ICMPV6 && icmpv6_is_control(icmp_type))
		return PARSE_CONTROL;
	if (f->t.icmp_kind == ICMP_KIND_ERROR &&
	    parse_icmp_inner(skb, l4, f->family, &f->inner) < 0)
		return PARSE_L4_MALFORMED;
	return PARSE_IP;
}
