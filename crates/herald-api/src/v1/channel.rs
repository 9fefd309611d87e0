//! `/api/v1/app/{app_id}/channel`: the app's live channels and presence members, for the
//! console and anyone holding the app's token (the Pusher HTTP API answers the same questions
//! to requests signed with the app's Pusher secret). Counts are the cluster's.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use herald_channels::presence::PresenceError;
use herald_core::pusher::{self, ChannelKind};
use serde::Serialize;
use serde_json::Value;

use crate::{
    ApiState,
    auth::Caller,
    error::ApiError,
    error::ApiResult,
    extract::QueryParams,
    pagination::{self, ListParams, ListResponse},
};
use herald_store::Page;

/// An occupied channel.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelOut {
    name: String,
    /// Connections subscribed, on every node.
    subscription_count: usize,
    /// Presence channels: distinct users.
    #[serde(skip_serializing_if = "Option::is_none")]
    user_count: Option<usize>,
}

/// A presence channel's member.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MemberOut {
    id: String,
    /// The `user_info` the member joined with; not kept cluster-wide, so `null`.
    info: Option<Value>,
}

fn unavailable(e: PresenceError) -> ApiError {
    tracing::error!(error = %e, "reading presence failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "presence_unavailable",
        e.to_string(),
    )
}

/// One page of `items` (in name order, as `name` reads it), as Svix pages its lists: the
/// iterator is [`pagination::NAME_CURSOR`] and the name of a page's last item, a `prevIterator` (`-`, then the
/// same of its first) walks back. The mark keeps a name that starts with `-` (channel names and
/// user ids may) from reading as a walk back. Channels and members are read whole from the
/// hub or the presence record; the page bounds the answer, not the read.
fn page_by_name<T: Serialize>(
    mut items: Vec<T>,
    name: impl Fn(&T) -> &str,
    page: &Page,
) -> ApiResult<ListResponse<T>> {
    let after = pagination::resumed_name(page)?;
    if page.descending {
        items.reverse();
    }
    let beyond = |item: &T| {
        after.is_none_or(|after| match page.descending {
            true => name(item) < after,
            false => name(item) > after,
        })
    };
    let rows: Vec<T> = items
        .into_iter()
        .filter(beyond)
        .take(page.limit as usize + 1)
        .collect();
    Ok(pagination::list(
        rows,
        page,
        |item| pagination::name_cursor(name(item)),
        |item| item,
    ))
}

/// Occupied channels in name order; `prefix` narrows them (`presence-`). Paged as every
/// list is (`limit`, 50 by default, at most 250; `iterator`).
#[utoipa::path(get, path = "/api/v1/app/{app_id}/channel", tag = "Channels",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("prefix" = Option<String>, Query, description = "Only channels whose name starts with this"),
        ListParams),
    responses((status = 200, body = ListResponse<ChannelOut>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<ChannelOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let page = pagination::page(&query, false)?;
    let prefix = query.str("prefix").unwrap_or("");
    let mut channels: Vec<ChannelOut> = state
        .presence
        .channels(&app.id, prefix)
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|(name, info)| ChannelOut {
            name,
            subscription_count: info.subscription_count,
            user_count: info.user_count,
        })
        .collect();
    channels.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(page_by_name(channels, |c| &c.name, &page)?))
}

/// A presence channel's members, in id order. Paged as every list is (`limit`, 50 by
/// default, at most 250; `iterator`).
#[utoipa::path(get, path = "/api/v1/app/{app_id}/channel/{channel}/member", tag = "Channels",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("channel" = String, Path, description = "A presence channel's name (`presence-...`)"),
        ListParams),
    responses((status = 200, body = ListResponse<MemberOut>)))]
pub async fn members(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, channel)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<MemberOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let page = pagination::page(&query, false)?;
    pusher::validate_channel_name(&channel)
        .map_err(|e| ApiError::invalid(&["path", "channel"], e.to_string()))?;
    if ChannelKind::of(&channel) != ChannelKind::Presence {
        return Err(ApiError::invalid(
            &["path", "channel"],
            "members are only listed for presence channels (presence-...)",
        ));
    }
    let mut ids = state
        .presence
        .users(&app.id, &channel)
        .await
        .map_err(unavailable)?;
    ids.sort();
    let members = ids
        .into_iter()
        .map(|id| MemberOut { id, info: None })
        .collect();
    Ok(Json(page_by_name(members, |m| &m.id, &page)?))
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, members))]
pub(crate) struct Docs;

#[cfg(test)]
mod tests {
    use super::*;

    fn page(limit: u32, iterator: Option<&str>) -> Page {
        let backwards = iterator.is_some_and(|it| it.starts_with('-'));
        Page {
            limit,
            iterator: iterator.map(|it| it.trim_start_matches('-').to_owned()),
            descending: backwards,
            backwards,
        }
    }

    fn names(list: &ListResponse<String>) -> Vec<&str> {
        list.data.iter().map(String::as_str).collect()
    }

    /// Names that start with `-` page forward like any other: their iterators are marked, so
    /// none reads as a walk back (which would serve the same page for ever).
    #[test]
    fn names_starting_with_a_dash_page_forward_and_back() {
        let items = || vec!["-a".to_owned(), "-b".to_owned(), "c".to_owned()];
        let first = page_by_name(items(), |n| n, &page(1, None)).expect("page");
        assert_eq!((names(&first), first.done), (vec!["-a"], false));
        let iterator = first.iterator.clone().expect("iterator");
        assert_eq!(iterator, ".-a");
        let second = page_by_name(items(), |n| n, &page(1, Some(&iterator))).expect("page");
        assert_eq!((names(&second), second.done), (vec!["-b"], false));
        let third =
            page_by_name(items(), |n| n, &page(1, second.iterator.as_deref())).expect("page");
        assert_eq!((names(&third), third.done), (vec!["c"], true));
        let back =
            page_by_name(items(), |n| n, &page(1, third.prev_iterator.as_deref())).expect("page");
        assert_eq!(names(&back), ["-b"], "walking back from c");
        assert!(
            page_by_name(items(), |n| n, &page(1, Some("-a"))).is_err(),
            "an unmarked iterator is refused, not guessed at"
        );
    }
}
