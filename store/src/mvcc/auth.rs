//! The auth state as state-machine data, and permission checks at apply time.
//!
//! Records in `meta`: `auth/enabled` (one byte), `auth/revision` (u64, big-endian),
//! `auth/user/<name>` (`authpb.User`), `auth/role/<name>` (`authpb.Role`). An auth
//! entry writes its records in the same batch as its raft index, then the in-memory
//! [`AuthState`] is replaced; so after a crash the state is exactly that of the last
//! applied entry, and snapshots (which copy `meta`) carry it to other members and to
//! restored backups, as etcd's `auth` buckets are.
//!
//! Writes (Put, DeleteRange, Txn, LeaseRevoke) and admin entries carry the
//! requester's [`AuthInfo`] in the entry; they are checked here, when they apply,
//! against the state of that moment, so all members reach the same answer.

use std::sync::Arc;

use prost::Message;
use rocksdb::WriteBatch;

use pontoon_proto::authpb::permission::Type as PermType;
use pontoon_proto::authpb::{Role, User};
use pontoon_proto::internal::internal_request::Request as InternalOp;
use pontoon_proto::internal::AuthHeader;

use super::{MvccStore, CF_META};
use crate::auth::{txn_needs, AuthInfo, AuthState, AuthWrite};
use crate::error::{Error, Result};

const ENABLED: &[u8] = b"auth/enabled";
const REVISION: &[u8] = b"auth/revision";
const USER_PREFIX: &str = "auth/user/";
const ROLE_PREFIX: &str = "auth/role/";

/// What applying an auth entry asks of the member's token keeper (tokens are not
/// state-machine data; see `auth::token`).
#[derive(Clone, Debug, PartialEq)]
pub enum TokenEffect {
    None,
    /// A simple token for `user`, valid on every member from now on.
    Assign {
        token: String,
        user: String,
    },
    /// The user was deleted or their password changed: drop their tokens.
    InvalidateUser(String),
    /// Auth was disabled: drop every token.
    ClearAll,
}

impl From<Option<&AuthHeader>> for AuthInfo {
    fn from(h: Option<&AuthHeader>) -> Self {
        h.map(|h| AuthInfo {
            username: h.username.clone(),
            revision: h.auth_revision,
        })
        .unwrap_or_default()
    }
}

/// True for the entries only a user with the root role may make.
pub fn needs_admin(op: &InternalOp) -> bool {
    matches!(
        op,
        InternalOp::AuthEnable(_)
            | InternalOp::AuthDisable(_)
            | InternalOp::UserAdd(_)
            | InternalOp::UserDelete(_)
            | InternalOp::UserChangePassword(_)
            | InternalOp::UserGrantRole(_)
            | InternalOp::UserRevokeRole(_)
            | InternalOp::RoleAdd(_)
            | InternalOp::RoleDelete(_)
            | InternalOp::RoleGrantPermission(_)
            | InternalOp::RoleRevokePermission(_)
    )
}

pub(super) fn load(store: &MvccStore) -> Result<AuthState> {
    let meta = store.cf(CF_META);
    let enabled = store
        .db
        .get_pinned_cf(meta, ENABLED)?
        .is_some_and(|v| v.as_ref() == [1]);
    let revision = match store.db.get_pinned_cf(meta, REVISION)? {
        Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().expect("8 bytes")),
        Some(_) => return Err(Error::Corrupt("auth revision is not 8 bytes".into())),
        None => 0,
    };
    let mut state = AuthState {
        enabled,
        revision,
        ..Default::default()
    };
    scan(store, USER_PREFIX, |name, v| {
        state.users.insert(name, User::decode(v)?);
        Ok(())
    })?;
    scan(store, ROLE_PREFIX, |name, v| {
        state.roles.insert(name, Role::decode(v)?);
        Ok(())
    })?;
    Ok(state)
}

fn scan(
    store: &MvccStore,
    prefix: &str,
    mut f: impl FnMut(String, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut it = store.db.raw_iterator_cf(store.cf(CF_META));
    it.seek(prefix.as_bytes());
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let Some(name) = k.strip_prefix(prefix.as_bytes()) else {
            break;
        };
        f(String::from_utf8_lossy(name).into_owned(), v)?;
        it.next();
    }
    it.status()?;
    Ok(())
}

impl MvccStore {
    /// The auth state as of the last applied entry.
    pub fn auth(&self) -> Arc<AuthState> {
        self.auth.read().expect("auth lock").clone()
    }

    pub(crate) fn reload_auth(&self) -> Result<()> {
        let state = load(self)?;
        *self.auth.write().expect("auth lock") = Arc::new(state);
        Ok(())
    }

    /// Checks a write entry's permissions against the current auth state.
    pub(super) fn check_write(&self, op: &InternalOp, who: &AuthInfo) -> Result<()> {
        let auth = self.auth();
        if !auth.enabled {
            return Ok(());
        }
        if needs_admin(op) {
            return auth.check_admin(who);
        }
        match op {
            InternalOp::Put(p) => {
                auth.check(who, &p.key, &[], PermType::Write)?;
                if p.prev_kv {
                    auth.check(who, &p.key, &[], PermType::Read)?;
                }
                // A key may join a lease only if the user could revoke it, i.e. write
                // every key already attached (etcd's `checkLeasePuts`).
                if p.lease != 0 {
                    self.check_lease_keys(&auth, who, p.lease)?;
                }
                Ok(())
            }
            InternalOp::DeleteRange(d) => {
                auth.check(who, &d.key, &d.range_end, PermType::Write)?;
                if d.prev_kv {
                    auth.check(who, &d.key, &d.range_end, PermType::Read)?;
                }
                Ok(())
            }
            InternalOp::Txn(t) => {
                let mut needs = Vec::new();
                txn_needs(t, &mut needs);
                for (key, end, perm) in &needs {
                    auth.check(who, key, end, *perm)?;
                }
                for op in t.success.iter().chain(&t.failure) {
                    if let Some(pontoon_proto::etcdserverpb::request_op::Request::RequestPut(p)) =
                        &op.request
                    {
                        if p.lease != 0 {
                            self.check_lease_keys(&auth, who, p.lease)?;
                        }
                    }
                }
                Ok(())
            }
            InternalOp::LeaseRevoke(r) => self.check_lease_keys(&auth, who, r.id),
            _ => Ok(()),
        }
    }

    fn check_lease_keys(&self, auth: &AuthState, who: &AuthInfo, lease: i64) -> Result<()> {
        for key in self.lease_keys(lease)? {
            auth.check(who, &key, &[], PermType::Write)?;
        }
        Ok(())
    }

    /// Applies an auth management entry; `None` if `op` is not one.
    pub(super) fn apply_auth(
        &self,
        index: u64,
        op: &InternalOp,
        batch: &mut WriteBatch,
    ) -> Option<Result<(AuthState, TokenEffect)>> {
        let mut next = (*self.auth()).clone();
        let result = match op {
            InternalOp::AuthEnable(_) => next.enable().map(|w| (w, TokenEffect::None)),
            InternalOp::AuthDisable(_) => Ok((next.disable(), TokenEffect::ClearAll)),
            InternalOp::Authenticate(a) => {
                // The password was checked by the member that proposed this; the user
                // may have gone or lost its password since.
                match next.users.get(&a.name) {
                    _ if !next.enabled => Err(Error::AuthNotEnabled),
                    None => Err(Error::AuthFailed),
                    Some(u) if u.options.is_some_and(|o| o.no_password) => Err(Error::AuthFailed),
                    Some(_) => Ok((
                        Vec::new(),
                        TokenEffect::Assign {
                            token: format!("{}.{index}", a.simple_token_prefix),
                            user: a.name.clone(),
                        },
                    )),
                }
            }
            InternalOp::UserAdd(r) => next.user_add(r).map(|w| (w, TokenEffect::None)),
            InternalOp::UserDelete(r) => next
                .user_delete(&r.name)
                .map(|w| (w, TokenEffect::InvalidateUser(r.name.clone()))),
            InternalOp::UserChangePassword(r) => next
                .user_change_password(r)
                .map(|w| (w, TokenEffect::InvalidateUser(r.name.clone()))),
            InternalOp::UserGrantRole(r) => next
                .user_grant_role(&r.user, &r.role)
                .map(|w| (w, TokenEffect::None)),
            InternalOp::UserRevokeRole(r) => next
                .user_revoke_role(&r.name, &r.role)
                .map(|w| (w, TokenEffect::None)),
            InternalOp::RoleAdd(r) => next.role_add(&r.name).map(|w| (w, TokenEffect::None)),
            InternalOp::RoleDelete(r) => next.role_delete(&r.role).map(|w| (w, TokenEffect::None)),
            InternalOp::RoleGrantPermission(r) => next
                .role_grant_permission(r)
                .map(|w| (w, TokenEffect::None)),
            InternalOp::RoleRevokePermission(r) => next
                .role_revoke_permission(r)
                .map(|w| (w, TokenEffect::None)),
            _ => return None,
        };
        Some(result.map(|(writes, effect)| {
            let meta = self.cf(CF_META);
            for w in writes {
                match w {
                    AuthWrite::PutUser(u) => batch.put_cf(
                        meta,
                        [USER_PREFIX.as_bytes(), &u.name].concat(),
                        u.encode_to_vec(),
                    ),
                    AuthWrite::DeleteUser(n) => batch.delete_cf(meta, format!("{USER_PREFIX}{n}")),
                    AuthWrite::PutRole(r) => batch.put_cf(
                        meta,
                        [ROLE_PREFIX.as_bytes(), &r.name].concat(),
                        r.encode_to_vec(),
                    ),
                    AuthWrite::DeleteRole(n) => batch.delete_cf(meta, format!("{ROLE_PREFIX}{n}")),
                }
            }
            batch.put_cf(meta, ENABLED, [next.enabled as u8]);
            batch.put_cf(meta, REVISION, next.revision.to_be_bytes());
            (next, effect)
        }))
    }

    /// Makes `state` current (after its records were committed).
    pub(super) fn install_auth(&self, state: AuthState) {
        *self.auth.write().expect("auth lock") = Arc::new(state);
    }
}
