//! Signing in: the admin token, posted once from the sign-in form, is
//! exchanged for a session cookie (random, HttpOnly, SameSite=Strict,
//! Secure when the console is reached over TLS, expiring). Sessions live in
//! this process's memory, so a restart signs everyone out. Every change
//! carries the session's CSRF token, and a request from another origin is
//! refused. Failed sign-ins are counted per client address and throttled.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine;
use rand::RngCore;
use secrecy::SecretString;
use subtle::ConstantTimeEq;

use super::ConsoleConfig;
use crate::tenancy::keys::hash_secret;

pub const COOKIE: &str = "sluice_console";
/// Largest form a change may post (CSRF is read from it).
const MAX_FORM_BYTES: usize = 64 * 1024;
/// Addresses whose failures are remembered at once.
const MAX_TRACKED: usize = 10_000;
const THROTTLE_WINDOW: Duration = Duration::from_secs(60);

/// A signed-in operator.
#[derive(Clone)]
pub struct Session {
    /// The first characters of the session id's hash: names it in the audit log.
    pub label: String,
    pub csrf: String,
    started: Instant,
    /// The key the playground made for this session, and its secret.
    pub playground_key: Option<(String, SecretString)>,
}

impl Session {
    pub fn actor(&self) -> crate::tenancy::audit::Actor {
        crate::tenancy::audit::Actor::Console {
            session: self.label.clone(),
        }
    }
}

/// The session of a request, put in its extensions by [`Sessions::guard`].
#[derive(Clone)]
pub struct SignedIn {
    pub id_hash: String,
    pub session: Session,
}

pub struct Sessions {
    token_hash: String,
    ttl: Duration,
    max: usize,
    attempts: u32,
    sessions: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

pub enum SignIn {
    /// The cookie to set.
    Welcome(String),
    Wrong,
    Throttled,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sessions {
    pub fn new(token_hash: String, config: &ConsoleConfig) -> Self {
        Self {
            token_hash,
            ttl: config.session_ttl,
            max: config.max_sessions.get() as usize,
            attempts: config.sign_in_attempts.get(),
            sessions: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Checks `token` (in constant time) unless `client` failed too often
    /// this minute; a right token starts a session.
    pub fn sign_in(&self, client: IpAddr, token: &str, secure: bool) -> SignIn {
        let now = Instant::now();
        {
            let mut failures = lock(&self.failures);
            if let Some((count, since)) = failures.get(&client)
                && now.duration_since(*since) < THROTTLE_WINDOW
                && *count >= self.attempts
            {
                return SignIn::Throttled;
            }
            let presented = hash_secret(token);
            if !bool::from(presented.as_bytes().ct_eq(self.token_hash.as_bytes())) {
                if failures.len() >= MAX_TRACKED {
                    failures.retain(|_, (_, since)| now.duration_since(*since) < THROTTLE_WINDOW);
                }
                let entry = failures.entry(client).or_insert((0, now));
                if now.duration_since(entry.1) >= THROTTLE_WINDOW {
                    *entry = (0, now);
                }
                entry.0 += 1;
                return SignIn::Wrong;
            }
            failures.remove(&client);
        }
        let id = random_token();
        let id_hash = hash_secret(&id);
        let session = Session {
            label: id_hash[..8].to_string(),
            csrf: random_token(),
            started: now,
            playground_key: None,
        };
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, s| now.duration_since(s.started) < self.ttl);
        if sessions.len() >= self.max
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.started)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(id_hash, session);
        SignIn::Welcome(cookie(&id, self.ttl, secure))
    }

    /// The live session whose id is in `headers`' cookie.
    pub fn find(&self, headers: &HeaderMap) -> Option<SignedIn> {
        let id = cookie_value(headers)?;
        let id_hash = hash_secret(id);
        let sessions = lock(&self.sessions);
        let session = sessions.get(&id_hash)?;
        (session.started.elapsed() < self.ttl).then(|| SignedIn {
            id_hash: id_hash.clone(),
            session: session.clone(),
        })
    }

    /// Ends a session; returns it as it was (its playground key is revoked by the caller).
    pub fn sign_out(&self, id_hash: &str) -> Option<Session> {
        lock(&self.sessions).remove(id_hash)
    }

    pub fn set_playground_key(&self, id_hash: &str, key: (String, SecretString)) {
        if let Some(session) = lock(&self.sessions).get_mut(id_hash) {
            session.playground_key = Some(key);
        }
    }

    /// Lets a request through only with a live session; a change (any method
    /// but GET and HEAD) also needs the session's CSRF token (header
    /// `x-csrf-token` or form field `csrf`) and no foreign `Origin`.
    pub async fn guard(&self, request: Request) -> Result<Request, Response> {
        let reading = matches!(*request.method(), Method::GET | Method::HEAD);
        let Some(signed_in) = self.find(request.headers()) else {
            return Err(match reading {
                true => Redirect::to("/console/sign-in").into_response(),
                false => (StatusCode::UNAUTHORIZED, "sign in first").into_response(),
            });
        };
        if reading {
            let mut request = request;
            request.extensions_mut().insert(signed_in);
            return Ok(request);
        }
        if !same_origin(request.headers()) {
            return Err((StatusCode::FORBIDDEN, "cross-origin request refused").into_response());
        }
        let expected = signed_in.session.csrf.clone();
        let (mut parts, body) = request.into_parts();
        let from_header = parts
            .headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (presented, body) = match from_header {
            Some(token) => (Some(token), body),
            None => {
                let is_form = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
                let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
                    .await
                    .map_err(|_| {
                        (StatusCode::PAYLOAD_TOO_LARGE, "form too large").into_response()
                    })?;
                let token = is_form
                    .then(|| {
                        url::form_urlencoded::parse(&bytes)
                            .find(|(name, _)| name == "csrf")
                            .map(|(_, value)| value.into_owned())
                    })
                    .flatten();
                (token, Body::from(bytes))
            }
        };
        let valid = presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(expected.as_bytes())));
        if !valid {
            return Err((StatusCode::FORBIDDEN, "missing or wrong CSRF token").into_response());
        }
        parts.extensions.insert(signed_in);
        Ok(Request::from_parts(parts, body))
    }
}

fn cookie(id: &str, ttl: Duration, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        ttl.as_secs()
    )
}

/// The cookie that ends a session in the browser.
pub fn expired_cookie() -> String {
    format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0")
}

fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// Whether a request's `Origin`, when it has one, is the console's own.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let authority = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    authority == Some(host)
}

/// Whether the browser reached the console over TLS (directly or through a
/// proxy that says so): the cookie is then `Secure`.
pub fn over_tls(headers: &HeaderMap) -> bool {
    let origin_https = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|o| o.starts_with("https://"));
    let forwarded_https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    origin_https || forwarded_https
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(attempts: u32) -> Sessions {
        let config = ConsoleConfig {
            sign_in_attempts: NonZeroU32::new(attempts).unwrap(),
            ..ConsoleConfig::default()
        };
        Sessions::new(hash_secret("the-admin-token-0123"), &config)
    }
    use std::num::NonZeroU32;

    #[test]
    fn a_wrong_token_is_refused_and_repeated_failures_throttled() {
        let sessions = sessions(2);
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(matches!(
            sessions.sign_in(client, "wrong", false),
            SignIn::Wrong
        ));
        assert!(matches!(
            sessions.sign_in(client, "wrong", false),
            SignIn::Wrong
        ));
        // Throttled even with the right token, for this address only.
        assert!(matches!(
            sessions.sign_in(client, "the-admin-token-0123", false),
            SignIn::Throttled
        ));
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let SignIn::Welcome(cookie) = sessions.sign_in(other, "the-admin-token-0123", true) else {
            panic!("the right token from another address signs in");
        };
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(cookie.contains("Secure") && cookie.contains("Max-Age=28800"));
        let mut headers = HeaderMap::new();
        let pair = cookie.split(';').next().unwrap();
        headers.insert(header::COOKIE, pair.parse().unwrap());
        let signed_in = sessions
            .find(&headers)
            .expect("the cookie finds its session");
        assert_eq!(signed_in.session.label.len(), 8);
        sessions.sign_out(&signed_in.id_hash);
        assert!(sessions.find(&headers).is_none());
    }

    #[test]
    fn the_cookie_is_secure_when_the_browser_came_over_tls() {
        let mut headers = HeaderMap::new();
        assert!(!over_tls(&headers));
        headers.insert(header::ORIGIN, "https://console.example".parse().unwrap());
        assert!(over_tls(&headers));
        let mut proxied = HeaderMap::new();
        proxied.insert("x-forwarded-proto", "https".parse().unwrap());
        assert!(over_tls(&proxied));
    }

    #[test]
    fn only_the_consoles_own_origin_may_change_things() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:8081".parse().unwrap());
        assert!(same_origin(&headers));
        headers.insert(header::ORIGIN, "http://127.0.0.1:8081".parse().unwrap());
        assert!(same_origin(&headers));
        headers.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!same_origin(&headers));
    }
}
