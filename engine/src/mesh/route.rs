//! Which shard owns a recipient domain: a pure, stable function of the domain and the shard
//! count, so that every shard (and every restart) agrees without coordination.

/// The shard that owns `domain` among `shards` (≥ 1). Case-insensitive; a trailing dot is
/// ignored. FNV-1a: stable across releases and platforms (unlike `std`'s randomised hasher).
pub fn owner_shard(domain: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in domain.trim_end_matches('.').bytes() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

/// The domain part of an address (after the last `@`); the whole string for `postmaster`.
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or(address, |(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_stable_and_case_insensitive() {
        // Pinned values: changing the function would move queues between shards on upgrade.
        assert_eq!(
            owner_shard("example.com", 8),
            owner_shard("EXAMPLE.com.", 8)
        );
        assert_eq!(owner_shard("example.com", 1), 0);
        let spread: std::collections::HashSet<usize> = (0..1000)
            .map(|i| owner_shard(&format!("d{i}.test"), 4))
            .collect();
        assert_eq!(
            spread.len(),
            4,
            "1000 domains must reach every one of 4 shards"
        );
        assert_eq!(owner_shard("gmail.com", 16), owner_shard("gmail.com", 16));
    }

    #[test]
    fn domains_are_split_from_addresses() {
        assert_eq!(domain_of("user@Example.COM"), "Example.COM");
        assert_eq!(domain_of("\"a@b\"@c.test"), "c.test");
        assert_eq!(domain_of("postmaster"), "postmaster");
    }
}
