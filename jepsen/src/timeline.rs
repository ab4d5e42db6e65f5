//! An SVG timeline of a (failing) sub-history: one row per process, one bar per
//! operation from invocation to completion (to the right edge if indeterminate).

use std::fmt::Write;

use crate::history::{Call, Op, Ret};

/// A one-line description: `p3 write 17 [t0..t1] ok`.
pub fn describe(op: &Op) -> String {
    let what = match (&op.call, &op.ret) {
        (Call::Read, Some(Ret::Read(v))) => format!("read -> {v:?}"),
        (Call::Read, _) => "read -> ?".into(),
        (Call::Write(v), _) => format!("write {v}"),
        (Call::Cas(e, n), Some(Ret::Cas(ok))) => {
            format!("cas {e}->{n} {}", if *ok { "ok" } else { "failed" })
        }
        (Call::Cas(e, n), _) => format!("cas {e}->{n} ?"),
    };
    let end = op.complete.map_or("indeterminate".to_string(), |c| {
        format!("{:.3}ms", c as f64 / 1e6)
    });
    format!(
        "process {:>3} {what:<24} invoked {:.3}ms, completed {end}",
        op.process,
        op.invoke as f64 / 1e6
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn svg(key: &str, ops: &[Op]) -> String {
    let mut processes: Vec<u64> = ops.iter().map(|o| o.process).collect();
    processes.sort_unstable();
    processes.dedup();
    let t0 = ops.iter().map(|o| o.invoke).min().unwrap_or(0);
    let t1 = ops
        .iter()
        .map(|o| o.complete.unwrap_or(o.invoke))
        .max()
        .unwrap_or(t0)
        .max(t0 + 1);
    let (width, row, left) = (1000.0, 40.0, 120.0);
    let x =
        |t: u64| left + (t.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * (width - left - 20.0);
    let height = row * (processes.len() as f64 + 1.5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<text x="10" y="16">key {} — not linearizable ({} operations, {:.3} ms)</text>"#,
        escape(key),
        ops.len(),
        (t1 - t0) as f64 / 1e6
    );
    for (i, p) in processes.iter().enumerate() {
        let y = row * (i as f64 + 1.0);
        let _ = writeln!(out, r#"<text x="10" y="{}">process {p}</text>"#, y + 20.0);
        for op in ops.iter().filter(|o| o.process == *p) {
            let (a, b) = (x(op.invoke), op.complete.map_or(width - 20.0, x));
            let color = match op.call {
                Call::Read => "#9cc3e6",
                Call::Write(_) => "#a8d5a2",
                Call::Cas(..) => "#f3c98b",
            };
            let dash = if op.complete.is_none() {
                r#" stroke-dasharray="4 2""#
            } else {
                ""
            };
            let _ = writeln!(
                out,
                r#"<rect x="{a:.1}" y="{:.1}" width="{:.1}" height="24" fill="{color}" stroke="black"{dash}/>"#,
                y + 6.0,
                (b - a).max(2.0)
            );
            let label = describe(op);
            let short = label.split("invoked").next().unwrap_or_default().trim();
            let short = short.split_once(' ').map_or(short, |(_, s)| s).trim();
            let short = short.split_once(' ').map_or(short, |(_, s)| s).trim();
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                a + 3.0,
                y + 22.0,
                escape(short)
            );
        }
    }
    out.push_str("</svg>\n");
    out
}
