//! The group commit answers its callers only once their batch is durable, and the writer goes
//! on with the next batch while the fsync runs.

use std::{
    io,
    sync::{Arc, Mutex, mpsc as std_mpsc},
    time::Duration,
};

use herald_core::model::{App, Endpoint};
use tokio::sync::mpsc;

use super::{SqliteStore, batch::Durable};
use crate::{AppStore, EndpointStore, MessageStore, StoreError, StoreLifecycle, conformance};

/// An fsync that waits for the test to say how it ends, and tells the test it has begun.
struct HeldSync {
    entered: mpsc::UnboundedSender<()>,
    outcomes: Mutex<std_mpsc::Receiver<io::Result<()>>>,
}

impl Durable for HeldSync {
    fn sync(&self) -> io::Result<()> {
        let _ = self.entered.send(());
        let outcomes = self.outcomes.lock().expect("lock");
        outcomes
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the test ended")))
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    app: App,
    endpoint: Endpoint,
    /// One `()` each time an fsync begins.
    entered: mpsc::UnboundedReceiver<()>,
    /// How each fsync ends, in order.
    release: std_mpsc::Sender<io::Result<()>>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("dir");
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let (release, outcomes) = std_mpsc::channel();
    let held = Arc::new(HeldSync {
        entered: entered_tx,
        outcomes: Mutex::new(outcomes),
    });
    let store = SqliteStore::open_with(dir.path(), None, held)
        .await
        .expect("open");
    // Apps and endpoints are written outside the group commit (durable at their own commit).
    let app = conformance::app("test");
    store.create_app(&app).await.expect("app");
    let endpoint = conformance::endpoint(&app.id);
    store.create_endpoint(&endpoint).await.expect("endpoint");
    Fixture {
        _dir: dir,
        store: Arc::new(store),
        app,
        endpoint,
        entered,
        release,
    }
}

const PATIENCE: Duration = Duration::from_secs(10);

impl Fixture {
    /// Starts creating a message; the task ends when the store answers.
    fn create(
        &self,
    ) -> (
        herald_core::model::Message,
        tokio::task::JoinHandle<crate::Result<()>>,
    ) {
        let message = conformance::message(&self.app.id, None);
        let store = self.store.clone();
        let endpoint = self.endpoint.id.clone();
        let sent = message.clone();
        let task = tokio::spawn(async move { store.create_message(sent, vec![endpoint]).await });
        (message, task)
    }

    async fn sync_begins(&mut self) {
        tokio::time::timeout(PATIENCE, self.entered.recv())
            .await
            .expect("an fsync should begin")
            .expect("the store is open");
    }

    /// Waits until `message` is committed (readers see it), whether or not it is durable yet.
    async fn committed(&self, message: &herald_core::model::Message) {
        tokio::time::timeout(PATIENCE, async {
            while self
                .store
                .get_message(&self.app.id, message.id.as_str())
                .await
                .expect("read")
                .is_none()
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the message should commit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_hear_of_a_commit_once_it_is_durable_and_the_writer_does_not_wait_for_it() {
    let mut f = fixture().await;
    let (first, first_task) = f.create();
    f.sync_begins().await;
    f.committed(&first).await;
    assert!(
        !first_task.is_finished(),
        "the caller is answered before its commit is durable"
    );

    // While the first batch's fsync is held, the writer commits the next batch.
    let (second, second_task) = f.create();
    f.committed(&second).await;
    assert!(!first_task.is_finished());
    assert!(!second_task.is_finished());

    f.release.send(Ok(())).expect("release");
    first_task.await.expect("task").expect("first message");
    // The second batch committed after the first fsync began: it needs one of its own.
    f.sync_begins().await;
    assert!(!second_task.is_finished());
    f.release.send(Ok(())).expect("release");
    second_task.await.expect("task").expect("second message");

    // Writes outside the group commit share its connection and still fsync at their commit.
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&f.store.writer)
        .await
        .expect("pragma");
    assert_eq!(synchronous, 2, "the writer is left at synchronous = FULL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_fails_its_writes_and_every_later_one() {
    let mut f = fixture().await;
    let (_, first_task) = f.create();
    f.sync_begins().await;
    f.release
        .send(Err(io::Error::other("I/O error on the test disk")))
        .expect("release");
    let refused = first_task.await.expect("task").expect_err("not durable");
    let StoreError::Batch(why) = refused else {
        panic!("expected a batch error, got {refused:?}");
    };
    assert!(
        why.contains("fsync of the WAL failed: I/O error on the test disk"),
        "{why}"
    );

    // No later fsync could vouch for what the failed one lost: later writes fail without one,
    // and are not applied either (a refused write that readers, claims and the dispatcher
    // could see would be delivered while its caller was told it failed, and retried by them).
    let (second, second_task) = f.create();
    let refused = second_task
        .await
        .expect("task")
        .expect_err("store is broken");
    assert!(refused.to_string().contains("restart Herald"), "{refused}");
    assert!(
        f.entered.try_recv().is_err(),
        "no fsync is attempted after one failed"
    );
    assert!(
        f.store
            .get_message(&f.app.id, second.id.as_str())
            .await
            .expect("read")
            .is_none(),
        "a write refused after the failure is not in the store"
    );
    // Readiness says so, though reads still work: only a restart recovers.
    let unready = f.store.ping().await.expect_err("not ready");
    assert!(unready.to_string().contains("restart Herald"), "{unready}");
}
