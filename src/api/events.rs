//! `GET /v1/jobs/{id}/events` (a page) and `/events/stream` (Server-Sent Events: each event's
//! id is its sequence number, `Last-Event-ID` replays what was missed from the store, idle
//! keep-alives). The stream follows the store, so it sees events from workers in any process,
//! and ends after the job's final event.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::Stream;
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::auth::Tenant;
use super::extract::{ApiQuery, page, page_limit};
use super::problem::{ApiError, ApiResult, Problem};
use super::views::{EventList, EventView};
use crate::store::EventRow;

const POLL: Duration = Duration::from_millis(100);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/jobs/{id}/events", get(list))
        .route("/jobs/{id}/events/stream", get(stream))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events after this sequence number (default 0: from the first).
    pub after: Option<i64>,
    /// 1 to 100, default 20.
    pub limit: Option<i64>,
}

/// A job's events in order: state changes, the plan, step metrics, checkpoints, warnings.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "events", params(("id" = String, Path), EventsQuery),
    responses(
        (status = 200, body = EventList),
        (status = 400, description = "Bad limit or after", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job of yours", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> ApiResult<Json<EventList>> {
    let limit = page_limit(query.limit)?;
    state.tenant_job(&tenant, &id).await?;
    let rows = state
        .store
        .list_events(&id, query.after.unwrap_or(0), limit + 1)
        .await?;
    let (rows, has_more) = page(rows, limit);
    Ok(Json(EventList::new(
        rows.into_iter().map(EventView::from).collect(),
        has_more,
    )))
}

/// Follow a job's events as Server-Sent Events (`id` = sequence number, `event` = kind,
/// `data` = JSON). Send `Last-Event-ID` (or `?after=`) to resume.
#[utoipa::path(get, path = "/v1/jobs/{id}/events/stream", tag = "events",
    params(("id" = String, Path), EventsQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event")),
    responses(
        (status = 200, description = "text/event-stream of the job's events; ends after the final state", body = String, content_type = "text/event-stream"),
        (status = 400, description = "Bad Last-Event-ID", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job of yours", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    state.tenant_job(&tenant, &id).await?;
    let last = match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_last_event_id",
                    "Last-Event-ID must be an event's sequence number",
                    "Last-Event-ID",
                )
            })?,
        None => query.after.unwrap_or(0),
    };
    let keep_alive = state.limits.keep_alive;
    let follow = Follow {
        state,
        id,
        after: last,
        buffer: VecDeque::new(),
        done: false,
    };
    let events = futures_util::stream::unfold(follow, |mut f| async move {
        let event = f.next().await?;
        Some((Ok(event), f))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(keep_alive)))
}

struct Follow {
    state: AppState,
    id: String,
    after: i64,
    buffer: VecDeque<EventRow>,
    done: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(row) = self.buffer.pop_front() {
                self.after = row.seq;
                return Some(
                    Event::default()
                        .id(row.seq.to_string())
                        .event(row.kind)
                        .data(row.data),
                );
            }
            if self.done || *self.state.shutdown.borrow() {
                return None;
            }
            match self
                .state
                .store
                .list_events(&self.id, self.after, 100)
                .await
            {
                Ok(rows) if !rows.is_empty() => self.buffer.extend(rows),
                Ok(_) => {
                    // The final state's event commits with the state, so once finished
                    // one more read has everything.
                    let finished = match self.state.store.get_job_any(&self.id).await {
                        Ok(Some(job)) => job.job_state().map(|s| s.is_finished()).unwrap_or(true),
                        Ok(None) => true,
                        Err(_) => false,
                    };
                    if finished {
                        match self
                            .state
                            .store
                            .list_events(&self.id, self.after, 100)
                            .await
                        {
                            Ok(rows) if !rows.is_empty() => self.buffer.extend(rows),
                            _ => self.done = true,
                        }
                    } else {
                        tokio::time::sleep(POLL).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(job = %self.id, error = %e, "event stream cannot read the store");
                    tokio::time::sleep(POLL * 10).await;
                }
            }
        }
    }
}
