//! Our migrator and apalis-postgres's share a database without clashing on their history tables.

use activekg::store;
use apalis_postgres::PostgresStorage;
use sqlx::{AssertSqlSafe, PgPool};

use crate::helpers::{TestDb, admin_url};

async fn empty_database(db: &TestDb, suffix: &str) -> (String, PgPool) {
    let name = format!("{}_{suffix}", db.name);
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&db.pool)
        .await
        .unwrap();
    let url = format!("{}/{name}", admin_url().rsplit_once('/').unwrap().0);
    (name.clone(), PgPool::connect(&url).await.unwrap())
}

async fn histories(pool: &PgPool) -> (i64, i64) {
    let ours = sqlx::query_scalar("SELECT count(*) FROM public._sqlx_migrations")
        .fetch_one(pool)
        .await
        .unwrap();
    let theirs = sqlx::query_scalar("SELECT count(*) FROM apalis._sqlx_migrations")
        .fetch_one(pool)
        .await
        .unwrap();
    (ours, theirs)
}

#[tokio::test]
async fn our_migrations_and_apalis_postgres_migrations_coexist_in_either_order() {
    let db = TestDb::new().await;
    for (suffix, ours_first) in [("ours_first", true), ("theirs_first", false)] {
        let (name, pool) = empty_database(&db, suffix).await;
        if ours_first {
            store::migrate(&pool).await.unwrap();
            PostgresStorage::setup(&pool).await.unwrap();
        } else {
            PostgresStorage::setup(&pool).await.unwrap();
            store::migrate(&pool).await.unwrap();
        }
        // Running both again is a no-op for each.
        store::migrate(&pool).await.unwrap();
        PostgresStorage::setup(&pool).await.unwrap();
        assert!(store::migrations_applied(&pool).await.unwrap());
        let (ours, theirs) = histories(&pool).await;
        assert_eq!(
            ours as usize,
            store::MIGRATOR.iter().count(),
            "only our versions in public._sqlx_migrations"
        );
        assert_eq!(
            theirs as usize,
            PostgresStorage::migrations().iter().count()
        );
        pool.close().await;
        sqlx::query(AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    db.drop_db().await;
}
