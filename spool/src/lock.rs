//! The exclusive lock that keeps two processes from using one spool directory at once.
//!
//! [`DirLock::acquire`] takes `flock(LOCK_EX | LOCK_NB)` on the file `lock` in the directory and
//! writes the holder's pid into it. The kernel releases the lock when the holder exits, however
//! it exits (a crash included), so a stale lock file never blocks a restart. A second process
//! gets [`SpoolError::Locked`] naming the directory and the holder's pid.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{IoOp, SpoolError, io_err};

/// Name of the lock file inside a locked directory.
pub const LOCK_FILE: &str = "lock";

/// An exclusive lock on a directory, held until dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    dir: PathBuf,
}

impl DirLock {
    /// Locks `dir` (created if missing), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(IoOp::CreateDir, dir))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(IoOp::Open, &path))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(SpoolError::Locked {
                    dir: dir.to_path_buf(),
                    holder: text.trim().parse().ok(),
                });
            }
            Err(e) => return Err(io_err(IoOp::Lock, &path)(e.into())),
        }
        let pid = std::process::id();
        let write = (|| {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{pid}")
        })();
        write.map_err(io_err(IoOp::Write, &path))?;
        Ok(DirLock {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        match DirLock::acquire(dir.path()) {
            Err(SpoolError::Locked { dir: d, holder }) => {
                assert_eq!(d, dir.path());
                assert_eq!(holder, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
