//! Tidy: the rules review keeps catching, checked over every tracked Rust file.
//!
//! - `unsafe` only in the modules fenced for it (the spool's mmap module);
//! - no unbounded channels, no `dbg!`, `todo!`, `unimplemented!` or fix-me markers left behind;
//! - every library or binary source file opens with a `//!` doc comment saying what it is for;
//! - lines within 100 columns;
//! - `allow(dead_code)` only with a `reason = "..."`;
//! - no `thread::sleep` in the daemon's code (waits are for state, on channels or timers);
//! - the crates and the daemon's modules are layered: nothing imports what sits above it.

use std::path::{Path, PathBuf};

/// Files allowed to contain `unsafe`, each with a `// SAFETY:` comment per block.
const UNSAFE_ALLOWED: &[&str] = &["spool/src/mmap.rs"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn rust_files() -> Vec<(String, String)> {
    let root = repo_root();
    let out = std::process::Command::new("git")
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "*.rs",
        ])
        .current_dir(&root)
        .output()
        .expect("git ls-files");
    assert!(out.status.success(), "git ls-files failed");
    String::from_utf8(out.stdout)
        .expect("utf-8 file names")
        .lines()
        .filter(|p| root.join(p).exists())
        .map(|p| {
            (
                p.to_string(),
                std::fs::read_to_string(root.join(p)).expect("read source"),
            )
        })
        .collect()
}

#[test]
fn sources_follow_the_house_rules() {
    let files = rust_files();
    assert!(files.len() > 10, "found only {} Rust files", files.len());
    // Spelled in pieces so that this file does not flag itself.
    let banned = [
        ["unbounded", "("].concat(),
        ["dbg", "!("].concat(),
        ["todo", "!("].concat(),
        ["unimplemented", "!("].concat(),
        ["FIX", "ME"].concat(),
    ];
    let unsafe_word = ["un", "safe "].concat();
    let mut problems = Vec::new();
    for (path, text) in &files {
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.chars().count() > 100 {
                problems.push(format!("{path}:{n}: longer than 100 columns"));
            }
            for b in &banned {
                if line.contains(b.as_str()) {
                    problems.push(format!("{path}:{n}: `{b}`"));
                }
            }
            let code = line.split("//").next().unwrap_or("");
            if code.contains(&unsafe_word) && !UNSAFE_ALLOWED.contains(&path.as_str()) {
                problems.push(format!(
                    "{path}:{n}: unsafe-code outside {UNSAFE_ALLOWED:?}"
                ));
            }
        }
        let is_module = path.contains("/src/") || path.ends_with("support.rs");
        if is_module && !text.trim_start().starts_with("//!") {
            problems.push(format!("{path}: no `//!` doc comment at the top"));
        }
    }
    assert!(problems.is_empty(), "tidy:\n{}", problems.join("\n"));
}

#[test]
fn every_unsafe_block_says_why_it_is_safe() {
    let unsafe_block = ["un", "safe {"].concat();
    for (path, text) in rust_files() {
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.contains(&unsafe_block) {
                let before = &lines[i.saturating_sub(6)..i];
                assert!(
                    before.iter().any(|l| l.contains("// SAFETY:")),
                    "{path}:{}: unsafe-block without a `// SAFETY:` comment above it",
                    i + 1
                );
            }
        }
    }
}

#[test]
fn dead_code_allowances_say_why_and_the_daemon_does_not_sleep() {
    let allow = ["allow(", "dead_code"].concat();
    let sleep = ["thread::", "sleep("].concat();
    // The spool demo kills its writer after a chosen time: the wait is the point.
    let sleep_allowed = ["engine/src/demo.rs"];
    let mut problems = Vec::new();
    for (path, text) in rust_files() {
        let code = non_test_code(&text);
        for (i, line) in text.lines().enumerate() {
            if line.contains(&allow) && !line.contains("reason =") {
                problems.push(format!(
                    "{path}:{}: a dead-code allowance without a reason",
                    i + 1
                ));
            }
        }
        if path.starts_with("engine/src/") && !sleep_allowed.contains(&path.as_str()) {
            for (i, line) in code.lines().enumerate() {
                if line.contains(&sleep) {
                    problems.push(format!("{path}:{}: thread::sleep in the daemon", i + 1));
                }
            }
        }
    }
    assert!(problems.is_empty(), "tidy:\n{}", problems.join("\n"));
}

/// The text before the file's test module (`#[cfg(test)] mod tests`).
fn non_test_code(text: &str) -> &str {
    let marker = ["#[cfg(test)]", "\nmod tests"].concat();
    text.find(&marker).map_or(text, |i| &text[..i])
}

/// The daemon's modules, lowest layer first: a module may use only those of lower rank (and
/// its own submodules). Config and the mesh sit low, admin and the shard runtime on top.
const DAEMON_LAYERS: &[(&str, u8)] = &[
    // Parents that only declare their submodules.
    ("delivery", 0),
    ("smtp", 0),
    ("smtp::server", 0),
    // Leaf helpers every layer may use.
    ("names", 0),
    ("state_file", 0),
    ("cidr", 1),
    ("dns", 1),
    ("auth", 1),
    ("demo", 1),
    ("mesh::route", 1),
    ("delivery::schedule", 1),
    ("delivery::throttle", 1),
    ("delivery::log", 1),
    ("delivery::dsn", 1),
    ("delivery::egress", 1),
    ("delivery::bounce_class", 1),
    ("delivery::backoff", 2),
    ("delivery::provider", 3),
    ("suppression", 1),
    ("tenant", 1),
    ("smtp::client", 1),
    ("smtp::server::inflight", 1),
    ("delivery::policy", 2),
    ("delivery::queue", 3),
    ("config", 4),
    ("api", 5),
    ("mesh", 6),
    ("metrics", 7),
    ("intake", 8),
    ("smtp::server::session", 9),
    ("delivery::engine", 10),
    ("admin", 11),
    ("shard", 12),
    ("main", 13),
];

/// The rank of the module `path` (`delivery::engine`): its longest prefix in the table.
fn rank(path: &str) -> Option<(&'static str, u8)> {
    DAEMON_LAYERS
        .iter()
        .filter(|(m, _)| path == *m || path.starts_with(&format!("{m}::")))
        .max_by_key(|(m, _)| m.len())
        .copied()
}

#[test]
fn the_daemon_modules_are_layered() {
    let mut problems = Vec::new();
    for (path, text) in rust_files() {
        let Some(rel) = path.strip_prefix("engine/src/") else {
            continue;
        };
        let module = rel
            .trim_end_matches(".rs")
            .trim_end_matches("/mod")
            .replace('/', "::");
        let Some((own, own_rank)) = rank(&module) else {
            problems.push(format!(
                "{path}: module `{module}` has no layer in DAEMON_LAYERS"
            ));
            continue;
        };
        let code = non_test_code(&text);
        for (i, line) in code.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + 7..];
                let used: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || *c == ':')
                    .collect();
                let used = used.trim_end_matches(':');
                let Some((dep, dep_rank)) = rank(used) else {
                    continue;
                };
                if dep != own && !dep.starts_with(&format!("{own}::")) && dep_rank >= own_rank {
                    problems.push(format!(
                        "{path}:{}: `{own}` (layer {own_rank}) uses `{dep}` (layer {dep_rank})",
                        i + 1
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "layering:\n{}", problems.join("\n"));
}

/// Workspace crates, lowest layer first: a crate may depend only on crates of lower rank.
const CRATE_LAYERS: &[(&str, u8)] = &[
    ("spool-format", 0),
    ("smtp-proto", 0),
    ("saida-net", 0),
    ("saida-dkim", 0),
    ("spool", 1),
    ("smtp-client", 1),
    ("saida-control", 1),
    ("saida", 2),
    ("saida-tools", 3),
    ("saida-bench", 3),
    ("saida-e2e", 4),
];

#[test]
fn the_crates_are_layered_without_a_cycle() {
    let root = repo_root();
    let mut problems = Vec::new();
    for dir in [
        "spool-format",
        "smtp-proto",
        "saida-net",
        "dkim",
        "smtp-client",
        "spool",
        "saida-control",
        "engine",
        "tools",
        "bench",
        "tests",
    ] {
        let manifest = std::fs::read_to_string(root.join(dir).join("Cargo.toml"))
            .unwrap_or_else(|e| panic!("{dir}/Cargo.toml: {e}"));
        let name = manifest
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .map(|n| n.trim_end_matches('"'))
            .unwrap_or_else(|| panic!("{dir}/Cargo.toml has no name"));
        let Some((_, own)) = CRATE_LAYERS.iter().find(|(n, _)| *n == name) else {
            problems.push(format!("crate {name} has no layer in CRATE_LAYERS"));
            continue;
        };
        let deps = manifest
            .split("[dependencies]")
            .nth(1)
            .unwrap_or("")
            .split("\n[")
            .next()
            .unwrap_or("");
        for line in deps.lines() {
            let dep = line.split(['.', ' ', '=']).next().unwrap_or("");
            if let Some((_, r)) = CRATE_LAYERS.iter().find(|(n, _)| *n == dep) {
                if r >= own {
                    problems.push(format!("{name} (layer {own}) depends on {dep} (layer {r})"));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "crate layering:\n{}",
        problems.join("\n")
    );
}
