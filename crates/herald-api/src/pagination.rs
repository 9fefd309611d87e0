//! Svix-style list responses: `{data, iterator, prevIterator, done}`.

use serde::Serialize;

use crate::{error::ApiResult, extract::QueryParams};
use herald_store::Page;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 250;

/// A page of a list, Svix's shape: `iterator` continues it, `prevIterator` walks back.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListResponse<T> {
    pub data: Vec<T>,
    pub iterator: Option<String>,
    pub prev_iterator: Option<String>,
    pub done: bool,
}

impl<T> ListResponse<T> {
    /// The same page with each item converted.
    pub fn map<U>(self, convert: impl FnMut(T) -> U) -> ListResponse<U> {
        ListResponse {
            data: self.data.into_iter().map(convert).collect(),
            iterator: self.iterator,
            prev_iterator: self.prev_iterator,
            done: self.done,
        }
    }
}

/// The query parameters every list takes, for the API's description (`params(ListParams)`);
/// [`page`] reads them.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ListParams {
    /// Rows per page: 1 to 250 (50 when left out).
    limit: Option<u32>,
    /// Where to continue: a page's `iterator`, or its `prevIterator` to walk back.
    iterator: Option<String>,
}

/// The page the query asks for. An iterator starting with `-` (a `prevIterator`) walks back:
/// the store reads in the opposite order and [`list`] puts the rows back in the usual one.
pub fn page(query: &QueryParams, descending: bool) -> ApiResult<Page> {
    let limit = match query.int("limit")? {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=i64::from(MAX_LIMIT)).contains(&n) => u32::try_from(n).unwrap_or(MAX_LIMIT),
        // As Svix's server: refused, not cut to the cap (a caller asking for more would take
        // a short page for the end of the list).
        Some(n) if n > i64::from(MAX_LIMIT) => {
            return Err(crate::error::ApiError::invalid(
                &["query", "limit"],
                format!("Given limit must not exceed {MAX_LIMIT}"),
            ));
        }
        Some(_) => {
            return Err(crate::error::ApiError::invalid(
                &["query", "limit"],
                "limit must be at least 1",
            ));
        }
    };
    let (iterator, descending) = match query.str("iterator") {
        Some(prev) if prev.starts_with('-') => (Some(prev[1..].to_owned()), !descending),
        other => (other.map(str::to_owned), descending),
    };
    Ok(Page {
        limit,
        iterator,
        descending,
        backwards: query.str("iterator").is_some_and(|it| it.starts_with('-')),
    })
}

/// Svix's reading of a time window given by `after` alone (no `before`, no iterator) on a list
/// read newest first: the page is the `limit` rows right after that time, still shown newest
/// first, and its `prevIterator` walks on towards the present. Read newest first, it would be
/// the newest `limit` rows, and a poller asking for what came after its last look would skip
/// whatever lay between.
pub fn starting_after(mut page: Page, query: &QueryParams) -> Page {
    let given = |name: &str| query.str(name).is_some_and(|value| !value.is_empty());
    if page.descending && page.iterator.is_none() && !given("before") && given("after") {
        page.descending = false;
        page.backwards = true;
    }
    page
}

/// What the iterators of lists keyed by a name start with: names (channels, user ids, event
/// types) may begin with `-`, which a bare iterator would read as a walk back.
pub const NAME_CURSOR: char = '.';

/// The iterator of a page `name` ends on (see [`NAME_CURSOR`]).
pub fn name_cursor(name: &str) -> String {
    format!("{NAME_CURSOR}{name}")
}

/// The name a list keyed by names resumes after: the page's iterator without its
/// [`NAME_CURSOR`] (422 for an iterator this list did not give).
pub fn resumed_name(page: &Page) -> ApiResult<Option<&str>> {
    page.iterator
        .as_deref()
        .map(|iterator| {
            iterator.strip_prefix(NAME_CURSOR).ok_or_else(|| {
                crate::error::ApiError::invalid(
                    &["query", "iterator"],
                    "not an iterator of this list (pass a page's `iterator` or `prevIterator` as it is)",
                )
            })
        })
        .transpose()
}

/// Whether a list is read newest first: Svix's `order` (`ascending` or `descending`; anything
/// else is a 422, never read as the default), or `descending_by_default` when it is left out.
pub fn descending(query: &QueryParams, descending_by_default: bool) -> ApiResult<bool> {
    match query.str("order") {
        None => Ok(descending_by_default),
        Some("ascending") => Ok(false),
        Some("descending") => Ok(true),
        Some(other) => Err(crate::error::ApiError::invalid(
            &["query", "order"],
            format!("order must be ascending or descending, not {other:?}"),
        )),
    }
}

/// Builds the response from the store's `limit + 1` rows; `cursor` gives each item's key.
pub fn list<T, U>(
    mut rows: Vec<T>,
    page: &Page,
    cursor: impl Fn(&T) -> String,
    out: impl Fn(T) -> U,
) -> ListResponse<U> {
    let done = rows.len() <= page.limit as usize;
    rows.truncate(page.limit as usize);
    if page.backwards {
        rows.reverse();
    }
    let iterator = rows.last().map(&cursor);
    let prev_iterator = rows.first().map(|r| format!("-{}", cursor(r)));
    ListResponse {
        data: rows.into_iter().map(out).collect(),
        iterator,
        prev_iterator,
        done,
    }
}
