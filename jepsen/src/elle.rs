//! An Elle-style checker for list-append histories (after Kingsbury & Alvaro, "Elle:
//! inferring isolation anomalies from experimental observations"; written here from
//! the paper's ideas, not its code).
//!
//! Every append writes a value that is unique per key, and every read returns a whole
//! list, so a read names not only the versions it saw but their order. From that:
//!
//! - **version order**: a key's versions are the prefixes of its longest read; every
//!   other read must be a prefix of it, else the key's order is incompatible (two
//!   readers disagree on history) and no dependency is inferred from that key;
//! - **dependencies** between committed transactions (ok ones, and indeterminate ones
//!   whose appends were observed):
//!   - `ww` T1 -> T2: T2 appended the element right after T1's in the key's order;
//!   - `wr` T1 -> T2: T2 read a list whose last element T1 appended;
//!   - `rw` T1 -> T2: T1 read a list, and T2 appended the element that follows it
//!     (T1 did not see T2's write: an anti-dependency);
//!   - `rt` T1 -> T2: T1 completed before T2 was invoked (real time; etcd claims strict
//!     serializability, so these must be honoured too). Only the edges from the
//!     frontier of most recently completed transactions are added, which keeps the
//!     graph small and loses no cycle (older ones reach T2 through the frontier).
//! - **cycles** in the graph are anomalies, named by the weakest edges that close one:
//!   `G0` (ww only: dirty writes), `G1c` (ww and wr: circular information flow), `G2`
//!   (includes an anti-dependency; `G-single` when exactly one), and `*-realtime` when
//!   the cycle needs a real-time edge (serializable, but not strictly so);
//! - **non-cycle anomalies**: `G1a` (a read observed an element appended by a failed
//!   transaction), `G1b` (a read ended in an element its writer later overwrote within
//!   the same transaction: an intermediate state), `duplicate` (an element twice in
//!   one list), `garbage` (an element nobody appended), `incompatible-order`, and
//!   `lost-append` (an acknowledged append no later read ever showed, though a read of
//!   the key began after the append was acknowledged).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::history::Status;

/// One step of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mop {
    Append {
        key: String,
        value: u64,
    },
    /// `value` is `None` until the transaction completes (and stays so unless ok).
    Read {
        key: String,
        value: Option<Vec<u64>>,
    },
}

impl Mop {
    pub fn key(&self) -> &str {
        match self {
            Mop::Append { key, .. } | Mop::Read { key, .. } => key,
        }
    }
}

/// A transaction as a client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub process: u64,
    pub mops: Vec<Mop>,
    pub status: Status,
    pub invoke: u64,
    /// `None` when indeterminate.
    pub complete: Option<u64>,
    /// Why it failed or is indeterminate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl fmt::Display for Txn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(p{} ", self.process)?;
        for (i, m) in self.mops.iter().enumerate() {
            if i > 0 {
                write!(f, " ")?;
            }
            match m {
                Mop::Append { key, value } => write!(f, "[append {key} {value}]")?,
                Mop::Read {
                    key,
                    value: Some(v),
                } => write!(f, "[r {key} {v:?}]")?,
                Mop::Read { key, value: None } => write!(f, "[r {key} ?]")?,
            }
        }
        let status = match self.status {
            Status::Ok => "ok",
            Status::Fail => "fail",
            Status::Info => "info",
        };
        write!(f, " {status} @{:.3}ms)", self.invoke as f64 / 1e6)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    G0,
    G1a,
    G1b,
    G1c,
    GSingle,
    G2,
    G0Realtime,
    G1cRealtime,
    GSingleRealtime,
    G2Realtime,
    Duplicate,
    Garbage,
    IncompatibleOrder,
    LostAppend,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::G0 => "G0",
            Kind::G1a => "G1a",
            Kind::G1b => "G1b",
            Kind::G1c => "G1c",
            Kind::GSingle => "G-single",
            Kind::G2 => "G2",
            Kind::G0Realtime => "G0-realtime",
            Kind::G1cRealtime => "G1c-realtime",
            Kind::GSingleRealtime => "G-single-realtime",
            Kind::G2Realtime => "G2-realtime",
            Kind::Duplicate => "duplicate",
            Kind::Garbage => "garbage",
            Kind::IncompatibleOrder => "incompatible-order",
            Kind::LostAppend => "lost-append",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anomaly {
    pub kind: Kind,
    /// What was seen, with the transactions involved (a cycle: each one and the
    /// edge to the next).
    pub explanation: String,
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.explanation)
    }
}

const WW: u8 = 1;
const WR: u8 = 2;
const RW: u8 = 4;
const RT: u8 = 8;

fn edge_name(bit: u8) -> &'static str {
    match bit {
        WW => "ww",
        WR => "wr",
        RW => "rw",
        _ => "rt",
    }
}

/// An edge's types (bits) and the key behind its ww, wr and rw types.
type Edge = (u8, [Option<String>; 3]);

/// The dependency graph over transaction indexes.
#[derive(Default)]
struct Graph {
    edges: HashMap<(usize, usize), Edge>,
}

impl Graph {
    fn add(&mut self, from: usize, to: usize, bit: u8, key: Option<&str>) {
        if from == to {
            return;
        }
        let e = self.edges.entry((from, to)).or_default();
        e.0 |= bit;
        let slot = match bit {
            WW => 0,
            WR => 1,
            RW => 2,
            _ => return,
        };
        if e.1[slot].is_none() {
            e.1[slot] = key.map(str::to_string);
        }
    }

    /// Adjacency lists of the edges having any of `mask`'s types.
    fn adjacency(&self, n: usize, mask: u8) -> Vec<Vec<usize>> {
        let mut adj = vec![Vec::new(); n];
        for (&(a, b), &(bits, _)) in &self.edges {
            if bits & mask != 0 {
                adj[a].push(b);
            }
        }
        for l in &mut adj {
            l.sort_unstable();
        }
        adj
    }
}

/// Strongly connected components (Tarjan, iterative); returns each node's component
/// and the component sizes.
fn components(adj: &[Vec<usize>]) -> (Vec<usize>, Vec<usize>) {
    let n = adj.len();
    const UNSEEN: usize = usize::MAX;
    let mut index = vec![UNSEEN; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut comp = vec![UNSEEN; n];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    let mut next_index = 0;
    for root in 0..n {
        if index[root] != UNSEEN {
            continue;
        }
        // (node, position in its adjacency list)
        let mut call: Vec<(usize, usize)> = vec![(root, 0)];
        index[root] = next_index;
        low[root] = next_index;
        next_index += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(&mut (v, ref mut pos)) = call.last_mut() {
            if *pos < adj[v].len() {
                let w = adj[v][*pos];
                *pos += 1;
                if index[w] == UNSEEN {
                    index[w] = next_index;
                    low[w] = next_index;
                    next_index += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    call.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            call.pop();
            if let Some(&(parent, _)) = call.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let c = sizes.len();
                let mut size = 0;
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    comp[w] = c;
                    size += 1;
                    if w == v {
                        break;
                    }
                }
                sizes.push(size);
            }
        }
    }
    (comp, sizes)
}

/// The shortest path from `from` to `to` inside one component, over `adj`.
fn path(adj: &[Vec<usize>], comp: &[usize], from: usize, to: usize) -> Option<Vec<usize>> {
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([from]);
    let mut seen = HashSet::from([from]);
    while let Some(v) = queue.pop_front() {
        if v == to {
            let mut p = vec![to];
            let mut x = to;
            while x != from {
                x = parent[&x];
                p.push(x);
            }
            p.reverse();
            return Some(p);
        }
        for &w in &adj[v] {
            if comp[w] == comp[from] && seen.insert(w) {
                parent.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    None
}

/// Checks a list-append history; returns every anomaly found (empty: valid).
pub fn check(history: &[Txn]) -> Vec<Anomaly> {
    let mut out = Vec::new();
    // Who appended what (values are unique per key by construction of the workload).
    let mut writer: HashMap<(&str, u64), usize> = HashMap::new();
    for (i, t) in history.iter().enumerate() {
        for m in &t.mops {
            if let Mop::Append { key, value } = m {
                writer.insert((key.as_str(), *value), i);
            }
        }
    }
    // Committed (or possibly committed) transactions are the graph's nodes.
    let in_graph = |i: usize| history[i].status != Status::Fail;
    let reads = || {
        history
            .iter()
            .enumerate()
            .filter(|(_, t)| t.status == Status::Ok)
            .flat_map(|(i, t)| {
                t.mops.iter().filter_map(move |m| match m {
                    Mop::Read {
                        key,
                        value: Some(v),
                    } => Some((i, key.as_str(), v)),
                    _ => None,
                })
            })
    };

    // Version orders: the longest read of each key, which every read must prefix.
    let mut longest: HashMap<&str, (usize, &Vec<u64>)> = HashMap::new();
    for (r, key, list) in reads() {
        let l = longest.entry(key).or_insert((r, list));
        if list.len() > l.1.len() {
            *l = (r, list);
        }
    }
    let mut broken: HashSet<&str> = HashSet::new();
    // The reads whose elements need a look: each key's longest, and any read that
    // is not a prefix of it (every other read's elements are the longest's).
    let mut distinct: Vec<(usize, &str, &Vec<u64>)> =
        longest.iter().map(|(k, (r, l))| (*r, *k, *l)).collect();
    for (r, key, list) in reads() {
        let l = longest[key].1;
        if l[..list.len()] != list[..] {
            distinct.push((r, key, list));
            if broken.insert(key) {
                out.push(Anomaly {
                    kind: Kind::IncompatibleOrder,
                    explanation: format!(
                        "{key}: {} read {list:?}, not a prefix of the longest read {l:?}",
                        history[r]
                    ),
                });
            }
        }
    }
    distinct.sort_unstable();

    // Elements that should not be there.
    let mut reported: HashSet<(Kind, usize, String)> = HashSet::new();
    let mut observed: HashSet<(&str, u64)> = HashSet::new();
    for &(r, key, list) in &distinct {
        let mut seen = HashSet::new();
        for &e in list {
            observed.insert((key, e));
            if !seen.insert(e) {
                broken.insert(key);
                out.push(Anomaly {
                    kind: Kind::Duplicate,
                    explanation: format!(
                        "element {e} twice in {key} = {list:?} read by {}",
                        history[r]
                    ),
                });
            }
            match writer.get(&(key, e)) {
                None => out.push(Anomaly {
                    kind: Kind::Garbage,
                    explanation: format!(
                        "{} read {key} element {e}, which nobody appended",
                        history[r]
                    ),
                }),
                Some(&w) if history[w].status == Status::Fail => {
                    if reported.insert((Kind::G1a, w, key.to_string())) {
                        out.push(Anomaly {
                            kind: Kind::G1a,
                            explanation: format!(
                                "{} read {key} element {e} appended by the failed {}",
                                history[r], history[w]
                            ),
                        });
                    }
                }
                Some(_) => {}
            }
        }
    }
    // G1b: a read ends in an element its writer overwrote within the same transaction.
    for (r, key, list) in reads() {
        let Some(&last) = list.last() else { continue };
        let Some(&w) = writer.get(&(key, last)) else {
            continue;
        };
        let final_append = history[w].mops.iter().rev().find_map(|m| match m {
            Mop::Append { key: k, value } if k == key => Some(*value),
            _ => None,
        });
        if w != r && final_append != Some(last) {
            out.push(Anomaly {
                kind: Kind::G1b,
                explanation: format!(
                    "{} read {key} = {list:?}, ending in the intermediate append {last} of {}",
                    history[r], history[w]
                ),
            });
        }
    }

    // Lost appends: acknowledged, never read, though a read of the key started after.
    for (&(key, e), &w) in &writer {
        let Some(done) = history[w]
            .complete
            .filter(|_| history[w].status == Status::Ok)
        else {
            continue;
        };
        if observed.contains(&(key, e)) {
            continue;
        }
        if let Some((r, _, list)) =
            reads().find(|&(r, k, _)| k == key && r != w && history[r].invoke > done)
        {
            out.push(Anomaly {
                kind: Kind::LostAppend,
                explanation: format!(
                    "{key} element {e} appended by {} (acknowledged), but {} began later and read {list:?}, and no read ever showed it",
                    history[w], history[r]
                ),
            });
        }
    }

    // Dependency edges.
    let n = history.len();
    let mut g = Graph::default();
    for (key, (_, l)) in &longest {
        if broken.contains(key) {
            continue;
        }
        for pair in l.windows(2) {
            if let (Some(&a), Some(&b)) =
                (writer.get(&(*key, pair[0])), writer.get(&(*key, pair[1])))
            {
                if in_graph(a) && in_graph(b) {
                    g.add(a, b, WW, Some(key));
                }
            }
        }
    }
    for (r, key, list) in reads() {
        if broken.contains(key) {
            continue;
        }
        if let Some(&w) = list.last().and_then(|e| writer.get(&(key, *e))) {
            if in_graph(w) {
                g.add(w, r, WR, Some(key));
            }
        }
        if let Some(&w) = longest[key]
            .1
            .get(list.len())
            .and_then(|e| writer.get(&(key, *e)))
        {
            if in_graph(w) {
                g.add(r, w, RW, Some(key));
            }
        }
    }
    // Real time: edges from the frontier of the most recently completed transactions.
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (i, t) in history.iter().enumerate() {
        if !in_graph(i) {
            continue;
        }
        events.push((t.invoke, false, i));
        if let (Status::Ok, Some(c)) = (t.status, t.complete) {
            events.push((c, true, i));
        }
    }
    // Invocations sort before completions at the same instant: touching is concurrent.
    events.sort_unstable();
    let mut frontier: Vec<usize> = Vec::new();
    let mut before: HashMap<usize, Vec<usize>> = HashMap::new();
    for (_, is_complete, i) in events {
        if is_complete {
            let preds = before.remove(&i).unwrap_or_default();
            frontier.retain(|f| !preds.contains(f));
            frontier.push(i);
        } else {
            for &f in &frontier {
                g.add(f, i, RT, None);
            }
            before.insert(i, frontier.clone());
        }
    }

    // Cycles, weakest first: each level reports one cycle per component that needs
    // the level's new edge type.
    let levels = [
        (WW, WW),
        (WW | WR, WR),
        (WW | WR | RW, RW),
        (WW | WR | RW | RT, RT),
    ];
    for (mask, required) in levels {
        let adj = g.adjacency(n, mask);
        let (comp, sizes) = components(&adj);
        let mut done_comps = HashSet::new();
        let mut keys: Vec<_> = g.edges.keys().copied().collect();
        keys.sort_unstable();
        for (a, b) in keys {
            let (bits, _) = g.edges[&(a, b)];
            if bits & required == 0 || comp[a] != comp[b] || sizes[comp[a]] < 2 {
                continue;
            }
            if !done_comps.insert(comp[a]) {
                continue;
            }
            let Some(back) = path(&adj, &comp, b, a) else {
                continue;
            };
            // The cycle a -> b -> ... -> a, each edge labelled with its weakest type
            // in the mask (the required one for the first).
            let mut cycle = vec![a];
            cycle.extend(back);
            let mut labels = Vec::new();
            for (k, w) in cycle.windows(2).enumerate() {
                let (bits, why) = &g.edges[&(w[0], w[1])];
                let bit = if k == 0 {
                    required
                } else {
                    [WW, WR, RW, RT]
                        .into_iter()
                        .find(|t| bits & mask & t != 0)
                        .unwrap_or(RT)
                };
                let key = match bit {
                    WW => why[0].as_deref(),
                    WR => why[1].as_deref(),
                    RW => why[2].as_deref(),
                    _ => None,
                };
                labels.push((bit, key));
            }
            let has = |t: u8| labels.iter().filter(|(b, _)| *b == t).count();
            let realtime = has(RT) > 0;
            let kind = match (has(RW), has(WR) > 0, realtime) {
                (0, false, false) => Kind::G0,
                (0, true, false) => Kind::G1c,
                (1, _, false) => Kind::GSingle,
                (_, _, false) => Kind::G2,
                (0, false, true) => Kind::G0Realtime,
                (0, true, true) => Kind::G1cRealtime,
                (1, _, true) => Kind::GSingleRealtime,
                (_, _, true) => Kind::G2Realtime,
            };
            let mut text = String::new();
            for (k, (bit, key)) in labels.iter().enumerate() {
                text.push_str(&format!(
                    "T{} {} -{}",
                    cycle[k],
                    history[cycle[k]],
                    edge_name(*bit)
                ));
                if let Some(key) = key {
                    text.push_str(&format!(" {key}"));
                }
                text.push_str("-> ");
            }
            text.push_str(&format!("T{}", cycle[0]));
            out.push(Anomaly {
                kind,
                explanation: text,
            });
        }
    }
    out
}

/// The anomaly kinds found, each once, in order.
pub fn kinds(anomalies: &[Anomaly]) -> Vec<Kind> {
    let mut k: Vec<Kind> = anomalies.iter().map(|a| a.kind).collect();
    k.sort_unstable();
    k.dedup();
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transaction from a compact notation: `"a x 1"` appends 1 to x, `"r x 1 2"`
    /// reads [1, 2], `"r x"` reads [].
    fn t(process: u64, status: Status, invoke: u64, complete: u64, mops: &[&str]) -> Txn {
        let mops = mops
            .iter()
            .map(|m| {
                let mut w = m.split_whitespace();
                let (f, key) = (w.next().unwrap(), w.next().unwrap().to_string());
                let nums: Vec<u64> = w.map(|x| x.parse().unwrap()).collect();
                match f {
                    "a" => Mop::Append {
                        key,
                        value: nums[0],
                    },
                    _ => Mop::Read {
                        key,
                        value: (status == Status::Ok).then_some(nums),
                    },
                }
            })
            .collect();
        Txn {
            process,
            mops,
            status,
            invoke,
            complete: (status != Status::Info).then_some(complete),
            error: None,
        }
    }
    fn ok(p: u64, a: u64, b: u64, mops: &[&str]) -> Txn {
        t(p, Status::Ok, a, b, mops)
    }

    #[test]
    fn a_serial_history_is_valid() {
        let h = [
            ok(1, 0, 1, &["a x 1", "a y 1"]),
            ok(2, 2, 3, &["r x 1", "a x 2", "r y 1"]),
            ok(1, 4, 5, &["r x 1 2", "a y 2", "r y 1 2"]),
            ok(2, 6, 7, &["r x 1 2", "r y 1 2"]),
        ];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn concurrent_transactions_may_serialize_either_way() {
        // T1 and T2 overlap in time; T2 saw T1's append, which is fine.
        let h = [
            ok(1, 0, 10, &["a x 1"]),
            ok(2, 2, 12, &["r x 1", "a y 5"]),
            ok(3, 20, 21, &["r x 1", "r y 5"]),
        ];
        assert_eq!(check(&h), vec![]);
        // Reading it empty would be fine too: T2 then precedes T1.
        let h = [
            ok(1, 0, 10, &["a x 1"]),
            ok(2, 2, 12, &["r x", "a y 5"]),
            ok(3, 20, 21, &["r x 1", "r y 5"]),
        ];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn g0_write_cycle() {
        // x says T1 before T2, y says T2 before T1.
        let h = [
            ok(1, 0, 10, &["a x 1", "a y 1"]),
            ok(2, 0, 10, &["a x 2", "a y 2"]),
            ok(3, 20, 21, &["r x 1 2", "r y 2 1"]),
        ];
        let a = check(&h);
        assert_eq!(kinds(&a), vec![Kind::G0], "{a:#?}");
        assert!(a[0].explanation.contains("-ww x->") && a[0].explanation.contains("-ww y->"));
    }

    #[test]
    fn g1c_circular_information_flow() {
        // Each saw the other's write.
        let h = [
            ok(1, 0, 10, &["a x 1", "r y 2"]),
            ok(2, 0, 10, &["a y 2", "r x 1"]),
        ];
        let a = check(&h);
        assert_eq!(kinds(&a), vec![Kind::G1c], "{a:#?}");
        assert!(a[0].explanation.contains("-wr"));
    }

    #[test]
    fn g2_write_skew() {
        // Each read the other's key empty, then both appended: two anti-dependencies.
        let h = [
            ok(1, 0, 10, &["r x", "a y 1"]),
            ok(2, 0, 10, &["r y", "a x 1"]),
            ok(3, 20, 21, &["r x 1", "r y 1"]),
        ];
        assert_eq!(kinds(&check(&h)), vec![Kind::G2]);
        // Lost update: both read x empty and appended; one anti-dependency plus ww.
        let h = [
            ok(1, 0, 10, &["r x", "a x 1"]),
            ok(2, 0, 10, &["r x", "a x 2"]),
            ok(3, 20, 21, &["r x 1 2"]),
        ];
        assert_eq!(kinds(&check(&h)), vec![Kind::GSingle]);
    }

    #[test]
    fn realtime_violation_is_strict_serializability_only() {
        // T2 began after T1 was acknowledged but did not see its append: serializable
        // (T2 before T1), not strictly.
        let h = [
            ok(1, 0, 1, &["a x 1"]),
            ok(2, 5, 6, &["r x"]),
            ok(3, 10, 11, &["r x 1"]),
        ];
        assert_eq!(kinds(&check(&h)), vec![Kind::GSingleRealtime]);
        // The same with T2 concurrent to T1 is fine.
        let h = [
            ok(1, 0, 5, &["a x 1"]),
            ok(2, 1, 6, &["r x"]),
            ok(3, 10, 11, &["r x 1"]),
        ];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn a_lost_append_is_found() {
        let h = [ok(1, 0, 1, &["a x 1"]), ok(2, 5, 6, &["r x"])];
        assert_eq!(kinds(&check(&h)), vec![Kind::LostAppend]);
        // Not if the read may have come first.
        let h = [ok(1, 0, 5, &["a x 1"]), ok(2, 1, 6, &["r x"])];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn g1a_aborted_read() {
        let h = [
            t(1, Status::Fail, 0, 1, &["a x 1"]),
            ok(2, 5, 6, &["r x 1"]),
        ];
        assert_eq!(kinds(&check(&h)), vec![Kind::G1a]);
        // An indeterminate append may be observed.
        let h = [
            t(1, Status::Info, 0, 0, &["a x 1"]),
            ok(2, 5, 6, &["r x 1"]),
        ];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn g1b_intermediate_read() {
        let h = [
            ok(1, 0, 1, &["a x 1", "a x 2"]),
            ok(2, 5, 6, &["r x 1"]),
            ok(3, 7, 8, &["r x 1 2"]),
        ];
        let k = kinds(&check(&h));
        assert!(k.contains(&Kind::G1b), "{k:?}");
        // The writer may read its own intermediate state.
        let h = [
            ok(1, 0, 1, &["a x 1", "r x 1", "a x 2"]),
            ok(3, 7, 8, &["r x 1 2"]),
        ];
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn duplicates_garbage_and_incompatible_orders() {
        let h = [ok(1, 0, 1, &["a x 1"]), ok(2, 5, 6, &["r x 1 1"])];
        assert!(kinds(&check(&h)).contains(&Kind::Duplicate));
        let h = [ok(1, 0, 1, &["a x 1"]), ok(2, 5, 6, &["r x 1 99"])];
        assert_eq!(kinds(&check(&h)), vec![Kind::Garbage]);
        let h = [
            ok(1, 0, 1, &["a x 1"]),
            ok(2, 0, 1, &["a x 2"]),
            ok(3, 5, 6, &["r x 1 2"]),
            ok(4, 5, 6, &["r x 2 1"]),
        ];
        assert_eq!(kinds(&check(&h)), vec![Kind::IncompatibleOrder]);
    }

    #[test]
    fn a_long_valid_history_is_checked_quickly() {
        // 4,000 transactions over 5 keys, 4 in flight at a time, serial by construction.
        let mut lists: Vec<Vec<u64>> = vec![Vec::new(); 5];
        let mut h = Vec::new();
        let mut rng = crate::rng::Rng::new(3);
        for i in 0..4000u64 {
            let (k1, k2) = (rng.below(5) as usize, rng.below(5) as usize);
            let point = 100 + i * 10;
            let read = Mop::Read {
                key: format!("k{k1}"),
                value: Some(lists[k1].clone()),
            };
            lists[k2].push(i);
            let append = Mop::Append {
                key: format!("k{k2}"),
                value: i,
            };
            h.push(Txn {
                process: i % 4,
                mops: vec![read, append],
                status: Status::Ok,
                invoke: point - rng.below(20),
                complete: Some(point + rng.below(20)),
                error: None,
            });
        }
        let started = std::time::Instant::now();
        assert_eq!(check(&h), vec![]);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        // Swap two adjacent elements in one late read: found.
        let last = h.len() - 1;
        if let Mop::Read { value: Some(v), .. } = &mut h[last].mops[0] {
            let n = v.len();
            v.swap(n - 1, n - 2);
        }
        assert!(!check(&h).is_empty());
    }
}
