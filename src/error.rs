//! The error every domain operation returns, classified by what the caller should do next.
//!
//! It carries no HTTP status: `api/error.rs` maps each variant to one. Database errors are classified here,
//! once, so that a lost connection reads as "try again" and a named constraint as a conflict.

/// What went wrong, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The thing asked for does not exist.
    #[error("{what} {id} was not found")]
    NotFound {
        /// The kind of thing (e.g. "job").
        what: &'static str,
        /// Its identifier as the caller gave it.
        id: String,
    },
    /// The request is well-formed but its values are not acceptable; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The request clashes with the current state (e.g. cancelling a job that already finished).
    #[error("{0}")]
    Conflict(String),
    /// The database (or another dependency) is unreachable or overloaded; retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure; details are logged, not shown.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Shorthand for results of domain operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Error::Unavailable(format!("the database is unavailable: {err}"))
            }
            sqlx::Error::Database(db) if db.is_unique_violation() => Error::Conflict(format!(
                "already exists ({})",
                db.constraint().unwrap_or("unique constraint")
            )),
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => Error::Invalid(format!(
                "refers to something that does not exist ({})",
                db.constraint().unwrap_or("foreign key")
            )),
            sqlx::Error::Database(db) if db.is_check_violation() => Error::Invalid(format!(
                "a value is out of range ({})",
                db.constraint().unwrap_or("check constraint")
            )),
            _ => Error::Internal(err.into()),
        }
    }
}
