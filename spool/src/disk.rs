//! The spool's I/O seam: every write, `fdatasync`, preallocation and recovery read of a segment
//! goes through a [`Disk`], so that tests can put a [`FaultyDisk`] under a real spool.
//!
//! [`RealDisk`] (the default) calls the kernel directly. [`FaultyDisk`] calls the kernel too,
//! on real files, and on top of it can fail chosen operations (`EIO` on the n-th write, sync or
//! read; `ENOSPC` when its space budget runs out) and *lose unsynced writes*: it keeps the bytes
//! each write overwrote until the file's next `fdatasync`, and [`FaultyDisk::crash`] puts them
//! back, which is what a machine crash does to data that only reached the page cache.
//!
//! Not covered by the seam: directory operations (rename, unlink, directory fsync) and the
//! read-only maps that serve message bodies after recovery.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The file operations the spool needs, with the path for error messages and fault targeting.
pub trait Disk: Send + Sync + fmt::Debug {
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, file: &File, path: &Path, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`.
    fn sync_data(&self, file: &File, path: &Path) -> io::Result<()>;
    /// Reserves `[0, len)` (`fallocate`), so that later writes cannot run out of space.
    fn preallocate(&self, file: &File, path: &Path, len: u64) -> io::Result<()>;
    /// Fills as much of `buf` as the file holds from `offset`; returns the bytes read.
    fn read_at(&self, file: &File, path: &Path, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

/// The kernel, directly.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealDisk;

impl Disk for RealDisk {
    fn write_at(&self, file: &File, _path: &Path, buf: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(buf, offset)
    }

    fn sync_data(&self, file: &File, _path: &Path) -> io::Result<()> {
        file.sync_data()
    }

    fn preallocate(&self, file: &File, _path: &Path, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len)
            .map_err(io::Error::from)
    }

    fn read_at(&self, file: &File, _path: &Path, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// The default disk, shared.
pub fn real() -> Arc<dyn Disk> {
    Arc::new(RealDisk)
}

/// An operation a [`FaultyDisk`] can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskOp {
    Write,
    Sync,
    Preallocate,
    Read,
}

/// One fault to inject: the `skip + 1`-th operation of kind `op` on a file whose name ends with
/// `suffix` fails with `EIO`.
struct FaultRule {
    op: DiskOp,
    suffix: String,
    skip: u64,
}

#[derive(Default)]
struct FaultState {
    rules: Vec<FaultRule>,
    /// Reads of these files always fail (a bad sector under them).
    unreadable: Vec<PathBuf>,
    /// Bytes that preallocation may still take; `None` is unlimited.
    space_left: Option<u64>,
    /// Per file: (offset, bytes overwritten) of writes since its last sync, oldest first.
    unsynced: HashMap<PathBuf, Vec<(u64, Vec<u8>)>>,
    /// Every operation fails (the machine is going down).
    frozen: bool,
    faults_injected: u64,
}

/// Real files with injected faults and lost unsynced writes; see the module docs.
#[derive(Default)]
pub struct FaultyDisk {
    state: Mutex<FaultState>,
}

impl fmt::Debug for FaultyDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultyDisk")
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected I/O error ({what})"))
}

impl FaultyDisk {
    pub fn new() -> Arc<FaultyDisk> {
        Arc::default()
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails the next operation of kind `op` on a segment file (`*.seg`, not the temporary
    /// files of segment creation) with `EIO`; `skip` lets that many succeed first.
    pub fn fail_next(&self, op: DiskOp, skip: u64) {
        self.fail_next_on(op, ".seg", skip);
    }

    /// Like [`FaultyDisk::fail_next`], on files whose name ends with `suffix` (`""`: any file).
    pub fn fail_next_on(&self, op: DiskOp, suffix: &str, skip: u64) {
        self.lock().rules.push(FaultRule {
            op,
            suffix: suffix.to_string(),
            skip,
        });
    }

    /// Every read of `path` fails with `EIO` from now on.
    pub fn make_unreadable(&self, path: &Path) {
        self.lock().unreadable.push(path.to_path_buf());
    }

    /// Preallocations may take `bytes` more, then fail with `ENOSPC`; `None` lifts the limit.
    pub fn set_space(&self, bytes: Option<u64>) {
        self.lock().space_left = bytes;
    }

    /// From now on every operation fails, as when the machine loses power; [`FaultyDisk::crash`]
    /// ends that.
    pub fn freeze(&self) {
        self.lock().frozen = true;
    }

    /// The crash: puts back what every unsynced write overwrote (newest first), forgets pending
    /// faults and thaws. Returns the number of writes lost.
    pub fn crash(&self) -> io::Result<u64> {
        let mut st = self.lock();
        let mut lost = 0;
        for (path, undo) in st.unsynced.drain() {
            let file = match std::fs::OpenOptions::new().write(true).open(&path) {
                Ok(f) => f,
                // Renamed or removed since: a temp file renamed after its own sync has no undo.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for (offset, old) in undo.iter().rev() {
                file.write_all_at(old, *offset)?;
                lost += 1;
            }
            file.sync_data()?;
        }
        st.rules.clear();
        st.frozen = false;
        Ok(lost)
    }

    /// Faults injected so far.
    pub fn faults_injected(&self) -> u64 {
        self.lock().faults_injected
    }

    /// The error to return if this operation is to fail.
    fn check(&self, st: &mut FaultState, op: DiskOp, path: &Path) -> io::Result<()> {
        if st.frozen {
            return Err(eio("frozen"));
        }
        let name = path.to_string_lossy();
        let mut fire = None;
        for (i, r) in st.rules.iter_mut().enumerate() {
            if r.op == op && name.ends_with(&r.suffix) {
                if r.skip == 0 {
                    fire = Some(i);
                    break;
                }
                r.skip -= 1;
            }
        }
        if let Some(i) = fire {
            st.rules.remove(i);
            st.faults_injected += 1;
            return Err(eio(&format!("{op:?} of {name}")));
        }
        Ok(())
    }
}

impl Disk for FaultyDisk {
    fn write_at(&self, file: &File, path: &Path, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.lock();
        self.check(&mut st, DiskOp::Write, path)?;
        let mut old = vec![0u8; buf.len()];
        let n = RealDisk.read_at(file, path, &mut old, offset)?;
        old.truncate(n);
        st.unsynced
            .entry(path.to_path_buf())
            .or_default()
            .push((offset, old));
        file.write_all_at(buf, offset)
    }

    fn sync_data(&self, file: &File, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        self.check(&mut st, DiskOp::Sync, path)?;
        file.sync_data()?;
        st.unsynced.remove(path);
        Ok(())
    }

    fn preallocate(&self, file: &File, path: &Path, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        self.check(&mut st, DiskOp::Preallocate, path)?;
        if let Some(left) = st.space_left {
            if left < len {
                st.faults_injected += 1;
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            st.space_left = Some(left - len);
        }
        RealDisk.preallocate(file, path, len)
    }

    fn read_at(&self, file: &File, path: &Path, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut st = self.lock();
        self.check(&mut st, DiskOp::Read, path)?;
        if st.unreadable.iter().any(|p| p == path) {
            st.faults_injected += 1;
            return Err(io::Error::from_raw_os_error(5));
        }
        drop(st);
        RealDisk.read_at(file, path, buf, offset)
    }
}
