//! Fuzz target: every decoder of spool bytes (frame, record, segment header, segment scan) on
//! arbitrary input, with the round-trip oracle. The logic lives in `spool_format::fuzzing` so
//! the property tests run the same checks in CI.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    spool_format::fuzzing::decode_round_trip(data);
});
