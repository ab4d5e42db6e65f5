//! The JSON gateway (`POST /v3/...`) against a real `pontoon store`, driven with `curl`
//! as its users drive it: every endpoint family, streamed watch / keep-alive /
//! snapshot / observe, error shapes, and (when etcd is installed) the same requests
//! answered by etcd 3.4 compared field for field.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{have_etcd, Member, Target};
use serde_json::Value;

/// `curl -X POST -d body`: (HTTP status, response headers, body), or `None` when
/// nothing answered.
fn try_post(m: &Member, path: &str, body: &str, headers: &[&str]) -> Option<(u16, String, String)> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-m",
        "20",
        "-D",
        "-",
        "-X",
        "POST",
        "--data-binary",
        body,
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd
        .arg(format!("{}{path}", m.endpoint()))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // A large body is preceded by "100 Continue".
    let text = text
        .strip_prefix("HTTP/1.1 100 Continue\r\n\r\n")
        .unwrap_or(&text);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    // etcd sends HTTP/1.1 trailers after an error, which `-D -` prints after the body.
    let body = body.split("Grpc-Trailer-").next().unwrap_or_default();
    Some((status, head.to_ascii_lowercase(), body.to_string()))
}

fn post_with(m: &Member, path: &str, body: &str, headers: &[&str]) -> (u16, String, String) {
    try_post(m, path, body, headers).unwrap_or_else(|| panic!("no HTTP answer from {path}"))
}

fn post(m: &Member, path: &str, body: &str) -> (u16, String) {
    let (status, _, body) = post_with(m, path, body, &[]);
    (status, body)
}

/// A 200 answer, parsed.
fn must_post(m: &Member, path: &str, body: &str) -> Value {
    let (status, head, text) = post_with(m, path, body, &[]);
    assert_eq!(status, 200, "{path} {body}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {head}\n{text}"))
}

/// A failed unary call: grpc-gateway's `{"error","message","code"}`, in that order.
fn must_fail(m: &Member, path: &str, body: &str, http: u16, code: i64, message: &str) {
    let (status, text) = post(m, path, body);
    assert_eq!(status, http, "{path} {body}: {text}");
    let want = format!(
        r#"{{"error":{m},"message":{m},"code":{code}}}"#,
        m = serde_json::to_string(message).unwrap()
    );
    assert_eq!(text, want, "{path} {body}");
}

fn b64(s: &str) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| n << 8 | *b as u32) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(s: &str) -> String {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {s}"),
        };
        bits = bits << 6 | v as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n & 0xff) as u8);
        }
    }
    String::from_utf8(out).expect("utf-8")
}

/// An int64/uint64 field: grpc-gateway writes them as JSON strings.
fn int(v: &Value) -> i128 {
    v.as_str()
        .unwrap_or_else(|| panic!("64-bit integers are strings: {v}"))
        .parse()
        .expect("integer")
}

fn revision(v: &Value) -> i128 {
    int(&v["header"]["revision"])
}

/// A streaming request left open, its answer read line by line.
struct Stream {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Stream {
    fn open(m: &Member, path: &str, body: &str) -> Stream {
        let mut child = Command::new("curl")
            .args(["-s", "-N", "-X", "POST", "--data-binary", body])
            .arg(format!("{}{path}", m.endpoint()))
            .stdout(Stdio::piped())
            .spawn()
            .expect("run curl");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Stream { child, lines }
    }

    /// The next `{"result": ...}` message.
    fn must_next(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a streamed message");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{line}");
        v["result"].clone()
    }

    fn must_be_quiet(&self, d: Duration) {
        if let Ok(line) = self.lines.recv_timeout(d) {
            panic!("unexpected message: {line}");
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kv_put_range_delete_txn_compaction() {
    let m = Member::start(Target::Pontoon);

    // A body as etcd's documentation writes it.
    let put = must_post(&m, "/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#);
    let r1 = revision(&put);
    assert!(r1 > 1);
    let header = put["header"].as_object().unwrap();
    for f in ["cluster_id", "member_id", "revision", "raft_term"] {
        assert!(header[f].is_string(), "{f} is a string: {put}");
    }
    assert_eq!(put.as_object().unwrap().len(), 1, "no prev_kv asked: {put}");

    let put = must_post(
        &m,
        "/v3/kv/put",
        &format!(
            r#"{{"key":"{}","value":"{}","prev_kv":true}}"#,
            b64("foo"),
            b64("baz")
        ),
    );
    assert_eq!(revision(&put), r1 + 1);
    assert_eq!(unb64(put["prev_kv"]["value"].as_str().unwrap()), "bar");
    assert_eq!(int(&put["prev_kv"]["mod_revision"]), r1);

    let got = must_post(
        &m,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64("foo")),
    );
    assert_eq!(int(&got["count"]), 1);
    let kv = &got["kvs"][0];
    assert_eq!(unb64(kv["key"].as_str().unwrap()), "foo");
    assert_eq!(unb64(kv["value"].as_str().unwrap()), "baz");
    assert_eq!(int(&kv["create_revision"]), r1);
    assert_eq!(int(&kv["mod_revision"]), r1 + 1);
    assert_eq!(int(&kv["version"]), 2);
    assert!(
        kv.get("lease").is_none(),
        "default values are omitted: {kv}"
    );
    assert!(got.get("more").is_none());

    // A range over a prefix, sorted, limited; lowerCamel names and numbers accepted.
    for k in ["p/a", "p/b", "p/c"] {
        must_post(
            &m,
            "/v3/kv/put",
            &format!(r#"{{"key":"{}","value":"{}"}}"#, b64(k), b64(k)),
        );
    }
    let got = must_post(
        &m,
        "/v3/kv/range",
        &format!(
            r#"{{"key":"{}","rangeEnd":"{}","limit":2,"sort_order":"DESCEND","sort_target":"KEY"}}"#,
            b64("p/"),
            b64("p0")
        ),
    );
    let keys: Vec<String> = got["kvs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| unb64(kv["key"].as_str().unwrap()))
        .collect();
    assert_eq!(keys, ["p/c", "p/b"]);
    assert_eq!(got["more"], Value::Bool(true));
    assert_eq!(int(&got["count"]), 3);
    let got = must_post(
        &m,
        "/v3/kv/range",
        &format!(
            r#"{{"key":"{}","range_end":"{}","count_only":true}}"#,
            b64("p/"),
            b64("p0")
        ),
    );
    assert!(got.get("kvs").is_none());
    assert_eq!(int(&got["count"]), 3);
    // Reading at an older revision.
    let old = must_post(
        &m,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}","revision":"{r1}"}}"#, b64("foo")),
    );
    assert_eq!(unb64(old["kvs"][0]["value"].as_str().unwrap()), "bar");

    // Txn: the compare picks the branch; responses are oneofs by field name.
    let txn = format!(
        r#"{{"compare":[{{"key":"{foo}","target":"VALUE","result":"EQUAL","value":"{baz}"}}],
            "success":[{{"request_range":{{"key":"{foo}"}}}},{{"request_put":{{"key":"{t}","value":"{one}"}}}}],
            "failure":[{{"request_delete_range":{{"key":"{foo}"}}}}]}}"#,
        foo = b64("foo"),
        baz = b64("baz"),
        t = b64("t"),
        one = b64("1")
    );
    let before = revision(&must_post(
        &m,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64("t")),
    ));
    let done = must_post(&m, "/v3/kv/txn", &txn);
    assert_eq!(done["succeeded"], Value::Bool(true));
    assert_eq!(revision(&done), before + 1);
    let responses = done["responses"].as_array().unwrap();
    assert_eq!(
        unb64(
            responses[0]["response_range"]["kvs"][0]["value"]
                .as_str()
                .unwrap()
        ),
        "baz"
    );
    assert_eq!(
        int(&responses[1]["response_put"]["header"]["revision"]),
        before + 1
    );
    // The same txn again fails its compare? No: the value is still baz. Change it.
    must_post(
        &m,
        "/v3/kv/put",
        &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("foo"), b64("qux")),
    );
    let done = must_post(&m, "/v3/kv/txn", &txn);
    assert!(done.get("succeeded").is_none(), "false is omitted: {done}");
    assert_eq!(
        int(&done["responses"][0]["response_delete_range"]["deleted"]),
        1
    );

    // DeleteRange with prev_kvs.
    let del = must_post(
        &m,
        "/v3/kv/deleterange",
        &format!(
            r#"{{"key":"{}","range_end":"{}","prev_kv":true}}"#,
            b64("p/"),
            b64("p0")
        ),
    );
    assert_eq!(int(&del["deleted"]), 3);
    assert_eq!(del["prev_kvs"].as_array().unwrap().len(), 3);
    let gone = must_post(
        &m,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64("p/a")),
    );
    assert!(
        gone.get("kvs").is_none() && gone.get("count").is_none(),
        "{gone}"
    );

    // Compaction, then the compacted revision is refused with etcd's error.
    let now = revision(&del);
    must_post(
        &m,
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{now}","physical":true}}"#),
    );
    must_fail(
        &m,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}","revision":"{r1}"}}"#, b64("foo")),
        400,
        11,
        "etcdserver: mvcc: required revision has been compacted",
    );
    must_fail(
        &m,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}","revision":"{}"}}"#, b64("foo"), now + 100),
        400,
        11,
        "etcdserver: mvcc: required revision is a future revision",
    );
}

#[test]
fn lease_grant_keepalive_timetolive_leases_revoke() {
    let m = Member::start(Target::Pontoon);
    let grant = must_post(&m, "/v3/lease/grant", r#"{"TTL":60}"#);
    let id = int(&grant["ID"]);
    assert!(id > 0);
    assert_eq!(int(&grant["TTL"]), 60);
    let fixed = must_post(&m, "/v3/lease/grant", r#"{"TTL":"30","ID":"4242"}"#);
    assert_eq!(int(&fixed["ID"]), 4242);
    must_fail(
        &m,
        "/v3/lease/grant",
        r#"{"TTL":30,"ID":"4242"}"#,
        412,
        9,
        "etcdserver: lease already exists",
    );

    must_post(
        &m,
        "/v3/kv/put",
        &format!(
            r#"{{"key":"{}","value":"{}","lease":"{id}"}}"#,
            b64("leased"),
            b64("v")
        ),
    );
    let ttl = must_post(
        &m,
        "/v3/lease/timetolive",
        &format!(r#"{{"ID":"{id}","keys":true}}"#),
    );
    assert_eq!(int(&ttl["grantedTTL"]), 60);
    assert!((55..=60).contains(&int(&ttl["TTL"])), "{ttl}");
    let keys: Vec<String> = ttl["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| unb64(k.as_str().unwrap()))
        .collect();
    assert_eq!(keys, ["leased"]);
    // etcd's alias paths.
    let alias = must_post(
        &m,
        "/v3/kv/lease/timetolive",
        &format!(r#"{{"ID":"{id}"}}"#),
    );
    assert_eq!(int(&alias["ID"]), id);
    assert!(alias.get("keys").is_none());

    // Keep-alive streams one answer per request message, then ends with the body.
    let (status, body) = post(
        &m,
        "/v3/lease/keepalive",
        &format!(r#"{{"ID":"{id}"}} {{"ID":"{id}"}}"#),
    );
    assert_eq!(status, 200, "{body}");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 2, "{body}");
    assert!(body.ends_with("}\n"));
    for line in lines {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(int(&v["result"]["ID"]), id);
        assert_eq!(int(&v["result"]["TTL"]), 60);
    }

    for path in ["/v3/lease/leases", "/v3/kv/lease/leases"] {
        let all = must_post(&m, path, "{}");
        let mut ids: Vec<i128> = all["leases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| int(&l["ID"]))
            .collect();
        ids.sort();
        let mut want = vec![id, 4242];
        want.sort();
        assert_eq!(ids, want);
    }

    // Revoking deletes the lease's keys.
    let before = revision(&must_post(
        &m,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64("leased")),
    ));
    let rev = must_post(&m, "/v3/lease/revoke", &format!(r#"{{"ID":"{id}"}}"#));
    assert_eq!(revision(&rev), before + 1);
    let gone = must_post(
        &m,
        "/v3/kv/range",
        &format!(r#"{{"key":"{}"}}"#, b64("leased")),
    );
    assert!(gone.get("kvs").is_none(), "{gone}");
    must_fail(
        &m,
        "/v3/kv/lease/revoke",
        &format!(r#"{{"ID":"{id}"}}"#),
        404,
        5,
        "etcdserver: requested lease not found",
    );
    let ttl = must_post(&m, "/v3/lease/timetolive", &format!(r#"{{"ID":"{id}"}}"#));
    assert_eq!(int(&ttl["TTL"]), -1);
    must_post(&m, "/v3/kv/lease/revoke", r#"{"ID":"4242"}"#);
}

#[test]
fn watch_streams_events_made_after_it() {
    let m = Member::start(Target::Pontoon);
    let first = must_post(
        &m,
        "/v3/kv/put",
        &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("w/1"), b64("a")),
    );
    let r1 = revision(&first);

    // curl sends the whole body at once; the watch keeps serving after it.
    let w = Stream::open(
        &m,
        "/v3/watch",
        &format!(
            r#"{{"create_request":{{"key":"{}","range_end":"{}","prev_kv":true}}}}"#,
            b64("w/"),
            b64("w0")
        ),
    );
    let created = w.must_next();
    assert_eq!(created["created"], Value::Bool(true), "{created}");
    assert!(
        created.get("watch_id").is_none(),
        "watch 0 is omitted: {created}"
    );
    assert_eq!(revision(&created), r1);
    w.must_be_quiet(Duration::from_millis(300));

    must_post(
        &m,
        "/v3/kv/put",
        &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("w/1"), b64("b")),
    );
    let ev = w.must_next();
    assert_eq!(revision(&ev), r1 + 1);
    let e = &ev["events"][0];
    assert!(e.get("type").is_none(), "PUT is the default: {e}");
    assert_eq!(unb64(e["kv"]["value"].as_str().unwrap()), "b");
    assert_eq!(unb64(e["prev_kv"]["value"].as_str().unwrap()), "a");
    assert_eq!(int(&e["kv"]["version"]), 2);

    must_post(
        &m,
        "/v3/kv/put",
        &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("other"), b64("x")),
    );
    must_post(
        &m,
        "/v3/kv/deleterange",
        &format!(r#"{{"key":"{}"}}"#, b64("w/1")),
    );
    let ev = w.must_next();
    assert_eq!(
        revision(&ev),
        r1 + 3,
        "the put outside the range is not sent"
    );
    assert_eq!(ev["events"][0]["type"], "DELETE");
    assert_eq!(int(&ev["events"][0]["kv"]["mod_revision"]), r1 + 3);

    // A second watcher from a past revision replays history; a progress request and
    // a cancel in the same body are answered in order.
    let w2 = Stream::open(
        &m,
        "/v3/watch",
        &format!(
            r#"{{"create_request":{{"key":"{}","start_revision":"{r1}","watch_id":"7"}}}}
               {{"progress_request":{{}}}}
               {{"cancel_request":{{"watch_id":"7"}}}}"#,
            b64("w/1")
        ),
    );
    let created = w2.must_next();
    assert_eq!(int(&created["watch_id"]), 7);
    let mut seen = Vec::new();
    let mut canceled = false;
    for _ in 0..4 {
        let msg = w2.must_next();
        if msg["canceled"] == Value::Bool(true) {
            canceled = true;
            break;
        }
        for e in msg["events"].as_array().into_iter().flatten() {
            seen.push(int(&e["kv"]["mod_revision"]));
        }
    }
    assert!(canceled);
    assert_eq!(seen, [r1, r1 + 1, r1 + 3]);
}

#[test]
fn cluster_and_maintenance() {
    let m = Member::start(Target::Pontoon);
    let list = must_post(&m, "/v3/cluster/member/list", "{}");
    let members = list["members"].as_array().unwrap();
    assert_eq!(members.len(), 1);
    let me = &members[0];
    assert_eq!(me["name"], "default");
    assert_eq!(me["peerURLs"][0], m.peer_url());
    assert_eq!(me["clientURLs"][0], m.endpoint());
    let id = int(&me["ID"]);
    assert_eq!(int(&list["header"]["member_id"]), id);

    let status = must_post(&m, "/v3/maintenance/status", "{}");
    assert_eq!(status["version"], "3.5.17");
    assert_eq!(int(&status["leader"]), id);
    assert!(int(&status["dbSize"]) > 0);
    assert!(int(&status["raftIndex"]) > 0);

    // Alarms: none, then one raised and listed, then disarmed.
    let alarms = must_post(&m, "/v3/maintenance/alarm", r#"{"action":"GET"}"#);
    assert!(alarms.get("alarms").is_none(), "{alarms}");
    let raised = must_post(
        &m,
        "/v3/maintenance/alarm",
        &format!(r#"{{"action":"ACTIVATE","memberID":"{id}","alarm":"NOSPACE"}}"#),
    );
    assert_eq!(raised["alarms"][0]["alarm"], "NOSPACE");
    must_fail(
        &m,
        "/v3/kv/put",
        &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("k"), b64("v")),
        429,
        8,
        "etcdserver: mvcc: database space exceeded",
    );
    let listed = must_post(&m, "/v3/maintenance/alarm", "{}");
    assert_eq!(int(&listed["alarms"][0]["memberID"]), id);
    must_post(
        &m,
        "/v3/maintenance/alarm",
        &format!(r#"{{"action":"DEACTIVATE","memberID":"{id}","alarm":"NOSPACE"}}"#),
    );
    must_post(
        &m,
        "/v3/kv/put",
        &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("k"), b64("v")),
    );

    // Hash is a uint32: a JSON number, not a string.
    let h1 = must_post(&m, "/v3/maintenance/hash", "{}");
    assert!(h1["hash"].is_u64(), "{h1}");
    let hkv = must_post(&m, "/v3/maintenance/hashkv", "{}");
    assert!(hkv["hash"].is_u64(), "{hkv}");
    must_post(&m, "/v3/maintenance/defragment", "{}");
    must_fail(
        &m,
        "/v3/maintenance/transfer-leadership",
        r#"{"targetID":"1"}"#,
        412,
        9,
        "etcdserver: bad leader transferee",
    );
    must_fail(
        &m,
        "/v3/cluster/member/remove",
        r#"{"ID":"1"}"#,
        404,
        5,
        "etcdserver: member not found",
    );

    // Snapshot: a stream of base64 blobs counting down remaining_bytes.
    let (status, body) = post(&m, "/v3/maintenance/snapshot", "{}");
    assert_eq!(status, 200);
    let chunks: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["result"].clone())
        .collect();
    assert!(!chunks.is_empty());
    let last = chunks.last().unwrap();
    assert!(
        last.get("remaining_bytes").is_none(),
        "the last chunk has 0 left: {last}"
    );
    let total: usize = chunks
        .iter()
        .map(|c| c["blob"].as_str().unwrap_or("").len() / 4 * 3)
        .sum();
    assert!(total > 100, "{total} bytes of snapshot");
}

#[test]
fn lock_and_election() {
    let m = Member::start(Target::Pontoon);
    let lease = int(&must_post(&m, "/v3/lease/grant", r#"{"TTL":60}"#)["ID"]);

    let held = must_post(
        &m,
        "/v3/lock/lock",
        &format!(r#"{{"name":"{}","lease":"{lease}"}}"#, b64("mylock")),
    );
    let key = held["key"].as_str().unwrap().to_string();
    assert!(unb64(&key).starts_with("mylock/"));
    let owner = must_post(&m, "/v3/kv/range", &format!(r#"{{"key":"{key}"}}"#));
    assert_eq!(int(&owner["kvs"][0]["lease"]), lease);
    must_post(&m, "/v3/lock/unlock", &format!(r#"{{"key":"{key}"}}"#));
    let owner = must_post(&m, "/v3/kv/range", &format!(r#"{{"key":"{key}"}}"#));
    assert!(
        owner.get("kvs").is_none(),
        "unlock deletes the key: {owner}"
    );

    let won = must_post(
        &m,
        "/v3/election/campaign",
        &format!(
            r#"{{"name":"{}","lease":"{lease}","value":"{}"}}"#,
            b64("el"),
            b64("v1")
        ),
    );
    let leader = won["leader"].clone();
    assert_eq!(unb64(leader["name"].as_str().unwrap()), "el");
    assert_eq!(int(&leader["lease"]), lease);
    let now = must_post(
        &m,
        "/v3/election/leader",
        &format!(r#"{{"name":"{}"}}"#, b64("el")),
    );
    assert_eq!(unb64(now["kv"]["value"].as_str().unwrap()), "v1");
    assert_eq!(now["kv"]["key"], leader["key"]);

    let observe = Stream::open(
        &m,
        "/v3/election/observe",
        &format!(r#"{{"name":"{}"}}"#, b64("el")),
    );
    assert_eq!(
        unb64(observe.must_next()["kv"]["value"].as_str().unwrap()),
        "v1"
    );
    must_post(
        &m,
        "/v3/election/proclaim",
        &format!(r#"{{"leader":{leader},"value":"{}"}}"#, b64("v2")),
    );
    assert_eq!(
        unb64(observe.must_next()["kv"]["value"].as_str().unwrap()),
        "v2"
    );
    let now = must_post(
        &m,
        "/v3/election/leader",
        &format!(r#"{{"name":"{}"}}"#, b64("el")),
    );
    assert_eq!(unb64(now["kv"]["value"].as_str().unwrap()), "v2");

    must_post(
        &m,
        "/v3/election/resign",
        &format!(r#"{{"leader":{leader}}}"#),
    );
    let (status, body) = post(
        &m,
        "/v3/election/leader",
        &format!(r#"{{"name":"{}"}}"#, b64("el")),
    );
    assert_ne!(status, 200);
    assert!(
        body.contains(r#""message":"election: no leader""#),
        "{body}"
    );
}

#[test]
fn errors_methods_and_headers() {
    let m = Member::start(Target::Pontoon);
    // Bad JSON and wrong types are InvalidArgument; so is etcd's own validation.
    let (status, body) = post(&m, "/v3/kv/range", r#"{"key":"#);
    assert_eq!(status, 400);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], 3);
    assert_eq!(v["error"], v["message"]);
    let (status, _) = post(&m, "/v3/kv/range", r#"{"key":5}"#);
    assert_eq!(status, 400);
    let (status, _) = post(
        &m,
        "/v3/kv/range",
        r#"{"key":"Zm9v","sort_order":"SIDEWAYS"}"#,
    );
    assert_eq!(status, 400);
    must_fail(
        &m,
        "/v3/kv/range",
        "",
        400,
        3,
        "etcdserver: key is not provided",
    );
    must_fail(
        &m,
        "/v3/kv/put",
        r#"{"value":"eA=="}"#,
        400,
        3,
        "etcdserver: key is not provided",
    );
    // Unknown fields are ignored, and so is anything after the first value.
    let ok = must_post(
        &m,
        "/v3/kv/put",
        r#"{"key":"eA==","value":"eQ==","bogus":[1]} trailing"#,
    );
    assert!(revision(&ok) > 1);

    let ops: Vec<String> = (0..129)
        .map(|i| {
            format!(
                r#"{{"request_put":{{"key":"{}","value":"eA=="}}}}"#,
                b64(&format!("k{i}"))
            )
        })
        .collect();
    must_fail(
        &m,
        "/v3/kv/txn",
        &format!(r#"{{"success":[{}]}}"#, ops.join(",")),
        400,
        3,
        "etcdserver: too many operations in txn request",
    );
    must_fail(
        &m,
        "/v3/kv/txn",
        r#"{"success":[{"request_put":{"key":"YQ=="}},{"request_put":{"key":"YQ=="}}]}"#,
        400,
        3,
        "etcdserver: duplicate key given in txn request",
    );

    // A streaming call whose first message is not JSON: 500, code Unknown.
    let (status, body) = post(&m, "/v3/watch", "garbage");
    assert_eq!(status, 500);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], 2);

    // The answer's headers: JSON, gRPC metadata, etcd's CORS.
    let (status, head, _) = post_with(&m, "/v3beta/kv/range", r#"{"key":"eA=="}"#, &[]);
    assert_eq!(status, 200, "etcd 3.4 serves /v3beta too");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(
        head.contains("grpc-metadata-content-type: application/grpc"),
        "{head}"
    );
    assert!(head.contains("access-control-allow-origin: *"), "{head}");

    let method = |method: &str, path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .arg(format!("{}{path}", m.endpoint()))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(method("GET", "/v3/kv/range"), "405");
    assert_eq!(method("OPTIONS", "/v3/kv/range"), "200");
    assert_eq!(method("POST", "/v3/kv/nothing"), "404");
    assert_eq!(
        method("GET", "/health"),
        "200",
        "the gateway leaves other paths alone"
    );
}

/// `Grpc-Metadata-*` headers reach the gRPC layers as metadata: a member that knows no
/// leader refuses a `hasleader` request at once (etcd's `WithRequireLeader`).
#[test]
fn grpc_metadata_headers_reach_the_server() {
    let mut m = Member::new(Target::Pontoon, "lonely", &[]);
    // Two voters, one of which never starts: no leader, ever.
    m.initial_cluster = Some(format!(
        "lonely={},ghost=http://127.0.0.1:{}",
        m.peer_url(),
        common::free_port()
    ));
    m.spawn_process();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (status, _, body) = loop {
        let out = try_post(
            &m,
            "/v3/kv/put",
            r#"{"key":"eA==","value":"eQ=="}"#,
            &["Grpc-Metadata-Hasleader: true"],
        );
        match out {
            Some(out) => break out,
            None if std::time::Instant::now() > deadline => panic!("the member never answered"),
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body,
        r#"{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}"#
    );
}

/// The same requests against etcd 3.4 and Pontoon give the same JSON, once the values
/// that differ between any two clusters (IDs, terms, sizes) are masked.
#[test]
fn answers_match_etcd() {
    if !have_etcd() {
        eprintln!("etcd not installed; skipping the comparison");
        return;
    }
    let etcd = Member::start(Target::Etcd);
    let pontoon = Member::start(Target::Pontoon);
    let steps: &[(&str, &str)] = &[
        ("/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#),
        (
            "/v3/kv/put",
            r#"{"key":"Zm9v","value":"YmF6","prev_kv":true}"#,
        ),
        ("/v3/kv/put", r#"{"key":"Zm9vMg==","value":"","lease":"0"}"#),
        ("/v3/kv/range", r#"{"key":"Zm9v"}"#),
        (
            "/v3/kv/range",
            r#"{"key":"Zm9v","range_end":"Zm9w","keys_only":true}"#,
        ),
        (
            "/v3/kv/range",
            r#"{"key":"Zm9v","range_end":"Zm9w","limit":"1","sortOrder":"DESCEND"}"#,
        ),
        (
            "/v3/kv/range",
            r#"{"key":"Zm9v","count_only":true,"bogus":1}"#,
        ),
        ("/v3/kv/range", r#"{"key":"bm9uZQ=="}"#),
        ("/v3/kv/range", ""),
        ("/v3/kv/range", r#"{"key":"Zm9v","revision":"1000"}"#),
        (
            "/v3/kv/txn",
            r#"{"compare":[{"key":"Zm9v","target":"VALUE","result":"EQUAL","value":"YmF6"}],"success":[{"request_range":{"key":"Zm9v"}},{"request_put":{"key":"dA==","value":"MQ=="}},{"request_delete_range":{"key":"Zm9vMg==","prev_kv":true}}]}"#,
        ),
        (
            "/v3/kv/txn",
            r#"{"compare":[{"key":"Zm9v","target":"MOD","result":"LESS","mod_revision":"1"}],"failure":[{"request_txn":{"success":[{"request_range":{"key":"dA=="}}]}}]}"#,
        ),
        (
            "/v3/kv/txn",
            r#"{"success":[{"request_put":{"key":"YQ=="}},{"request_put":{"key":"YQ=="}}]}"#,
        ),
        ("/v3/kv/deleterange", r#"{"key":"dA==","prev_kv":true}"#),
        ("/v3/kv/compaction", r#"{"revision":"3"}"#),
        ("/v3/kv/range", r#"{"key":"Zm9v","revision":"2"}"#),
        ("/v3/lease/grant", r#"{"TTL":"100","ID":"77"}"#),
        ("/v3/lease/grant", r#"{"TTL":"100","ID":"77"}"#),
        (
            "/v3/kv/put",
            r#"{"key":"bA==","value":"bA==","lease":"77"}"#,
        ),
        ("/v3/lease/timetolive", r#"{"ID":"77","keys":true}"#),
        ("/v3/lease/leases", "{}"),
        ("/v3/lease/keepalive", r#"{"ID":"77"}"#),
        ("/v3/kv/lease/revoke", r#"{"ID":"77"}"#),
        ("/v3/lease/revoke", r#"{"ID":"77"}"#),
        ("/v3/lease/timetolive", r#"{"ID":"77"}"#),
        ("/v3/lease/keepalive", ""),
        ("/v3/cluster/member/remove", r#"{"ID":"1"}"#),
        ("/v3/maintenance/transfer-leadership", r#"{"targetID":"1"}"#),
        ("/v3/lock/unlock", r#"{"key":"bm9uZQ=="}"#),
        ("/v3beta/kv/range", r#"{"key":"Zm9v"}"#),
        ("/v3/kv/range", r#"{"key":"Zm9v","sort_order":"SIDEWAYS"}"#),
    ];
    for (path, body) in steps {
        let (es, eb) = post(&etcd, path, body);
        let (ps, pb) = post(&pontoon, path, body);
        assert_eq!(ps, es, "{path} {body}:\n etcd    {eb}\n pontoon {pb}");
        if es == 200 || eb.starts_with(r#"{"error":"etcdserver"#) {
            assert_eq!(mask(&pb), mask(&eb), "{path} {body}");
        } else {
            // Decoding errors: the text is Go's or serde's; the shape and code match.
            let (e, p): (Value, Value) = (
                serde_json::from_str(&eb).unwrap(),
                serde_json::from_str(&pb).unwrap(),
            );
            assert_eq!(p["code"], e["code"], "{path} {body}");
        }
    }
    // Watches: from a compacted revision (created, then canceled), and from a later one
    // (created, then the history), each read for a second. Left out: a watch with
    // prev_kv from the compaction revision itself, whose first event etcd sends without
    // the (compacted) prev_kv and Pontoon with it.
    for body in [
        r#"{"create_request":{"key":"Zm9v","range_end":"Zm9w","start_revision":"1"}}"#,
        r#"{"create_request":{"key":"Zm9v","range_end":"Zm9w","start_revision":"4","prev_kv":true}}"#,
        r#"{"create_request":{"key":"dA==","start_revision":"4","filters":["NOPUT"]}}"#,
    ] {
        let e = read_stream_for(&etcd, "/v3/watch", body, 1);
        let p = read_stream_for(&pontoon, "/v3/watch", body, 1);
        assert!(e.lines().count() >= 2, "{e}");
        assert_eq!(mask(&p), mask(&e), "{body}");
    }
}

/// What a streaming call answers within `secs` seconds.
fn read_stream_for(m: &Member, path: &str, body: &str, secs: u32) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-N",
            "-m",
            &secs.to_string(),
            "-X",
            "POST",
            "--data-binary",
            body,
        ])
        .arg(format!("{}{path}", m.endpoint()))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Masks the values that differ between any two clusters (IDs, terms, remaining TTLs),
/// keeping the text otherwise byte for byte, field order included.
fn mask(json: &str) -> String {
    let mut out = json.to_string();
    for key in ["cluster_id", "member_id", "raft_term", "TTL"] {
        let pat = format!(r#""{key}":""#);
        let mut from = 0;
        while let Some(at) = out[from..].find(&pat) {
            let start = from + at + pat.len();
            let len = out[start..].find('"').expect("closing quote");
            out.replace_range(start..start + len, "*");
            from = start;
        }
    }
    out
}

/// The `/v3/auth/*` routes, and the `Authorization` header carrying the token, as
/// etcd's gateway clients use them; the same session against etcd 3.4 must answer
/// alike (statuses and the token-less refusal).
#[test]
fn auth_through_the_gateway() {
    for target in [Target::Pontoon, Target::Etcd] {
        let m = Member::start(target);
        let ok = |path: &str, body: &str| must_post(&m, path, body);
        ok(
            "/v3/auth/user/add",
            r#"{"name":"root","password":"rootpw"}"#,
        );
        ok("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#);
        ok("/v3/auth/role/add", r#"{"name":"app"}"#);
        ok(
            "/v3/auth/role/grant",
            &format!(
                r#"{{"name":"app","perm":{{"permType":"READWRITE","key":"{}","range_end":"{}"}}}}"#,
                b64("/app/"),
                b64("/app0")
            ),
        );
        ok(
            "/v3/auth/user/add",
            r#"{"name":"alice","password":"alicepw"}"#,
        );
        ok("/v3/auth/user/grant", r#"{"user":"alice","role":"app"}"#);
        ok("/v3/auth/enable", "{}");
        must_fail(
            &m,
            "/v3/kv/put",
            &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("/app/x"), b64("1")),
            400,
            3,
            "etcdserver: user name is empty",
        );
        must_fail(
            &m,
            "/v3/auth/authenticate",
            r#"{"name":"alice","password":"nope"}"#,
            400,
            3,
            "etcdserver: authentication failed, invalid user ID or password",
        );
        let token = ok(
            "/v3/auth/authenticate",
            r#"{"name":"alice","password":"alicepw"}"#,
        )["token"]
            .as_str()
            .expect("a token")
            .to_string();
        let auth = format!("Authorization: {token}");
        let put = |key: &str| {
            post_with(
                &m,
                "/v3/kv/put",
                &format!(r#"{{"key":"{}","value":"{}"}}"#, b64(key), b64("1")),
                &[&auth],
            )
        };
        assert_eq!(put("/app/x").0, 200, "{target:?}");
        let (status, _, body) = put("/other");
        assert_eq!(status, 403, "{target:?}: {body}");
        assert!(body.contains("etcdserver: permission denied"), "{body}");
        let (status, _, body) = post_with(
            &m,
            "/v3/kv/range",
            &format!(r#"{{"key":"{}"}}"#, b64("/app/x")),
            &[&auth],
        );
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(unb64(v["kvs"][0]["value"].as_str().unwrap()), "1");
        // Admin routes are root's.
        let (status, _, _) = post_with(&m, "/v3/auth/user/list", "{}", &[&auth]);
        assert_ne!(status, 200, "{target:?}: alice listed users");
        let root = ok(
            "/v3/auth/authenticate",
            r#"{"name":"root","password":"rootpw"}"#,
        )["token"]
            .as_str()
            .unwrap()
            .to_string();
        let (status, _, body) = post_with(
            &m,
            "/v3/auth/user/list",
            "{}",
            &[&format!("Authorization: {root}")],
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["users"], serde_json::json!(["alice", "root"]));
        let (status, _, body) = post_with(
            &m,
            "/v3/auth/disable",
            "{}",
            &[&format!("Authorization: {root}")],
        );
        assert_eq!(status, 200, "{body}");
    }
}
