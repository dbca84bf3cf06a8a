//! The end-to-end benchmark's smallest run, as a smoke test (not a timed test: it checks that
//! every workload completes through a real saida and that the report is whole, not how fast).

use saida_e2e::binary;

#[test]
fn delivery_bench_runs_every_workload_end_to_end() {
    let out = std::process::Command::new(binary("delivery-bench"))
        .args([
            "--workloads",
            "w1,w2,w3",
            "--scale",
            "0.002",
            "--connections",
            "10",
        ])
        .arg("--json")
        .output()
        .expect("delivery-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "delivery-bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        rows.len(),
        6,
        "saida and ceiling for three workloads: {stdout}"
    );
    for r in &rows {
        assert!(r["e2e_per_s"].as_f64().unwrap() > 0.0, "{r}");
        let copies = r["messages"].as_u64().unwrap() * r["rcpts"].as_u64().unwrap();
        let expect = if r["target"] == "saida" {
            copies
        } else {
            r["messages"].as_u64().unwrap()
        };
        assert_eq!(r["latency_ms"]["count"].as_u64(), Some(expect), "{r}");
    }
}
