//! A throwaway PostgreSQL cluster for `stagepass dev`: `initdb` into a fresh
//! temporary directory, `pg_ctl start` on a free port bound to 127.0.0.1,
//! and on drop `pg_ctl stop` and delete the directory.
//!
//! The [`Cluster`] value exists from the moment the directory is created, so
//! every later failure (initdb, start) and every exit path (return, error,
//! panic, a cancelled future on Ctrl-C) runs the same cleanup in `Drop`.
//!
//! PostgreSQL refuses to run as root, so when we are root every PostgreSQL
//! command runs as the `postgres` OS user through `runuser`, and the
//! directory is handed to that user first.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::error::{Context as _, Result, fail};

const OS_USER: &str = "postgres";

pub struct Cluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    as_postgres: bool,
    started: bool,
    /// `-c` settings added to the server's command line.
    settings: Vec<String>,
}

/// A server certificate and its key (PEM) for a cluster with `ssl = on`.
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Cluster {
    /// Creates, initialises and starts a cluster; ready for connections on return.
    pub fn start() -> Result<Cluster> {
        Self::start_with(None)
    }

    /// [`Cluster::start`], serving TLS with `tls` when given (plain
    /// connections are still accepted: `trust` on `host` lines).
    pub fn start_with(tls: Option<&ServerTls>) -> Result<Cluster> {
        Self::start_configured(tls, &[])
    }

    /// [`Cluster::start_with`], with extra server settings (`name=value`,
    /// passed as `-c` options), e.g. `shared_preload_libraries=pg_stat_statements`.
    pub fn start_configured(tls: Option<&ServerTls>, settings: &[String]) -> Result<Cluster> {
        let bindir = find_bindir()?;
        let as_postgres = running_as_root()?;
        let dir =
            std::env::temp_dir().join(format!("stagepass-dev-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, Drop cleans up whatever happens next.
        let mut cluster = Cluster {
            dir,
            bindir,
            port: 0,
            as_postgres,
            started: false,
            settings: settings.to_vec(),
        };
        if as_postgres {
            cluster.chown_to_postgres()?;
        }
        cluster.initdb()?;
        if let Some(tls) = tls {
            cluster.install_tls(tls)?;
        }
        cluster.port = crate::bench::free_port()?;
        cluster.pg_ctl_start()?;
        Ok(cluster)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[cfg(test)]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser connection (migrations, fixtures).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The unprivileged login the functions use (trust auth: no password).
    pub fn app_url(&self) -> String {
        format!("postgres://stagepass_app@127.0.0.1:{}/postgres", self.port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn chown_to_postgres(&self) -> Result<()> {
        self.chown_path_to_postgres(&self.dir)
    }

    fn chown_path_to_postgres(&self, path: &Path) -> Result<()> {
        let (uid, gid) = os_user_ids(OS_USER)?;
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("handing {} to the {OS_USER} user", path.display()))
    }

    /// Writes the certificate and key where the server reads them. The key
    /// must belong to the server's user and be private to it, or PostgreSQL
    /// refuses to start.
    fn install_tls(&mut self, tls: &ServerTls) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let cert = self.dir.join("server.crt");
        let key = self.dir.join("server.key");
        std::fs::write(&cert, &tls.cert_pem).context("writing server.crt")?;
        std::fs::write(&key, &tls.key_pem).context("writing server.key")?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .context("chmod server.key")?;
        if self.as_postgres {
            self.chown_path_to_postgres(&cert)?;
            self.chown_path_to_postgres(&key)?;
        }
        self.settings.extend([
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", cert.display()),
            format!("ssl_key_file={}", key.display()),
        ]);
        Ok(())
    }

    fn initdb(&self) -> Result<()> {
        let data = self.data_dir();
        let args: Vec<&std::ffi::OsStr> = vec![
            "-D".as_ref(),
            data.as_os_str(),
            "-A".as_ref(),
            "trust".as_ref(),
            "-U".as_ref(),
            "postgres".as_ref(),
            "-E".as_ref(),
            "UTF8".as_ref(),
            "--locale=C".as_ref(),
            // A throwaway cluster: skip fsync of the new files.
            "--no-sync".as_ref(),
        ];
        self.pg_command("initdb", &args)
    }

    fn pg_ctl_start(&mut self) -> Result<()> {
        let data = self.data_dir();
        let log = self.dir.join("postgres.log");
        // Listen on 127.0.0.1 only, with the Unix socket in our own directory
        // (not /var/run/postgresql, which the system cluster owns). fsync off:
        // nothing here needs to survive a crash.
        let mut server_options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        for setting in &self.settings {
            server_options.push_str(" -c ");
            server_options.push_str(setting);
        }
        let args: Vec<&std::ffi::OsStr> = vec![
            "start".as_ref(),
            "-w".as_ref(),
            "-t".as_ref(),
            "30".as_ref(),
            "-D".as_ref(),
            data.as_os_str(),
            "-l".as_ref(),
            log.as_os_str(),
            "-o".as_ref(),
            server_options.as_ref(),
        ];
        // Mark as started before trying: a half-started server must be stopped too.
        self.started = true;
        self.pg_command("pg_ctl", &args).map_err(|e| {
            let tail = log_tail(&log);
            format!("{e}\n--- postgres.log ---\n{tail}").into()
        })
    }

    fn stop(&self) -> Result<()> {
        let data = self.data_dir();
        let stop = |mode: &str| {
            let args: Vec<&std::ffi::OsStr> = vec![
                "stop".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "20".as_ref(),
                "-m".as_ref(),
                mode.as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ];
            self.pg_command("pg_ctl", &args)
        };
        // "fast" ends sessions and shuts down cleanly; "immediate" if that fails.
        stop("fast").or_else(|_| stop("immediate"))
    }

    /// Runs one of the PostgreSQL programs (as `postgres` when we are root),
    /// keeping its chatter unless it fails.
    fn pg_command(&self, program: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
        let path = self.bindir.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", OS_USER, "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        command.args(args).current_dir(&self.dir);
        let output = command
            .output()
            .with_context(|| format!("running {}", path.display()))?;
        check_output(program, &output)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started
            && let Err(e) = self.stop()
        {
            eprintln!("warning: stopping the throwaway postgres failed: {e}");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!(
                "warning: could not remove {}: {e} (delete it by hand)",
                self.dir.display()
            );
        }
    }
}

fn check_output(program: &str, output: &Output) -> Result<()> {
    if output.status.success() {
        return Ok(());
    }
    fail(format!(
        "{program} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The directory holding `initdb` and `pg_ctl`: `pg_config --bindir` when it
/// has them (on Debian `pg_config` may come from libpq-dev and name a version
/// without a server), else the newest `/usr/lib/postgresql/<version>/bin`.
fn find_bindir() -> Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => fail(
            "no PostgreSQL server binaries found (neither `pg_config --bindir` nor \
             /usr/lib/postgresql/*/bin has initdb and pg_ctl); install PostgreSQL or set DATABASE_URL",
        ),
    }
}

/// Whether this process runs as root (the owner of `/proc/self` is our
/// effective uid; no `unsafe` call to `geteuid` needed).
fn running_as_root() -> Result<bool> {
    let meta = std::fs::metadata("/proc/self").context("reading /proc/self")?;
    Ok(meta.uid() == 0)
}

/// uid and gid of an OS user, from /etc/passwd.
fn os_user_ids(user: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&user))
        .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        .ok_or_else(|| {
            format!("there is no '{user}' OS user to run PostgreSQL as (PostgreSQL refuses root)")
                .into()
        })
}
