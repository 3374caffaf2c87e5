//! Real processes for fault tests: a private Kafka-protocol broker, S3 server, Redis or PostgreSQL
//! that a test may pause, kill or crash without the rest of the suite noticing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The repository root (the tests crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The tansu binary, found the way `scripts/broker.sh` finds it.
fn tansu() -> PathBuf {
    let out = Command::new(repo_root().join("scripts/broker.sh"))
        .arg("ensure")
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/broker.sh runs");
    assert!(out.status.success(), "scripts/broker.sh ensure failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `signal` (e.g. "STOP", "CONT", "KILL") to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A Tansu broker (in memory) of one test, on its own port, stopped when dropped.
pub struct PrivateBroker {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub async fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("catalog-broker-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut broker = Self {
            port,
            dir,
            child: None,
        };
        broker.restart().await;
        broker
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Process id of the running broker.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    /// Stops it (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// Kills it (SIGKILL); its in-memory log is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: the storage is in memory).
    pub async fn restart(&mut self) {
        self.kill();
        let log = std::fs::File::create(self.dir.join("broker.log")).unwrap();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("RUST_LOG", "warn")
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.addr()).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private broker did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused process cannot die from SIGKILL until it is continued on some kernels' views;
            // continue it first so the kill always lands.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A SeaweedFS S3 server of one test (every port its own), stopped and its data removed when dropped.
pub struct PrivateS3 {
    /// Its S3 port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl PrivateS3 {
    /// Starts one with bucket `images` and the test credentials, and waits until S3 answers.
    pub async fn start() -> Self {
        let out = Command::new(repo_root().join("scripts/s3.sh"))
            .arg("ensure")
            .stderr(Stdio::inherit())
            .output()
            .expect("scripts/s3.sh runs");
        assert!(out.status.success(), "scripts/s3.sh ensure failed");
        let weed = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("catalog-s3-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("weed.log")).unwrap();
        let p = |name: &str| format!("-{name}={}", free_port());
        let child = Command::new(weed)
            .env("AWS_ACCESS_KEY_ID", "catalog")
            .env("AWS_SECRET_ACCESS_KEY", "catalog-secret")
            .current_dir(&dir)
            .args([
                format!("-logdir={}", dir.display()),
                "mini".to_owned(),
                format!("-dir={}", dir.display()),
                "-ip=127.0.0.1".to_owned(),
                "-ip.bind=127.0.0.1".to_owned(),
                "-master.telemetry=false".to_owned(),
                "-webdav=false".to_owned(),
                "-admin.ui=false".to_owned(),
                p("admin.port"),
                p("admin.port.grpc"),
                p("master.port"),
                p("master.port.grpc"),
                p("volume.port"),
                p("volume.port.grpc"),
                p("filer.port"),
                p("filer.port.grpc"),
                p("s3.port.grpc"),
                format!("-s3.port={port}"),
                "-s3.port.iceberg=0".to_owned(),
                "-s3.port.lance=0".to_owned(),
                format!("-s3.localSocket={}/s3.sock", dir.display()),
                format!("-filer.localSocket={}/filer.sock", dir.display()),
                "-bucket=images".to_owned(),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("weed starts");
        let s3 = Self { port, dir, child };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let http = reqwest::Client::new();
        while http
            .get(format!("{}/images/", s3.endpoint()))
            .send()
            .await
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "private S3 did not start; see {}",
                s3.dir.join("weed.log").display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s3
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Lets it go on (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }
}

impl Drop for PrivateS3 {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A redis-server of one test (no persistence) on its own port, which the test may pause (SIGSTOP:
/// connections stay open, nothing answers), stop and start again on the same port; killed (after a
/// SIGCONT) when dropped.
pub struct PrivateRedis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one on a free port.
    pub fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            child: None,
        };
        redis.restart();
        redis
    }

    /// Starts it (again, empty) on its port.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
    }

    /// Kills it: connections are refused until `restart`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(self.child.as_ref().expect("running").id(), "STOP");
    }

    /// Lets it go on (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.as_ref().expect("running").id(), "CONT");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `program args…` (as the `postgres` user when this process is root, as initdb and postgres
/// refuse root) and fails the test if it fails.
fn run_as_postgres(program: &str, args: &[&str]) {
    let program = postgres_tool(program);
    let program = program.as_str();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut command = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    };
    let out = command.args(args).output().expect("runs");
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `initdb` or `pg_ctl`: from `PATH` when there, else from the server's own directory (Debian keeps
/// them in /usr/lib/postgresql/<version>/bin, off `PATH`), newest version first. Always an absolute path: `runuser` searches the caller's `PATH` as the `postgres` user, who may not
/// read some of its directories.
fn postgres_tool(name: &str) -> String {
    let on_path = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|p| p.starts_with('/'));
    if let Some(path) = on_path {
        return path;
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.iter()
        .rev()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found on PATH or in /usr/lib/postgresql/*/bin"))
        .display()
        .to_string()
}

/// A PostgreSQL cluster of a test's own (initdb, pg_ctl), on its own port, that the test may restart
/// or crash; stopped and removed when dropped.
pub struct PrivatePostgres {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    settings: String,
}

impl PrivatePostgres {
    /// Starts a cluster (fsync off: a test's data need not survive the machine).
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a cluster with these extra server settings (`-c name=value …`).
    pub fn start_with(settings: &str) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("catalog-chaos-pg-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _ = Command::new("chown")
            .args(["postgres:postgres", &dir.display().to_string()])
            .status();
        let data = dir.display().to_string();
        run_as_postgres(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        let pg = Self {
            port,
            dir,
            settings: settings.to_owned(),
        };
        pg.ctl("start");
        pg
    }

    /// `pg_ctl <action>` (`start`, `restart` — fast —, `stop`), waiting for it.
    pub fn ctl(&self, action: &str) {
        let data = self.dir.display().to_string();
        let options = format!(
            "-p {} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200 {}",
            self.port, self.settings
        );
        let log = format!("{data}/postgres.log");
        let mut args = vec!["-D", &data, "-l", &log, "-w", "-o", &options];
        if action == "restart" {
            args.extend(["-m", "fast"]);
        }
        args.push(action);
        run_as_postgres("pg_ctl", &args);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.display().to_string();
        run_as_postgres("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        // A failed run keeps the cluster for a look (pg_ctl -D … start).
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
