//! Histories: what each client asked for, when, and what it learned.
//!
//! Clients record an *invoke* before sending a request and a *completion* when it
//! ends: `ok` (the result is known), `fail` (the request certainly had no effect) or
//! `info` (indeterminate: a timeout or a lost connection; the operation may or may not
//! have taken effect, and is never retried). Times are nanoseconds on one monotonic
//! clock shared by every client of a run.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Call {
    Read,
    Write(u64),
    /// Compare-and-set: if the value is the first, set the second.
    Cas(u64, u64),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    Read(Option<u64>),
    Write,
    Cas(bool),
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Ok,
    Fail,
    Info,
}

/// One completed (or abandoned) client operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// The logical client; a new one takes over after an indeterminate operation.
    pub process: u64,
    pub key: String,
    pub call: Call,
    /// `None` when indeterminate.
    pub ret: Option<Ret>,
    pub invoke: u64,
    /// `None` when indeterminate (the operation may take effect at any later time).
    pub complete: Option<u64>,
}

/// One line of the recorded history file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub process: u64,
    /// "invoke", "ok", "fail" or "info".
    pub kind: String,
    pub key: String,
    pub call: Call,
    pub ret: Option<Ret>,
    pub time: u64,
    pub error: Option<String>,
}

/// The operations of a run, as clients completed them.
#[derive(Default)]
pub struct History {
    pub ops: Vec<(Op, Status, Option<String>)>,
}

impl History {
    /// Writes the history as JSON lines (invoke and completion events in time order).
    pub fn write_jsonl(&self, path: &Path) -> std::io::Result<()> {
        let mut events = Vec::new();
        for (op, status, error) in &self.ops {
            events.push(Event {
                process: op.process,
                kind: "invoke".into(),
                key: op.key.clone(),
                call: op.call.clone(),
                ret: None,
                time: op.invoke,
                error: None,
            });
            events.push(Event {
                process: op.process,
                kind: match status {
                    Status::Ok => "ok",
                    Status::Fail => "fail",
                    Status::Info => "info",
                }
                .into(),
                key: op.key.clone(),
                call: op.call.clone(),
                ret: op.ret.clone(),
                time: op.complete.unwrap_or(u64::MAX),
                error: error.clone(),
            });
        }
        events.sort_by_key(|e| e.time);
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for e in events {
            serde_json::to_writer(&mut f, &e)?;
            f.write_all(b"\n")?;
        }
        f.flush()
    }

    /// The operations the checker considers: failed ones certainly had no effect.
    pub fn for_checker(&self) -> Vec<Op> {
        self.ops
            .iter()
            .filter(|(_, s, _)| *s != Status::Fail)
            .map(|(op, _, _)| op.clone())
            .collect()
    }

    pub fn count(&self, status: Status) -> usize {
        self.ops.iter().filter(|(_, s, _)| *s == status).count()
    }
}
