use pontoon_proto::authpb::permission::Type as PermType;
use pontoon_proto::authpb::{Permission, UserAddOptions};
use pontoon_proto::etcdserverpb::{
    AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest, AuthUserAddRequest,
};

use super::*;

fn add_user(s: &mut AuthState, name: &str) {
    s.user_add(&AuthUserAddRequest {
        name: name.into(),
        hashed_password: "hash".into(),
        ..Default::default()
    })
    .unwrap();
}

fn grant(s: &mut AuthState, role: &str, t: PermType, key: &[u8], end: &[u8]) {
    s.role_grant_permission(&AuthRoleGrantPermissionRequest {
        name: role.into(),
        perm: Some(Permission {
            perm_type: t as i32,
            key: key.to_vec(),
            range_end: end.to_vec(),
        }),
    })
    .unwrap();
}

/// root (with the root role) and alice (role `app`), auth enabled.
fn enabled_state() -> AuthState {
    let mut s = AuthState::default();
    add_user(&mut s, "root");
    s.user_grant_role("root", "root").unwrap();
    add_user(&mut s, "alice");
    s.role_add("app").unwrap();
    s.user_grant_role("alice", "app").unwrap();
    s.enable().unwrap();
    s
}

fn who(s: &AuthState, name: &str) -> AuthInfo {
    AuthInfo {
        username: name.into(),
        revision: s.revision,
    }
}

#[test]
fn enable_needs_root_user_with_root_role() {
    let mut s = AuthState::default();
    assert!(matches!(s.enable(), Err(Error::RootUserNotExist)));
    add_user(&mut s, "root");
    assert!(matches!(s.enable(), Err(Error::RootRoleNotExist)));
    // The root role need not exist as a record to be granted.
    s.user_grant_role("root", "root").unwrap();
    s.enable().unwrap();
    assert!(s.enabled);
    let rev = s.revision;
    s.enable().unwrap();
    assert_eq!(s.revision, rev, "enabling twice is a no-op");
    s.disable();
    assert!(!s.enabled);
    assert_eq!(s.revision, rev + 1, "disable bumps the revision");
}

#[test]
fn root_is_protected_while_enabled() {
    let mut s = enabled_state();
    assert!(matches!(s.user_delete("root"), Err(Error::InvalidAuthMgmt)));
    assert!(matches!(
        s.user_revoke_role("root", "root"),
        Err(Error::InvalidAuthMgmt)
    ));
    s.role_add("root").unwrap();
    assert!(matches!(s.role_delete("root"), Err(Error::InvalidAuthMgmt)));
    assert_eq!(s.role_permissions("root").unwrap(), vec![root_permission()]);
    s.disable();
    s.user_revoke_role("root", "root").unwrap();
    s.user_delete("root").unwrap();
}

#[test]
fn management_errors_are_etcds() {
    let mut s = enabled_state();
    assert!(matches!(
        s.user_add(&AuthUserAddRequest::default()),
        Err(Error::UserEmpty)
    ));
    assert!(matches!(
        s.user_add(&AuthUserAddRequest {
            name: "alice".into(),
            ..Default::default()
        }),
        Err(Error::UserAlreadyExist)
    ));
    assert!(matches!(s.user_delete("bob"), Err(Error::UserNotFound)));
    assert!(matches!(
        s.user_grant_role("alice", "nope"),
        Err(Error::RoleNotFound)
    ));
    assert!(matches!(
        s.user_grant_role("bob", "app"),
        Err(Error::UserNotFound)
    ));
    assert!(matches!(
        s.user_revoke_role("alice", "other"),
        Err(Error::RoleNotGranted)
    ));
    assert!(matches!(s.role_add(""), Err(Error::RoleEmpty)));
    assert!(matches!(s.role_add("app"), Err(Error::RoleAlreadyExist)));
    assert!(matches!(
        s.role_grant_permission(&AuthRoleGrantPermissionRequest {
            name: "app".into(),
            perm: None
        }),
        Err(Error::PermissionNotGiven)
    ));
    assert!(matches!(
        s.role_revoke_permission(&AuthRoleRevokePermissionRequest {
            role: "app".into(),
            key: b"k".to_vec(),
            range_end: Vec::new(),
        }),
        Err(Error::PermissionNotGranted)
    ));
    let rev = s.revision;
    s.user_grant_role("alice", "app").unwrap();
    assert_eq!(s.revision, rev, "granting a held role changes nothing");
}

#[test]
fn requests_without_a_user_or_with_an_old_revision_are_refused() {
    let s = enabled_state();
    let none = AuthInfo::default();
    assert!(matches!(
        s.check(&none, b"k", b"", PermType::Read),
        Err(Error::UserEmpty)
    ));
    let old = AuthInfo {
        username: "root".into(),
        revision: s.revision - 1,
    };
    assert!(matches!(
        s.check(&old, b"k", b"", PermType::Read),
        Err(Error::AuthOldRevision)
    ));
    assert!(s
        .check(&who(&s, "root"), b"k", b"", PermType::Write)
        .is_ok());
    assert!(matches!(
        s.check(&who(&s, "ghost"), b"k", b"", PermType::Read),
        Err(Error::PermissionDenied)
    ));
    let mut off = s.clone();
    off.disable();
    assert!(off.check(&none, b"k", b"", PermType::Write).is_ok());
}

#[test]
fn ranges_must_be_covered_by_the_union_of_permissions() {
    let mut s = enabled_state();
    grant(&mut s, "app", PermType::Read, b"a", b"c");
    grant(&mut s, "app", PermType::Readwrite, b"c", b"e");
    grant(&mut s, "app", PermType::Write, b"f", b"");
    grant(&mut s, "app", PermType::Read, b"m/", b"\0");
    let alice = who(&s, "alice");
    let ok = |k: &[u8], e: &[u8], t| s.check(&alice, k, e, t).is_ok();
    // single keys
    assert!(ok(b"a", b"", PermType::Read));
    assert!(ok(b"b\xff", b"", PermType::Read));
    assert!(!ok(b"b", b"", PermType::Write));
    assert!(ok(b"d", b"", PermType::Write), "READWRITE grants write");
    assert!(ok(b"f", b"", PermType::Write));
    assert!(!ok(b"f", b"", PermType::Read));
    assert!(
        !ok(b"f0", b"", PermType::Write),
        "a one-key permission is one key"
    );
    assert!(
        !ok(b"f", b"f0", PermType::Write),
        "nor a range starting at it"
    );
    assert!(ok(b"f", b"f\0", PermType::Write), "[f, f\\0) is just f");
    // ranges: [a, e) is covered by [a, c) + [c, e) for reads, not for writes
    assert!(ok(b"a", b"e", PermType::Read));
    assert!(ok(b"b", b"d", PermType::Read));
    assert!(!ok(b"a", b"e", PermType::Write));
    assert!(!ok(b"a", b"f", PermType::Read), "[e, f) is not granted");
    assert!(!ok(b"0", b"b", PermType::Read), "[0, a) is not granted");
    // open-ended: "m/" and everything after
    assert!(ok(b"m/", b"\0", PermType::Read));
    assert!(ok(b"zzz", b"", PermType::Read));
    assert!(!ok(b"a", b"\0", PermType::Read), "gap between e and m/");
    assert!(ok(b"x", b"", PermType::Read), "x is past m/");
    // revoking takes effect at once
    s.role_revoke_permission(&AuthRoleRevokePermissionRequest {
        role: "app".into(),
        key: b"c".to_vec(),
        range_end: b"e".to_vec(),
    })
    .unwrap();
    let alice = who(&s, "alice");
    assert!(s.check(&alice, b"d", b"", PermType::Read).is_err());
    assert!(s.check(&alice, b"a", b"c", PermType::Read).is_ok());
}

#[test]
fn admin_needs_the_root_role() {
    let s = enabled_state();
    assert!(s.check_admin(&who(&s, "root")).is_ok());
    assert!(matches!(
        s.check_admin(&who(&s, "alice")),
        Err(Error::PermissionDenied)
    ));
    assert!(matches!(
        s.check_admin(&AuthInfo::default()),
        Err(Error::UserEmpty)
    ));
    assert!(matches!(
        s.check_admin(&who(&s, "ghost")),
        Err(Error::UserNotFound)
    ));
}

#[test]
fn deleting_a_role_takes_it_from_users_and_no_password_users_cannot_log_in() {
    let mut s = enabled_state();
    grant(&mut s, "app", PermType::Read, b"k", b"");
    let writes = s.role_delete("app").unwrap();
    assert_eq!(writes.len(), 2, "the role and alice's record");
    assert!(s.users["alice"].roles.is_empty());
    s.user_add(&AuthUserAddRequest {
        name: "svc".into(),
        options: Some(UserAddOptions { no_password: true }),
        hashed_password: "ignored".into(),
        ..Default::default()
    })
    .unwrap();
    assert!(s.users["svc"].password.is_empty());
    assert!(matches!(s.password_hash("svc"), Err(Error::AuthFailed)));
    assert!(matches!(s.password_hash("nobody"), Err(Error::AuthFailed)));
    assert_eq!(s.password_hash("alice").unwrap(), b"hash");
    s.disable();
    assert!(matches!(
        s.password_hash("alice"),
        Err(Error::AuthNotEnabled)
    ));
}

#[test]
fn txn_needs_every_compare_and_both_branches() {
    use pontoon_proto::etcdserverpb::request_op::Request as R;
    use pontoon_proto::etcdserverpb::{Compare, DeleteRangeRequest, PutRequest, RangeRequest};
    let inner = TxnRequest {
        success: vec![RequestOp {
            request: Some(R::RequestDeleteRange(DeleteRangeRequest {
                key: b"d".to_vec(),
                range_end: b"e".to_vec(),
                prev_kv: true,
            })),
        }],
        ..Default::default()
    };
    let t = TxnRequest {
        compare: vec![Compare {
            key: b"c".to_vec(),
            ..Default::default()
        }],
        success: vec![RequestOp {
            request: Some(R::RequestPut(PutRequest {
                key: b"p".to_vec(),
                ..Default::default()
            })),
        }],
        failure: vec![
            RequestOp {
                request: Some(R::RequestRange(RangeRequest {
                    key: b"r".to_vec(),
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(R::RequestTxn(inner)),
            },
        ],
    };
    let mut needs = Vec::new();
    txn_needs(&t, &mut needs);
    let got: Vec<(&[u8], &[u8], PermType)> = needs
        .iter()
        .map(|(k, e, p)| (k.as_slice(), e.as_slice(), *p))
        .collect();
    assert_eq!(
        got,
        vec![
            (&b"c"[..], &b""[..], PermType::Read),
            (b"p", b"", PermType::Write),
            (b"r", b"", PermType::Read),
            (b"d", b"e", PermType::Write),
            (b"d", b"e", PermType::Read),
        ]
    );
}
