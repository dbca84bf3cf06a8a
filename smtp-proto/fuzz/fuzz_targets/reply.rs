//! Fuzz target: only the `reply` oracle of `smtp_proto::fuzzing` (raw bytes or SMTP tokens, by
//! the first byte), for a long run on one parser; `smtp` runs all four.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((first, rest)) = data.split_first() {
        let mut input = vec![(first & 4) | 3];
        input.extend_from_slice(rest);
        smtp_proto::fuzzing::all(&input);
    }
});
