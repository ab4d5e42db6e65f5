//! A linearizability checker for registers: Wing & Gong's search with Lowe's
//! memoization, as in Knossos and Porcupine.
//!
//! The history is split per key first (linearizability is compositional, and each key
//! is an independent register), then each key's operations are searched:
//!
//! - every operation is an interval `[invoke, complete]`; an *indeterminate*
//!   operation (a timeout, a connection lost mid-request) may take effect at any point
//!   after its invocation or never, so it completes at infinity;
//! - the search walks the events in time order, tentatively linearizing any call whose
//!   effect is allowed by the model in the current state; when it reaches the return
//!   of an operation it has not linearized, it backtracks;
//! - a cache of (set of linearized operations, register state) prunes configurations
//!   already explored (Lowe): without it the search is exponential in concurrency;
//! - the history is valid once every determinate operation is linearized (the
//!   remaining indeterminate ones can always be placed at the end, unobserved).
//!
//! A time budget that runs out gives [`Verdict::Unknown`], never `Valid`. For an
//! invalid key the checker shrinks the key's history to a 1-minimal non-linearizable
//! subset (removing any single operation from it makes it linearizable).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use crate::history::{Call, Op, Ret};

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Valid,
    /// The key and a minimal non-linearizable set of its operations.
    Invalid {
        key: String,
        ops: Vec<Op>,
    },
    /// The budget ran out before a decision.
    Unknown {
        reason: String,
    },
    /// A workload's guarantees were broken (watch: lost, duplicated, reordered or
    /// wrong events).
    Violations(Vec<String>),
}

/// The register's state: the value, or absent.
type State = Option<u64>;

/// The register model: the state after `op` from `state`, or `None` if `op`'s
/// observed result is impossible in `state`.
fn step(state: State, op: &Op) -> Option<State> {
    match (&op.call, &op.ret) {
        (Call::Read, Some(Ret::Read(v))) => (state == *v).then_some(state),
        (Call::Read, _) => Some(state),
        (Call::Write(v), _) => Some(Some(*v)),
        (Call::Cas(e, n), Some(Ret::Cas(true))) => (state == Some(*e)).then_some(Some(*n)),
        (Call::Cas(e, _), Some(Ret::Cas(false))) => (state != Some(*e)).then_some(state),
        // Indeterminate: if linearized here, the compare decides.
        (Call::Cas(e, n), _) => Some(if state == Some(*e) { Some(*n) } else { state }),
    }
}

/// A growable bit set (which operations are linearized).
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

enum Outcome {
    Linearizable,
    NotLinearizable,
    OutOfTime,
}

/// Searches one key's operations (determinate ones have `complete`, indeterminate
/// ones `complete == None`).
fn search(ops: &[&Op], deadline: Instant) -> Outcome {
    let n = ops.len();
    // Events: (time, is_return, op). Calls sort before returns at equal times, which
    // treats touching intervals as concurrent (never a false alarm).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.invoke, false, i));
        events.push((op.complete.unwrap_or(u64::MAX), true, i));
    }
    events.sort_by_key(|&(t, ret, i)| (t, ret, i));
    // A doubly linked list over the events; node 0 is the head sentinel.
    let m = events.len();
    let mut next: Vec<usize> = (1..=m + 2).collect();
    let mut prev: Vec<usize> = (0..m + 2).map(|i| i.saturating_sub(1)).collect();
    let mut ret_node = vec![0usize; n];
    for (k, &(_, is_ret, i)) in events.iter().enumerate() {
        if is_ret {
            ret_node[i] = k + 1;
        }
    }
    let end = m + 1;
    let determinate = ops.iter().filter(|o| o.complete.is_some()).count();
    let mut done = 0usize;
    let mut state: State = None;
    let mut linearized = Bits::new(n);
    let mut cache: HashSet<(Bits, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut node = next[0];
    let mut steps = 0u64;

    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, x: usize| {
        let (p, q) = (prev[x], next[x]);
        next[p] = q;
        prev[q] = p;
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, x: usize| {
        let (p, q) = (prev[x], next[x]);
        next[p] = x;
        prev[q] = x;
    };

    loop {
        if done == determinate {
            return Outcome::Linearizable;
        }
        steps += 1;
        if steps % 4096 == 0 && Instant::now() > deadline {
            return Outcome::OutOfTime;
        }
        if node == end {
            // Only indeterminate returns remain behind us; cannot happen while a
            // determinate op is unlinearized (its return precedes infinity).
            return Outcome::NotLinearizable;
        }
        let (_, is_ret, i) = events[node - 1];
        if !is_ret {
            if let Some(s) = step(state, ops[i]) {
                let mut lin = linearized.clone();
                lin.set(i);
                if cache.insert((lin.clone(), s)) {
                    stack.push((node, state));
                    state = s;
                    linearized = lin;
                    if ops[i].complete.is_some() {
                        done += 1;
                    }
                    unlink(&mut next, &mut prev, node);
                    unlink(&mut next, &mut prev, ret_node[i]);
                    node = next[0];
                    continue;
                }
            }
            node = next[node];
        } else {
            // The return of an operation not yet linearized: backtrack.
            let Some((call, s)) = stack.pop() else {
                return Outcome::NotLinearizable;
            };
            let (_, _, j) = events[call - 1];
            state = s;
            linearized.clear(j);
            if ops[j].complete.is_some() {
                done -= 1;
            }
            relink(&mut next, &mut prev, ret_node[j]);
            relink(&mut next, &mut prev, call);
            node = next[call];
        }
    }
}

/// The value an operation may leave in the register.
fn written(op: &Op) -> Option<u64> {
    match op.call {
        Call::Write(v) | Call::Cas(_, v) => Some(v),
        Call::Read => None,
    }
}

/// Shrinks a non-linearizable set of operations to a small one that still explains
/// itself: an operation whose value a remaining read observed is kept (so "read 5"
/// always comes with the write of 5), and removing any other operation would make
/// the rest linearizable.
fn shrink(ops: Vec<&Op>, deadline: Instant) -> Vec<Op> {
    let mut ops = ops;
    let mut i = 0;
    while i < ops.len() && Instant::now() < deadline {
        let observed = written(ops[i]).is_some_and(|v| {
            ops.iter().any(|o| {
                o.ret == Some(Ret::Read(Some(v)))
                    || matches!(o.call, Call::Cas(e, _) if e == v && o.ret == Some(Ret::Cas(true)))
            })
        });
        if observed {
            i += 1;
            continue;
        }
        let mut fewer = ops.clone();
        fewer.remove(i);
        match search(&fewer, deadline) {
            Outcome::NotLinearizable => ops = fewer,
            _ => i += 1,
        }
    }
    ops.into_iter().cloned().collect()
}

/// Checks a whole history (completed operations: `Op::complete` set for ok ones,
/// `None` for indeterminate ones; failed operations must already be removed).
pub fn check(history: &[Op], budget: Duration) -> Verdict {
    let deadline = Instant::now() + budget;
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        // An indeterminate read has no effect and tells nothing.
        if op.complete.is_none() && op.call == Call::Read {
            continue;
        }
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        match search(&ops, deadline) {
            Outcome::Linearizable => {}
            Outcome::NotLinearizable => {
                let minimal = shrink(ops, Instant::now() + Duration::from_secs(30));
                return Verdict::Invalid {
                    key: key.to_string(),
                    ops: minimal,
                };
            }
            Outcome::OutOfTime => {
                return Verdict::Unknown {
                    reason: format!("time budget of {budget:?} ran out on key {key}"),
                }
            }
        }
    }
    Verdict::Valid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(process: u64, key: &str, call: Call, ret: Option<Ret>, t: (u64, Option<u64>)) -> Op {
        Op {
            process,
            key: key.to_string(),
            call,
            ret,
            invoke: t.0,
            complete: t.1,
        }
    }
    fn w(p: u64, v: u64, a: u64, b: u64) -> Op {
        op(p, "k", Call::Write(v), Some(Ret::Write), (a, Some(b)))
    }
    fn r(p: u64, v: Option<u64>, a: u64, b: u64) -> Op {
        op(p, "k", Call::Read, Some(Ret::Read(v)), (a, Some(b)))
    }
    fn cas(p: u64, e: u64, n: u64, ok: bool, a: u64, b: u64) -> Op {
        op(p, "k", Call::Cas(e, n), Some(Ret::Cas(ok)), (a, Some(b)))
    }
    const T: Duration = Duration::from_secs(10);

    #[test]
    fn sequential_and_concurrent_histories() {
        assert_eq!(
            check(&[w(1, 1, 0, 1), r(2, Some(1), 2, 3)], T),
            Verdict::Valid
        );
        // Read concurrent with the write may see either value.
        assert_eq!(
            check(&[w(1, 1, 0, 10), r(2, None, 2, 3)], T),
            Verdict::Valid
        );
        assert_eq!(
            check(&[w(1, 1, 0, 10), r(2, Some(1), 2, 3)], T),
            Verdict::Valid
        );
        // A stale read after the write completed is not linearizable.
        let bad = [w(1, 1, 0, 1), w(1, 2, 2, 3), r(2, Some(1), 4, 5)];
        match check(&bad, T) {
            Verdict::Invalid { key, ops } => {
                assert_eq!(key, "k");
                // The stale read, the write it saw, and the write that superseded it.
                assert_eq!(ops, bad.to_vec());
            }
            v => panic!("expected invalid, got {v:?}"),
        }
    }

    #[test]
    fn cas_outcomes_must_agree_with_the_state() {
        let ok = [w(1, 1, 0, 1), cas(2, 1, 2, true, 2, 3), r(3, Some(2), 4, 5)];
        assert_eq!(check(&ok, T), Verdict::Valid);
        let both_won = [
            w(1, 1, 0, 1),
            cas(2, 1, 2, true, 2, 5),
            cas(3, 1, 3, true, 2, 5),
        ];
        assert!(matches!(check(&both_won, T), Verdict::Invalid { .. }));
        let failed_wrongly = [w(1, 1, 0, 1), cas(2, 1, 2, false, 2, 3)];
        assert!(matches!(check(&failed_wrongly, T), Verdict::Invalid { .. }));
    }

    #[test]
    fn indeterminate_writes_may_or_may_not_happen() {
        let lost = op(1, "k", Call::Write(7), None, (0, None));
        // Observed later...
        assert_eq!(
            check(&[lost.clone(), r(2, Some(7), 5, 6)], T),
            Verdict::Valid
        );
        // ...or never.
        assert_eq!(check(&[lost.clone(), r(2, None, 5, 6)], T), Verdict::Valid);
        // But not before it was invoked.
        let early = [
            r(2, Some(7), 0, 1),
            op(1, "k", Call::Write(7), None, (2, None)),
        ];
        assert!(matches!(check(&early, T), Verdict::Invalid { .. }));
        // And not un-done once seen.
        let flicker = [lost, r(2, Some(7), 5, 6), r(2, None, 7, 8)];
        assert!(matches!(check(&flicker, T), Verdict::Invalid { .. }));
    }

    #[test]
    fn keys_are_independent() {
        let mut h = vec![w(1, 1, 0, 1)];
        h.push(op(
            2,
            "other",
            Call::Read,
            Some(Ret::Read(None)),
            (2, Some(3)),
        ));
        h.push(r(2, Some(1), 4, 5));
        assert_eq!(check(&h, T), Verdict::Valid);
    }

    #[test]
    fn many_concurrent_operations_are_decided_quickly() {
        // 20 processes, 2,000 ops on one key, heavily overlapping, all consistent:
        // each process writes unique values and reads its own last write back while
        // nobody else writes in between (a serial order exists by construction).
        let mut h = Vec::new();
        let mut t = 0;
        for i in 0..1000u64 {
            let p = i % 20;
            h.push(w(p, i, t, t + 3));
            h.push(r(p + 100, Some(i), t + 4, t + 7));
            t += 5;
        }
        let started = Instant::now();
        assert_eq!(check(&h, T), Verdict::Valid);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A linearizable history by construction: operations take effect at increasing
    /// points, each interval spans its point, and results follow the register.
    pub(crate) fn synthetic(ops: usize, keys: usize, seed: u64) -> Vec<Op> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut state = vec![None; keys];
        let mut out = Vec::with_capacity(ops);
        for i in 0..ops as u64 {
            let k = (i % keys as u64) as usize;
            let point = 1_000 + i * 10;
            let invoke = point - rng.below(60);
            let complete = point + rng.below(60);
            let (call, ret) = match rng.below(10) {
                0..=3 => (Call::Read, Ret::Read(state[k])),
                4..=7 => {
                    state[k] = Some(i);
                    (Call::Write(i), Ret::Write)
                }
                _ => {
                    let e = rng.below(i.max(1));
                    let e = if rng.below(2) == 0 {
                        state[k].unwrap_or(e)
                    } else {
                        e
                    };
                    let ok = state[k] == Some(e);
                    if ok {
                        state[k] = Some(i);
                    }
                    (Call::Cas(e, i), Ret::Cas(ok))
                }
            };
            out.push(Op {
                process: i % 50,
                key: format!("k{k}"),
                call,
                ret: Some(ret),
                invoke,
                complete: Some(complete),
            });
        }
        out
    }

    #[test]
    fn a_100k_operation_history_is_decided() {
        let h = synthetic(100_000, 100, 42);
        let started = Instant::now();
        assert_eq!(check(&h, Duration::from_secs(600)), Verdict::Valid);
        eprintln!(
            "100,000 operations over 100 keys checked in {:?}",
            started.elapsed()
        );
        // One stale read makes it invalid, and the checker finds it.
        let mut bad = h.clone();
        let i = bad
            .iter()
            .rposition(|o| matches!(o.ret, Some(Ret::Read(Some(_)))))
            .unwrap();
        bad[i].ret = Some(Ret::Read(Some(u64::MAX)));
        assert!(matches!(
            check(&bad, Duration::from_secs(600)),
            Verdict::Invalid { .. }
        ));
    }
}
