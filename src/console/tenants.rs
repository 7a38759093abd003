//! Keys and teams: search, create (a key's secret shown once), edit limits,
//! models, team and expiry, revoke. Every change goes through
//! [`crate::tenancy::tenants`], as the admin API's and the command line's
//! do, with this session as its actor in the audit log.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect};
use axum::{Extension, Form};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;

use super::session::SignedIn;
use super::{Console, Layout, Page, Problem, Shared, html};
use crate::backends::queue::Priority;
use crate::backends::store::{ApiKey, Team};
use crate::error::GatewayError;
use crate::tenancy::Limits;
use crate::tenancy::tenants::{self, KeyPatch, LimitsPatch};

/// A key or team's limits as a form shows and posts them: an empty field
/// is no limit of its own (the defaults apply).
#[derive(Debug, Default, Deserialize)]
pub struct LimitsForm {
    #[serde(default)]
    requests_per_minute: String,
    #[serde(default)]
    tokens_per_minute: String,
    #[serde(default)]
    max_concurrent: String,
    /// Comma-separated.
    #[serde(default)]
    models: String,
    /// `high`, `normal`, `low`, or empty.
    #[serde(default)]
    priority: String,
}

/// A page with a form: 400 when it shows the form's error.
fn form_page(error: &Option<String>, page: &impl Template) -> Page {
    let status = match error {
        Some(_) => StatusCode::BAD_REQUEST,
        None => StatusCode::OK,
    };
    Ok((status, Html(page.render()?)).into_response())
}

/// What a refused change says on its form (a client's mistake), or the
/// failure itself (anything else).
fn refusal(err: Problem) -> Result<String, Problem> {
    match err {
        Problem::Gateway(err) if err.status().is_client_error() => Ok(err.info().message),
        err => Err(err),
    }
}

fn bad(message: String) -> Problem {
    Problem::Gateway(GatewayError::BadRequest(message))
}

impl LimitsForm {
    fn of(limits: &Limits) -> Self {
        let number = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_default();
        Self {
            requests_per_minute: number(limits.requests_per_minute),
            tokens_per_minute: number(limits.tokens_per_minute),
            max_concurrent: number(limits.max_concurrent),
            models: limits
                .models
                .as_ref()
                .map(|m| m.join(", "))
                .unwrap_or_default(),
            priority: limits
                .priority
                .map(|p| p.name().to_string())
                .unwrap_or_default(),
        }
    }

    /// Every field set as the form has it (a form shows all of them).
    fn patch(&self) -> Result<LimitsPatch, Problem> {
        let number = |name: &str, text: &str| -> Result<Option<Option<u64>>, Problem> {
            match text.trim() {
                "" => Ok(Some(None)),
                text => text
                    .parse()
                    .map(|n| Some(Some(n)))
                    .map_err(|_| bad(format!("{name} must be a whole number, or empty for none"))),
            }
        };
        let models: Vec<String> = self
            .models
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect();
        let priority = match self.priority.trim() {
            "" => None,
            name => Some(
                Priority::ALL
                    .into_iter()
                    .find(|p| p.name() == name)
                    .ok_or_else(|| {
                        bad(format!(
                            "priority must be high, normal or low, not `{name}`"
                        ))
                    })?,
            ),
        };
        Ok(LimitsPatch {
            requests_per_minute: number("requests_per_minute", &self.requests_per_minute)?,
            tokens_per_minute: number("tokens_per_minute", &self.tokens_per_minute)?,
            max_concurrent: number("max_concurrent", &self.max_concurrent)?,
            models: Some((!models.is_empty()).then_some(models)),
            priority: Some(priority),
        })
    }
}

/// What the keys table shows of a key.
pub struct KeyRow {
    pub key: ApiKey,
    pub team: String,
    pub state: &'static str,
    pub limits: String,
}

impl KeyRow {
    fn new(key: ApiKey, team: String) -> Self {
        Self {
            team,
            state: state_of(&key),
            limits: key.limits.to_string(),
            key,
        }
    }
}

fn state_of(key: &ApiKey) -> &'static str {
    match (key.revoked_at, key.expires_at) {
        (Some(_), _) => "revoked",
        (None, Some(at)) if at <= Utc::now() => "expired",
        _ => "active",
    }
}

fn team_name(teams: &[Team], id: Option<&str>) -> String {
    id.map(|id| {
        teams
            .iter()
            .find(|t| t.id == id)
            .map_or_else(|| id.to_string(), |t| t.name.clone())
    })
    .unwrap_or_default()
}

#[derive(Template)]
#[template(path = "keys.html")]
struct KeysPage {
    layout: Layout,
    query: String,
    keys: Vec<KeyRow>,
    teams: Vec<Team>,
    error: Option<String>,
    form: NewKeyForm,
}

#[derive(Debug, Default, Deserialize)]
pub struct Search {
    #[serde(default)]
    q: String,
}

async fn keys_page(
    console: &Console,
    signed_in: &SignedIn,
    query: String,
    error: Option<String>,
    form: NewKeyForm,
) -> Page {
    let teams = console.store.list_teams().await?;
    let needle = query.trim().to_lowercase();
    let keys = console
        .store
        .list_keys()
        .await?
        .into_iter()
        .rev()
        .map(|key| {
            let team = team_name(&teams, key.team_id.as_deref());
            KeyRow::new(key, team)
        })
        .filter(|row| {
            needle.is_empty()
                || row.key.name.to_lowercase().contains(&needle)
                || row.key.id.to_lowercase().contains(&needle)
                || row.team.to_lowercase().contains(&needle)
        })
        .collect();
    let page = KeysPage {
        layout: Layout::new("keys", "Keys", signed_in),
        query,
        keys,
        teams,
        error,
        form,
    };
    form_page(&page.error, &page)
}

pub async fn keys(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    Query(search): Query<Search>,
) -> Page {
    keys_page(&console, &signed_in, search.q, None, NewKeyForm::default()).await
}

#[derive(Debug, Default, Deserialize)]
pub struct NewKeyForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    team: String,
    /// `YYYY-MM-DDTHH:MM`, UTC (a `datetime-local` field); empty: never.
    #[serde(default)]
    expires_at: String,
    #[serde(flatten)]
    limits: LimitsForm,
}

fn expiry(text: &str) -> Result<Option<DateTime<Utc>>, Problem> {
    match text.trim() {
        "" => Ok(None),
        text => NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
            .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S"))
            .map(|t| Some(t.and_utc()))
            .map_err(|_| bad(format!("expires_at `{text}` is not a date and time"))),
    }
}

fn team_field(text: &str) -> Option<Option<String>> {
    Some(
        Some(text.trim())
            .filter(|t| !t.is_empty())
            .map(String::from),
    )
}

#[derive(Template)]
#[template(path = "key_created.html")]
struct KeyCreatedPage {
    layout: Layout,
    id: String,
    name: String,
    secret: String,
}

pub async fn create_key(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    Form(form): Form<NewKeyForm>,
) -> Page {
    let attempt = async {
        let patch = KeyPatch {
            limits: form.limits.patch()?,
            team: team_field(&form.team),
            expires_at: Some(expiry(&form.expires_at)?),
        };
        let created = tenants::create_key(
            console.store.as_ref(),
            &signed_in.session.actor(),
            &form.name,
            &patch,
            None,
        )
        .await?;
        Ok::<_, Problem>(created)
    };
    match attempt.await {
        Ok(created) => {
            let page = KeyCreatedPage {
                layout: Layout::new("keys", "Key created", &signed_in),
                id: created.id,
                name: created.name,
                secret: created.secret,
            };
            Ok((StatusCode::CREATED, Html(page.render()?)).into_response())
        }
        Err(err) => {
            keys_page(
                &console,
                &signed_in,
                String::new(),
                Some(refusal(err)?),
                form,
            )
            .await
        }
    }
}

#[derive(Template)]
#[template(path = "key.html")]
struct KeyPage {
    layout: Layout,
    key: ApiKey,
    state: &'static str,
    teams: Vec<Team>,
    limits: LimitsForm,
    expires_at: String,
    notice: Option<String>,
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Notice {
    #[serde(default)]
    saved: Option<String>,
}

async fn key_page(
    console: &Console,
    signed_in: &SignedIn,
    id: &str,
    notice: Option<String>,
    error: Option<String>,
) -> Page {
    let key = tenants::find_key(console.store.as_ref(), id).await?;
    let page = KeyPage {
        layout: Layout::new("keys", format!("Key {}", key.name), signed_in),
        state: state_of(&key),
        teams: console.store.list_teams().await?,
        limits: LimitsForm::of(&key.limits),
        expires_at: key
            .expires_at
            .map(|t| t.format("%Y-%m-%dT%H:%M").to_string())
            .unwrap_or_default(),
        key,
        notice,
        error,
    };
    form_page(&page.error, &page)
}

pub async fn key(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    Path(id): Path<String>,
    Query(notice): Query<Notice>,
) -> Page {
    let notice = notice.saved.map(|what| match what.as_str() {
        "revoked" => "Revoked: its requests are refused within seconds.".to_string(),
        _ => "Saved: the new limits apply within seconds.".to_string(),
    });
    key_page(&console, &signed_in, &id, notice, None).await
}

#[derive(Debug, Default, Deserialize)]
pub struct KeyForm {
    #[serde(default)]
    team: String,
    #[serde(default)]
    expires_at: String,
    #[serde(flatten)]
    limits: LimitsForm,
}

pub async fn update_key(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    Path(id): Path<String>,
    Form(form): Form<KeyForm>,
) -> Page {
    let attempt = async {
        let patch = KeyPatch {
            limits: form.limits.patch()?,
            team: team_field(&form.team),
            expires_at: Some(expiry(&form.expires_at)?),
        };
        tenants::update_key(
            console.store.as_ref(),
            &signed_in.session.actor(),
            &id,
            &patch,
        )
        .await
        .map_err(Problem::from)
    };
    match attempt.await {
        Ok(key) => {
            Ok(Redirect::to(&format!("/console/keys/{}?saved=limits", key.id)).into_response())
        }
        Err(err) => key_page(&console, &signed_in, &id, None, Some(refusal(err)?)).await,
    }
}

pub async fn revoke_key(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    Path(id): Path<String>,
) -> Page {
    let key = tenants::revoke_key(console.store.as_ref(), &signed_in.session.actor(), &id).await?;
    Ok(Redirect::to(&format!("/console/keys/{}?saved=revoked", key.id)).into_response())
}

pub struct TeamRow {
    pub team: Team,
    pub keys: usize,
    pub limits: String,
}

#[derive(Template)]
#[template(path = "teams.html")]
struct TeamsPage {
    layout: Layout,
    teams: Vec<TeamRow>,
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct NewTeamForm {
    #[serde(default)]
    name: String,
    #[serde(flatten)]
    limits: LimitsForm,
}

async fn teams_page(console: &Console, signed_in: &SignedIn, error: Option<String>) -> Page {
    let keys = console.store.list_keys().await?;
    let teams = console
        .store
        .list_teams()
        .await?
        .into_iter()
        .map(|team| TeamRow {
            keys: keys
                .iter()
                .filter(|k| {
                    k.team_id.as_deref() == Some(team.id.as_str()) && k.revoked_at.is_none()
                })
                .count(),
            limits: team.limits.to_string(),
            team,
        })
        .collect();
    let page = TeamsPage {
        layout: Layout::new("teams", "Teams", signed_in),
        teams,
        error,
    };
    form_page(&page.error, &page)
}

pub async fn teams(State(console): Shared, Extension(signed_in): Extension<SignedIn>) -> Page {
    teams_page(&console, &signed_in, None).await
}

pub async fn create_team(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    Form(form): Form<NewTeamForm>,
) -> Page {
    let attempt = async {
        let limits = form.limits.patch()?;
        tenants::create_team(
            console.store.as_ref(),
            &signed_in.session.actor(),
            &form.name,
            &limits,
        )
        .await
        .map_err(Problem::from)
    };
    match attempt.await {
        Ok(team) => Ok(Redirect::to(&format!("/console/teams/{}", team.id)).into_response()),
        Err(err) => teams_page(&console, &signed_in, Some(refusal(err)?)).await,
    }
}

#[derive(Template)]
#[template(path = "team.html")]
struct TeamPage {
    layout: Layout,
    team: Team,
    limits: LimitsForm,
    keys: Vec<KeyRow>,
    notice: bool,
}

pub async fn team(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    Path(id): Path<String>,
    Query(notice): Query<Notice>,
) -> Page {
    let team = tenants::find_team(console.store.as_ref(), &id).await?;
    let keys = console
        .store
        .list_keys()
        .await?
        .into_iter()
        .filter(|k| k.team_id.as_deref() == Some(team.id.as_str()))
        .map(|key| KeyRow::new(key, team.name.clone()))
        .collect();
    html(&TeamPage {
        layout: Layout::new("teams", format!("Team {}", team.name), &signed_in),
        limits: LimitsForm::of(&team.limits),
        team,
        keys,
        notice: notice.saved.is_some(),
    })
}

pub async fn update_team(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    Path(id): Path<String>,
    Form(form): Form<LimitsForm>,
) -> Page {
    let limits = form.patch()?;
    let team = tenants::update_team(
        console.store.as_ref(),
        &signed_in.session.actor(),
        &id,
        &limits,
    )
    .await?;
    Ok(Redirect::to(&format!("/console/teams/{}?saved=limits", team.id)).into_response())
}
