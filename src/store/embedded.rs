//! The zero-configuration database: a PostgreSQL on localhost:5432 if one lets us in, else a private cluster
//! started from the PostgreSQL binaries on the machine, with its data under `./.activekg/`.
//!
//! Only `serve` without `ACTIVEKG_DSN` comes here. The private cluster is a child we stop on shutdown; one left
//! running by a killed predecessor is adopted rather than fought over.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

const SUPERUSER: &str = "activekg";
const DATABASE: &str = "activekg";

/// Why the embedded default could not give us a database.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// No PostgreSQL binaries anywhere we looked.
    #[error(
        "no PostgreSQL server lets us in on localhost and no PostgreSQL binaries were found (looked in PATH, \
         `pg_config --bindir` and /usr/lib/postgresql/*/bin). Install PostgreSQL (Debian/Ubuntu: \
         `apt-get install postgresql`; macOS: `brew install postgresql@16`) or set ACTIVEKG_DSN to an existing database"
    )]
    NoBinaries,
    /// A step of setting up or starting the cluster failed.
    #[error("the private PostgreSQL cluster in {dir} could not be {step}: {detail}")]
    Step {
        /// Which step.
        step: &'static str,
        /// The cluster directory.
        dir: String,
        /// What went wrong (tool output, log tail).
        detail: String,
    },
}

/// Where the database came from, for the start-up log.
#[derive(Debug)]
pub enum Origin {
    /// A server already listening on localhost:5432.
    Localhost,
    /// Our private cluster, started now or adopted from an earlier run.
    Private(Box<PrivateCluster>),
}

/// A private cluster this process is responsible for stopping.
#[derive(Debug)]
pub struct PrivateCluster {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    child: Option<tokio::process::Child>,
}

impl PrivateCluster {
    /// True when the cluster was already running (left by an earlier process) rather than started by us.
    pub fn is_adopted(&self) -> bool {
        self.child.is_none()
    }

    /// The directory holding the cluster's data.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Connection URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the cluster (fast shutdown: sessions are disconnected, data is flushed) and waits for it.
    pub async fn stop(mut self) -> Result<(), EmbeddedError> {
        let output = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "-t", "60"])
            .output()
            .await
            .map_err(|e| self.step_error("stopped", e.to_string()))?;
        if !output.status.success() {
            return Err(self.step_error(
                "stopped",
                String::from_utf8_lossy(&output.stderr).into_owned(),
            ));
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.wait().await;
        }
        Ok(())
    }

    fn command(&self, tool: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(self.bin_dir.join(tool));
        command.env("LC_ALL", "C").stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    fn step_error(&self, step: &'static str, detail: String) -> EmbeddedError {
        EmbeddedError::Step {
            step,
            dir: self.data_dir.display().to_string(),
            detail: detail.trim().to_owned(),
        }
    }
}

/// Finds or starts the default database and returns its URL (database `activekg`, created if needed): a
/// server on localhost:`local_port` that lets us in, else a private cluster on 127.0.0.1:`private_port`
/// (away from 5432, so a system server started later does not collide).
pub async fn resolve(
    base_dir: &Path,
    local_port: u16,
    private_port: u16,
) -> Result<(String, Origin), EmbeddedError> {
    if let Some(url) = try_localhost(local_port).await {
        return Ok((url, Origin::Localhost));
    }
    let cluster = start_private(base_dir, private_port).await?;
    let url = cluster.url(DATABASE);
    Ok((url, Origin::Private(Box::new(cluster))))
}

/// Connects to localhost:`port` as the usual superusers; on success makes sure database `activekg` exists.
async fn try_localhost(port: u16) -> Option<String> {
    let mut users = vec!["postgres".to_owned()];
    if let Ok(user) = std::env::var("USER")
        && !users.contains(&user)
    {
        users.insert(0, user);
    }
    for user in users {
        let admin = format!("postgres://{user}@localhost:{port}/postgres");
        match connect_once(&admin).await {
            Ok(mut conn) => {
                if let Err(err) = create_database(&mut conn, DATABASE).await {
                    tracing::warn!(%err, user, port, "a local PostgreSQL let us in but we could not create database {DATABASE}");
                    continue;
                }
                return Some(format!("postgres://{user}@localhost:{port}/{DATABASE}"));
            }
            Err(err) => tracing::debug!(%err, user, port, "no usable local PostgreSQL"),
        }
    }
    None
}

async fn connect_once(url: &str) -> Result<sqlx::PgConnection, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .application_name("activekg")
        .log_statements(tracing::log::LevelFilter::Off);
    tokio::time::timeout(Duration::from_secs(3), options.connect())
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)?
}

async fn create_database(conn: &mut sqlx::PgConnection, name: &str) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        // Identifiers cannot be bound; the name is our constant or a test's generated one.
        match sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut *conn)
            .await
        {
            Ok(_) => {}
            // Lost a race with another process creating it: fine.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Starts (or adopts) a private cluster under `base_dir/pgdata`, listening on 127.0.0.1:`port` only.
pub async fn start_private(base_dir: &Path, port: u16) -> Result<PrivateCluster, EmbeddedError> {
    let bin_dir = find_bin_dir().await.ok_or(EmbeddedError::NoBinaries)?;
    let step = |step: &'static str, detail: String| EmbeddedError::Step {
        step,
        dir: base_dir.display().to_string(),
        detail,
    };
    std::fs::create_dir_all(base_dir).map_err(|e| step("created", e.to_string()))?;
    let base_dir = base_dir
        .canonicalize()
        .map_err(|e| step("created", e.to_string()))?;
    let data_dir = base_dir.join("pgdata");
    // initdb and postgres refuse to run as root; run them as an unprivileged account that owns the data,
    // and let that account traverse our directory (the data directory itself stays 0700).
    let run_as = if rustix::process::geteuid().is_root() {
        let account = unprivileged_account().ok_or_else(|| {
            step(
                "prepared",
                "running as root, and neither a `postgres` nor a `nobody` account exists to run the server as".to_owned(),
            )
        })?;
        std::fs::set_permissions(
            &base_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(|e| step("prepared", e.to_string()))?;
        Some(account)
    } else {
        None
    };
    let mut cluster = PrivateCluster {
        bin_dir,
        data_dir,
        port,
        run_as,
        child: None,
    };
    let admin_url = cluster.url("postgres");
    if connect_once(&admin_url).await.is_ok() {
        tracing::info!(port, dir = %cluster.data_dir.display(), "adopting the private PostgreSQL cluster left running by an earlier run");
    } else {
        if !cluster.data_dir.join("PG_VERSION").exists() {
            init_cluster(&cluster).await?;
        }
        let log_path = base_dir.join("postgres.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| cluster.step_error("started", e.to_string()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| cluster.step_error("started", e.to_string()))?;
        let child = cluster
            .command("postgres")
            .arg("-D")
            .arg(&cluster.data_dir)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                "unix_socket_directories=",
                "-c",
                "max_connections=200",
            ])
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| cluster.step_error("started", e.to_string()))?;
        cluster.child = Some(child);
        wait_until_accepting(&mut cluster, &admin_url, &log_path).await?;
    }
    let mut conn = connect_once(&admin_url)
        .await
        .map_err(|e| cluster.step_error("connected to", e.to_string()))?;
    create_database(&mut conn, DATABASE)
        .await
        .map_err(|e| cluster.step_error("given its database", e.to_string()))?;
    Ok(cluster)
}

async fn init_cluster(cluster: &PrivateCluster) -> Result<(), EmbeddedError> {
    std::fs::create_dir_all(&cluster.data_dir)
        .map_err(|e| cluster.step_error("initialised", e.to_string()))?;
    if let Some((uid, gid)) = cluster.run_as {
        std::os::unix::fs::chown(&cluster.data_dir, Some(uid), Some(gid))
            .map_err(|e| cluster.step_error("initialised", e.to_string()))?;
    }
    std::fs::set_permissions(
        &cluster.data_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .map_err(|e| cluster.step_error("initialised", e.to_string()))?;
    let output = cluster
        .command("initdb")
        .arg("-D")
        .arg(&cluster.data_dir)
        .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
        .output()
        .await
        .map_err(|e| cluster.step_error("initialised", e.to_string()))?;
    if !output.status.success() {
        let mut detail = String::from_utf8_lossy(&output.stderr).into_owned();
        if detail.contains("Permission denied") {
            detail.push_str(
                "\n(the server runs as an unprivileged user, which must be able to reach the data directory: \
                 run from a directory every user can traverse, or set ACTIVEKG_DATA_DIR)",
            );
        }
        return Err(cluster.step_error("initialised", detail));
    }
    Ok(())
}

async fn wait_until_accepting(
    cluster: &mut PrivateCluster,
    admin_url: &str,
    log_path: &Path,
) -> Result<(), EmbeddedError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if connect_once(admin_url).await.is_ok() {
            return Ok(());
        }
        let exited = match cluster.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten(),
            None => None,
        };
        if exited.is_some() || tokio::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let detail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
            return Err(cluster.step_error(
                "started",
                format!("server log {}:\n{detail}", log_path.display()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first directory holding both `initdb` and `postgres`: PATH, then `pg_config --bindir`, then the newest
/// /usr/lib/postgresql/<version>/bin.
async fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| {
        dir.join("initdb").is_file()
            && dir.join("postgres").is_file()
            && dir.join("pg_ctl").is_file()
    };
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    // Symlinks in PATH (Debian's wrappers, Homebrew) point into the real bin dir, where the share files are.
    candidates = candidates
        .into_iter()
        .filter(|dir| has_tools(dir))
        .filter_map(|dir| {
            dir.join("initdb")
                .canonicalize()
                .ok()?
                .parent()
                .map(Path::to_path_buf)
        })
        .collect();
    if let Ok(output) = tokio::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .await
        && output.status.success()
    {
        candidates.push(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    Some((
                        e.file_name().to_str()?.parse::<u32>().ok()?,
                        e.path().join("bin"),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
    candidates.extend(versions.into_iter().map(|(_, dir)| dir));
    candidates.into_iter().find(|dir| has_tools(dir))
}

/// uid and gid of `postgres`, else `nobody`, from /etc/passwd.
fn unprivileged_account() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let lookup = |name: &str| {
        passwd
            .lines()
            .map(|line| line.split(':').collect::<Vec<_>>())
            .find(|fields| fields.len() > 3 && fields[0] == name)
            .and_then(|fields| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
    };
    lookup("postgres").or_else(|| lookup("nobody"))
}

/// Connects as the cluster's superuser; used by tests and by `resolve`.
pub async fn can_connect(url: &str) -> bool {
    match connect_once(url).await {
        Ok(conn) => {
            let _ = conn.close().await;
            true
        }
        Err(_) => false,
    }
}
