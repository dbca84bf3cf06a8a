//! The README's demo end to end: `saida demo` kills its writer with SIGKILL and recovers the
//! spool each round; `saida-spool inspect` then reads the same spool, read-only, and finds it
//! clean.

use std::process::Command;

use saida_e2e::binary;

#[test]
fn demo_loses_no_acknowledged_message_and_leaves_a_clean_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let out = Command::new(binary("saida"))
        .args(["demo", "--rounds", "3", "--max-run-ms", "400", "--dir"])
        .arg(&spool)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches(", lost 0").count(), 3, "{stdout}");
    assert!(stdout.contains("every acknowledged message survived every kill"));

    let out = Command::new(binary("saida-spool"))
        .arg("inspect")
        .arg(&spool)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "inspect found damage:\n{report}");
    let total: Vec<&str> = report.lines().last().unwrap().split_whitespace().collect();
    assert_eq!(total[0], "total");
    let messages: u64 = total[1].parse().unwrap();
    assert!(messages > 0, "{report}");
}

#[test]
fn inspect_reports_damage_with_exit_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let ok = Command::new(binary("saida"))
        .args(["demo", "--rounds", "1", "--max-run-ms", "200", "--dir"])
        .arg(&spool)
        .status()
        .unwrap();
    assert!(ok.success());
    // Flip one byte inside the first record of the first segment.
    let mut segs: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[64 + 40] ^= 0xFF;
    std::fs::write(&segs[0], bytes).unwrap();
    let out = Command::new(binary("saida-spool"))
        .arg("inspect")
        .arg(&spool)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("damage at 64"));
}
