//! The decoder's fuzz property, shared by the cargo-fuzz target (`spool-format/fuzz`) and the
//! property tests, so that CI exercises the same oracle a long fuzz run does.

use crate::codec::{FramePos, FrameRead, decode_frame};

/// Where fuzz inputs are taken to sit: segment 0, offset 0 (the seeds are encoded there).
pub const FUZZ_POS: FramePos = FramePos {
    segment: 0,
    offset: 0,
};
use crate::scan::scan_segment;

/// Feeds arbitrary bytes to every decoder and checks the round-trip oracle: whatever decodes as a
/// frame re-encodes to exactly the same bytes. Panics (which the fuzzer reports) only when the
/// oracle fails; any input must otherwise be rejected with an error.
pub fn decode_round_trip(data: &[u8]) {
    if let Ok(FrameRead::Frame(frame)) = decode_frame(data, FUZZ_POS) {
        if let Ok(record) = frame.record() {
            let mut again = Vec::new();
            let n = record
                .encode_frame(FUZZ_POS, &mut again)
                .expect("a decoded record re-encodes");
            assert_eq!(n, frame.frame_len);
            let payload_end = crate::codec::FRAME_HEADER_LEN + frame.payload.len();
            assert_eq!(
                &again[..payload_end],
                &data[..payload_end],
                "re-encoding differs"
            );
        }
    }
    let _ = crate::segment::SegmentHeader::decode(data);
    let _ = scan_segment(data, FUZZ_POS.segment, |_, _, _| {});
}
