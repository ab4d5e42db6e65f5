//! Authentication and authorization with etcd's semantics: users, roles, key-range
//! permissions, the `root` user and role, and the auth revision.
//!
//! [`AuthState`] is the replicated part: whether auth is enabled, the auth revision,
//! every user and role. It is state-machine data: changed only by applying raft
//! entries (the management requests), stored in the `meta` column family in the same
//! RocksDB batch as the entry's index (`mvcc::auth`), and carried by raft snapshots.
//! Tokens ([`token`]) are not: simple tokens live in each member's memory (assigned
//! on every member as an `Authenticate` entry applies), JWTs are self-contained.
//!
//! Invariants and rules, each etcd's:
//!
//! - **Every change bumps the auth revision.** A request carries the revision its
//!   token was checked at; a write whose entry applies after a later auth change is
//!   refused with `etcdserver: revision of auth store is old` (clients re-authenticate
//!   and retry), so a revoked permission is never used by a write in flight.
//! - **Writes are checked when they apply**, against the state of that moment, by
//!   every member alike; reads and watches are checked on the member serving them.
//! - **root**: auth cannot be enabled unless the user `root` exists and holds the role
//!   `root`; while enabled, neither can be deleted nor the role revoked from the user.
//!   A user with the role `root` may do anything; admin requests (auth management,
//!   member changes, maintenance) need it.
//! - Permissions: `READ`, `WRITE` or `READWRITE` on one key (empty `range_end`), on
//!   `[key, range_end)`, or on every key from `key` up (`range_end` = `"\0"`). A
//!   request over a range needs the union of a user's permissions to cover all of it.

pub mod password;
pub mod token;

use std::collections::BTreeMap;

use pontoon_proto::authpb::permission::Type as PermType;
use pontoon_proto::authpb::{Permission, Role, User, UserAddOptions};
use pontoon_proto::etcdserverpb::request_op::Request as TxnOp;
use pontoon_proto::etcdserverpb::{
    AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest, AuthUserAddRequest,
    AuthUserChangePasswordRequest, RequestOp, TxnRequest,
};

use crate::error::{Error, Result};
use crate::mvcc::KeySpan;

pub const ROOT_USER: &str = "root";
pub const ROOT_ROLE: &str = "root";

/// Who is asking, as far as a check needs to know: the token's user and the auth
/// revision the token was validated at. Revision 0 means "no user given".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthInfo {
    pub username: String,
    pub revision: u64,
}

/// One record the state machine writes for an auth change (see `mvcc::auth`).
#[derive(Clone, Debug, PartialEq)]
pub enum AuthWrite {
    PutUser(User),
    DeleteUser(String),
    PutRole(Role),
    DeleteRole(String),
}

/// The replicated auth state. Small (users and roles), so it is held in memory whole
/// and replaced, not mutated, when an entry changes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthState {
    pub enabled: bool,
    pub revision: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

/// The permission etcd reports for the `root` role: read-write on every key.
pub fn root_permission() -> Permission {
    Permission {
        perm_type: PermType::Readwrite as i32,
        key: Vec::new(),
        range_end: vec![0],
    }
}

fn has_role(user: &User, role: &str) -> bool {
    user.roles.iter().any(|r| r == role)
}

impl AuthState {
    // ---- checks ----

    /// etcd's `isOpPermitted`: may `who` do `want` on `[key, range_end)` (one key
    /// when `range_end` is empty, every key from `key` up when it is `"\0"`)?
    pub fn check(
        &self,
        who: &AuthInfo,
        key: &[u8],
        range_end: &[u8],
        want: PermType,
    ) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let user = self.user_for_check(who)?;
        if has_role(user, ROOT_ROLE) || self.covered(user, key, range_end, want) {
            Ok(())
        } else {
            Err(Error::PermissionDenied)
        }
    }

    /// etcd's `IsAdminPermitted`: the user must hold the `root` role.
    pub fn check_admin(&self, who: &AuthInfo) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if who.username.is_empty() {
            return Err(Error::UserEmpty);
        }
        let user = self.users.get(&who.username).ok_or(Error::UserNotFound)?;
        if has_role(user, ROOT_ROLE) {
            Ok(())
        } else {
            Err(Error::PermissionDenied)
        }
    }

    fn user_for_check(&self, who: &AuthInfo) -> Result<&User> {
        if who.revision == 0 {
            return Err(Error::UserEmpty);
        }
        if who.revision < self.revision {
            return Err(Error::AuthOldRevision);
        }
        self.users.get(&who.username).ok_or(Error::PermissionDenied)
    }

    /// True if the union of the user's `want` permissions covers the request.
    fn covered(&self, user: &User, key: &[u8], range_end: &[u8], want: PermType) -> bool {
        let mut spans: Vec<KeySpan> = Vec::new();
        for role in user.roles.iter().filter_map(|r| self.roles.get(r)) {
            for p in &role.key_permission {
                let grants = match PermType::try_from(p.perm_type) {
                    Ok(PermType::Readwrite) => true,
                    Ok(t) => t == want,
                    Err(_) => false,
                };
                if grants {
                    spans.push(KeySpan::new(&p.key, &p.range_end));
                }
            }
        }
        let wanted = KeySpan::new(key, range_end);
        let wanted_end = wanted.iter_end();
        // Sweep the spans in key order, extending the covered stretch from `key`;
        // an end of `None` is past every key.
        spans.sort_by(|a, b| a.start().cmp(b.start()));
        let mut reached = Some(wanted.start().to_vec());
        for span in spans {
            if end_at_or_past(&reached, &wanted_end) {
                return true;
            }
            let end = span.iter_end();
            if end_at_or_past(&reached, &end) {
                continue;
            }
            if !end_at_or_past(&reached, &Some(span.start().to_vec())) {
                // A gap before this span; later spans start later still.
                return false;
            }
            reached = end;
        }
        end_at_or_past(&reached, &wanted_end)
    }

    // ---- management (applied from raft entries; each returns the records to write) ----

    pub fn enable(&mut self) -> Result<Vec<AuthWrite>> {
        if self.enabled {
            return Ok(Vec::new());
        }
        let root = self.users.get(ROOT_USER).ok_or(Error::RootUserNotExist)?;
        if !has_role(root, ROOT_ROLE) {
            return Err(Error::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(Vec::new())
    }

    pub fn disable(&mut self) -> Vec<AuthWrite> {
        if self.enabled {
            self.enabled = false;
            self.revision += 1;
        }
        Vec::new()
    }

    /// `hashed` is the bcrypt hash the proposer computed (never the password).
    pub fn user_add(&mut self, r: &AuthUserAddRequest) -> Result<Vec<AuthWrite>> {
        if r.name.is_empty() {
            return Err(Error::UserEmpty);
        }
        if self.users.contains_key(&r.name) {
            return Err(Error::UserAlreadyExist);
        }
        let options = r.options.unwrap_or(UserAddOptions { no_password: false });
        let password = if options.no_password {
            Vec::new()
        } else {
            r.hashed_password.as_bytes().to_vec()
        };
        let user = User {
            name: r.name.as_bytes().to_vec(),
            password,
            roles: Vec::new(),
            options: Some(options),
        };
        self.users.insert(r.name.clone(), user.clone());
        self.revision += 1;
        Ok(vec![AuthWrite::PutUser(user)])
    }

    pub fn user_delete(&mut self, name: &str) -> Result<Vec<AuthWrite>> {
        if self.enabled && name == ROOT_USER {
            return Err(Error::InvalidAuthMgmt);
        }
        self.users.remove(name).ok_or(Error::UserNotFound)?;
        self.revision += 1;
        Ok(vec![AuthWrite::DeleteUser(name.to_string())])
    }

    pub fn user_change_password(
        &mut self,
        r: &AuthUserChangePasswordRequest,
    ) -> Result<Vec<AuthWrite>> {
        let user = self.users.get_mut(&r.name).ok_or(Error::UserNotFound)?;
        let no_password = user.options.is_some_and(|o| o.no_password);
        user.password = if no_password {
            Vec::new()
        } else {
            r.hashed_password.as_bytes().to_vec()
        };
        let user = user.clone();
        self.revision += 1;
        Ok(vec![AuthWrite::PutUser(user)])
    }

    pub fn user_grant_role(&mut self, name: &str, role: &str) -> Result<Vec<AuthWrite>> {
        if !self.users.contains_key(name) {
            return Err(Error::UserNotFound);
        }
        if role != ROOT_ROLE && !self.roles.contains_key(role) {
            return Err(Error::RoleNotFound);
        }
        let user = self.users.get_mut(name).expect("checked above");
        if has_role(user, role) {
            return Ok(Vec::new());
        }
        user.roles.push(role.to_string());
        user.roles.sort();
        let user = user.clone();
        self.revision += 1;
        Ok(vec![AuthWrite::PutUser(user)])
    }

    pub fn user_revoke_role(&mut self, name: &str, role: &str) -> Result<Vec<AuthWrite>> {
        if self.enabled && name == ROOT_USER && role == ROOT_ROLE {
            return Err(Error::InvalidAuthMgmt);
        }
        let user = self.users.get_mut(name).ok_or(Error::UserNotFound)?;
        let before = user.roles.len();
        user.roles.retain(|r| r != role);
        if user.roles.len() == before {
            return Err(Error::RoleNotGranted);
        }
        let user = user.clone();
        self.revision += 1;
        Ok(vec![AuthWrite::PutUser(user)])
    }

    pub fn role_add(&mut self, name: &str) -> Result<Vec<AuthWrite>> {
        if name.is_empty() {
            return Err(Error::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(Error::RoleAlreadyExist);
        }
        let role = Role {
            name: name.as_bytes().to_vec(),
            key_permission: Vec::new(),
        };
        self.roles.insert(name.to_string(), role.clone());
        self.revision += 1;
        Ok(vec![AuthWrite::PutRole(role)])
    }

    /// Deletes a role and takes it from every user holding it.
    pub fn role_delete(&mut self, name: &str) -> Result<Vec<AuthWrite>> {
        if self.enabled && name == ROOT_ROLE {
            return Err(Error::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(Error::RoleNotFound)?;
        let mut writes = vec![AuthWrite::DeleteRole(name.to_string())];
        for user in self.users.values_mut() {
            if has_role(user, name) {
                user.roles.retain(|r| r != name);
                writes.push(AuthWrite::PutUser(user.clone()));
            }
        }
        self.revision += 1;
        Ok(writes)
    }

    /// Grants a permission, or changes the type of the one on the same range.
    /// Permissions stay sorted by key, as etcd keeps them.
    pub fn role_grant_permission(
        &mut self,
        r: &AuthRoleGrantPermissionRequest,
    ) -> Result<Vec<AuthWrite>> {
        let perm = r.perm.as_ref().ok_or(Error::PermissionNotGiven)?;
        let role = self.roles.get_mut(&r.name).ok_or(Error::RoleNotFound)?;
        match role
            .key_permission
            .iter_mut()
            .find(|p| p.key == perm.key && p.range_end == perm.range_end)
        {
            Some(existing) => existing.perm_type = perm.perm_type,
            None => {
                role.key_permission.push(perm.clone());
                role.key_permission.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        let role = role.clone();
        self.revision += 1;
        Ok(vec![AuthWrite::PutRole(role)])
    }

    pub fn role_revoke_permission(
        &mut self,
        r: &AuthRoleRevokePermissionRequest,
    ) -> Result<Vec<AuthWrite>> {
        let role = self.roles.get_mut(&r.role).ok_or(Error::RoleNotFound)?;
        let before = role.key_permission.len();
        role.key_permission
            .retain(|p| !(p.key == r.key && p.range_end == r.range_end));
        if role.key_permission.len() == before {
            return Err(Error::PermissionNotGranted);
        }
        let role = role.clone();
        self.revision += 1;
        Ok(vec![AuthWrite::PutRole(role)])
    }

    /// The permissions `RoleGet` reports (the root role's is implicit).
    pub fn role_permissions(&self, name: &str) -> Result<Vec<Permission>> {
        let role = self.roles.get(name).ok_or(Error::RoleNotFound)?;
        if name == ROOT_ROLE {
            return Ok(vec![root_permission()]);
        }
        Ok(role.key_permission.clone())
    }

    /// Checks a user may log in with a password, returning the stored hash.
    pub fn password_hash(&self, name: &str) -> Result<&[u8]> {
        if !self.enabled {
            return Err(Error::AuthNotEnabled);
        }
        let user = self.users.get(name).ok_or(Error::AuthFailed)?;
        if user.options.is_some_and(|o| o.no_password) {
            return Err(Error::AuthFailed);
        }
        Ok(&user.password)
    }
}

/// `a >= b` for exclusive span ends, `None` being past every key.
fn end_at_or_past(a: &Option<Vec<u8>>, b: &Option<Vec<u8>>) -> bool {
    match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => a >= b,
    }
}

/// Every key range a Txn touches, with the permission it needs: compares need READ,
/// puts WRITE (and READ with `prev_kv`), deletes WRITE (and READ with `prev_kv`),
/// ranges READ; both branches, nested Txns included (etcd checks them all, whatever
/// the compares decide).
pub fn txn_needs(req: &TxnRequest, out: &mut Vec<(Vec<u8>, Vec<u8>, PermType)>) {
    for c in &req.compare {
        out.push((c.key.clone(), c.range_end.clone(), PermType::Read));
    }
    for op in req.success.iter().chain(&req.failure) {
        op_needs(op, out);
    }
}

fn op_needs(op: &RequestOp, out: &mut Vec<(Vec<u8>, Vec<u8>, PermType)>) {
    match &op.request {
        Some(TxnOp::RequestRange(r)) => {
            out.push((r.key.clone(), r.range_end.clone(), PermType::Read))
        }
        Some(TxnOp::RequestPut(p)) => {
            out.push((p.key.clone(), Vec::new(), PermType::Write));
            if p.prev_kv {
                out.push((p.key.clone(), Vec::new(), PermType::Read));
            }
        }
        Some(TxnOp::RequestDeleteRange(d)) => {
            out.push((d.key.clone(), d.range_end.clone(), PermType::Write));
            if d.prev_kv {
                out.push((d.key.clone(), d.range_end.clone(), PermType::Read));
            }
        }
        Some(TxnOp::RequestTxn(t)) => txn_needs(t, out),
        None => {}
    }
}

#[cfg(test)]
mod tests;
