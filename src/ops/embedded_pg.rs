//! A throwaway PostgreSQL for the demo: `initdb` + `postgres` from the machine's own
//! binaries, listening only on a Unix socket inside a temporary folder, stopped and
//! removed when dropped. It owns finding the binaries and the server's lifetime; it
//! knows nothing about the queue.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedPgError {
    #[error(
        "no PostgreSQL server binaries (initdb, postgres) found on PATH, via pg_config or under /usr/lib/postgresql/*/bin; install them (apt-get install postgresql, or brew install postgresql) or set DATABASE_URL"
    )]
    NotInstalled,
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
}

fn failed(what: &str, detail: impl ToString) -> EmbeddedPgError {
    EmbeddedPgError::Failed {
        what: what.into(),
        detail: detail.to_string(),
    }
}

/// Where `initdb` and `postgres` live: PATH first, then `pg_config --bindir`, then the
/// newest Debian-style `/usr/lib/postgresql/<version>/bin`.
pub fn find_bindir() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                return Some(dir);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_both(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e
                .file_name()
                .to_string_lossy()
                .split('.')
                .next()?
                .parse()
                .ok()?;
            let bin = e.path().join("bin");
            has_both(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Who runs PostgreSQL when we are root (it refuses to run as root), in this order.
const RUN_AS: [&str; 2] = ["postgres", "nobody"];

/// The uid and gid of `name` in /etc/passwd.
fn passwd_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() > 3 && f[0] == name {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The name of the user `run_as` picks (for the commands a person pastes).
fn run_as_name() -> Option<&'static str> {
    if !is_root() {
        return None;
    }
    RUN_AS.into_iter().find(|name| passwd_ids(name).is_some())
}

/// PostgreSQL refuses to run as root: run it as the `postgres` user (or `nobody`).
fn run_as() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    Some(
        RUN_AS
            .into_iter()
            .find_map(passwd_ids)
            .unwrap_or((65534, 65534)),
    )
}

pub struct ThrowawayPostgres {
    dir: PathBuf,
    child: Option<Child>,
    keep: bool,
}

impl ThrowawayPostgres {
    /// Creates a cluster in a new temporary folder and starts it on a private socket.
    pub async fn start() -> Result<ThrowawayPostgres, EmbeddedPgError> {
        let bindir = find_bindir().ok_or(EmbeddedPgError::NotInstalled)?;
        static INSTANCES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("report-worker-demo-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sock"))
            .map_err(|e| failed("creating the temporary folder", e))?;
        let user = run_as();
        if let Some((uid, gid)) = user {
            for p in [dir.clone(), dir.join("sock")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .map_err(|e| failed("chown of the temporary folder", e))?;
            }
        }
        let mut pg = ThrowawayPostgres {
            dir: dir.clone(),
            child: None,
            keep: false,
        };
        let command = |name: &str| {
            let mut c = Command::new(bindir.join(name));
            if let Some((uid, gid)) = user {
                std::os::unix::process::CommandExt::uid(&mut c, uid);
                std::os::unix::process::CommandExt::gid(&mut c, gid);
            }
            c.current_dir(&dir);
            c
        };
        let out = command("initdb")
            .args([
                "-D",
                "data",
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .output()
            .map_err(|e| failed("initdb", e))?;
        if !out.status.success() {
            return Err(failed(
                "initdb",
                String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
        pg.launch(&bindir).await?;
        Ok(pg)
    }

    /// Stops the server (a fast shutdown) and starts it again on the same data: a new
    /// server process, as a restart or a failover makes one.
    pub async fn restart(&mut self) -> Result<(), EmbeddedPgError> {
        let bindir = find_bindir().ok_or(EmbeddedPgError::NotInstalled)?;
        self.stop_server();
        self.launch(&bindir).await
    }

    /// Starts `postgres` on the cluster and waits until it accepts connections.
    async fn launch(&mut self, bindir: &Path) -> Result<(), EmbeddedPgError> {
        let dir = self.dir.clone();
        let user = run_as();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("postgres.log"))
            .map_err(|e| failed("creating the server log", e))?;
        if let Some((uid, gid)) = user {
            let _ = std::os::unix::fs::chown(dir.join("postgres.log"), Some(uid), Some(gid));
        }
        let mut command = Command::new(bindir.join("postgres"));
        if let Some((uid, gid)) = user {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        let child = command
            .current_dir(&dir)
            .args(["-D", "data", "-k"])
            .arg(dir.join("sock"))
            .args(["-c", "listen_addresses=", "-p", "5432", "-F"])
            .args([
                "-c",
                "max_connections=60",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=off",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| failed("starting postgres", e))?;
        self.child = Some(child);
        // Ready when a connection succeeds.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if crate::queue::connect(&self.url(), 1).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(failed(
                    "postgres",
                    format!("exited with {status}: {}", tail.join(" | ")),
                ));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(failed("postgres", "did not accept connections within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self) -> String {
        let sock = self.dir.join("sock");
        let encoded = percent_encoding::utf8_percent_encode(
            &sock.to_string_lossy(),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string();
        format!("postgres://postgres@localhost:5432/postgres?host={encoded}")
    }

    /// The shell command that starts a kept throwaway server in `dir` again, in the
    /// background, as it ran (its data, its private socket, no TCP), as the user it
    /// ran as.
    pub fn kept_commands(dir: &Path) -> String {
        let bindir = find_bindir().unwrap_or_default();
        let postgres = crate::domain::shell_quote(&bindir.join("postgres").to_string_lossy());
        let data = crate::domain::shell_quote(&dir.join("data").to_string_lossy());
        let sock = crate::domain::shell_quote(&dir.join("sock").to_string_lossy());
        let log = crate::domain::shell_quote(&dir.join("postgres.log").to_string_lossy());
        let server = format!("{postgres} -D {data} -k {sock} -c listen_addresses= -p 5432");
        match run_as_name() {
            Some(user) => format!("runuser -u {user} -- {server} >>{log} 2>&1 &"),
            None => format!("{server} >>{log} 2>&1 &"),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Keep the data folder when stopped (the server itself is always stopped).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    fn shutdown(&mut self) {
        self.stop_server();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn stop_server(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT: PostgreSQL's fast shutdown; SIGKILL if it does not finish.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            for _ in 0..100 {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        self.shutdown();
    }
}
