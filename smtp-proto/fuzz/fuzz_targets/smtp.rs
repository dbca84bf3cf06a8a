//! Fuzz target: the command parser, line receiver, content reader and reply parser, on raw
//! bytes and on bytes folded into SMTP tokens (the first byte chooses). The oracles live in
//! `smtp_proto::fuzzing`, so a property test runs the same checks in CI.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    smtp_proto::fuzzing::all(data);
});
