//! Cron schedules across real processes: three schedulers fire each tick once, and a tick missed while no
//! scheduler ran is fired once when one comes back.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::helpers::{TestDb, child_ready, eventually, spawn_child};

/// Runs a scheduler child for `seconds`; returns when it started its scheduler, and (when it exits) how many
/// ticks it says it fired.
async fn run_scheduler(db: &TestDb, seconds: u64) -> (DateTime<Utc>, tokio::task::JoinHandle<u64>) {
    let mut child = spawn_child(
        "scheduler",
        &db.url,
        &[("ACTIVEKG_CHILD_SECONDS", &seconds.to_string())],
    );
    let (ready, mut lines) = child_ready(&mut child).await;
    let started_at = DateTime::parse_from_rfc3339(&ready)
        .unwrap()
        .with_timezone(&Utc);
    let fired = tokio::spawn(async move {
        let mut fired = None;
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(n) = line.strip_prefix("FIRED ") {
                fired = Some(n.parse().unwrap());
            }
        }
        assert!(
            child.wait().await.unwrap().success(),
            "the scheduler child exits cleanly"
        );
        fired.expect("the child reports how many ticks it fired")
    });
    (started_at, fired)
}

async fn ticks(db: &TestDb) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar(
        "SELECT (args->>'tick')::timestamptz FROM jobs WHERE kind = 'test_tick' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn three_schedulers_fire_each_tick_exactly_once() {
    let db = TestDb::new().await;
    let (_, a) = run_scheduler(&db, 5).await;
    let (_, b) = run_scheduler(&db, 5).await;
    let (_, c) = run_scheduler(&db, 5).await;
    let fired = a.await.unwrap() + b.await.unwrap() + c.await.unwrap();

    let ticks = ticks(&db).await;
    assert!(
        ticks.len() >= 4,
        "about five seconds of per-second ticks, got {ticks:?}"
    );
    assert_eq!(
        fired as usize,
        ticks.len(),
        "the processes together fired once per tick, no more"
    );
    for pair in ticks.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_seconds(),
            1,
            "no tick was skipped or doubled: {ticks:?}"
        );
    }
    db.drop_db().await;
}

#[tokio::test]
async fn a_tick_missed_while_no_scheduler_ran_fires_once_on_restart() {
    let db = TestDb::new().await;
    run_scheduler(&db, 2).await.1.await.unwrap();
    let last_before = *ticks(&db).await.last().expect("the first scheduler fired");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (restarted_at, second) = run_scheduler(&db, 2).await;
    second.await.unwrap();

    let after: Vec<DateTime<Utc>> = ticks(&db)
        .await
        .into_iter()
        .filter(|t| *t > last_before)
        .collect();
    let missed: Vec<&DateTime<Utc>> = after.iter().filter(|t| **t <= restarted_at).collect();
    // Without catch-up, every new tick would be later than the restart; with it, exactly the latest tick
    // missed while down fires, once, and the ones before it are not replayed one by one.
    assert_eq!(
        missed.len(),
        1,
        "ticks at or before the restart: {missed:?} (last before: {last_before})"
    );
    assert!(
        (*missed[0] - last_before).num_seconds() >= 3,
        "{missed:?} collapses the gap after {last_before}"
    );
    assert!(
        (restarted_at - *missed[0]).num_milliseconds() < 1000,
        "it is the latest tick before the restart"
    );
    // Then it keeps firing, each tick once. (A lone scheduler that is starved for over a second, as in a
    // loaded test run, collapses the ticks it slept through into the latest, by the same rule as above.)
    assert!(
        after.len() >= 2,
        "it keeps firing after the catch-up: {after:?}"
    );
    for pair in after.windows(2) {
        assert!(
            (pair[1] - pair[0]).num_seconds() >= 1,
            "no tick fires twice: {after:?}"
        );
    }
    db.drop_db().await;
}

#[tokio::test]
async fn the_schedules_show_their_last_and_next_tick_who_fired_it_and_its_job() {
    let app = crate::helpers::TestApp::spawn().await;
    let schedule = eventually(
        Duration::from_secs(20),
        "the poller's schedule to fire",
        || async {
            let list = app.admin_json("/_admin/schedules").await;
            let poll = list["schedules"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == "connectors.poll")?
                .clone();
            poll["last_job_id"].as_i64().map(|_| poll)
        },
    )
    .await;
    let fired_by = schedule["fired_by"].as_str().unwrap();
    assert!(
        fired_by.ends_with(&format!(":{}", std::process::id())),
        "this process fired it: {fired_by}"
    );
    assert_eq!(schedule["cron"], "*/5 * * * * *");
    let last: DateTime<Utc> = schedule["last_tick"].as_str().unwrap().parse().unwrap();
    let next: DateTime<Utc> = schedule["next_tick"].as_str().unwrap().parse().unwrap();
    assert!(
        next > last && next > Utc::now() - chrono::Duration::seconds(1),
        "{schedule}"
    );
    let job = app
        .admin_json(&format!("/_admin/jobs/{}", schedule["last_job_id"]))
        .await;
    assert_eq!(job["kind"], "poll_connectors");
    let list = app.admin_json("/_admin/schedules").await;
    let purger = list["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "connectors.purge_deleted")
        .unwrap();
    assert!(purger["fired_by"].is_null(), "not fired yet: {purger}");
    assert!(purger["next_tick"].is_string());
    app.stop().await;
}
