//! A host that refuses io_uring still runs saida: with `kernel.io_uring_disabled = 2` (the
//! sysctl that makes `io_uring_setup` fail for everyone), `backend = "auto"` falls back to epoll
//! and says so, and `backend = "io_uring"` refuses to start with a clear error.
//!
//! This test changes a machine-wide sysctl for a few seconds, so it lives in its own test binary
//! (cargo runs test binaries one after another) and restores the old value even if it fails.
//! It needs root, as the rest of the suite does.

use saida_e2e::Daemon;

const SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";

struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.0);
    }
}

#[test]
fn auto_falls_back_to_epoll_where_io_uring_is_refused() {
    let old = std::fs::read_to_string(SYSCTL).expect("this kernel has kernel.io_uring_disabled");
    let _restore = Restore(old.trim().to_string());
    std::fs::write(SYSCTL, "2").expect("setting kernel.io_uring_disabled needs root");

    let d = Daemon::start("auto", "");
    let log = d.log();
    assert!(
        log.contains("io_uring unavailable; falling back to epoll"),
        "{log}"
    );
    assert!(log.contains("running on epoll"), "{log}");
    // It serves mail normally.
    let out = saida_e2e::python(
        r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
print(s.sendmail("a@origin.test", ["b@dest.test"], b"Subject: x\r\n\r\nhi\r\n"))
"#,
        &[&d.port.to_string()],
    );
    assert_eq!(out.trim(), "{}");
    drop(d);

    // Asking for io_uring explicitly fails at start-up instead of silently running epoll.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("saida.toml");
    let port = saida_e2e::free_port();
    std::fs::write(
        &path,
        format!(
            "[server]\nbackend = \"io_uring\"\n[[listener]]\naddress = \"127.0.0.1:{port}\"\n\
             [spool]\ndir = \"{}\"\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(saida_e2e::binary("saida"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("io_uring unavailable"), "{err}");
}
