//! Memory maps of segment files: read-only maps for recovery scans and zero-copy message bodies,
//! and the writable map used only by the `mmap-msync` append method (kept for the benchmark).
//!
//! This is one of the two modules allowed `unsafe` (the other is none yet: io_uring glue lives
//! in the engine). Mapping a file is unsafe because another party could change or shrink it
//! while we hold slices into it.
//!
//! # Truncation and SIGBUS
//! Touching a mapped page past the end of the file raises SIGBUS and kills the process; an I/O
//! error while faulting a page in does the same. This cannot happen in normal operation:
//! - segments are preallocated to their full size before they are renamed into place, and saida
//!   never truncates a segment (torn tails are zeroed with `pwrite`, not cut);
//! - a segment is deleted only with `unlink`, which keeps the inode alive for existing maps;
//! - the spool directory belongs to saida: an operator who truncates segments by hand while
//!   saida runs can crash it, and docs/operations.md says so.
//!
//! A map is created with the file's length at that moment and never grows.
//!
//! # Writing through a map
//! On this kernel, page-cache folios take the size of the writes that created them: in a file
//! pre-filled with 1 MiB writes, a 4 KiB store through the map followed by `msync` writes back a
//! whole 1 MiB folio. Segments are preallocated with `fallocate` (unwritten extents, no folios),
//! so the trap does not apply to them; the default append method is `pwrite` anyway (measured
//! faster, see docs/benchmarks.md), and writes through a map turn ENOSPC/EIO into SIGBUS.

#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

use memmap2::{Mmap, MmapMut};

use crate::error::{IoOp, SpoolError, io_err};

/// A read-only map of a whole segment file.
pub struct SegmentMap {
    map: Mmap,
}

impl SegmentMap {
    /// Maps `file` (opened on `path`, which is only used in errors) read-only.
    pub fn open(file: &File, path: &Path) -> Result<SegmentMap, SpoolError> {
        // SAFETY: segment files are owned by this spool, preallocated to their final length
        // before use and never truncated while mapped (see the module docs); deletion unlinks,
        // which keeps the mapping valid. Writers only append into zeroed space with pwrite,
        // which readers observe only after commit.
        let map = unsafe { Mmap::map(file) }.map_err(io_err(IoOp::Map, path))?;
        Ok(SegmentMap { map })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// A writable shared map of a segment, for the `mmap-msync` append method.
pub struct SegmentMapMut {
    map: MmapMut,
}

impl SegmentMapMut {
    /// Maps `file` read-write and shared.
    pub fn open(file: &File, path: &Path) -> Result<SegmentMapMut, SpoolError> {
        // SAFETY: as for `SegmentMap::open`; additionally only the log's sync thread writes
        // through this map, into ranges no reader looks at until they are committed.
        let map = unsafe { MmapMut::map_mut(file) }.map_err(io_err(IoOp::Map, path))?;
        Ok(SegmentMapMut { map })
    }

    /// Copies `bytes` to `offset` and `msync`s that range (MS_SYNC), which makes it durable.
    pub fn write_and_sync(
        &mut self,
        offset: usize,
        bytes: &[u8],
        path: &Path,
    ) -> Result<(), SpoolError> {
        let end = offset
            .checked_add(bytes.len())
            .filter(|&e| e <= self.map.len())
            .ok_or_else(|| {
                SpoolError::Config(format!(
                    "write past the end of mapped segment {}",
                    path.display()
                ))
            })?;
        self.map[offset..end].copy_from_slice(bytes);
        self.map
            .flush_range(offset, bytes.len())
            .map_err(io_err(IoOp::Sync, path))
    }
}
