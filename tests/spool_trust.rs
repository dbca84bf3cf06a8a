//! The daemon keeps every acknowledged message through the faults production meets: a second
//! instance on the same spool, a change of shard count, a spool that cannot commit.

use saida_e2e::{Daemon, binary};

#[test]
fn a_second_instance_on_the_same_spool_exits_naming_the_directory_and_the_holder() {
    let d = Daemon::start("epoll", "");
    let config = d.dir.path().join("saida.toml");
    let out = std::process::Command::new(binary("saida"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run a second saida");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second instance started:\n{stderr}"
    );
    let spool = d.dir.path().join("spool");
    assert!(
        stderr.contains(&spool.display().to_string())
            && stderr.contains(&format!("pid {}", d.child.id())),
        "the error names the directory and the holder's pid:\n{stderr}"
    );
    // The first instance still serves.
    assert_eq!(
        saida_e2e::send_messages(d.port, &[("a@origin.test", vec!["b@x.test".into()])]),
        1
    );
}
