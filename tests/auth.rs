//! Authentication and authorization, end to end: the real `etcdctl` auth workflow
//! compared with etcd 3.4, a users x permissions x operations matrix run against both
//! servers, revocation taking effect at once (tokens and open watches), simple tokens
//! valid on every member of a cluster, and JWT tokens.

mod common;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseTimeToLiveOptions,
    Permission, PutOptions, RoleRevokePermissionOptions, Txn, TxnOp, WatchOptions,
};

use common::{grpc_status, have_etcd, must_match_etcd, normalize, Cluster, Member, Target};

const ROOT: &str = "--user=root:rootpw";
const ALICE: &str = "--user=alice:alicepw";

/// An operator's session: enabling auth, users, roles, permissions, and what each user
/// may then do. etcdctl 3.4 grants the root role itself when `auth enable` finds the
/// root user without it. (`role get root` is left out: Pontoon answers as etcd 3.5,
/// with the root role's implicit read-write permission on every key; 3.4 lists none.)
const SCRIPT: &[&[&str]] = &[
    &["auth", "enable"],
    &["user", "add", "root:rootpw"],
    &["auth", "enable"],
    &["get", "foo"],
    &["put", "foo", "bar"],
    &[ROOT, "put", "foo", "bar"],
    &["--user=root:wrong", "get", "foo"],
    &["--user=nobody:x", "get", "foo"],
    &[ROOT, "get", "foo"],
    &[ROOT, "role", "add", "app"],
    &[ROOT, "role", "add", "app"],
    &[
        ROOT,
        "role",
        "grant-permission",
        "app",
        "read",
        "/app/",
        "--prefix",
    ],
    &[
        ROOT,
        "role",
        "grant-permission",
        "app",
        "readwrite",
        "/app/rw",
    ],
    &[
        ROOT,
        "role",
        "grant-permission",
        "app",
        "write",
        "/logs/",
        "/logs0",
    ],
    &[ROOT, "role", "get", "app"],
    &[ROOT, "role", "get", "nope"],
    &[ROOT, "user", "add", "alice:alicepw"],
    &[ROOT, "user", "add", "alice:again"],
    &[ROOT, "user", "grant-role", "alice", "app"],
    &[ROOT, "user", "grant-role", "alice", "nope"],
    &[ROOT, "user", "get", "alice"],
    &[ROOT, "user", "list"],
    &[ROOT, "role", "list"],
    &[ROOT, "put", "/app/x", "1"],
    &[ALICE, "get", "/app/x"],
    &[ALICE, "get", "/app/", "--prefix"],
    &[ALICE, "put", "/app/x", "2"],
    &[ALICE, "put", "/app/rw", "2"],
    &[ALICE, "get", "/app/rw"],
    &[ALICE, "put", "/logs/1", "line"],
    &[ALICE, "get", "/logs/1"],
    &[ALICE, "get", "foo"],
    &[ALICE, "del", "/app/x"],
    &[ALICE, "user", "list"],
    &[ALICE, "role", "add", "mine"],
    &[ALICE, "auth", "disable"],
    &[
        ROOT,
        "role",
        "revoke-permission",
        "app",
        "/app/",
        "--prefix",
    ],
    &[
        ROOT,
        "role",
        "revoke-permission",
        "app",
        "/app/",
        "--prefix",
    ],
    &[ALICE, "get", "/app/x"],
    &[ROOT, "user", "passwd", "alice", "--interactive=false"],
    &[ROOT, "user", "revoke-role", "alice", "app"],
    &[ROOT, "user", "revoke-role", "alice", "app"],
    &[ROOT, "user", "revoke-role", "root", "root"],
    &[ROOT, "user", "delete", "root"],
    &[ROOT, "role", "delete", "app"],
    &[ROOT, "user", "delete", "alice"],
    &[ROOT, "user", "delete", "alice"],
    &[ROOT, "auth", "disable"],
    &["get", "foo"],
    &["user", "list"],
];

fn run_script(m: &Member) -> Vec<String> {
    SCRIPT
        .iter()
        .map(|args| {
            // `user passwd --interactive=false` reads the new password from stdin.
            let (ok, out, err) = if args.contains(&"passwd") {
                m.etcdctl_stdin(args, "newpw\n")
            } else {
                m.etcdctl(args)
            };
            normalize(&format!(
                "$ etcdctl {}\nexit ok: {ok}\nstdout:\n{out}stderr:\n{err}",
                args.join(" ")
            ))
        })
        .collect()
}

#[test]
fn etcdctl_auth_session_matches_etcd() {
    must_match_etcd(run_script);
}

/// Connects as `user` (password = user + "pw"); `None` connects without credentials.
async fn connect(m: &Member, user: Option<&str>) -> Client {
    let opts = user.map(|u| ConnectOptions::new().with_user(u, format!("{u}pw")));
    Client::connect([m.endpoint()], opts)
        .await
        .expect("connect")
}

/// root, and users reader (READ /r/), writer (WRITE /w/), both (READWRITE /rw/) and
/// nobody (no role); auth enabled; keys /r/k, /w/k, /rw/k exist.
async fn setup(m: &Member) {
    let mut c = connect(m, None).await;
    c.user_add("root", "rootpw", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    for (user, role, perm) in [
        ("reader", "r", Permission::read("/r/").with_prefix()),
        ("writer", "w", Permission::write("/w/").with_prefix()),
        ("both", "rw", Permission::read_write("/rw/").with_prefix()),
    ] {
        c.role_add(role).await.unwrap();
        c.role_grant_permission(role, perm).await.unwrap();
        c.user_add(user, format!("{user}pw"), None).await.unwrap();
        c.user_grant_role(user, role).await.unwrap();
    }
    c.user_add("nobody", "nobodypw", None).await.unwrap();
    c.auth_enable().await.unwrap();
    let mut root = connect(m, Some("root")).await;
    for k in ["/r/k", "/w/k", "/rw/k"] {
        root.put(k, "v", None).await.unwrap();
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Perm {
    Read,
    Write,
}

/// The permission model the test expects (independent of the server's code): each
/// user holds one permission on one prefix.
fn holds(user: &str, prefix: &str, perm: Perm) -> bool {
    match user {
        "reader" => prefix == "r" && perm == Perm::Read,
        "writer" => prefix == "w" && perm == Perm::Write,
        "both" => prefix == "rw",
        _ => false,
    }
}

/// One operation on prefix `x`, the permissions it needs, and whether it succeeded
/// (a refusal must be `permission denied`; anything else fails the test).
async fn attempt(c: &mut Client, op: &str, x: &str) -> (Vec<(&'static str, Perm)>, bool) {
    let key = format!("/{x}/k");
    let leak: &'static str = Box::leak(x.to_string().into_boxed_str());
    let (needs, result): (Vec<(&'static str, Perm)>, Result<(), etcd_client::Error>) = match op {
        "get" => (vec![(leak, Perm::Read)], c.get(key, None).await.map(drop)),
        "get-prefix" => (
            vec![(leak, Perm::Read)],
            c.get(format!("/{x}/"), Some(GetOptions::new().with_prefix()))
                .await
                .map(drop),
        ),
        "put" => (
            vec![(leak, Perm::Write)],
            c.put(key, "n", None).await.map(drop),
        ),
        "put-prev-kv" => (
            vec![(leak, Perm::Write), (leak, Perm::Read)],
            c.put(key, "n", Some(PutOptions::new().with_prev_key()))
                .await
                .map(drop),
        ),
        "delete" => (
            vec![(leak, Perm::Write)],
            c.delete(key, None).await.map(drop),
        ),
        "txn-compare" => {
            // Compare on x (read), write /rw/t on success, read /r/k on failure: etcd
            // checks both branches whatever the compare decides.
            let t = Txn::new()
                .when([Compare::value(key, CompareOp::Equal, "v")])
                .and_then([TxnOp::put("/rw/t", "1", None)])
                .or_else([TxnOp::get("/r/k", None)]);
            (
                vec![(leak, Perm::Read), ("rw", Perm::Write), ("r", Perm::Read)],
                c.txn(t).await.map(drop),
            )
        }
        "txn-read" => {
            // A Txn that cannot write is served as a read (no raft), still checked.
            let t = Txn::new()
                .when([Compare::version(key.as_str(), CompareOp::Greater, 0)])
                .and_then([TxnOp::get(key.as_str(), None)])
                .or_else([TxnOp::get(
                    key.as_str(),
                    Some(GetOptions::new().with_serializable()),
                )]);
            (vec![(leak, Perm::Read)], c.txn(t).await.map(drop))
        }
        "watch" => {
            let mut stream = c
                .watch(format!("/{x}/"), Some(WatchOptions::new().with_prefix()))
                .await
                .expect("watch stream opens");
            let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .expect("watch create answered")
                .expect("watch response")
                .expect("a response");
            assert!(first.created(), "{first:?}");
            let ok = !first.canceled();
            if !ok {
                assert!(
                    first.cancel_reason().contains("permission denied"),
                    "{first:?}"
                );
            }
            return (vec![(leak, Perm::Read)], ok);
        }
        other => panic!("unknown op {other}"),
    };
    match result {
        Ok(()) => (needs, true),
        Err(e) => {
            let (code, msg) = grpc_status(&e);
            assert_eq!(
                (code, msg.as_str()),
                (
                    tonic::Code::PermissionDenied,
                    "etcdserver: permission denied"
                ),
                "{op} on {x}"
            );
            (needs, false)
        }
    }
}

async fn matrix(target: Target) {
    let m = Member::start(target);
    setup(&m).await;
    let mut checked = 0;
    for user in ["reader", "writer", "both", "nobody"] {
        let mut c = connect(&m, Some(user)).await;
        for op in [
            "get",
            "get-prefix",
            "put",
            "put-prev-kv",
            "delete",
            "txn-compare",
            "txn-read",
            "watch",
        ] {
            for x in ["r", "w", "rw"] {
                let (needs, ok) = attempt(&mut c, op, x).await;
                let want = needs.iter().all(|(p, perm)| holds(user, p, *perm));
                assert_eq!(ok, want, "{target:?}: {user} {op} /{x}/ (needs {needs:?})");
                checked += 1;
                if ok && op == "delete" {
                    connect(&m, Some("root"))
                        .await
                        .put(format!("/{x}/k"), "v", None)
                        .await
                        .unwrap();
                }
            }
        }
        // Admin requests are root's.
        let (code, _) = grpc_status(&c.user_list().await.unwrap_err());
        assert_eq!(code, tonic::Code::PermissionDenied, "{user} user list");
        let (code, msg) = grpc_status(&c.defragment().await.unwrap_err());
        assert!(
            msg.contains("permission denied"),
            "{user} defragment: {msg}"
        );
        if target == Target::Pontoon {
            // etcd 3.4 answers with code Unknown and "auth: permission denied" (its
            // maintenance service does not translate the error; 3.5 does).
            assert_eq!(code, tonic::Code::PermissionDenied, "{user} defragment");
        }
        assert!(c.member_list().await.is_ok(), "{user} may list members");
    }
    assert_eq!(checked, 4 * 8 * 3);

    // Revoking a lease needs write permission on every key attached to it.
    let mut root = connect(&m, Some("root")).await;
    let l1 = root.lease_grant(60, None).await.unwrap().id();
    let l2 = root.lease_grant(60, None).await.unwrap().id();
    root.put("/w/leased", "x", Some(PutOptions::new().with_lease(l1)))
        .await
        .unwrap();
    root.put("/r/leased", "x", Some(PutOptions::new().with_lease(l2)))
        .await
        .unwrap();
    let mut writer = connect(&m, Some("writer")).await;
    writer.lease_revoke(l1).await.expect("writer may revoke l1");
    let e = writer.lease_revoke(l2).await.unwrap_err();
    assert_eq!(grpc_status(&e).0, tonic::Code::PermissionDenied);
    assert_eq!(root.get("/r/leased", None).await.unwrap().kvs().len(), 1);

    // LeaseTimeToLive needs read permission on every key attached to the lease: etcd
    // checks it from 3.4.26 / 3.5.9 (CVE-2023-32082); the Debian etcd 3.4.23 does not.
    let mut reader = connect(&m, Some("reader")).await;
    let with_keys = || Some(LeaseTimeToLiveOptions::new().with_keys());
    let r = reader.lease_time_to_live(l2, with_keys()).await.unwrap();
    assert_eq!(r.keys(), [b"/r/leased".to_vec()]);
    let l3 = root.lease_grant(60, None).await.unwrap().id();
    root.put("/w/leased3", "x", Some(PutOptions::new().with_lease(l3)))
        .await
        .unwrap();
    assert!(root.lease_time_to_live(l3, with_keys()).await.is_ok());
    if target == Target::Pontoon {
        for (c, who) in [(&mut reader, "reader"), (&mut writer, "writer")] {
            for opts in [with_keys(), None] {
                let e = c.lease_time_to_live(l3, opts).await.unwrap_err();
                assert_eq!(
                    grpc_status(&e),
                    (
                        tonic::Code::PermissionDenied,
                        "etcdserver: permission denied".into()
                    ),
                    "{who}"
                );
            }
        }
    }

    // Without a token: user name is empty. With a forged one: invalid auth token.
    let mut anon = connect(&m, None).await;
    let (code, msg) = grpc_status(&anon.get("/r/k", None).await.unwrap_err());
    assert_eq!(
        (code, msg.as_str()),
        (
            tonic::Code::InvalidArgument,
            "etcdserver: user name is empty"
        )
    );
    let mut kv = pontoon_proto::etcdserverpb::kv_client::KvClient::connect(m.endpoint())
        .await
        .unwrap();
    let mut req = tonic::Request::new(pontoon_proto::etcdserverpb::RangeRequest {
        key: b"/r/k".to_vec(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("token", "forged.1".parse().unwrap());
    let s = kv.range(req).await.unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (
            tonic::Code::Unauthenticated,
            "etcdserver: invalid auth token"
        )
    );
}

#[tokio::test]
async fn permission_matrix_pontoon() {
    matrix(Target::Pontoon).await;
}

#[tokio::test]
async fn permission_matrix_etcd() {
    assert!(have_etcd(), "apt-get install -y etcd-server");
    matrix(Target::Etcd).await;
}

#[tokio::test]
async fn revoking_takes_effect_for_tokens_and_open_watches() {
    let m = Member::start(Target::Pontoon);
    setup(&m).await;
    let mut reader = connect(&m, Some("reader")).await;
    let mut root = connect(&m, Some("root")).await;
    let mut stream = reader
        .watch("/r/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let created = stream.message().await.unwrap().unwrap();
    assert!(created.created() && !created.canceled());
    root.put("/r/a", "1", None).await.unwrap();
    let ev = stream.message().await.unwrap().unwrap();
    assert_eq!(ev.events()[0].event_type(), EventType::Put);
    assert_eq!(ev.events()[0].kv().unwrap().key(), b"/r/a");

    root.role_revoke_permission(
        "r",
        "/r/",
        Some(RoleRevokePermissionOptions::new().with_prefix()),
    )
    .await
    .unwrap();
    root.put("/r/b", "secret", None).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the watcher hears back")
        .unwrap()
        .unwrap();
    assert!(
        next.events().is_empty(),
        "no event after the revoke: {next:?}"
    );
    assert!(next.canceled(), "{next:?}");
    assert!(next.cancel_reason().contains("permission denied"));
    // The reader's existing token no longer reads /r/.
    let e = reader.get("/r/a", None).await.unwrap_err();
    assert_eq!(grpc_status(&e).0, tonic::Code::PermissionDenied);

    // Deleting a user drops their tokens at once.
    let mut writer = connect(&m, Some("writer")).await;
    writer.put("/w/x", "1", None).await.unwrap();
    root.user_delete("writer").await.unwrap();
    let e = writer.put("/w/x", "2", None).await.unwrap_err();
    assert_eq!(grpc_status(&e).0, tonic::Code::Unauthenticated);
}

type AuthClient = pontoon_proto::etcdserverpb::auth_client::AuthClient<tonic::transport::Channel>;

async fn auth_client(m: &Member) -> AuthClient {
    AuthClient::connect(m.endpoint()).await.unwrap()
}

/// A token for user `both`, from the raw Auth API (the token itself is what the
/// replication tests hand to other members).
async fn authenticate_both(auth: &mut AuthClient) -> String {
    auth.authenticate(pontoon_proto::etcdserverpb::AuthenticateRequest {
        name: "both".into(),
        password: "bothpw".into(),
    })
    .await
    .unwrap()
    .into_inner()
    .token
}

/// A simple token is assigned through raft: one issued by one member is accepted by
/// the others, and the auth state is the same on every member.
#[tokio::test]
async fn simple_tokens_and_auth_state_are_replicated() {
    let mut cluster = Cluster::start(Target::Pontoon, 3, &[]);
    cluster
        .wait_leader(Duration::from_secs(10))
        .await
        .expect("a leader");
    setup(&cluster.members[0]).await;
    let mut auth = auth_client(&cluster.members[0]).await;
    let token = authenticate_both(&mut auth).await;
    assert!(
        token.contains('.'),
        "simple token <random>.<index>: {token}"
    );
    for m in &cluster.members[1..] {
        let mut kv = pontoon_proto::etcdserverpb::kv_client::KvClient::connect(m.endpoint())
            .await
            .unwrap();
        let mut put = tonic::Request::new(pontoon_proto::etcdserverpb::PutRequest {
            key: b"/rw/from-token".to_vec(),
            value: m.endpoint().into_bytes(),
            ..Default::default()
        });
        put.metadata_mut().insert("token", token.parse().unwrap());
        kv.put(put).await.expect("token valid on another member");
        let mut denied = tonic::Request::new(pontoon_proto::etcdserverpb::PutRequest {
            key: b"/r/k".to_vec(),
            value: b"x".to_vec(),
            ..Default::default()
        });
        denied
            .metadata_mut()
            .insert("token", token.parse().unwrap());
        assert_eq!(
            kv.put(denied).await.unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        // Every member knows the users (etcdctl authenticates on that member).
        let (ok, out, err) = m.etcdctl(&["--user=root:rootpw", "user", "list"]);
        assert!(ok, "{err}");
        assert_eq!(out, "both\nnobody\nreader\nroot\nwriter\n");
    }
}

/// A client that authenticates on one member and is then sent to a member that has
/// not applied the token's `Authenticate` entry yet (it was stopped meanwhile) is not
/// turned away as holding an invalid token: the lagging member waits for the entry
/// the token names, as etcd's does. (etcd 3.4 then answers `revision of auth store is
/// old`, having read its auth revision before the wait; its clients take that as "get
/// a new token". Pontoon reads it after the wait and serves the request.)
#[tokio::test]
async fn a_simple_token_is_accepted_by_a_member_still_catching_up() {
    assert!(have_etcd(), "apt-get install -y etcd-server");
    for target in [Target::Pontoon, Target::Etcd] {
        let mut cluster = Cluster::start(target, 3, &[]);
        let leader = cluster
            .wait_leader(Duration::from_secs(10))
            .await
            .expect("a leader");
        let lagging = (leader + 1) % 3;
        setup(&cluster.members[leader]).await;
        let mut kv = pontoon_proto::etcdserverpb::kv_client::KvClient::connect(
            cluster.members[lagging].endpoint(),
        )
        .await
        .unwrap();
        let mut auth = auth_client(&cluster.members[leader]).await;

        cluster.members[lagging].pause();
        // A backlog the member must receive and apply before it reaches the token.
        let root = connect(&cluster.members[leader], Some("root")).await;
        let mut fill = tokio::task::JoinSet::new();
        for t in 0..64 {
            let mut c = root.clone();
            fill.spawn(async move {
                for i in 0..40 {
                    c.put(format!("/fill/{t}/{i}"), "v", None).await.unwrap();
                }
            });
        }
        fill.join_all().await;
        let token = authenticate_both(&mut auth).await;
        cluster.members[lagging].resume();

        let mut put = tonic::Request::new(pontoon_proto::etcdserverpb::PutRequest {
            key: b"/rw/after-catch-up".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        });
        put.metadata_mut().insert("token", token.parse().unwrap());
        match (target, kv.put(put).await) {
            (Target::Pontoon, r) => {
                r.expect("token refused by a lagging member");
            }
            (Target::Etcd, Err(e))
                if e.message() == "etcdserver: revision of auth store is old" => {}
            (Target::Etcd, r) => {
                r.expect("etcd: token refused by a lagging member");
            }
        }
    }
}

fn openssl(args: &[&str]) {
    let st = std::process::Command::new("openssl")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success(), "openssl {args:?}");
}

#[tokio::test]
async fn jwt_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    let public = dir.path().join("jwt.pub");
    let (k, p) = (key.to_str().unwrap(), public.to_str().unwrap());
    openssl(&["genrsa", "-out", k, "2048"]);
    openssl(&["rsa", "-in", k, "-pubout", "-out", p]);
    let flag = format!("--auth-token=jwt,pub-key={p},priv-key={k},sign-method=RS256,ttl=10m");
    let m = Member::start_with(Target::Pontoon, &[&flag]);
    setup(&m).await;
    let mut auth = pontoon_proto::etcdserverpb::auth_client::AuthClient::connect(m.endpoint())
        .await
        .unwrap();
    let token = auth
        .authenticate(pontoon_proto::etcdserverpb::AuthenticateRequest {
            name: "both".into(),
            password: "bothpw".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let mut kv = pontoon_proto::etcdserverpb::kv_client::KvClient::connect(m.endpoint())
        .await
        .unwrap();
    let put = |token: &str, key: &str| {
        let mut r = tonic::Request::new(pontoon_proto::etcdserverpb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        });
        r.metadata_mut().insert("token", token.parse().unwrap());
        r
    };
    kv.put(put(&token, "/rw/jwt")).await.expect("JWT accepted");
    let mut forged = token.clone();
    forged.replace_range(forged.len() - 4.., "AAAA");
    assert_eq!(
        kv.put(put(&forged, "/rw/jwt")).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    // A JWT carries the auth revision it was issued at: after any auth change it is
    // old, and clients authenticate again (etcd's ErrAuthOldRevision).
    let mut root = connect(&m, Some("root")).await;
    root.role_add("another").await.unwrap();
    let s = kv.put(put(&token, "/rw/jwt")).await.unwrap_err();
    assert_eq!(s.message(), "etcdserver: revision of auth store is old");
    let (ok, out, err) = m.etcdctl(&["--user=both:bothpw", "put", "/rw/e", "1"]);
    assert!(ok && out == "OK\n", "{out}{err}");
}
