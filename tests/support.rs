//! Helpers for saida's end-to-end tests: finding the workspace's built binaries.
//!
//! The tests run the real `saida` and tool binaries as separate processes. They are built by
//! `cargo build --workspace --bins`, which `scripts/test.sh` runs before `cargo test`.

use std::path::PathBuf;

/// Path of the workspace binary `name`, built in the same profile as this test.
///
/// Panics with the command to run when the binary has not been built: a missing binary is a
/// broken test setup, never a reason to pass.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile> directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A running `saida run` with its own configuration, spool and log; killed on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts saida with `extra` TOML appended to a config that sets the listener (plus any
    /// listeners `extra` adds), the spool directory and 2 shards, and waits until it accepts
    /// connections. `{dir}` in `extra` is replaced by the daemon's directory.
    pub fn start(backend: &str, extra: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = format!(
            "[server]\nhostname = \"saida.test\"\nshards = 2\nbackend = \"{backend}\"\n\
             shutdown_grace_secs = 2\n\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n\n\
             [spool]\ndir = \"{d}/spool\"\n\n{extra}\n",
            d = dir.path().display(),
            extra = extra.replace("{dir}", &dir.path().display().to_string()),
        );
        Daemon::start_in(dir, port, &config)
    }

    /// Starts saida on a complete configuration in `dir` (listening on `port`).
    pub fn start_in(dir: tempfile::TempDir, port: u16, config: &str) -> Daemon {
        let path = dir.path().join("saida.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("saida.log")).expect("log file");
        let child = std::process::Command::new(binary("saida"))
            .args(["run", "--config"])
            .arg(&path)
            .stderr(log)
            .spawn()
            .expect("start saida");
        let daemon = Daemon { child, port, dir };
        // Ready means every shard has recovered its spool and serves ("saida running" is logged
        // after that), not merely that the kernel accepts connections on the port.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !daemon.log().contains("saida running") {
            let log = daemon.log();
            assert!(
                std::time::Instant::now() < deadline,
                "saida did not start:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        daemon
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("saida.log")).unwrap_or_default()
    }

    /// The spool directory of shard `n`.
    pub fn shard_dir(&self, n: usize) -> std::path::PathBuf {
        self.dir.path().join("spool").join(format!("shard-{n}"))
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        self.child.wait().expect("wait for saida")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a Python 3 script with arguments; returns its standard output, panicking with its
/// error output if it fails.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 is required for the end-to-end tests");
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes a self-signed certificate for `saida.test` and its key into `dir`; returns their
/// paths.
pub fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["saida.test".to_string()]).expect("rcgen");
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).expect("write cert");
    std::fs::write(&k, signing_key.serialize_pem()).expect("write key");
    (c, k)
}

/// Queue ids in `250 2.0.0 Ok: queued as <id>` lines of `text`.
pub fn queued_ids(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split("queued as ").nth(1))
        .map(|id| id.trim().trim_end_matches('\'').to_string())
        .collect()
}

/// A `[tls]` section with a fresh self-signed certificate written into `dir`, plus `more` keys.
pub fn tls_config(dir: &std::path::Path, more: &str) -> String {
    let (cert, key) = self_signed(dir);
    format!(
        "[tls]\ncertificate = \"{}\"\nkey = \"{}\"\n{more}",
        cert.display(),
        key.display()
    )
}
