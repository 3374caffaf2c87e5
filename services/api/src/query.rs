//! Queries of the projection that the routes and the read path share, and the bounded wait for
//! read-your-writes.
//!
//! Every query checks a connection out of the pool, runs one statement and gives the connection back:
//! nothing here holds a pooled connection while it waits, so a read waiting for the projection (or a
//! client that gave up on one) never starves the requests behind it.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::error::ApiError;

/// Longest a read waiting for the projection goes without looking again, even if no commit was
/// announced (a safety net: commits are announced by `LISTEN`/`NOTIFY`, see
/// [`platform::db::projection_commits`]).
const SAFETY_POLL: Duration = Duration::from_millis(100);

/// One look at a projected row.
#[derive(Debug, Clone)]
pub(crate) struct Projected<T> {
    /// The row, if it is projected.
    pub(crate) value: Option<T>,
    /// The version the event store accepted for the id (0 if it holds no such stream).
    pub(crate) accepted: u64,
}

/// Reads `columns` of `table` (whose first column is `id`) for `id`, and the version the event store
/// accepted for it (its stream head), in one statement. `sending` runs just before the statement goes out (the single
/// flight records when its snapshot can have been taken).
pub(crate) async fn projected<T>(
    pool: &Pool,
    table: &str,
    columns: &str,
    id: Uuid,
    from_row: fn(&tokio_postgres::Row) -> T,
    sending: impl FnOnce(),
) -> Result<Projected<T>, ApiError> {
    let client = pool.get().await?;
    let sql = format!(
        "SELECT {columns},
                (SELECT h.version FROM stream_heads h WHERE h.aggregate_id = $1)
           FROM (SELECT $1::uuid AS wanted) w LEFT JOIN {table} ON {table}.id = w.wanted"
    );
    let statement = client.prepare_cached(&sql).await?;
    sending();
    let row = client.query_one(&statement, &[&id]).await?;
    let accepted: Option<i64> = row.get(row.len() - 1);
    let value = row
        .get::<_, Option<Uuid>>(0)
        .is_some()
        .then(|| from_row(&row));
    Ok(Projected {
        value,
        accepted: accepted.and_then(|v| u64::try_from(v).ok()).unwrap_or(0),
    })
}

/// Looks (with `look`) until the row reaches the larger of `min_version` and the version this API
/// accepted for it, or `wait` runs out; then returns the row as it is (callers compare versions).
///
/// An id that is neither projected nor accepted is answered at once (not found), and a `min_version`
/// above the accepted version is refused at once (422 naming `min_version`): neither can change by
/// waiting.
/// Between looks nothing is held but a timer and a subscription to the projector's commit
/// announcements: a read wakes when a batch commits, not on a polling interval. Dropping the
/// returned future stops the wait.
pub(crate) async fn wait_projected<T, F, Fut>(
    commits: &tokio::sync::watch::Receiver<u64>,
    wait: Duration,
    min_version: u64,
    version_of: impl Fn(&T) -> u64,
    mut look: F,
) -> Result<Option<T>, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Projected<T>, ApiError>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    let mut commits = commits.clone();
    loop {
        // Mark the commits seen before looking: one committed after this wakes the wait below.
        commits.borrow_and_update();
        let Projected { value, accepted } = look().await?;
        // A version the event store never accepted is not "on its way": waiting for it would only
        // end in `projection_behind`. An id with no stream at all reads as not found.
        if min_version > accepted && accepted > 0 {
            return Err(ApiError::Validation(vec![crate::domain::FieldError::new(
                "min_version",
                format!("there is no version {min_version} yet; the latest is {accepted}"),
            )]));
        }
        if min_version > 0 && accepted == 0 && value.is_none() {
            return Ok(None);
        }
        let wanted = accepted.max(min_version);
        let caught_up = match &value {
            None => accepted == 0 && min_version == 0,
            Some(v) => version_of(v) >= wanted,
        };
        let now = tokio::time::Instant::now();
        if caught_up || now >= deadline {
            return Ok(value);
        }
        let nap = SAFETY_POLL.min(deadline - now);
        match tokio::time::timeout(nap, commits.changed()).await {
            Ok(Ok(())) | Err(_) => {}
            // No announcer (it stopped): fall back to the timer alone.
            Ok(Err(_)) => tokio::time::sleep(nap).await,
        }
    }
}
