//! Reading scamper's JSON output: shape checks and a normalised view of the trace.
//!
//! scamper's output is kept byte for byte and never re-serialised: the old implementation parsed
//! it into structs and wrote it back, which dropped fields and once broke the ETL with a typo.
//! This module therefore only *reads* the three lines scamper prints for one measurement
//! (`cycle-start`, `trace` or `tracelb`, `cycle-stop`) in order to
//!
//! 1. check that they have the shape scamper 20211212 prints, with a clear error otherwise;
//! 2. get `cycle-start.start_time`, which names the trace file;
//! 3. build a [`TraceSummary`], the normalised view the service maps to protobuf.
//!
//! The lines are read through [`serde_json::Value`] rather than typed structs so that fields we
//! do not use (and fields a later scamper adds) never cause a failure, while every field we do
//! use is checked with an error that names it (for example `hops[3].probe_ttl`).
//!
//! # How a `tracelb` line is read
//!
//! scamper prints only the nodes that have at least one outgoing link, so the destination never
//! appears as a node: it is only the far end of links. Each node's `links` changes shape with
//! its `linkc` (see `node_tostr` in scamper's `scamper_tracelb_json.c`):
//!
//! * `linkc > 1`: one inner list holding every next hop,
//!   `[[{"addr":n1,"probes":[..]},{"addr":n2,"probes":[..]}]]`. Each element's probes are the
//!   ones sent one hop beyond the node.
//! * `linkc == 1`: a chain of inner lists, one per hop along the link. Positions before the
//!   last are usually `[{"addr":"*"}]` (silent hops); the last is the far node with its probes,
//!   or `[{"addr":"*"}]` when scamper gave up (gap limit) before finding one. A position may in
//!   principle hold several elements (scamper's probe-set summary), so each position is read as
//!   a set of alternatives.
//!
//! Every reply in an element's probes becomes part of a [`Hop`] at the *probe's* `ttl` (not the
//! reply's `ttl`, which is the TTL the reply arrived with) for that element's address.
//!
//! The first node(s) are found by probes scamper does not print, so they have no replies. Their
//! TTL is derived from the probes they do print: a probe with TTL `t` at position `p` (0-based)
//! of a node's links was sent `p + 1` hops beyond that node, so the node is at `t - p - 1`.
//! `q_ttl` cannot be used: it is the TTL quoted back inside the ICMP error (the probe's TTL on
//! arrival, 1 on every node of every fixture), not the node's distance. When no printed probe
//! gives a TTL (a node whose only link is all `"*"`), a node that is never the target of a link
//! falls back to the trace's `firsthop`, where scamper's MDA starts. The same derivation is
//! applied to any other node that no printed reply places (possible when a `linkc > 1` link
//! spans silent hops, because scamper then prints the probes of the link's first hop under the
//! far node's address). Derived hops have no RTTs and the kind [`ReplyKind::Other`], because
//! their replies were not printed; a node that already has a hop from a reply gets no other.
//!
//! Links follow the chain: node → next hop for `linkc > 1`, node → position 0 → position 1 → …
//! for `linkc == 1`, with `None` for `"*"`, deduplicated (so two silent chains share one
//! `None → None` link).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use serde_json::{Map, Value};

/// Single path (`trace`) or multipath (`tracelb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceKind {
    /// A `trace` line: one path, Paris or classic traceroute.
    SinglePath,
    /// A `tracelb` line: every path found by the Multipath Detection Algorithm.
    Multipath,
}

/// Why a router or the destination answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// ICMP time exceeded (IPv4 type 11, IPv6 type 3): a router on the way.
    TimeExceeded,
    /// Any ICMP destination unreachable, port unreachable included (IPv4 type 3, IPv6 type 1).
    Unreachable,
    /// ICMP echo reply (IPv4 type 0, IPv6 type 129).
    EchoReply,
    /// A TCP reply (the reply has `tcp_flags`), such as the destination's RST.
    Tcp,
    /// Anything else, or a hop whose reply was not printed (see the module docs).
    Other,
}

/// One responding address at one TTL, with every RTT seen from it at that TTL (milliseconds, in
/// the order they appear).
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    /// The TTL of the probes this address answered (never the reply's own TTL).
    pub ttl: u8,
    /// The address that answered.
    pub addr: IpAddr,
    /// Round-trip times in milliseconds, in the order scamper printed them; empty for a `tracelb`
    /// first node whose replies scamper does not print.
    pub rtts_ms: Vec<f64>,
    /// Why the address answered, taken from its first printed reply at this TTL.
    pub kind: ReplyKind,
    /// The MPLS label stack its first reply carrying one reported (`icmpext`, RFC 4950), top
    /// first; empty for most routers.
    pub mpls_labels: Vec<MplsLabel>,
}

/// One MPLS label stack entry a router reported in an ICMP extension (RFC 3032 fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MplsLabel {
    /// The 20-bit label.
    pub label: u32,
    /// The 3 experimental (traffic class) bits.
    pub exp: u8,
    /// The bottom-of-stack bit.
    pub bottom: bool,
    /// The entry's TTL.
    pub ttl: u8,
}

/// A link between consecutive nodes of a multipath trace; `None` is an unresponsive hop ("*").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Link {
    /// The near end, `None` for a silent hop.
    pub from: Option<IpAddr>,
    /// The far end, `None` for a silent hop.
    pub to: Option<IpAddr>,
}

/// The normalised view of one measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSummary {
    /// Whether line 2 was a `trace` or a `tracelb`.
    pub kind: TraceKind,
    /// scamper's `method`, for example `icmp-echo-paris` or `udp-dport`.
    pub method: String,
    /// The source address, when scamper printed one.
    pub src: Option<IpAddr>,
    /// The destination address.
    pub dst: IpAddr,
    /// `cycle-start.start_time`, unix seconds: the time that names the trace file.
    pub start_time: i64,
    /// scamper's `stop_reason` (`trace` only; `None` for `tracelb`, which has none).
    pub stop_reason: Option<String>,
    /// Sorted by (ttl, first appearance); one entry per (ttl, addr).
    pub hops: Vec<Hop>,
    /// Multipath only: deduplicated, in order of first appearance.
    pub links: Vec<Link>,
}

/// Why scamper's output was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ScamperJsonError {
    /// scamper writes ASCII; anything else is not its output.
    #[error("output is not UTF-8")]
    NotUtf8,
    /// scamper ends lines with `\n` only, and the trace file format forbids CRLF.
    #[error("carriage return in output")]
    CarriageReturn,
    /// The last line must end with `\n` (a missing one usually means truncated output).
    #[error("missing final newline")]
    MissingFinalNewline,
    /// One measurement is exactly three lines.
    #[error("expected 3 lines, got {0}")]
    LineCount(usize),
    /// A line failed to parse as JSON.
    #[error("line {line} is not JSON: {source}")]
    NotJson {
        /// 1-based line number.
        line: usize,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A line is JSON but not an object.
    #[error("line {line} is not a JSON object")]
    NotObject {
        /// 1-based line number.
        line: usize,
    },
    /// A line has no string `type`.
    #[error("line {line} has no \"type\" string")]
    MissingType {
        /// 1-based line number.
        line: usize,
    },
    /// A line's `type` is not the one expected at its position.
    #[error("line {line} has type {found:?}, expected {expected}")]
    WrongType {
        /// 1-based line number.
        line: usize,
        /// The type found (cut to 64 characters).
        found: String,
        /// The type or types allowed there.
        expected: &'static str,
    },
    /// A required field is absent; the field is named by its path, e.g. `hops[2].addr`.
    #[error("missing field {0}")]
    MissingField(String),
    /// A field has the wrong JSON type.
    #[error("field {field} is not {expected}")]
    FieldType {
        /// Path of the field.
        field: String,
        /// What it should have been, e.g. "an integer".
        expected: &'static str,
    },
    /// A field that must hold an IP address holds something else.
    #[error("field {field} is not an IP address: {value:?}")]
    BadAddress {
        /// Path of the field.
        field: String,
        /// The text found (cut to 64 characters).
        value: String,
    },
    /// A number is outside the range its meaning allows (a TTL above 255, a negative RTT, ...).
    #[error("field {field} is out of range: {value}")]
    OutOfRange {
        /// Path of the field.
        field: String,
        /// The value found.
        value: String,
    },
    /// The structure differs from what scamper prints (e.g. `links` disagreeing with `linkc`).
    #[error("field {field}: {problem}")]
    Shape {
        /// Path of the field.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
}

type Result<T> = std::result::Result<T, ScamperJsonError>;
type Obj = Map<String, Value>;

/// Parses the three lines scamper prints for one measurement (cycle-start, trace|tracelb,
/// cycle-stop), each ending in '\n', nothing else. Rejects anything else with a clear error.
///
/// Never panics, whatever the input: every index, number and address is checked.
///
/// # Errors
///
/// A [`ScamperJsonError`] naming the first problem found: the framing (UTF-8, `\r`, final
/// newline, line count), then each line's JSON and `type`, then the fields this module reads.
pub fn summarize(lines: &[u8]) -> Result<TraceSummary> {
    let text = std::str::from_utf8(lines).map_err(|_| ScamperJsonError::NotUtf8)?;
    // Checked before splitting so that CRLF gets its own message rather than "not JSON" or a
    // wrong line count.
    if text.contains('\r') {
        return Err(ScamperJsonError::CarriageReturn);
    }
    if text.is_empty() {
        return Err(ScamperJsonError::LineCount(0));
    }
    let body = text
        .strip_suffix('\n')
        .ok_or(ScamperJsonError::MissingFinalNewline)?;
    let parts: Vec<&str> = body.split('\n').collect();
    let [start_line, trace_line, stop_line] = parts.as_slice() else {
        return Err(ScamperJsonError::LineCount(parts.len()));
    };

    let start = parse_line(1, start_line)?;
    let trace = parse_line(2, trace_line)?;
    let stop = parse_line(3, stop_line)?;

    // Types first, so that lines in the wrong order are reported as such rather than as a
    // missing field.
    expect_type(1, &start, "cycle-start", "\"cycle-start\"")?;
    let kind = match line_type(2, &trace)? {
        "trace" => TraceKind::SinglePath,
        "tracelb" => TraceKind::Multipath,
        other => {
            return Err(ScamperJsonError::WrongType {
                line: 2,
                found: cut(other),
                expected: "\"trace\" or \"tracelb\"",
            });
        }
    };
    expect_type(3, &stop, "cycle-stop", "\"cycle-stop\"")?;

    let start_time = int_field(&start, "", "start_time")?;
    let start_time =
        i64::try_from(start_time).map_err(|_| out_of_range("", "start_time", start_time))?;

    let method = str_field(&trace, "", "method")?.to_owned();
    let dst = addr_field(&trace, "", "dst")?;
    let src = match trace.get("src") {
        None => None,
        Some(_) => Some(addr_field(&trace, "", "src")?),
    };
    let v6 = dst.is_ipv6();

    let (stop_reason, hops, links) = match kind {
        TraceKind::SinglePath => {
            let stop_reason = match trace.get("stop_reason") {
                None => None,
                Some(_) => Some(str_field(&trace, "", "stop_reason")?.to_owned()),
            };
            (stop_reason, single_path_hops(&trace, v6)?, Vec::new())
        }
        TraceKind::Multipath => {
            let (hops, links) = multipath(&trace, v6)?;
            (None, hops, links)
        }
    };

    Ok(TraceSummary {
        kind,
        method,
        src,
        dst,
        start_time,
        stop_reason,
        hops,
        links,
    })
}

/// Reads a `trace` line's `hops`: every element is one reply.
fn single_path_hops(trace: &Obj, v6: bool) -> Result<Vec<Hop>> {
    let mut table = HopTable::default();
    // scamper leaves "hops" out when nothing answered.
    let Some(hops) = opt_array(trace, "", "hops")? else {
        return Ok(Vec::new());
    };
    for (i, hop) in hops.iter().enumerate() {
        let path = format!("hops[{i}]");
        let hop = as_object(hop, &path)?;
        // scamper always writes the address of a reply, so a missing one is an error, not a
        // silent hop (silent TTLs are simply absent from "hops").
        let addr = addr_field(hop, &path, "addr")?;
        let ttl = ttl_field(hop, &path, "probe_ttl")?;
        let rtt = rtt_field(hop, &path)?;
        let kind = reply_kind(hop, &path, v6)?;
        let labels = mpls_labels(hop, &path)?;
        // Index by probe_ttl, never by position: silent TTLs leave gaps.
        table.reply(i, ttl, addr, rtt, kind, &labels);
    }
    Ok(table.finish())
}

/// The entries of every MPLS label stack object (class 1, type 1) in a hop's `icmpext`.
fn mpls_labels(hop: &Obj, path: &str) -> Result<Vec<MplsLabel>> {
    let Some(objects) = opt_array(hop, path, "icmpext")? else {
        return Ok(Vec::new());
    };
    let mut labels = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        let path = format!("{path}.icmpext[{i}]");
        let object = as_object(object, &path)?;
        let mpls =
            int_field(object, &path, "ie_cn")? == 1 && int_field(object, &path, "ie_ct")? == 1;
        let Some(entries) = opt_array(object, &path, "mpls_labels")?.filter(|_| mpls) else {
            continue;
        };
        for (j, entry) in entries.iter().enumerate() {
            let path = format!("{path}.mpls_labels[{j}]");
            let entry = as_object(entry, &path)?;
            let bounded = |key: &str, max: i128| -> Result<i128> {
                match int_field(entry, &path, key)? {
                    n if (0..=max).contains(&n) => Ok(n),
                    n => Err(out_of_range(&path, key, n)),
                }
            };
            // The bounds make the narrowing conversions exact.
            labels.push(MplsLabel {
                label: bounded("mpls_label", 0xF_FFFF)? as u32,
                exp: bounded("mpls_exp", 7)? as u8,
                bottom: bounded("mpls_s", 1)? == 1,
                ttl: bounded("mpls_ttl", 255)? as u8,
            });
        }
    }
    Ok(labels)
}

/// What the multipath walk remembers about a node until every reply has been seen.
struct NodeSeen {
    addr: IpAddr,
    /// Order key of the node's own entry in `nodes`, so a derived hop sorts where it appeared.
    order: usize,
    /// TTL derived from the first printed probe of the node's links.
    derived_ttl: Option<u8>,
}

/// Reads a `tracelb` line's `nodes` into hops and links.
fn multipath(trace: &Obj, v6: bool) -> Result<(Vec<Hop>, Vec<Link>)> {
    // Only a fallback for first nodes (see the module docs), so tolerate its absence.
    let firsthop = match trace.get("firsthop") {
        None => None,
        Some(_) => Some(ttl_field(trace, "", "firsthop")?),
    };
    let mut table = HopTable::default();
    let mut links = LinkSet::default();
    // Addresses that are the far end of some link; the others are first nodes.
    let mut targets: HashSet<IpAddr> = HashSet::new();
    let mut nodes_seen: Vec<NodeSeen> = Vec::new();
    // Counts every address in document order, to sort hops by first appearance.
    let mut order = 0usize;

    // scamper leaves "nodes" out when it found none.
    let nodes = opt_array(trace, "", "nodes")?.map_or(&[][..], Vec::as_slice);
    for (i, node) in nodes.iter().enumerate() {
        let npath = format!("nodes[{i}]");
        let node = as_object(node, &npath)?;
        let node_addr = lb_addr_field(node, &npath, "addr")?;
        let node_order = order;
        order += 1;
        let linkc = int_field(node, &npath, "linkc")?;
        let lists = array_field(node, &npath, "links")?;
        let lpath = format!("{npath}.links");
        let mut derived_ttl = None;

        if linkc > 1 {
            // One inner list holding every next hop, each probed one hop beyond the node.
            let [list] = lists.as_slice() else {
                return Err(shape(
                    &lpath,
                    format!(
                        "has {} lists, expected 1 because linkc is {linkc}",
                        lists.len()
                    ),
                ));
            };
            let epath = format!("{lpath}[0]");
            let elems = as_array(list, &epath)?;
            if i128::try_from(elems.len()).ok() != Some(linkc) {
                return Err(shape(
                    &epath,
                    format!("has {} next hops but linkc is {linkc}", elems.len()),
                ));
            }
            for (j, elem) in elems.iter().enumerate() {
                let el = read_element(
                    elem,
                    &format!("{epath}[{j}]"),
                    0,
                    v6,
                    &mut table,
                    &mut order,
                )?;
                derived_ttl = derived_ttl.or(el.derived_ttl);
                if let Some(a) = el.addr {
                    targets.insert(a);
                }
                links.add(node_addr, el.addr);
            }
        } else if linkc == 1 {
            // A chain: one inner list per hop along the link, ending at the far node or "*".
            if lists.is_empty() {
                return Err(shape(&lpath, "is empty but linkc is 1".to_owned()));
            }
            let mut prev: Vec<Option<IpAddr>> = vec![node_addr];
            for (pos, list) in lists.iter().enumerate() {
                let ppath = format!("{lpath}[{pos}]");
                let elems = as_array(list, &ppath)?;
                if elems.is_empty() {
                    return Err(shape(&ppath, "is an empty hop".to_owned()));
                }
                let mut cur = Vec::with_capacity(elems.len().min(MAX_AT_POSITION));
                let mut distinct = std::collections::HashSet::new();
                for (j, elem) in elems.iter().enumerate() {
                    let el = read_element(
                        elem,
                        &format!("{ppath}[{j}]"),
                        pos,
                        v6,
                        &mut table,
                        &mut order,
                    )?;
                    derived_ttl = derived_ttl.or(el.derived_ttl);
                    if let Some(a) = el.addr {
                        targets.insert(a);
                    }
                    // Each address once (stars are one): the pairings below stay linear in
                    // the output for any number of replies from the same routers.
                    if distinct.insert(el.addr) {
                        cur.push(el.addr);
                    }
                }
                if cur.len() > MAX_AT_POSITION {
                    return Err(shape(
                        &ppath,
                        format!(
                            "has {} distinct addresses at one hop (at most {MAX_AT_POSITION})",
                            cur.len()
                        ),
                    ));
                }
                // Normally one element per position; with several, every pairing is a link.
                for from in &prev {
                    for to in &cur {
                        links.add(*from, *to);
                    }
                }
                prev = cur;
            }
        } else if linkc == 0 {
            // scamper never prints a node without links; accept one only if it is consistent.
            if !lists.is_empty() {
                return Err(shape(&lpath, "is not empty but linkc is 0".to_owned()));
            }
        } else {
            return Err(out_of_range(&npath, "linkc", linkc));
        }

        if let Some(addr) = node_addr {
            nodes_seen.push(NodeSeen {
                addr,
                order: node_order,
                derived_ttl,
            });
        }
    }

    // Nodes that no printed reply places anywhere (the first nodes, found by unprinted probes):
    // give them a hop at the TTL their own links imply, else at firsthop if nothing leads to them.
    for node in &nodes_seen {
        if table.has_addr(node.addr) {
            continue;
        }
        let ttl = node
            .derived_ttl
            .or_else(|| firsthop.filter(|_| !targets.contains(&node.addr)));
        if let Some(ttl) = ttl {
            table.unanswered(node.order, ttl, node.addr);
        }
    }

    Ok((table.finish(), links.list))
}

/// One element of a node's links, once read.
struct Element {
    /// `None` for `"*"`.
    addr: Option<IpAddr>,
    /// TTL of the node that owns the links, implied by this element's first probe.
    derived_ttl: Option<u8>,
}

/// Reads one link element `{"addr", "probes"?}` at chain position `pos`, adding its replies to
/// `table`.
fn read_element(
    elem: &Value,
    path: &str,
    pos: usize,
    v6: bool,
    table: &mut HopTable,
    order: &mut usize,
) -> Result<Element> {
    let elem = as_object(elem, path)?;
    let addr = lb_addr_field(elem, path, "addr")?;
    let elem_order = *order;
    *order += 1;
    let mut derived_ttl = None;
    // "*" elements carry no probes; scamper also prints probes with no replies from the
    // element's address (linkc > 1), so both "probes" and "replies" are optional.
    let probes = opt_array(elem, path, "probes")?.map_or(&[][..], Vec::as_slice);
    for (k, probe) in probes.iter().enumerate() {
        let ppath = format!("{path}.probes[{k}]");
        let probe = as_object(probe, &ppath)?;
        let ttl = ttl_field(probe, &ppath, "ttl")?;
        if derived_ttl.is_none() {
            // A probe at position pos went pos + 1 hops beyond the owning node.
            derived_ttl = u8::try_from(pos)
                .ok()
                .and_then(|p| p.checked_add(1))
                .and_then(|hops_beyond| ttl.checked_sub(hops_beyond))
                .filter(|&t| t >= 1);
        }
        let replies = opt_array(probe, &ppath, "replies")?.map_or(&[][..], Vec::as_slice);
        for (r, reply) in replies.iter().enumerate() {
            let rpath = format!("{ppath}.replies[{r}]");
            let reply = as_object(reply, &rpath)?;
            let rtt = rtt_field(reply, &rpath)?;
            let kind = reply_kind(reply, &rpath, v6)?;
            // A reply under "*" would contradict itself; it is checked above but has no
            // address to attach to.
            if let Some(a) = addr {
                table.reply(elem_order, ttl, a, rtt, kind, &[]);
            }
        }
    }
    Ok(Element { addr, derived_ttl })
}

/// Hops up to which a [`HopTable`] is searched linearly.
const SCAN_HOPS: usize = 64;

/// A long [`HopTable`]'s index: the slot of each (ttl, addr), and every address.
type HopIndex = (HashMap<(u8, IpAddr), usize>, HashSet<IpAddr>);

/// Hops keyed by (ttl, addr), each remembering where it first appeared. Also how the engine
/// builds its summary from its own answers, so both backends group replies the same way.
#[derive(Default)]
pub(crate) struct HopTable {
    /// (order of first appearance, hop). Searched linearly while short: a trace has tens of
    /// hops, and two hash tables per trace cost more than the scans (the engine builds one per
    /// trace).
    hops: Vec<(usize, Hop)>,
    /// Past [`SCAN_HOPS`] (a wide multipath trace, or output built to be slow): the slot of
    /// each (ttl, addr), and the addresses, so neither lookup is a scan.
    index: Option<HopIndex>,
}

impl HopTable {
    /// A table with room for `hops` hops.
    pub(crate) fn with_capacity(hops: usize) -> Self {
        Self {
            hops: Vec::with_capacity(hops),
            index: None,
        }
    }

    fn slot(&self, ttl: u8, addr: IpAddr) -> Option<usize> {
        match &self.index {
            Some((slots, _)) => slots.get(&(ttl, addr)).copied(),
            None => self
                .hops
                .iter()
                .position(|(_, h)| h.ttl == ttl && h.addr == addr),
        }
    }

    fn entry(&mut self, order: usize, ttl: u8, addr: IpAddr, kind: ReplyKind) -> &mut Hop {
        let slot = match self.slot(ttl, addr) {
            Some(slot) => slot,
            None => {
                self.hops.push((
                    order,
                    Hop {
                        ttl,
                        addr,
                        rtts_ms: Vec::new(),
                        kind,
                        mpls_labels: Vec::new(),
                    },
                ));
                let slot = self.hops.len() - 1;
                match &mut self.index {
                    Some((slots, addrs)) => {
                        slots.insert((ttl, addr), slot);
                        addrs.insert(addr);
                    }
                    None if self.hops.len() > SCAN_HOPS => {
                        let slots = (self.hops.iter().enumerate())
                            .map(|(i, (_, h))| ((h.ttl, h.addr), i))
                            .collect();
                        let addrs = self.hops.iter().map(|(_, h)| h.addr).collect();
                        self.index = Some((slots, addrs));
                    }
                    None => {}
                }
                slot
            }
        };
        &mut self.hops[slot].1
    }

    /// Records one reply; the first reply at (ttl, addr) sets the hop's kind.
    pub(crate) fn reply(
        &mut self,
        order: usize,
        ttl: u8,
        addr: IpAddr,
        rtt: f64,
        kind: ReplyKind,
        labels: &[MplsLabel],
    ) {
        let hop = self.entry(order, ttl, addr, kind);
        hop.rtts_ms.push(rtt);
        if hop.mpls_labels.is_empty() {
            hop.mpls_labels.extend_from_slice(labels);
        }
    }

    /// Records a hop whose replies scamper did not print.
    fn unanswered(&mut self, order: usize, ttl: u8, addr: IpAddr) {
        self.entry(order, ttl, addr, ReplyKind::Other);
    }

    fn has_addr(&self, addr: IpAddr) -> bool {
        match &self.index {
            Some((_, addrs)) => addrs.contains(&addr),
            None => self.hops.iter().any(|(_, h)| h.addr == addr),
        }
    }

    pub(crate) fn finish(mut self) -> Vec<Hop> {
        self.hops.sort_by_key(|(order, hop)| (hop.ttl, *order));
        self.hops.into_iter().map(|(_, hop)| hop).collect()
    }
}

/// Links deduplicated, in order of first appearance.
#[derive(Default)]
struct LinkSet {
    seen: HashSet<Link>,
    list: Vec<Link>,
}

impl LinkSet {
    fn add(&mut self, from: Option<IpAddr>, to: Option<IpAddr>) {
        let link = Link { from, to };
        if self.seen.insert(link.clone()) {
            self.list.push(link);
        }
    }
}

fn parse_line(line: usize, text: &str) -> Result<Obj> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(ScamperJsonError::NotObject { line }),
        Err(source) => Err(ScamperJsonError::NotJson { line, source }),
    }
}

fn line_type(line: usize, obj: &Obj) -> Result<&str> {
    obj.get("type")
        .and_then(Value::as_str)
        .ok_or(ScamperJsonError::MissingType { line })
}

fn expect_type(line: usize, obj: &Obj, want: &str, expected: &'static str) -> Result<()> {
    let found = line_type(line, obj)?;
    if found == want {
        Ok(())
    } else {
        Err(ScamperJsonError::WrongType {
            line,
            found: cut(found),
            expected,
        })
    }
}

/// Why a reply came back. The ICMP types differ between IPv4 and IPv6, so branch on the
/// family of the destination (scamper never mixes families within one trace).
fn reply_kind(obj: &Obj, path: &str, v6: bool) -> Result<ReplyKind> {
    if obj.contains_key("tcp_flags") {
        // Checked only so that nonsense is rejected; the flags themselves are not needed.
        let flags = int_field(obj, path, "tcp_flags")?;
        if u8::try_from(flags).is_err() {
            return Err(out_of_range(path, "tcp_flags", flags));
        }
        return Ok(ReplyKind::Tcp);
    }
    if !obj.contains_key("icmp_type") {
        return Ok(ReplyKind::Other);
    }
    let icmp_type = int_field(obj, path, "icmp_type")?;
    let Ok(icmp_type) = u8::try_from(icmp_type) else {
        return Err(out_of_range(path, "icmp_type", icmp_type));
    };
    Ok(match (v6, icmp_type) {
        (false, 11) | (true, 3) => ReplyKind::TimeExceeded,
        (false, 3) | (true, 1) => ReplyKind::Unreachable,
        (false, 0) | (true, 129) => ReplyKind::EchoReply,
        _ => ReplyKind::Other,
    })
}

fn field_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Cuts text quoted in an error so that a huge bogus value cannot make a huge message.
fn cut(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Distinct addresses one position of a `tracelb` chain may hold (every pairing with the
/// position before is a link, so this bounds the work per position).
const MAX_AT_POSITION: usize = 256;

fn shape(field: &str, problem: String) -> ScamperJsonError {
    ScamperJsonError::Shape {
        field: field.to_owned(),
        problem,
    }
}

fn out_of_range(path: &str, key: &str, value: impl ToString) -> ScamperJsonError {
    ScamperJsonError::OutOfRange {
        field: field_path(path, key),
        value: value.to_string(),
    }
}

fn wrong_type(path: &str, key: &str, expected: &'static str) -> ScamperJsonError {
    ScamperJsonError::FieldType {
        field: field_path(path, key),
        expected,
    }
}

fn field<'a>(obj: &'a Obj, path: &str, key: &str) -> Result<&'a Value> {
    obj.get(key)
        .ok_or_else(|| ScamperJsonError::MissingField(field_path(path, key)))
}

fn as_object<'a>(value: &'a Value, path: &str) -> Result<&'a Obj> {
    value
        .as_object()
        .ok_or_else(|| ScamperJsonError::FieldType {
            field: path.to_owned(),
            expected: "an object",
        })
}

fn as_array<'a>(value: &'a Value, path: &str) -> Result<&'a Vec<Value>> {
    value.as_array().ok_or_else(|| ScamperJsonError::FieldType {
        field: path.to_owned(),
        expected: "an array",
    })
}

fn array_field<'a>(obj: &'a Obj, path: &str, key: &str) -> Result<&'a Vec<Value>> {
    field(obj, path, key)?
        .as_array()
        .ok_or_else(|| wrong_type(path, key, "an array"))
}

fn opt_array<'a>(obj: &'a Obj, path: &str, key: &str) -> Result<Option<&'a Vec<Value>>> {
    match obj.get(key) {
        None => Ok(None),
        Some(_) => array_field(obj, path, key).map(Some),
    }
}

fn str_field<'a>(obj: &'a Obj, path: &str, key: &str) -> Result<&'a str> {
    field(obj, path, key)?
        .as_str()
        .ok_or_else(|| wrong_type(path, key, "a string"))
}

/// An integer field, widened so that negative and huge values can be range-checked by callers.
/// Numbers beyond 64 bits parse as floats and are reported as not integers.
fn int_field(obj: &Obj, path: &str, key: &str) -> Result<i128> {
    let value = field(obj, path, key)?;
    value
        .as_u64()
        .map(i128::from)
        .or_else(|| value.as_i64().map(i128::from))
        .ok_or_else(|| wrong_type(path, key, "an integer"))
}

/// A probe TTL: 1 to 255. Zero is rejected too: scamper never sends a probe with TTL 0.
fn ttl_field(obj: &Obj, path: &str, key: &str) -> Result<u8> {
    let ttl = int_field(obj, path, key)?;
    match u8::try_from(ttl) {
        Ok(t) if t >= 1 => Ok(t),
        _ => Err(out_of_range(path, key, ttl)),
    }
}

/// An RTT in milliseconds: finite and not negative.
fn rtt_field(obj: &Obj, path: &str) -> Result<f64> {
    let rtt = field(obj, path, "rtt")?
        .as_f64()
        .ok_or_else(|| wrong_type(path, "rtt", "a number"))?;
    if rtt.is_finite() && rtt >= 0.0 {
        Ok(rtt)
    } else {
        Err(out_of_range(path, "rtt", rtt))
    }
}

fn addr_field(obj: &Obj, path: &str, key: &str) -> Result<IpAddr> {
    let text = str_field(obj, path, key)?;
    text.parse().map_err(|_| ScamperJsonError::BadAddress {
        field: field_path(path, key),
        value: cut(text),
    })
}

/// A `tracelb` address: `"*"` is an unresponsive hop.
fn lb_addr_field(obj: &Obj, path: &str, key: &str) -> Result<Option<IpAddr>> {
    if str_field(obj, path, key)? == "*" {
        Ok(None)
    } else {
        addr_field(obj, path, key).map(Some)
    }
}

#[cfg(test)]
mod tests;
