//! saida's end-to-end tests in one binary (one link instead of nine): each module is one
//! scenario area, run against the built binaries on loopback (see `saida_e2e` for the
//! helpers). `cargo test -p saida-e2e -- delivery::` runs one area.

mod backoff;
mod bench_smoke;
mod deliverability;
mod delivery;
mod io_uring_fallback;
mod load_tools;
mod observability;
mod smtp_server;
mod spool_demo;
mod spool_trust;
mod tenants;
mod tidy;
