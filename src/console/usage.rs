//! Usage: requests, prompt and completion tokens, cache hits and failures
//! per key, team or model, by hour or day over a chosen range, aggregated
//! in SQL from the inference log; as charts, a table, or CSV.

use std::collections::HashMap;

use askama::Template;
use axum::Extension;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use chrono::{Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::session::SignedIn;
use super::{Layout, Page, Problem, Shared, html};
use crate::backends::store::usage::{Granularity, UsageGroup, UsageQuery, UsageRow};
use crate::error::GatewayError;

/// Longest range in days, and longest by hour.
const MAX_DAYS: i64 = 400;
const MAX_HOURLY_DAYS: i64 = 62;
/// Groups drawn in the charts; the rest are summed as "others".
const CHARTED: usize = 8;
/// Rows of the per-bucket table on the page (the CSV has them all).
const TABLE_ROWS: usize = 2000;

#[derive(Debug, Default, Deserialize)]
pub struct Params {
    /// First day, `YYYY-MM-DD` (UTC); default: six days before `to`.
    #[serde(default)]
    from: String,
    /// Last day, included; default: today.
    #[serde(default)]
    to: String,
    granularity: Option<Granularity>,
    #[serde(default)]
    group: UsageGroup,
    #[serde(default)]
    key: String,
    #[serde(default)]
    team: String,
    #[serde(default)]
    model: String,
    /// `csv` for a download.
    #[serde(default)]
    format: String,
}

/// A group's totals over the range.
pub struct Total {
    pub id: String,
    pub name: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cache_hits: i64,
    pub failed: i64,
}

#[derive(Serialize)]
struct Chart {
    /// Each bucket's start, Unix seconds.
    buckets: Vec<i64>,
    series: Vec<Series>,
}

#[derive(Serialize)]
struct Series {
    name: String,
    requests: Vec<i64>,
    tokens: Vec<i64>,
}

#[derive(Template)]
#[template(path = "usage.html")]
struct UsagePage {
    layout: Layout,
    from: String,
    to: String,
    granularity: Granularity,
    group: UsageGroup,
    key: String,
    team: String,
    model: String,
    keys: Vec<(String, String)>,
    teams: Vec<(String, String)>,
    totals: Vec<Total>,
    rows: Vec<(UsageRow, String)>,
    /// Rows left out of the table (in the CSV).
    more_rows: usize,
    chart: String,
    csv: String,
    took_ms: String,
}

fn bad(message: impl Into<String>) -> Problem {
    Problem::Gateway(GatewayError::BadRequest(message.into()))
}

fn day(text: &str, name: &str) -> Result<Option<NaiveDate>, Problem> {
    match text.trim() {
        "" => Ok(None),
        text => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .map(Some)
            .map_err(|_| bad(format!("{name} `{text}` is not a date (YYYY-MM-DD)"))),
    }
}

fn non_empty(text: &str) -> Option<String> {
    Some(text.trim())
        .filter(|t| !t.is_empty())
        .map(String::from)
}

/// A bucket's start as Unix seconds (`2026-12-07T10` or `2026-12-07`).
fn bucket_start(bucket: &str) -> Option<i64> {
    let (date, hour) = match bucket.split_once('T') {
        Some((date, hour)) => (date, hour.parse::<u32>().ok()?),
        None => (bucket, 0),
    };
    let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(hour, 0, 0)?.and_utc().timestamp())
}

pub async fn page(
    State(console): Shared,
    Extension(signed_in): Extension<SignedIn>,
    Query(params): Query<Params>,
) -> Page {
    let today = Utc::now().date_naive();
    let to = day(&params.to, "to")?.unwrap_or(today);
    let out_of_range = || bad("the dates are out of range");
    // The end is exclusive: the day after `to` (checked: dates come from the client).
    let end = to.succ_opt().ok_or_else(out_of_range)?;
    let from = match day(&params.from, "from")? {
        Some(from) => from,
        None => to
            .checked_sub_signed(Duration::days(6))
            .ok_or_else(out_of_range)?,
    };
    let days = (to - from).num_days() + 1;
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(bad(format!(
            "the range must be 1 to {MAX_DAYS} days, from before to"
        )));
    }
    let granularity = params.granularity.unwrap_or(match days {
        1..=2 => Granularity::Hour,
        _ => Granularity::Day,
    });
    if granularity == Granularity::Hour && days > MAX_HOURLY_DAYS {
        return Err(bad(format!(
            "by hour, the range is at most {MAX_HOURLY_DAYS} days"
        )));
    }
    let query = UsageQuery {
        from: from.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc(),
        to: end.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc(),
        granularity,
        group: params.group,
        key_id: non_empty(&params.key),
        team_id: non_empty(&params.team),
        model: non_empty(&params.model),
    };
    let started = std::time::Instant::now();
    let rows = console.store.usage(&query).await?;
    let took = started.elapsed();
    let keys = console.store.list_keys().await?;
    let teams = console.store.list_teams().await?;
    let mut names: HashMap<String, String> = HashMap::new();
    match params.group {
        UsageGroup::Key => names.extend(keys.iter().map(|k| (k.id.clone(), k.name.clone()))),
        UsageGroup::Team => {
            names.extend(teams.iter().map(|t| (t.id.clone(), t.name.clone())));
            names.insert(String::new(), "(no team)".into());
        }
        UsageGroup::Model => {}
    }
    let name_of = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());

    if params.format == "csv" {
        let mut csv = String::from(
            "bucket,group,name,requests,prompt_tokens,completion_tokens,cache_hits,failed\n",
        );
        for row in &rows {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{},{}\n",
                row.bucket,
                csv_field(&row.group_id),
                csv_field(&name_of(&row.group_id)),
                row.requests,
                row.prompt_tokens,
                row.completion_tokens,
                row.cache_hits,
                row.failed
            ));
        }
        let filename = format!("attachment; filename=\"sluice-usage-{from}-{to}.csv\"");
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (header::CONTENT_DISPOSITION, filename),
            ],
            csv,
        )
            .into_response());
    }

    let mut totals: Vec<Total> = Vec::new();
    for row in &rows {
        let total = match totals.iter_mut().find(|t| t.id == row.group_id) {
            Some(total) => total,
            None => {
                totals.push(Total {
                    id: row.group_id.clone(),
                    name: name_of(&row.group_id),
                    requests: 0,
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    cache_hits: 0,
                    failed: 0,
                });
                totals.last_mut().expect("just pushed")
            }
        };
        total.requests += row.requests;
        total.prompt_tokens += row.prompt_tokens;
        total.completion_tokens += row.completion_tokens;
        total.cache_hits += row.cache_hits;
        total.failed += row.failed;
    }
    totals.sort_by_key(|t| std::cmp::Reverse(t.requests));
    let chart = chart(&rows, &totals, &query);
    let csv = format!(
        "/console/usage?from={from}&to={to}&granularity={}&group={}&key={}&team={}&model={}&format=csv",
        granularity.name(),
        params.group.name(),
        urlencode(&params.key),
        urlencode(&params.team),
        urlencode(&params.model),
    );
    html(&UsagePage {
        layout: Layout::new("usage", "Usage", &signed_in),
        from: from.to_string(),
        to: to.to_string(),
        granularity,
        group: params.group,
        key: params.key.clone(),
        team: params.team.clone(),
        model: params.model.clone(),
        keys: keys.into_iter().map(|k| (k.id, k.name)).collect(),
        teams: teams.into_iter().map(|t| (t.id, t.name)).collect(),
        more_rows: rows.len().saturating_sub(TABLE_ROWS),
        rows: rows
            .into_iter()
            .take(TABLE_ROWS)
            .map(|r| {
                let name = name_of(&r.group_id);
                (r, name)
            })
            .collect(),
        totals,
        chart: serde_json::to_string(&chart).unwrap_or_default(),
        csv,
        took_ms: format!("{:.1}", took.as_secs_f64() * 1000.0),
    })
}

impl UsagePage {
    fn unit(&self) -> &'static str {
        self.granularity.name()
    }

    fn per(&self) -> &'static str {
        self.group.name()
    }
}

/// Every bucket of the range (empty ones too), and the busiest groups' series.
fn chart(rows: &[UsageRow], totals: &[Total], query: &UsageQuery) -> Chart {
    let step = match query.granularity {
        Granularity::Hour => 3600,
        Granularity::Day => 86_400,
    };
    let buckets: Vec<i64> = (query.from.timestamp()..query.to.timestamp())
        .step_by(step as usize)
        .collect();
    let index: HashMap<i64, usize> = buckets.iter().enumerate().map(|(i, b)| (*b, i)).collect();
    let charted: Vec<&Total> = totals.iter().take(CHARTED).collect();
    let mut series: Vec<Series> = charted
        .iter()
        .map(|t| Series {
            name: t.name.clone(),
            requests: vec![0; buckets.len()],
            tokens: vec![0; buckets.len()],
        })
        .collect();
    let mut others = Series {
        name: "others".into(),
        requests: vec![0; buckets.len()],
        tokens: vec![0; buckets.len()],
    };
    for row in rows {
        let Some(&at) = bucket_start(&row.bucket)
            .as_ref()
            .and_then(|b| index.get(b))
        else {
            continue;
        };
        let target = match charted.iter().position(|t| t.id == row.group_id) {
            Some(i) => &mut series[i],
            None => &mut others,
        };
        target.requests[at] += row.requests;
        target.tokens[at] += row.prompt_tokens + row.completion_tokens;
    }
    if others.requests.iter().any(|n| *n > 0) {
        series.push(others);
    }
    Chart { buckets, series }
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A CSV field, quoted when it must be (and never read as a formula).
fn csv_field(text: &str) -> String {
    let text = match text.starts_with(['=', '+', '-', '@']) {
        true => format!("'{text}"),
        false => text.to_string(),
    };
    match text.contains([',', '"', '\n']) {
        true => format!("\"{}\"", text.replace('"', "\"\"")),
        false => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_read_back_as_times_and_csv_fields_are_safe() {
        assert!(
            day("+262142-12-31", "to")
                .unwrap()
                .unwrap()
                .succ_opt()
                .is_none()
        );
        assert_eq!(bucket_start("1970-01-02T01"), Some(86_400 + 3600));
        assert_eq!(bucket_start("1970-01-02"), Some(86_400));
        assert_eq!(bucket_start("garbage"), None);
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
    }
}
