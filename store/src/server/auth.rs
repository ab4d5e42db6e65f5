//! The etcd `Auth` gRPC service, and how every other service learns who is asking.
//!
//! A request names its user with a token in the gRPC metadata `token` (etcd clients)
//! or `authorization` (the JSON gateway's `Authorization` header); without one, and
//! with `--client-cert-auth`, the Common Name of the verified client certificate is
//! the user. [`EtcdServer::caller`] turns that into an [`AuthInfo`].
//!
//! Management requests go through raft and are checked (root only) when they apply;
//! gets and lists are answered locally after a linearizable read barrier, checked
//! here. `Authenticate` checks the password on this member (bcrypt is slow, so never
//! in the apply loop), then for simple tokens proposes the token so every member
//! knows it.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use pontoon_proto::etcdserverpb::auth_server::Auth;
use pontoon_proto::etcdserverpb::*;
use pontoon_proto::internal::internal_request::Request as InternalOp;
use pontoon_proto::internal::InternalAuthenticate;

use super::status::to_status;
use super::tls::TlsConnectInfo;
use super::EtcdServer;
use crate::auth::token::{simple_token_index, simple_token_prefix, TokenProvider};
use crate::auth::{password, AuthInfo};
use crate::error::Error;
use crate::mvcc::{ApplyResponse, TokenEffect};

/// What a request presented to prove who it is, kept by long-lived streams (watch)
/// so the user can be looked up again as the auth state changes.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    token: Option<String>,
    cert_name: Option<String>,
}

impl EtcdServer {
    pub fn credentials<T>(&self, req: &Request<T>) -> Credentials {
        let md = req.metadata();
        Credentials {
            token: md
                .get("token")
                .or_else(|| md.get("authorization"))
                .map(|t| t.to_str().unwrap_or("\u{fffd}").to_string()),
            cert_name: req
                .extensions()
                .get::<TlsConnectInfo>()
                .and_then(|c| c.common_name.clone()),
        }
    }

    /// Who sent `req`: etcd's `AuthInfoFromCtx`, then the client certificate.
    /// With auth off, an empty [`AuthInfo`]. A token that is unknown, expired or
    /// forged is `etcdserver: invalid auth token`.
    pub async fn caller<T>(&self, req: &Request<T>) -> Result<AuthInfo, Status> {
        if !self.mvcc.auth().enabled {
            return Ok(AuthInfo::default());
        }
        self.resolve(&self.credentials(req)).await
    }

    /// A simple token names the raft index of the entry that assigned it. A member
    /// that has not applied that entry yet (the client authenticated on a faster
    /// member) waits for it, up to the request timeout, before judging the token, as
    /// etcd's `isValidSimpleToken` does.
    pub async fn resolve(&self, creds: &Credentials) -> Result<AuthInfo, Status> {
        if !self.mvcc.auth().enabled {
            return Ok(AuthInfo::default());
        }
        if let Some(token) = &creds.token {
            if self.tokens.is_simple() {
                if let Some(index) = simple_token_index(token) {
                    if self.raft.wait_applied(index).await.is_err() {
                        return Err(to_status(Error::InvalidAuthToken));
                    }
                }
            }
            let auth = self.mvcc.auth();
            if !auth.enabled {
                return Ok(AuthInfo::default());
            }
            return self
                .tokens
                .info(token, auth.revision)
                .ok_or_else(|| to_status(Error::InvalidAuthToken));
        }
        let auth = self.mvcc.auth();
        match &creds.cert_name {
            Some(cn) if self.client_cert_auth => Ok(AuthInfo {
                username: cn.clone(),
                revision: auth.revision,
            }),
            _ => Ok(AuthInfo::default()),
        }
    }

    /// Read permission on `[key, range_end)` for a request served by this member.
    pub fn check_read(&self, who: &AuthInfo, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
        use pontoon_proto::authpb::permission::Type;
        self.mvcc
            .auth()
            .check(who, key, range_end, Type::Read)
            .map_err(to_status)
    }

    /// Read permission for every key a read-only Txn compares or ranges over (nothing
    /// is collected while auth is off).
    pub fn check_read_txn(
        &self,
        who: &AuthInfo,
        req: &pontoon_proto::etcdserverpb::TxnRequest,
    ) -> Result<(), Status> {
        let auth = self.mvcc.auth();
        if !auth.enabled {
            return Ok(());
        }
        let mut needs = Vec::new();
        crate::auth::txn_needs(req, &mut needs);
        for (key, range_end, perm) in &needs {
            auth.check(who, key, range_end, *perm).map_err(to_status)?;
        }
        Ok(())
    }

    /// Root only (admin requests served by this member).
    pub fn check_admin(&self, who: &AuthInfo) -> Result<(), Status> {
        self.mvcc.auth().check_admin(who).map_err(to_status)
    }
}

pub struct AuthService {
    server: Arc<EtcdServer>,
}

impl AuthService {
    pub fn new(server: Arc<EtcdServer>) -> Self {
        AuthService { server }
    }

    /// Proposes a management entry as `who`; the answer carries only a header.
    async fn manage(&self, who: &AuthInfo, op: InternalOp) -> Result<ResponseHeader, Status> {
        match self.server.propose(op, who).await? {
            ApplyResponse::Auth(_) => Ok(self.server.header(self.server.mvcc.current_revision())),
            other => Err(to_status(Error::Corrupt(format!(
                "auth entry answered with {other:?}"
            )))),
        }
    }

    /// For gets and lists: a linearizable barrier, then the admin check.
    async fn read_admin<T>(&self, req: &Request<T>) -> Result<ResponseHeader, Status> {
        let who = self.server.caller(req).await?;
        self.server.raft.read_index().await.map_err(to_status)?;
        self.server.check_admin(&who)?;
        Ok(self.server.header(self.server.mvcc.current_revision()))
    }

    async fn hash(&self, password: String) -> Result<String, Status> {
        let cost = self.server.bcrypt_cost;
        tokio::task::spawn_blocking(move || password::hash(&password, cost))
            .await
            .map_err(|e| Status::internal(format!("hashing: {e}")))?
            .map_err(to_status)
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        req: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let header = self
            .manage(&who, InternalOp::AuthEnable(req.into_inner()))
            .await?;
        Ok(Response::new(AuthEnableResponse {
            header: Some(header),
        }))
    }

    async fn auth_disable(
        &self,
        req: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let header = self
            .manage(&who, InternalOp::AuthDisable(req.into_inner()))
            .await?;
        Ok(Response::new(AuthDisableResponse {
            header: Some(header),
        }))
    }

    async fn auth_status(
        &self,
        _req: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        self.server.raft.read_index().await.map_err(to_status)?;
        let auth = self.server.mvcc.auth();
        Ok(Response::new(AuthStatusResponse {
            header: Some(self.server.header(self.server.mvcc.current_revision())),
            enabled: auth.enabled,
            auth_revision: auth.revision,
        }))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let req = req.into_inner();
        let (stored, revision) = {
            let auth = self.server.mvcc.auth();
            let hash = auth.password_hash(&req.name).map_err(to_status)?.to_vec();
            (hash, auth.revision)
        };
        let password = req.password.clone();
        let ok = tokio::task::spawn_blocking(move || password::verify(&password, &stored))
            .await
            .map_err(|e| Status::internal(format!("checking password: {e}")))?;
        if !ok {
            return Err(to_status(Error::AuthFailed));
        }
        let token = match self.server.tokens.as_ref() {
            TokenProvider::Jwt(jwt) => jwt.assign(&req.name, revision).map_err(to_status)?,
            TokenProvider::Simple(_) => {
                let op = InternalOp::Authenticate(InternalAuthenticate {
                    name: req.name.clone(),
                    simple_token_prefix: simple_token_prefix(),
                });
                match self.server.propose(op, &AuthInfo::default()).await? {
                    ApplyResponse::Auth(TokenEffect::Assign { token, .. }) => token,
                    other => {
                        return Err(to_status(Error::Corrupt(format!(
                            "authenticate answered with {other:?}"
                        ))))
                    }
                }
            }
        };
        Ok(Response::new(AuthenticateResponse {
            header: Some(self.server.header(self.server.mvcc.current_revision())),
            token,
        }))
    }

    async fn user_add(
        &self,
        req: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let mut r = req.into_inner();
        let no_password = r.options.is_some_and(|o| o.no_password);
        if !no_password {
            r.hashed_password = self.hash(std::mem::take(&mut r.password)).await?;
        } else {
            r.password.clear();
            r.hashed_password.clear();
        }
        let header = self.manage(&who, InternalOp::UserAdd(r)).await?;
        Ok(Response::new(AuthUserAddResponse {
            header: Some(header),
        }))
    }

    async fn user_get(
        &self,
        req: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let header = self.read_admin(&req).await?;
        let auth = self.server.mvcc.auth();
        let user = auth
            .users
            .get(&req.get_ref().name)
            .ok_or_else(|| to_status(Error::UserNotFound))?;
        Ok(Response::new(AuthUserGetResponse {
            header: Some(header),
            roles: user.roles.clone(),
        }))
    }

    async fn user_list(
        &self,
        req: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let header = self.read_admin(&req).await?;
        Ok(Response::new(AuthUserListResponse {
            header: Some(header),
            users: self.server.mvcc.auth().users.keys().cloned().collect(),
        }))
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let header = self
            .manage(&who, InternalOp::UserDelete(req.into_inner()))
            .await?;
        Ok(Response::new(AuthUserDeleteResponse {
            header: Some(header),
        }))
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let mut r = req.into_inner();
        r.hashed_password = self.hash(std::mem::take(&mut r.password)).await?;
        let header = self.manage(&who, InternalOp::UserChangePassword(r)).await?;
        Ok(Response::new(AuthUserChangePasswordResponse {
            header: Some(header),
        }))
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let header = self
            .manage(&who, InternalOp::UserGrantRole(req.into_inner()))
            .await?;
        Ok(Response::new(AuthUserGrantRoleResponse {
            header: Some(header),
        }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let header = self
            .manage(&who, InternalOp::UserRevokeRole(req.into_inner()))
            .await?;
        Ok(Response::new(AuthUserRevokeRoleResponse {
            header: Some(header),
        }))
    }

    async fn role_add(
        &self,
        req: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let header = self
            .manage(&who, InternalOp::RoleAdd(req.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleAddResponse {
            header: Some(header),
        }))
    }

    async fn role_get(
        &self,
        req: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let header = self.read_admin(&req).await?;
        let perm = self
            .server
            .mvcc
            .auth()
            .role_permissions(&req.get_ref().role)
            .map_err(to_status)?;
        Ok(Response::new(AuthRoleGetResponse {
            header: Some(header),
            perm,
        }))
    }

    async fn role_list(
        &self,
        req: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let header = self.read_admin(&req).await?;
        Ok(Response::new(AuthRoleListResponse {
            header: Some(header),
            roles: self.server.mvcc.auth().roles.keys().cloned().collect(),
        }))
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let header = self
            .manage(&who, InternalOp::RoleDelete(req.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleDeleteResponse {
            header: Some(header),
        }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let header = self
            .manage(&who, InternalOp::RoleGrantPermission(req.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse {
            header: Some(header),
        }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let header = self
            .manage(&who, InternalOp::RoleRevokePermission(req.into_inner()))
            .await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse {
            header: Some(header),
        }))
    }
}
