//! The operator console: server-rendered pages on the admin listener
//! (`/console/`), never on the public port. Operators sign in with the
//! admin token ([`session`]), then see the gateway's live figures and
//! backends ([`status`]), manage keys and teams through the same
//! operations as the admin API and the command line ([`tenants`]), read
//! usage from the inference log ([`usage`]), try a model ([`playground`])
//! and read the audit log ([`audit`]).
//!
//! Pages work without JavaScript (forms post and redirect); a small script
//! of our own and a vendored chart library, embedded in the binary
//! ([`assets`]), add charts, live refresh and streaming. The
//! Content-Security-Policy allows scripts, styles and connections to the
//! console's own origin only, and no inline script.

mod assets;
mod audit;
mod config;
mod history;
mod playground;
mod session;
mod status;
mod tenants;
mod usage;

use std::net::SocketAddr;
use std::sync::Arc;

use askama::Template;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use secrecy::ExposeSecret;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::backends::store::Store;
use crate::edge::{AdminConfig, Edge};
use crate::error::GatewayError;
use crate::plugins::PluginHost;
use crate::tenancy::keys::hash_secret;
use session::{SignIn, SignedIn};

pub use config::ConsoleConfig;
pub use history::History;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What every page's handler reads.
pub struct Console {
    store: Arc<dyn Store>,
    edge: Arc<Edge>,
    /// The public API's routes, which the playground calls in process.
    public: Router,
    plugins: Option<Arc<PluginHost>>,
    history: Arc<History>,
    sessions: session::Sessions,
    config: ConsoleConfig,
}

type Shared = State<Arc<Console>>;

/// The console's routes, or `None` when it is off or the admin listener has
/// no token. Its sampler of live figures runs until `stop`.
pub fn router(
    edge: Arc<Edge>,
    plugins: Option<Arc<PluginHost>>,
    admin: &AdminConfig,
    config: &ConsoleConfig,
    stop: CancellationToken,
) -> Option<Router> {
    let token = admin.token.as_ref()?;
    if !config.enabled {
        return None;
    }
    let console = Arc::new(Console {
        store: edge.stages.store.clone(),
        public: crate::edge::router(edge.clone()),
        history: History::start(edge.stages.registry.clone(), stop),
        edge,
        plugins,
        sessions: session::Sessions::new(hash_secret(token.expose_secret()), config),
        config: config.clone(),
    });
    let signed_in = Router::new()
        .route("/console/", get(status::overview))
        .route("/console/overview.json", get(status::overview_json))
        .route("/console/fleet", get(status::fleet))
        .route("/console/plugins", get(status::plugins))
        .route(
            "/console/keys",
            get(tenants::keys).post(tenants::create_key),
        )
        .route(
            "/console/keys/{id}",
            get(tenants::key).post(tenants::update_key),
        )
        .route("/console/keys/{id}/revoke", post(tenants::revoke_key))
        .route(
            "/console/teams",
            get(tenants::teams).post(tenants::create_team),
        )
        .route(
            "/console/teams/{id}",
            get(tenants::team).post(tenants::update_team),
        )
        .route("/console/usage", get(usage::page))
        .route("/console/playground", get(playground::page))
        .route("/console/playground/chat", post(playground::chat))
        .route("/console/audit", get(audit::page))
        .route("/console/sign-out", post(sign_out))
        .layer(middleware::from_fn_with_state(console.clone(), guard));
    Some(
        Router::new()
            .route("/console", get(|| async { Redirect::to("/console/") }))
            .route("/console/sign-in", get(sign_in_page).post(sign_in))
            .route("/console/assets/{digest}/{name}", get(assets::serve))
            .merge(signed_in)
            .layer(middleware::from_fn(security_headers))
            .with_state(console),
    )
}

async fn guard(State(console): Shared, request: Request, next: Next) -> Response {
    match console.sessions.guard(request).await {
        Ok(request) => next.run(request).await,
        Err(refused) => refused,
    }
}

/// A strict CSP and no caching on every page (assets set their own caching).
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// What the page layout shows: the navigation, the CSRF token for forms.
pub struct Layout {
    pub page: &'static str,
    pub title: String,
    pub csrf: String,
    pub session: String,
}

impl Layout {
    fn new(page: &'static str, title: impl Into<String>, signed_in: &SignedIn) -> Self {
        Self {
            page,
            title: title.into(),
            csrf: signed_in.session.csrf.clone(),
            session: signed_in.session.label.clone(),
        }
    }

    pub fn asset(&self, name: &str) -> String {
        assets::url(name)
    }

    /// `aria-current` for the navigation link of `page`.
    pub fn current(&self, page: &str) -> &'static str {
        if self.page == page { "page" } else { "false" }
    }
}

/// A console page's failure, shown as a page with its status.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("the page could not be rendered: {0}")]
    Render(#[from] askama::Error),
}

impl From<crate::tenancy::tenants::TenantError> for Problem {
    fn from(err: crate::tenancy::tenants::TenantError) -> Self {
        Self::Gateway(err.into())
    }
}

impl From<crate::backends::store::StoreError> for Problem {
    fn from(err: crate::backends::store::StoreError) -> Self {
        crate::tenancy::tenants::TenantError::Store(err).into()
    }
}

#[derive(Template)]
#[template(path = "problem.html")]
struct ProblemPage {
    status: u16,
    message: String,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = match &self {
            Problem::Gateway(err) => err.status(),
            Problem::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match &self {
            Problem::Gateway(err) => err.info().message,
            Problem::Render(err) => err.to_string(),
        };
        if status.is_server_error() {
            tracing::error!(%message, "console page failed");
        }
        let page = ProblemPage {
            status: status.as_u16(),
            message,
        };
        let body = page.render().unwrap_or_else(|_| "error".into());
        (status, Html(body)).into_response()
    }
}

type Page = Result<Response, Problem>;

fn html(template: &impl Template) -> Page {
    Ok(Html(template.render()?).into_response())
}

#[derive(Template)]
#[template(path = "sign_in.html")]
struct SignInPage {
    error: Option<&'static str>,
}

impl SignInPage {
    fn asset(&self, name: &str) -> String {
        assets::url(name)
    }
}

async fn sign_in_page() -> Page {
    html(&SignInPage { error: None })
}

#[derive(Deserialize)]
struct SignInForm {
    token: String,
}

async fn sign_in(
    State(console): Shared,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    Form(form): Form<SignInForm>,
) -> Page {
    if !session::same_origin(&headers) {
        return Ok((StatusCode::FORBIDDEN, "cross-origin request refused").into_response());
    }
    let secure = session::over_tls(&headers);
    let (status, error) = match console.sessions.sign_in(client.ip(), &form.token, secure) {
        SignIn::Welcome(cookie) => {
            let mut response = Redirect::to("/console/").into_response();
            if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            return Ok(response);
        }
        SignIn::Wrong => (StatusCode::UNAUTHORIZED, "That is not the admin token."),
        SignIn::Throttled => (
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed sign-ins from this address; wait a minute.",
        ),
    };
    tracing::warn!(client = %client.ip(), status = status.as_u16(), "console sign-in refused");
    let page = SignInPage { error: Some(error) }.render()?;
    Ok((status, Html(page)).into_response())
}

async fn sign_out(
    State(console): Shared,
    axum::Extension(signed_in): axum::Extension<SignedIn>,
) -> Page {
    if let Some(session) = console.sessions.sign_out(&signed_in.id_hash)
        && let Some((key_id, _)) = &session.playground_key
    {
        crate::tenancy::tenants::revoke_key(console.store.as_ref(), &session.actor(), key_id)
            .await?;
    }
    let mut response = Redirect::to("/console/sign-in").into_response();
    if let Ok(cookie) = HeaderValue::from_str(&session::expired_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    Ok(response)
}
