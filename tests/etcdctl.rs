//! `etcdctl` (the real one, from Debian's etcd-client package) against Pontoon, and
//! the same script against real etcd 3.4 (etcd-server) with the outputs compared.

mod common;

use common::{mask, must_match_etcd, normalize, Member, Target};

/// One etcdctl invocation: arguments and optional stdin (for `txn`).
struct Step {
    args: &'static [&'static str],
    stdin: Option<&'static str>,
}

const fn run(args: &'static [&'static str]) -> Step {
    Step { args, stdin: None }
}

const TXN_SUCCEEDS: &str = "value(\"foo\") = \"baz\"\n\nput foo qux\nget foo\n\nget foo\n\n";
const TXN_DUPLICATE: &str = "\n\nput d 1\nput d 2\n\n\n";
const TXN_NESTED_READS: &str =
    "version(\"foo\") > \"1\"\ncreate(\"/b/1\") < \"100\"\n\nput t1 a\nget t1\ndel /b/1\n\n\n";
const TXN_FAILS: &str = "mod(\"foo\") = \"2\"\n\nput foo never\n\nget foo\nget /a/ --prefix\n\n";

const SCRIPT: &[Step] = &[
    run(&["put", "foo", "bar"]),
    run(&["put", "foo", "baz", "--prev-kv"]),
    run(&["get", "foo"]),
    run(&["get", "foo", "-w", "json"]),
    run(&["put", "/a/1", "x"]),
    run(&["put", "/a/2", "z"]),
    run(&["put", "/a/3", "y"]),
    run(&["put", "/b/1", "w"]),
    run(&["get", "/a/", "--prefix"]),
    run(&["get", "/a/", "--prefix", "--limit", "2"]),
    run(&["get", "/a/", "--prefix", "--limit", "2", "-w", "json"]),
    run(&[
        "get",
        "/a/",
        "--prefix",
        "--sort-by",
        "VALUE",
        "--order",
        "DESCEND",
    ]),
    run(&[
        "get",
        "/a/",
        "--prefix",
        "--sort-by",
        "MODIFY",
        "--order",
        "DESCEND",
    ]),
    run(&["get", "/a/", "--prefix", "--sort-by", "CREATE"]),
    run(&[
        "get",
        "/a/",
        "--prefix",
        "--sort-by",
        "VERSION",
        "--order",
        "ASCEND",
    ]),
    run(&["get", "/a/", "--prefix", "--keys-only"]),
    run(&["get", "/a/", "--prefix", "--print-value-only"]),
    run(&["get", "/a/2", "--from-key"]),
    run(&["get", "/a/1", "/a/3"]),
    run(&["get", "foo", "--rev", "2"]),
    run(&["get", "foo", "--rev", "3", "-w", "json"]),
    run(&["get", "foo", "--consistency", "s"]),
    run(&["get", "nothing"]),
    run(&["get", "nothing", "-w", "json"]),
    run(&["del", "/a/1"]),
    run(&["del", "/a/", "--prefix", "--prev-kv"]),
    run(&["del", "nothing"]),
    Step {
        args: &["txn"],
        stdin: Some(TXN_SUCCEEDS),
    },
    Step {
        args: &["txn", "-w", "json"],
        stdin: Some(TXN_FAILS),
    },
    Step {
        args: &["txn"],
        stdin: Some(TXN_DUPLICATE),
    },
    Step {
        args: &["txn", "-w", "json"],
        stdin: Some(TXN_NESTED_READS),
    },
    run(&["put", "foo", "v8"]),
    run(&["compaction", "3"]),
    run(&["get", "foo", "--rev", "2"]),
    run(&["get", "foo", "--rev", "3"]),
    run(&["get", "foo", "--rev", "100"]),
    run(&["compaction", "3"]),
    run(&["compaction", "100"]),
    run(&["compaction", "--physical", "5"]),
    run(&["put", "", "x"]),
    run(&["get", "", "--prefix", "-w", "json"]),
    run(&["del", "", "--prefix"]),
    run(&["get", "", "--prefix", "-w", "json"]),
];

fn run_script(m: &Member) -> Vec<String> {
    SCRIPT
        .iter()
        .map(|step| {
            let (ok, out, err) = match step.stdin {
                Some(input) => m.etcdctl_stdin(step.args, input),
                None => m.etcdctl(step.args),
            };
            normalize(&format!(
                "$ etcdctl {}\nexit ok: {ok}\nstdout:\n{out}stderr:\n{err}",
                step.args.join(" ")
            ))
        })
        .collect()
}

#[test]
fn etcdctl_outputs_match_etcd() {
    must_match_etcd(run_script);
}

#[test]
fn etcdctl_against_pontoon() {
    let m = Member::start(Target::Pontoon);
    let ok = |args: &[&str]| {
        let (ok, out, err) = m.etcdctl(args);
        assert!(ok, "etcdctl {args:?} failed: {err}");
        out
    };
    assert_eq!(ok(&["put", "foo", "bar"]), "OK\n");
    assert_eq!(ok(&["put", "foo", "baz", "--prev-kv"]), "OK\nfoo\nbar\n");
    assert_eq!(ok(&["get", "foo"]), "foo\nbaz\n");
    for (k, v) in [("/p/1", "c"), ("/p/2", "a"), ("/p/3", "b")] {
        ok(&["put", k, v]);
    }
    assert_eq!(
        ok(&["get", "/p/", "--prefix", "--keys-only"]),
        "/p/1\n\n/p/2\n\n/p/3\n\n"
    );
    assert_eq!(ok(&["get", "/p/", "--prefix", "--limit", "1"]), "/p/1\nc\n");
    assert_eq!(
        ok(&[
            "get",
            "/p/",
            "--prefix",
            "--sort-by",
            "VALUE",
            "--print-value-only"
        ]),
        "a\nb\nc\n"
    );
    assert!(
        ok(&["get", "/p/", "--prefix", "--limit", "1", "-w", "json"])
            .contains("\"more\":true,\"count\":3")
    );
    assert_eq!(ok(&["get", "foo", "--rev", "2"]), "foo\nbar\n");
    let (_, out, _) = m.etcdctl_stdin(
        &["txn"],
        "value(\"foo\") = \"baz\"\n\nput foo qux\n\nget foo\n\n",
    );
    assert_eq!(out, "SUCCESS\n\nOK\n");
    assert_eq!(ok(&["del", "/p/", "--prefix"]), "3\n");
    assert_eq!(ok(&["compaction", "4"]), "compacted revision 4\n");
    let (success, _, err) = m.etcdctl(&["get", "foo", "--rev", "2"]);
    assert!(!success);
    assert!(
        err.contains("etcdserver: mvcc: required revision has been compacted"),
        "{err}"
    );
}

/// `etcdctl watch` replaying history (with `--rev`, `--prev-kv`, from a compacted
/// revision) prints the same against both servers.
#[test]
fn etcdctl_watch_matches_etcd() {
    let run = |m: &Member| -> Vec<String> {
        for (k, v) in [("w1", "a"), ("w2", "b"), ("w1", "c")] {
            assert!(m.etcdctl(&["put", k, v]).0);
        }
        assert!(m.etcdctl(&["del", "w2"]).0);
        assert!(m.etcdctl_stdin(&["txn"], "\n\nput w3 x\nput w4 y\n\n\n").0);
        let watch = |args: &[&str]| {
            let out = std::process::Command::new("timeout")
                .arg("2")
                .arg("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(m.endpoint())
                .arg("watch")
                .args(args)
                .output()
                .expect("run etcdctl watch");
            normalize(&format!(
                "$ etcdctl watch {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        };
        let mut outs = vec![
            watch(&["w", "--prefix", "--rev", "2"]),
            watch(&["w1", "--rev", "1", "--prev-kv"]),
            watch(&["w", "--prefix", "--rev", "3", "-w", "json"]),
        ];
        assert!(m.etcdctl(&["compaction", "4"]).0);
        outs.push(watch(&["w", "--prefix", "--rev", "2"]));
        outs.push(watch(&["w", "--prefix", "--rev", "4"]));
        outs
    };
    must_match_etcd(run);
}

/// `etcdctl lease ...` prints the same against both servers (lease IDs, which each
/// server chooses, and the remaining TTL second masked).
#[test]
fn etcdctl_lease_matches_etcd() {
    let run = |m: &Member| -> Vec<String> {
        let (ok, out, err) = m.etcdctl(&["lease", "grant", "100"]);
        assert!(ok, "{err}");
        let id = out.split_whitespace().nth(1).unwrap().to_string();
        let dec = i64::from_str_radix(&id, 16).unwrap().to_string();
        let steps: Vec<Vec<&str>> = vec![
            vec!["put", "--lease", &id, "lk", "v"],
            vec!["get", "lk", "-w", "json"],
            vec!["lease", "timetolive", &id, "--keys"],
            vec!["lease", "list"],
            vec!["lease", "keep-alive", "--once", &id],
            vec!["lease", "revoke", &id],
            vec!["get", "lk"],
            vec!["lease", "revoke", &id],
            vec!["lease", "timetolive", &id],
            vec!["put", "--lease", &id, "lk", "v"],
            vec!["lease", "grant", "-5"],
        ];
        steps
            .iter()
            .map(|args| {
                let (ok, out, err) = m.etcdctl(args);
                let text = format!("$ etcdctl {}\nok: {ok}\n{out}{err}", args.join(" "))
                    .replace(&id, "<id>")
                    .replace(&dec, "<id>");
                let text = mask(&text, "remaining(", "ttl", |c| c == 's');
                // A lease granted by the last step has its own fresh ID.
                let text = mask(&text, "lease ", "lease", |c| c == ' ');
                normalize(&text)
            })
            .collect()
    };
    must_match_etcd(run);
}
