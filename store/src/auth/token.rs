//! Auth tokens, as etcd's `--auth-token` flag chooses them.
//!
//! - `simple` (the default): a random string, `<16 letters>.<raft index>`. Not signed;
//!   meaningful only because every member remembers it: the `Authenticate` entry
//!   assigns it on each member as it applies. A token lives `--auth-token-ttl` seconds
//!   (default 300) after its last use; deleting the user or changing their password
//!   drops their tokens, disabling auth drops all. A restarted member forgets them
//!   (clients authenticate again), as etcd's do.
//! - `jwt,pub-key=<path>,priv-key=<path>,sign-method=<RS256|ES256|...>[,ttl=<dur>]`:
//!   a signed JSON Web Token carrying the user name and the auth revision it was
//!   issued at (claims `username`, `revision`, `exp`, as etcd's). Any member with the
//!   public key verifies it; a member with only the public key cannot issue tokens.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;

use super::AuthInfo;
use crate::error::{Error, Result};

/// etcd's default `--auth-token-ttl`.
pub const DEFAULT_SIMPLE_TTL: Duration = Duration::from_secs(300);
/// etcd's default JWT lifetime.
const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);
/// Simple tokens are swept for expiry at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

pub enum TokenProvider {
    Simple(SimpleTokens),
    Jwt(Box<JwtTokens>),
}

impl TokenProvider {
    /// Parses `--auth-token` (`simple`, or `jwt,key=value,...`).
    pub fn from_flag(flag: &str, simple_ttl: Duration) -> Result<TokenProvider> {
        let mut parts = flag.split(',');
        let kind = parts.next().unwrap_or_default();
        let mut opts = HashMap::new();
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("auth: invalid auth options {flag:?}")))?;
            if opts.insert(k, v).is_some() {
                return Err(Error::Config(format!(
                    "auth: invalid auth options {flag:?}: {k} given twice"
                )));
            }
        }
        match kind {
            "simple" => Ok(TokenProvider::Simple(SimpleTokens::new(simple_ttl))),
            "jwt" => Ok(TokenProvider::Jwt(Box::new(JwtTokens::from_options(
                &opts,
            )?))),
            other => Err(Error::Config(format!(
                "auth: unknown token type {other:?} (want simple or jwt)"
            ))),
        }
    }

    /// Who a presented token names; `None` if it is unknown, expired or forged.
    /// `current` is the auth revision now (simple tokens are always current; a JWT
    /// carries the revision it was issued at).
    pub fn info(&self, token: &str, current: u64) -> Option<AuthInfo> {
        match self {
            TokenProvider::Simple(s) => s.info(token).map(|username| AuthInfo {
                username,
                revision: current,
            }),
            TokenProvider::Jwt(j) => j.info(token),
        }
    }

    pub fn invalidate_user(&self, name: &str) {
        if let TokenProvider::Simple(s) = self {
            s.invalidate_user(name);
        }
    }

    pub fn clear(&self) {
        if let TokenProvider::Simple(s) = self {
            s.clear();
        }
    }

    pub fn is_simple(&self) -> bool {
        matches!(self, TokenProvider::Simple(_))
    }
}

/// Random prefix of a simple token (etcd uses 16 letters).
pub fn simple_token_prefix() -> String {
    let mut rng = rand::thread_rng();
    (0..16)
        .map(|_| {
            let c = rng.gen_range(0..52u8);
            if c < 26 {
                (b'a' + c) as char
            } else {
                (b'A' + c - 26) as char
            }
        })
        .collect()
}

/// The raft index a simple token was assigned at (`<letters>.<index>`), if it has
/// that shape.
pub fn simple_token_index(token: &str) -> Option<u64> {
    token.rsplit_once('.')?.1.parse().ok()
}

pub struct SimpleTokens {
    ttl: Duration,
    inner: Mutex<SimpleInner>,
}

struct SimpleInner {
    /// token -> (user, expires at)
    tokens: HashMap<String, (String, Instant)>,
    swept: Instant,
}

impl SimpleTokens {
    pub fn new(ttl: Duration) -> SimpleTokens {
        SimpleTokens {
            ttl,
            inner: Mutex::new(SimpleInner {
                tokens: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    /// Remembers a token (applied from an `Authenticate` entry).
    pub fn assign(&self, token: String, user: &str) {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("token lock");
        if now.duration_since(inner.swept) >= SWEEP_EVERY {
            inner.tokens.retain(|_, (_, exp)| *exp > now);
            inner.swept = now;
        }
        inner
            .tokens
            .insert(token, (user.to_string(), now + self.ttl));
    }

    /// The user of a live token, extending its life (etcd resets the TTL on use).
    pub fn info(&self, token: &str) -> Option<String> {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("token lock");
        let (user, exp) = inner.tokens.get_mut(token)?;
        if *exp <= now {
            inner.tokens.remove(token);
            return None;
        }
        *exp = now + self.ttl;
        Some(user.clone())
    }

    pub fn invalidate_user(&self, name: &str) {
        let mut inner = self.inner.lock().expect("token lock");
        inner.tokens.retain(|_, (u, _)| u != name);
    }

    pub fn clear(&self) {
        self.inner.lock().expect("token lock").tokens.clear();
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

pub struct JwtTokens {
    algorithm: Algorithm,
    decoding: DecodingKey,
    /// `None` for a verify-only member (no `priv-key`).
    encoding: Option<EncodingKey>,
    ttl: Duration,
}

fn read_key(path: &str) -> Result<Vec<u8>> {
    std::fs::read(Path::new(path))
        .map_err(|e| Error::Config(format!("auth: cannot read JWT key {path}: {e}")))
}

impl JwtTokens {
    fn from_options(opts: &HashMap<&str, &str>) -> Result<JwtTokens> {
        let method = opts
            .get("sign-method")
            .ok_or_else(|| Error::Config("auth: jwt needs sign-method".into()))?;
        let algorithm: Algorithm = method.parse().map_err(|_| {
            Error::Config(format!("auth: invalid auth signature method {method:?}"))
        })?;
        let ttl = match opts.get("ttl") {
            Some(t) => crate::duration::parse_go_duration(t)
                .ok_or_else(|| Error::Config(format!("auth: invalid JWT ttl {t:?}")))?,
            None => DEFAULT_JWT_TTL,
        };
        let pub_path = opts
            .get("pub-key")
            .ok_or_else(|| Error::Config("auth: missing key data (pub-key)".into()))?;
        let pem = read_key(pub_path)?;
        let bad = |e: jsonwebtoken::errors::Error| Error::Config(format!("auth: JWT key: {e}"));
        let decoding = match algorithm {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => DecodingKey::from_rsa_pem(&pem).map_err(bad)?,
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem).map_err(bad)?,
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem).map_err(bad)?,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                DecodingKey::from_secret(&pem)
            }
        };
        let encoding = match opts.get("priv-key") {
            None => None,
            Some(p) => {
                let pem = read_key(p)?;
                Some(match algorithm {
                    Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512 => EncodingKey::from_rsa_pem(&pem).map_err(bad)?,
                    Algorithm::ES256 | Algorithm::ES384 => {
                        EncodingKey::from_ec_pem(&pem).map_err(bad)?
                    }
                    Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).map_err(bad)?,
                    Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                        EncodingKey::from_secret(&pem)
                    }
                })
            }
        };
        let tokens = JwtTokens {
            algorithm,
            decoding,
            encoding,
            ttl,
        };
        // etcd refuses a key pair that does not match; sign and verify once.
        if tokens.encoding.is_some() {
            let probe = tokens.assign("probe", 0)?;
            if tokens.info(&probe).is_none() {
                return Err(Error::Config(
                    "auth: public and private keys don't match".into(),
                ));
            }
        }
        Ok(tokens)
    }

    /// Signs a token for `username` at auth revision `revision`.
    pub fn assign(&self, username: &str, revision: u64) -> Result<String> {
        let key = self.encoding.as_ref().ok_or_else(|| {
            Error::Config("auth: token signing attempted with verify-only key".into())
        })?;
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(self.ttl)
            .as_secs();
        let claims = Claims {
            username: username.to_string(),
            revision,
            exp,
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(|e| Error::Config(format!("auth: signing JWT: {e}")))
    }

    fn info(&self, token: &str) -> Option<AuthInfo> {
        let mut validation = Validation::new(self.algorithm);
        validation.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).ok()?;
        Some(AuthInfo {
            username: data.claims.username,
            revision: data.claims.revision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_tokens_expire_refresh_and_drop() {
        let t = SimpleTokens::new(Duration::from_millis(200));
        t.assign("a.1".into(), "alice");
        t.assign("b.2".into(), "bob");
        assert_eq!(t.info("a.1").as_deref(), Some("alice"));
        assert_eq!(t.info("nope"), None);
        t.invalidate_user("alice");
        assert_eq!(t.info("a.1"), None);
        std::thread::sleep(Duration::from_millis(120));
        assert!(t.info("b.2").is_some(), "use extends the TTL");
        std::thread::sleep(Duration::from_millis(120));
        assert!(t.info("b.2").is_some(), "still within the extended TTL");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.info("b.2"), None, "expired");
        t.assign("c.3".into(), "carol");
        t.clear();
        assert_eq!(t.info("c.3"), None);
    }

    #[test]
    fn simple_tokens_name_their_raft_index() {
        assert_eq!(simple_token_index("aBcDeFgHiJkLmNoP.42"), Some(42));
        assert_eq!(simple_token_index("aBcDeFgHiJkLmNoP"), None);
        assert_eq!(simple_token_index("a.b.x"), None);
    }

    #[test]
    fn prefixes_are_random_letters() {
        let a = simple_token_prefix();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_alphabetic()));
        assert_ne!(a, simple_token_prefix());
    }

    #[test]
    fn flag_parsing_rejects_bad_options() {
        assert!(TokenProvider::from_flag("simple", DEFAULT_SIMPLE_TTL)
            .unwrap()
            .is_simple());
        assert!(TokenProvider::from_flag("bogus", DEFAULT_SIMPLE_TTL).is_err());
        assert!(TokenProvider::from_flag("jwt,sign-method", DEFAULT_SIMPLE_TTL).is_err());
        assert!(TokenProvider::from_flag("jwt,sign-method=RS256", DEFAULT_SIMPLE_TTL).is_err());
        assert!(TokenProvider::from_flag(
            "jwt,sign-method=RS256,pub-key=/nonexistent",
            DEFAULT_SIMPLE_TTL
        )
        .is_err());
    }

    #[test]
    fn jwt_signs_and_verifies_with_hmac() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, b"a shared secret of some length").unwrap();
        let k = key.display();
        let p = TokenProvider::from_flag(
            &format!("jwt,sign-method=HS256,pub-key={k},priv-key={k},ttl=1m"),
            DEFAULT_SIMPLE_TTL,
        )
        .unwrap();
        let TokenProvider::Jwt(j) = &p else {
            panic!("jwt provider expected")
        };
        let token = j.assign("alice", 7).unwrap();
        assert_eq!(
            p.info(&token, 9),
            Some(AuthInfo {
                username: "alice".into(),
                revision: 7
            }),
            "a JWT carries the revision it was issued at"
        );
        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(p.info(&forged, 9), None);
        assert_eq!(p.info("garbage", 9), None);
    }
}
