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

/// How a request ended, for the history: `Some(Ok(_))` is `ok` with its result; an
/// error is `fail` when the request certainly had no effect (it is `harmless`, like a
/// read, or the error is definite), else `info`; `None` (timed out) is `fail` for a
/// harmless request and `info` otherwise. Every workload classifies its requests here.
pub fn outcome<T>(
    result: Option<Result<T, etcd_client::Error>>,
    harmless: bool,
) -> (Status, Option<T>, Option<String>) {
    match result {
        Some(Ok(r)) => (Status::Ok, Some(r), None),
        Some(Err(e)) if harmless || is_definite_failure(&e) => {
            (Status::Fail, None, Some(e.to_string()))
        }
        Some(Err(e)) => (Status::Info, None, Some(e.to_string())),
        None if harmless => (Status::Fail, None, Some("timeout".into())),
        None => (Status::Info, None, Some("timeout".into())),
    }
}

/// Whether a failed request certainly had no effect.
pub fn is_definite_failure(e: &etcd_client::Error) -> bool {
    match e {
        // The connection could not be made: the request never left.
        etcd_client::Error::GRpcStatus(s)
            if s.code() == tonic::Code::Unavailable
                && (s.message().contains("tcp connect error")
                    || s.message().contains("Connection refused")) =>
        {
            true
        }
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::NotFound
                    | tonic::Code::OutOfRange
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
            ) || s.message() == "etcdserver: no leader"
        }
        _ => false,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_connections_are_definite_failures() {
        let refused =
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("tcp connect error"));
        assert!(is_definite_failure(&refused));
        let lost = etcd_client::Error::GRpcStatus(tonic::Status::unknown("transport error"));
        assert!(!is_definite_failure(&lost));
        let changed = etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
            "etcdserver: leader changed",
        ));
        assert!(!is_definite_failure(&changed));
    }

    #[test]
    fn only_harmless_or_definite_errors_are_failures() {
        let lost = || etcd_client::Error::GRpcStatus(tonic::Status::unknown("transport error"));
        assert_eq!(outcome(Some(Ok(1)), false), (Status::Ok, Some(1), None));
        assert_eq!(outcome::<()>(Some(Err(lost())), false).0, Status::Info);
        assert_eq!(outcome::<()>(Some(Err(lost())), true).0, Status::Fail);
        assert_eq!(outcome::<()>(None, false).0, Status::Info);
        assert_eq!(outcome::<()>(None, true).0, Status::Fail);
    }
}
