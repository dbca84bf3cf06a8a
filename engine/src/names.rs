//! The one rule for names an operator gives things in the configuration (tenants, egress
//! sources and pools, providers, DKIM selectors): 1 to [`NAME_CHARS_MAX`] of `A-Za-z0-9-_.`.
//! They become queue-name parts, metric label values and file lines, so they never hold a
//! `/`, `@`, `:`, space or anything to escape.

/// Longest name.
pub const NAME_CHARS_MAX: usize = 64;

/// Whether `s` is a valid name.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= NAME_CHARS_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_short_and_plain() {
        assert!(super::is_name("acme-ips_2.eu"));
        for bad in ["", "a/b", "a@b", "a:b", "a b", &"x".repeat(65)] {
            assert!(!super::is_name(bad), "{bad}");
        }
    }
}
