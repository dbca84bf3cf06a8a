//! The bounded line receiver: finds command lines in whatever bytes arrived, sans-IO.
//!
//! A line ends with LF (a CR before it is dropped). A line longer than the bound, line end
//! included, is never buffered whole: once more than `max` bytes arrive without a line end the
//! receiver says [`Scan::Discard`] (the caller drops them) and reports [`Scan::TooLong`] when
//! that line finally ends, so a client cannot grow the buffer past the bound.

use std::ops::Range;

/// What the buffered bytes hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scan {
    /// A line at `line` (without its line end); `consumed` bytes are used up.
    Line { line: Range<usize>, consumed: usize },
    /// A line longer than the bound ended; `consumed` bytes are used up.
    TooLong { consumed: usize },
    /// More than the bound without a line end: drop all `consumed` bytes and read on.
    Discard { consumed: usize },
    /// No complete line yet.
    NeedMore,
}

/// Finds lines of at most `max` bytes (line end included).
#[derive(Clone, Debug)]
pub struct LineReceiver {
    max: usize,
    discarding: bool,
}

impl LineReceiver {
    pub fn new(max: usize) -> LineReceiver {
        LineReceiver {
            max,
            discarding: false,
        }
    }

    /// The bound in bytes, line end included.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Looks for the next line at the start of `buf`.
    pub fn scan(&mut self, buf: &[u8]) -> Scan {
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let consumed = i + 1;
                if std::mem::take(&mut self.discarding) {
                    return Scan::TooLong { consumed };
                }
                let end = if i > 0 && buf[i - 1] == b'\r' {
                    i - 1
                } else {
                    i
                };
                if end + 2 > self.max {
                    return Scan::TooLong { consumed };
                }
                Scan::Line {
                    line: 0..end,
                    consumed,
                }
            }
            None if buf.len() > self.max || (self.discarding && !buf.is_empty()) => {
                self.discarding = true;
                Scan::Discard {
                    consumed: buf.len(),
                }
            }
            None => Scan::NeedMore,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_found_and_bounded() {
        let mut r = LineReceiver::new(10);
        assert_eq!(
            r.scan(b"NOOP\r\nQUIT\r\n"),
            Scan::Line {
                line: 0..4,
                consumed: 6
            }
        );
        assert_eq!(
            r.scan(b"bare\n"),
            Scan::Line {
                line: 0..4,
                consumed: 5
            }
        );
        assert_eq!(r.scan(b"NOO"), Scan::NeedMore);
        assert_eq!(r.scan(b"0123456789\r\n"), Scan::TooLong { consumed: 12 });
        // Longer than the bound with no end yet: dropped piece by piece, reported at its end.
        assert_eq!(r.scan(b"0123456789AB"), Scan::Discard { consumed: 12 });
        assert_eq!(r.scan(b"CD"), Scan::Discard { consumed: 2 });
        assert_eq!(r.scan(b"EF\r\nNOOP\r\n"), Scan::TooLong { consumed: 4 });
        assert_eq!(
            r.scan(b"NOOP\r\n"),
            Scan::Line {
                line: 0..4,
                consumed: 6
            }
        );
    }
}
