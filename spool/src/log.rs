//! The segment log: appends framed records to preallocated segment files and makes them durable
//! by group commit on a dedicated sync thread.
//!
//! [`SegmentLog::append`] encodes a record straight into the pending batch buffer (one copy),
//! assigns its [`Location`] and returns a [`CommitTicket`] at once; it never does I/O. The
//! writer thread takes the whole pending batch and writes it with one `pwrite` per segment
//! touched; one `fdatasync` then covers it and every ticket of the batch completes. While that
//! happens, new appends fill the next batch: that is group commit, and its batch size adapts to
//! the load.
//!
//! Under load the commit is a two-stage pipeline: the writer hands a written batch to the *sync
//! stage* thread and goes on copying the next batch into the page cache while the stage waits
//! for the device. When the stage is idle and nothing else is pending, the writer syncs the
//! batch itself (one thread hand-off fewer at low load).
//!
//! # Durability
//! With [`SyncPolicy::EveryCommit`] (the default) a ticket completes only after the `fdatasync`
//! that covers its record has returned, so an SMTP server may answer `250` then. Before the
//! first write into a new segment, the writer waits for the sync stage and syncs the previous
//! segment, so after a crash only the newest segment holding records can have a torn tail
//! (recovery relies on this).
//! [`SyncPolicy::Interval`] and [`SyncPolicy::None`] complete tickets after the `pwrite` alone:
//! a crash of the machine (not of the process) loses what was not yet synced. They exist for load
//! tests and are documented as unsafe.
//!
//! # Backpressure
//! Bytes waiting for the next commit are bounded by `pending_bytes_max`; an append beyond it
//! fails with [`SpoolError::Backpressure`] instead of queueing without bound.
//!
//! # Disk full
//! Segments are preallocated with `fallocate` (and the next one is prepared ahead, the
//! *standby*), so writes into a segment cannot run out of space. Disk full shows up as a failure
//! to preallocate the next segment: appends that need it fail with [`SpoolError::Full`] right
//! away, nothing written is touched, and the sync thread retries every `standby_retry` until
//! space returns.
//!
//! # The reserve segment
//! Besides the standby, the sync thread keeps a second preallocated segment, the *reserve*, that
//! only records other than new messages (outcomes, compaction copies) may roll into. On a disk
//! that the spool itself filled, new messages are refused (`452 4.3.1`) while outcomes still
//! have a whole segment to go to: deliveries go on, outcomes make old segments dead,
//! reclamation deletes them, and space returns. Without it the spool could never drain.
//! A restart hands both empty segments back ([`SegmentLog::open`]'s `spares`).
//!
//! # I/O errors
//! When a write or sync fails, every ticket of that batch fails, and the next append starts a
//! fresh segment: after `fdatasync` reports an error the kernel may have dropped the dirty pages,
//! so nothing more is written into that file.
//!
//! # Untrusted tails
//! After a failed write or `fdatasync`, bytes of that segment past its last successful sync
//! may still be read back (from the page cache) by a later start, yet be lost at the next
//! crash. Acting on them could delete the durable copy of a message (compaction) or forget an
//! outcome. So at the failure the log records, durably, in the spool directory's
//! [`UNTRUSTED_FILE`], the segment and the offset up to which it was synced; recovery ignores
//! that segment's bytes from there on (they were never acknowledged) and never appends to it.
//!
//! # Shutdown
//! [`SegmentLog::close`] (and `Drop`) writes and syncs what is pending, completes its tickets and
//! joins the thread. Appends after that fail with [`SpoolError::Closed`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::mem;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::codec::Record;
use crate::disk::Disk;
use crate::error::{IoFailure, IoOp, SpoolError, io_err};
use crate::mmap::SegmentMapMut;
use crate::segment::{
    FORMAT_VERSION, SEGMENT_HEADER_LEN, SegmentHeader, TEMP_SUFFIX, segment_file_name,
};

/// Smallest allowed segment size.
pub const SEGMENT_BYTES_MIN: u64 = 1 << 20;
/// Largest allowed segment size (offsets within a segment are `u32`).
pub const SEGMENT_BYTES_MAX: u64 = 1 << 30;
/// Default segment size: 64 MiB.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Default bound on bytes waiting for commit: 64 MiB.
pub const PENDING_BYTES_MAX_DEFAULT: usize = 64 << 20;
/// How often the sync thread retries preallocating a segment after a failure.
const STANDBY_RETRY: Duration = Duration::from_millis(500);
/// Failed segments remembered (older ones were rolled away from long ago and are closed).
const FAILED_SEGMENTS_MAX: usize = 16;
/// Name of the file listing segments whose tails are untrusted (see the module docs): one line
/// `<segment id in hex> <offset>` each.
pub const UNTRUSTED_FILE: &str = "untrusted";
/// Entries kept in that file (the oldest are dropped; their segments are long reclaimed).
const UNTRUSTED_MAX: usize = 4096;
/// Spare batch buffers kept for reuse.
const SPARE_BUFFERS_MAX: usize = 4;
/// Default for [`LogConfig::outcome_commit_delay`].
pub const OUTCOME_COMMIT_DELAY_DEFAULT: Duration = Duration::from_millis(5);
/// Largest allowed [`LogConfig::outcome_commit_delay`].
pub const OUTCOME_COMMIT_DELAY_MAX: Duration = Duration::from_secs(1);
/// Bytes of outcome records that start a commit without waiting for the delay (or half of
/// `pending_bytes_max`, if that is less: waiting outcomes must never make appends fail).
const DEFERRED_BYTES_MAX: usize = 1 << 20;
/// Default for [`LogConfig::commit_gather`].
pub const COMMIT_GATHER_DEFAULT: Duration = Duration::from_millis(1);
/// Largest allowed [`LogConfig::commit_gather`].
pub const COMMIT_GATHER_MAX: Duration = Duration::from_millis(10);
/// A batch this large is committed without gathering more.
const GATHER_RECORDS_MAX: u64 = 64;
/// Gathering holds a batch only while at least this many messages are expected in the window
/// (a moderate load, with few sessions in flight, would only wait).
const GATHER_ARRIVALS_MIN: u32 = 4;
/// Gathering ends when no message came for twice the mean gap, or at least this long.
const GATHER_QUIET_MIN: Duration = Duration::from_micros(100);

/// When appended records are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// `fdatasync` before a ticket completes. The only policy under which `250` means durable.
    EveryCommit,
    /// Tickets complete after `pwrite`; `fdatasync` runs at most this often. **Unsafe**: a
    /// machine crash loses up to this much acknowledged mail.
    Interval(Duration),
    /// Tickets complete after `pwrite`; no `fdatasync` except at shutdown. **Unsafe**; for load
    /// tests only.
    None,
}

/// How the sync thread puts bytes into a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendMethod {
    /// `pwrite` then `fdatasync` (default: measured faster, see docs/benchmarks.md).
    Pwrite,
    /// Copy into a writable shared map, then `msync(MS_SYNC)` of the range.
    MmapMsync,
}

/// Configuration of one shard's log.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// The shard's spool directory.
    pub dir: PathBuf,
    /// Shard number, written into segment headers and queue ids.
    pub shard: u16,
    /// Preallocated size of each segment; bounds a record's size too.
    pub segment_bytes: u64,
    pub sync: SyncPolicy,
    pub append_method: AppendMethod,
    /// Bound on bytes appended but not yet handed to the sync thread.
    pub pending_bytes_max: usize,
    /// How long an outcome record may wait for a commit that a new message starts anyway (it
    /// rides along) before it starts one itself. Zero commits every record at once.
    pub outcome_commit_delay: Duration,
    /// How long a batch holding a new message may wait for more messages before its commit,
    /// when at least four messages are expected in it (a busy spool: fewer `fdatasync`s per
    /// message, at most this much more latency); it ends early when no message came for twice
    /// the mean gap. Zero commits at once; only
    /// [`SyncPolicy::EveryCommit`] gathers.
    pub commit_gather: Duration,
    /// Where writes, syncs and recovery reads go ([`crate::disk::RealDisk`] unless a test
    /// injects faults).
    pub disk: Arc<dyn Disk>,
}

impl LogConfig {
    /// Defaults: 64 MiB segments, `EveryCommit`, `pwrite`, 64 MiB pending bound.
    pub fn new(dir: impl Into<PathBuf>) -> LogConfig {
        LogConfig {
            dir: dir.into(),
            shard: 0,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            sync: SyncPolicy::EveryCommit,
            append_method: AppendMethod::Pwrite,
            pending_bytes_max: PENDING_BYTES_MAX_DEFAULT,
            outcome_commit_delay: OUTCOME_COMMIT_DELAY_DEFAULT,
            commit_gather: COMMIT_GATHER_DEFAULT,
            disk: crate::disk::real(),
        }
    }

    /// Checks every bound; the message names the key.
    pub fn validate(&self) -> Result<(), SpoolError> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return Err(SpoolError::Config(format!(
                "segment_bytes = {} is outside {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}",
                self.segment_bytes
            )));
        }
        if self.segment_bytes % 4096 != 0 {
            return Err(SpoolError::Config(
                "segment_bytes must be a multiple of 4096".into(),
            ));
        }
        if !(64 << 10..=1 << 30).contains(&self.pending_bytes_max) {
            return Err(SpoolError::Config(format!(
                "pending_bytes_max = {} is outside 65536..=1073741824",
                self.pending_bytes_max
            )));
        }
        if self.outcome_commit_delay > OUTCOME_COMMIT_DELAY_MAX {
            return Err(SpoolError::Config(format!(
                "outcome_commit_delay = {:?} is above {OUTCOME_COMMIT_DELAY_MAX:?}",
                self.outcome_commit_delay
            )));
        }
        if self.commit_gather > COMMIT_GATHER_MAX {
            return Err(SpoolError::Config(format!(
                "commit_gather = {:?} is above {COMMIT_GATHER_MAX:?}",
                self.commit_gather
            )));
        }
        if let SyncPolicy::Interval(d) = self.sync {
            if d.is_zero() || d > Duration::from_secs(60) {
                return Err(SpoolError::Config(
                    "sync interval must be within 1 ms..=60 s".into(),
                ));
            }
        }
        Ok(())
    }

    /// Pending bytes at which a batch of outcomes is committed without waiting for its delay.
    fn deferred_bytes_max(&self) -> usize {
        DEFERRED_BYTES_MAX.min(self.pending_bytes_max / 2)
    }

    /// Largest frame one segment can hold.
    pub fn record_bytes_max(&self) -> usize {
        self.segment_bytes as usize - SEGMENT_HEADER_LEN
    }
}

/// Where a record lives: segment id, byte offset of its frame, frame length (padding included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    pub segment: u64,
    pub offset: u32,
    pub len: u32,
}

/// Counters of the log, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Group commits completed (one per batch written).
    pub commits: u64,
    /// Records those commits covered.
    pub records: u64,
    /// Bytes written.
    pub bytes: u64,
    /// `fdatasync`/`msync` calls.
    pub syncs: u64,
}

/// Reads a log's counters and health from any thread ([`SegmentLog::watch`]).
#[derive(Clone)]
pub struct LogWatch(Arc<Shared>);

impl LogWatch {
    /// Counters as of now.
    pub fn stats(&self) -> LogStats {
        self.0.lock().stats
    }

    /// Why the log cannot commit right now, if it cannot: the last write or sync failed and no
    /// commit has succeeded since, or no segment can be preallocated.
    pub fn unhealthy(&self) -> Option<String> {
        let st = self.0.lock();
        if let Some(f) = &st.last_failure {
            return Some(f.clone());
        }
        let stuck = st.standby.is_none() && st.active_next + 4096 > self.0.config.segment_bytes;
        match &st.standby_failure {
            Some((f, _)) if stuck || f.is_no_space() => Some(f.to_string()),
            _ => None,
        }
    }
}

/// The appending side of one shard's spool.
pub struct SegmentLog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    config: LogConfig,
    state: Mutex<State>,
    /// Wakes the sync thread: a batch is pending, a standby is wanted, or shutdown.
    work: Condvar,
    /// Wakes appenders waiting for a standby segment.
    standby_ready: Condvar,
}

struct State {
    active: u64,
    active_next: u64,
    /// A preallocated segment ready to become active.
    standby: Option<u64>,
    /// A preallocated segment that only records other than new messages may roll into. Segment
    /// ids must follow write order (recovery replays in id order), so when both spares exist a
    /// roll takes the older one and the newer one stays the reserve.
    reserve: Option<u64>,
    /// The active segment is the reserve: new messages must roll out of it.
    active_is_reserve: bool,
    /// Why the last standby could not be created, and when to retry.
    standby_failure: Option<(IoFailure, Instant)>,
    next_id: u64,
    pending: Batch,
    pending_bytes: usize,
    spare: Vec<Vec<u8>>,
    /// The sync thread saw an I/O error in the active segment: roll before appending again.
    roll_requested: bool,
    /// Segments where a write or sync failed (newest last, at most `FAILED_SEGMENTS_MAX`).
    /// Nothing more is written to or acknowledged from them: after `fdatasync` reports an error
    /// once, a later `fdatasync` of the same file can return success without the data being
    /// durable.
    failed_segments: Vec<u64>,
    /// The failure of the last batch, until a batch commits again (`/readyz`).
    last_failure: Option<String>,
    /// Per segment: the end of the bytes covered by its last successful sync.
    durable_end: HashMap<u64, u64>,
    /// Segments with an untrusted tail, and where it starts (persisted in [`UNTRUSTED_FILE`]).
    untrusted: Vec<(u64, u64)>,
    closed: bool,
    stats: LogStats,
    /// How messages have been arriving (the gather's inputs).
    arrivals: Arrivals,
}

/// How messages have been arriving (see [`LogConfig::commit_gather`]).
#[derive(Clone, Copy, Debug)]
struct Arrivals {
    /// Moving mean of the time between appended messages.
    gap: Duration,
    /// When the last one was appended.
    last: Option<Instant>,
}

impl State {
    /// Updates the moving mean of the time between messages (weight 1/8, gaps capped at 1 s).
    fn note_message_at(&mut self, now: Instant) {
        let a = &mut self.arrivals;
        if let Some(last) = a.last {
            let gap = now
                .saturating_duration_since(last)
                .min(Duration::from_secs(1));
            a.gap = (a.gap * 7 + gap) / 8;
        }
        a.last = Some(now);
    }

    /// Notes how a batch ended, for [`LogWatch::unhealthy`].
    fn note_result(&mut self, result: &Result<(), SpoolError>) {
        self.last_failure = result.as_ref().err().map(|e| e.to_string());
    }
}

struct Batch {
    chunks: Vec<Chunk>,
    outcome: Arc<BatchOutcome>,
    records: u64,
    /// When the first record that must be committed soon (not an outcome) was appended;
    /// `None` while the batch holds only outcomes, which may wait until
    /// `opened + outcome_commit_delay`.
    urgent_since: Option<Instant>,
    /// When the first record of the batch was appended.
    opened: Option<Instant>,
}

impl Batch {
    /// How long the batch may still wait for more records before its commit: `None` when it is
    /// empty, zero when it is due.
    fn wait_left(
        &self,
        config: &LogConfig,
        bytes: usize,
        closing: bool,
        arrivals: Arrivals,
    ) -> Option<Duration> {
        if self.records == 0 {
            return None;
        }
        if closing || bytes >= config.deferred_bytes_max() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let until = match self.urgent_since {
            Some(since) => {
                let gather = config.commit_gather;
                // Gathering saves fdatasyncs; without them it would only add latency.
                if gather.is_zero()
                    || config.sync != SyncPolicy::EveryCommit
                    || arrivals.gap * GATHER_ARRIVALS_MIN > gather
                    || self.records >= GATHER_RECORDS_MAX
                {
                    return Some(Duration::ZERO);
                }
                // No message for twice the mean gap: the senders are all waiting on this
                // commit (a few sessions in flight), and waiting longer gains nothing.
                let quiet = (arrivals.gap * 2).max(GATHER_QUIET_MIN);
                (since + gather).min(arrivals.last.unwrap_or(since) + quiet)
            }
            None => self.opened.unwrap_or(now) + config.outcome_commit_delay,
        };
        Some(until.saturating_duration_since(now))
    }

    /// The batch should be committed now.
    fn due(&self, config: &LogConfig, bytes: usize, closing: bool, arrivals: Arrivals) -> bool {
        self.wait_left(config, bytes, closing, arrivals) == Some(Duration::ZERO)
    }
}

impl Batch {
    fn new() -> Batch {
        Batch {
            chunks: Vec::new(),
            outcome: Arc::new(BatchOutcome::default()),
            records: 0,
            urgent_since: None,
            opened: None,
        }
    }
}

/// Contiguous bytes destined for one segment at one offset.
struct Chunk {
    segment: u64,
    offset: u64,
    bytes: Vec<u8>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `segment` as failed: nothing more is written to it or acknowledged from it, and
    /// appends move to a fresh segment.
    fn poison(&self, segment: u64) {
        let mut st = self.lock();
        if !st.untrusted.iter().any(|(s, _)| *s == segment) {
            let from = st
                .durable_end
                .get(&segment)
                .copied()
                .unwrap_or(SEGMENT_HEADER_LEN as u64);
            if st.untrusted.len() >= UNTRUSTED_MAX {
                st.untrusted.remove(0);
            }
            st.untrusted.push((segment, from));
            if let Err(e) = write_untrusted(&self.config.dir, &st.untrusted) {
                // Nothing more can be done here: the batch fails either way.
                st.last_failure = Some(format!("recording an untrusted segment tail: {e}"));
            }
        }
        if !st.failed_segments.contains(&segment) {
            if st.failed_segments.len() == FAILED_SEGMENTS_MAX {
                st.failed_segments.remove(0);
            }
            st.failed_segments.push(segment);
        }
        if st.active == segment {
            st.roll_requested = true;
        }
    }

    /// After a successful sync of `segment` covering its bytes up to `end`: records that end as
    /// durable, unless the segment was poisoned while the sync ran (another thread's write
    /// failed). The untrusted offset recorded then does not cover these bytes, so they must not
    /// be acknowledged: the error. One critical section with [`Shared::poison`], so one of the
    /// two always sees the other.
    fn confirm_sync(&self, segment: u64, end: u64) -> Result<(), SpoolError> {
        let mut st = self.lock();
        if st.failed_segments.contains(&segment) {
            return Err(SpoolError::Io(IoFailure {
                op: IoOp::Sync,
                path: self.config.dir.join(segment_file_name(segment)),
                kind: std::io::ErrorKind::Other,
                message: "another write to this segment failed during the sync".into(),
            }));
        }
        let d = st.durable_end.entry(segment).or_insert(0);
        *d = (*d).max(end);
        Ok(())
    }

    /// The error for work on a segment that failed before, if `segment` did.
    fn check_healthy(&self, segment: u64, op: IoOp) -> Result<(), SpoolError> {
        if !self.lock().failed_segments.contains(&segment) {
            return Ok(());
        }
        Err(SpoolError::Io(IoFailure {
            op,
            path: self.config.dir.join(segment_file_name(segment)),
            kind: std::io::ErrorKind::Other,
            message: "an earlier write or sync of this segment failed".into(),
        }))
    }
}

impl SegmentLog {
    /// Starts appending at the beginning of segment `first_segment`, creating it unless it is
    /// `reuse`d (an existing, empty, preallocated segment: recovery hands back the previous run's
    /// standby so that a restart on a full disk still has room). Starts the sync thread, which
    /// prepares the next segment at once.
    ///
    /// `spares` are more existing empty preallocated segments after `first_segment` (the previous
    /// run's standby and reserve), taken as standby and reserve again.
    ///
    /// A reused segment is appended to from `first_offset` (the header's end for an empty one;
    /// past the last record when recovery resumes the newest segment on a full disk, which then
    /// takes only records other than new messages, like the reserve).
    pub fn open(
        config: LogConfig,
        first_segment: u64,
        reuse: bool,
        first_offset: u64,
        spares: &[u64],
    ) -> Result<SegmentLog, SpoolError> {
        config.validate()?;
        let spares = &spares[..spares.len().min(2)];
        let open_existing = |id: u64| -> Result<OpenSegment, SpoolError> {
            let path = config.dir.join(segment_file_name(id));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(IoOp::Open, &path))?;
            Ok(OpenSegment {
                file: Arc::new(file),
                path,
                map: None,
            })
        };
        let mut spare_files = Vec::new();
        for &id in spares {
            spare_files.push((id, open_existing(id)?));
        }
        let first = if reuse {
            Some(open_existing(first_segment)?)
        } else {
            match create_segment(&config, first_segment) {
                Ok(seg) => Some(seg),
                // A full disk (or a failing preallocation) must not stop the spool from opening:
                // queued mail still has to be delivered to free space. Appends fail with `Full`
                // (or the I/O error) until a segment can be made.
                Err(SpoolError::Full(_) | SpoolError::Io(_)) => None,
                Err(e) => return Err(e),
            }
        };
        let state = State {
            active: first_segment,
            // Without a first segment, the first append has to roll (and finds no standby yet).
            active_next: if first.is_some() {
                first_offset.max(SEGMENT_HEADER_LEN as u64)
            } else {
                config.segment_bytes
            },
            standby: if spares.len() == 2 {
                spares.first().copied()
            } else {
                None
            },
            reserve: spares.last().copied(),
            active_is_reserve: reuse && spares.is_empty(),
            standby_failure: None,
            next_id: spares
                .iter()
                .copied()
                .max()
                .unwrap_or(first_segment)
                .max(first_segment)
                + 1,
            pending: Batch::new(),
            pending_bytes: 0,
            spare: Vec::new(),
            roll_requested: false,
            failed_segments: Vec::new(),
            last_failure: None,
            // A resumed segment is durable up to where recovery found its last record.
            durable_end: HashMap::from([(first_segment, first_offset)]),
            untrusted: read_untrusted(&config.dir),
            closed: false,
            stats: LogStats::default(),
            arrivals: Arrivals {
                gap: Duration::from_secs(1),
                last: None,
            },
        };
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(state),
            work: Condvar::new(),
            standby_ready: Condvar::new(),
        });
        let mut files = HashMap::new();
        if let Some(first) = first {
            files.insert(first_segment, first);
        }
        files.extend(spare_files);
        let writer = SyncThread::new(Arc::clone(&shared), files)?;
        let name = format!("spool-sync-{}", shared.config.shard);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || writer.run())
            .map_err(|e| SpoolError::Io(IoFailure::new(IoOp::Create, "sync thread", &e)))?;
        Ok(SegmentLog {
            shared,
            thread: Some(thread),
        })
    }

    /// The configuration the log runs with.
    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    /// Encodes `record` into the pending batch and returns a ticket that completes when the batch
    /// is committed.
    ///
    /// Cost: one copy of the record and a short critical section; no I/O, no waiting, except when
    /// the active segment is full and the next one is still being preallocated (once per
    /// `segment_bytes`, normally never).
    pub fn append(&self, record: &Record<'_>) -> Result<CommitTicket, SpoolError> {
        let len = record.frame_len();
        let max = self.shared.config.record_bytes_max();
        if len > max {
            return Err(SpoolError::RecordTooLarge { len, max });
        }
        let mut st = self.lock();
        if st.closed {
            return Err(SpoolError::Closed);
        }
        let pending_max = self.shared.config.pending_bytes_max;
        if st.pending_bytes > 0 && st.pending_bytes + len > pending_max {
            return Err(SpoolError::Backpressure {
                pending: st.pending_bytes,
                max: pending_max,
            });
        }
        let is_message = matches!(record, Record::Message(_));
        let full = st.active_next + len as u64 > self.shared.config.segment_bytes;
        if st.roll_requested || full || (is_message && st.active_is_reserve) {
            st = self.roll(st, !is_message)?;
        }
        let (segment, offset) = (st.active, st.active_next);
        let st_ref = &mut *st;
        let contiguous = st_ref
            .pending
            .chunks
            .last()
            .is_some_and(|c| c.segment == segment && c.offset + c.bytes.len() as u64 == offset);
        if !contiguous {
            let bytes = st_ref.spare.pop().unwrap_or_default();
            st_ref.pending.chunks.push(Chunk {
                segment,
                offset,
                bytes,
            });
        }
        let chunk = st_ref
            .pending
            .chunks
            .last_mut()
            .expect("a chunk was just ensured");
        let before = chunk.bytes.len();
        let pos = crate::codec::FramePos { segment, offset };
        if let Err(e) = record.encode_frame(pos, &mut chunk.bytes) {
            // Caller error (an oversized field): nothing was added to the buffer.
            debug_assert_eq!(chunk.bytes.len(), before);
            if chunk.bytes.is_empty() {
                st_ref.pending.chunks.pop();
            }
            return Err(SpoolError::Config(format!("record cannot be encoded: {e}")));
        }
        debug_assert_eq!(chunk.bytes.len() - before, len);
        st_ref.active_next += len as u64;
        st_ref.pending_bytes += len;
        st_ref.pending.records += 1;
        let first_in_batch = st_ref.pending.records == 1;
        let now = Instant::now();
        if first_in_batch {
            st_ref.pending.opened = Some(now);
        }
        // Outcomes may wait for a commit that a message starts anyway (module docs).
        let urgent = !matches!(record, Record::Outcomes(_))
            || self.shared.config.outcome_commit_delay.is_zero();
        let first_urgent = urgent && st_ref.pending.urgent_since.is_none();
        if first_urgent {
            st_ref.pending.urgent_since = Some(now);
        }
        if urgent {
            st_ref.note_message_at(now);
        }
        let deferred_max = self.shared.config.deferred_bytes_max();
        let wake = first_in_batch
            || first_urgent
            || st_ref.pending.records == GATHER_RECORDS_MAX
            || (st_ref.pending_bytes >= deferred_max && st_ref.pending_bytes - len < deferred_max);
        let ticket = CommitTicket {
            outcome: Arc::clone(&st_ref.pending.outcome),
            location: Location {
                segment,
                offset: offset as u32,
                len: len as u32,
            },
        };
        drop(st);
        if wake {
            self.shared.work.notify_one();
        }
        Ok(ticket)
    }

    /// Switches to the standby segment, waiting for it if the sync thread is still creating it.
    /// A record that is not a new message (`control`) may take the reserve segment instead.
    fn roll<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        control: bool,
    ) -> Result<MutexGuard<'a, State>, SpoolError> {
        loop {
            let next = match (st.standby, st.reserve) {
                (Some(s), Some(r)) => {
                    st.standby = None;
                    st.reserve = Some(s.max(r));
                    Some((s.min(r), false))
                }
                (Some(s), None) => {
                    st.standby = None;
                    Some((s, false))
                }
                (None, Some(r)) if control => {
                    st.reserve = None;
                    Some((r, true))
                }
                _ => None,
            };
            if let Some((id, is_reserve)) = next {
                st.active_is_reserve = is_reserve;
                st.active = id;
                st.active_next = SEGMENT_HEADER_LEN as u64;
                st.roll_requested = false;
                self.shared.work.notify_one(); // prepare the next standby
                return Ok(st);
            }
            if let Some((failure, _)) = &st.standby_failure {
                let failure = failure.clone();
                self.shared.work.notify_one(); // retry soon
                return Err(if failure.is_no_space() {
                    SpoolError::Full(failure)
                } else {
                    SpoolError::Io(failure)
                });
            }
            if st.closed {
                return Err(SpoolError::Closed);
            }
            st = self
                .shared
                .standby_ready
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent in a way that matters
        // more than refusing service, so poisoning is ignored.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counters so far.
    pub fn stats(&self) -> LogStats {
        self.lock().stats
    }

    /// A handle that reads the counters and health from another thread, at any time (a metrics
    /// scrape, a readiness probe).
    pub fn watch(&self) -> LogWatch {
        LogWatch(Arc::clone(&self.shared))
    }

    /// The segment currently receiving appends.
    pub fn active_segment(&self) -> u64 {
        self.lock().active
    }

    /// Bytes appended and not yet taken by the sync thread.
    pub fn pending_bytes(&self) -> usize {
        self.lock().pending_bytes
    }

    /// Commits what is pending, stops the sync thread and waits for it.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.lock().closed = true;
        self.shared.work.notify_all();
        self.shared.standby_ready.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SegmentLog {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An open segment as the writer thread holds it. The file is shared with the sync stage.
struct OpenSegment {
    file: Arc<File>,
    path: PathBuf,
    map: Option<SegmentMapMut>,
}

/// Written batches the sync stage may hold before the writer waits: bounds memory and keeps the
/// pipeline two deep, which is all the overlap there is to win.
const STAGE_QUEUE_MAX: usize = 2;

/// The second stage of the commit pipeline (policy `every-commit` with `pwrite`): it covers
/// written batches with `fdatasync` while the writer thread already copies the next batch into
/// the page cache, so the copy and the device flush overlap. When the stage is idle and nothing
/// else is pending, the writer syncs a batch itself instead, saving a thread hand-off at low load.
struct SyncStage {
    state: Mutex<StageState>,
    work: Condvar,
    idle: Condvar,
}

#[derive(Default)]
struct StageState {
    queue: Vec<WrittenBatch>,
    busy: bool,
    closed: bool,
}

/// A batch whose bytes are in the page cache and that waits for its `fdatasync`.
struct WrittenBatch {
    outcome: Arc<BatchOutcome>,
    records: u64,
    bytes: u64,
    /// The segment the batch ended in (earlier segments of the batch were synced at the change).
    segment: u64,
    /// End of what had been written to that segment when the batch was handed over.
    end: u64,
    file: Arc<File>,
    path: PathBuf,
}

impl SyncStage {
    fn lock(&self) -> MutexGuard<'_, StageState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self, shared: &Shared) {
        loop {
            let batches = {
                let mut st = self.lock();
                while st.queue.is_empty() && !st.closed {
                    st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.queue.is_empty() {
                    return;
                }
                st.busy = true;
                mem::take(&mut st.queue)
            };
            let mut files: Vec<(u64, &Arc<File>, &PathBuf)> = batches
                .iter()
                .map(|b| (b.segment, &b.file, &b.path))
                .collect();
            files.sort_by_key(|f| f.0);
            files.dedup_by_key(|f| f.0);
            let mut results: Vec<(u64, Result<(), SpoolError>)> = Vec::with_capacity(files.len());
            for (segment, file, path) in &files {
                let result = shared.check_healthy(*segment, IoOp::Sync).and_then(|()| {
                    shared.config.disk.sync_data(file, path).map_err(|e| {
                        shared.poison(*segment);
                        SpoolError::Io(IoFailure::new(IoOp::Sync, *path, &e))
                    })
                });
                let end = batches
                    .iter()
                    .filter(|b| b.segment == *segment)
                    .map(|b| b.end)
                    .max()
                    .unwrap_or(0);
                let result = result.and_then(|()| shared.confirm_sync(*segment, end));
                results.push((*segment, result));
            }
            let result_of = |segment: u64| {
                results
                    .iter()
                    .find(|r| r.0 == segment)
                    .map_or(Ok(()), |r| r.1.clone())
            };
            {
                let mut st = shared.lock();
                st.stats.syncs += files.len() as u64;
                for b in &batches {
                    st.note_result(&result_of(b.segment));
                }
                for b in batches.iter().filter(|b| result_of(b.segment).is_ok()) {
                    st.stats.commits += 1;
                    st.stats.records += b.records;
                    st.stats.bytes += b.bytes;
                }
            }
            for b in &batches {
                b.outcome.complete(result_of(b.segment));
            }
            self.lock().busy = false;
            self.idle.notify_all();
        }
    }

    /// Hands a written batch over, waiting while the queue is full.
    fn push(&self, batch: WrittenBatch) {
        let mut st = self.lock();
        while st.queue.len() >= STAGE_QUEUE_MAX {
            st = self.idle.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.queue.push(batch);
        drop(st);
        self.work.notify_one();
    }

    /// Waits until every handed-over batch is synced.
    fn drain(&self) {
        let mut st = self.lock();
        while st.busy || !st.queue.is_empty() {
            st = self.idle.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn is_idle(&self) -> bool {
        let st = self.lock();
        !st.busy && st.queue.is_empty()
    }
}

struct SyncThread {
    shared: Arc<Shared>,
    files: HashMap<u64, OpenSegment>,
    /// Segments written but not yet synced (Interval and None policies).
    unsynced: Vec<u64>,
    /// The segment the last chunk went to.
    last_segment: Option<u64>,
    /// Per segment: the end of what has been written to it.
    written_end: HashMap<u64, u64>,
    /// The pipelined sync stage and its thread, for `every-commit` with `pwrite`.
    stage: Option<(Arc<SyncStage>, JoinHandle<()>)>,
}

enum Work {
    CreateStandby(u64),
    Write(Batch),
    SyncInterval,
    Exit,
}

impl SyncThread {
    fn new(
        shared: Arc<Shared>,
        files: HashMap<u64, OpenSegment>,
    ) -> Result<SyncThread, SpoolError> {
        let pipelined = shared.config.sync == SyncPolicy::EveryCommit
            && shared.config.append_method == AppendMethod::Pwrite;
        let stage = if pipelined {
            let stage = Arc::new(SyncStage {
                state: Mutex::new(StageState::default()),
                work: Condvar::new(),
                idle: Condvar::new(),
            });
            let (st, sh) = (Arc::clone(&stage), Arc::clone(&shared));
            let handle = std::thread::Builder::new()
                .name(format!("spool-fsync-{}", shared.config.shard))
                .spawn(move || st.run(&sh))
                .map_err(|e| {
                    SpoolError::Io(IoFailure::new(IoOp::Create, "sync stage thread", &e))
                })?;
            Some((stage, handle))
        } else {
            None
        };
        Ok(SyncThread {
            shared,
            files,
            unsynced: Vec::new(),
            last_segment: None,
            written_end: HashMap::new(),
            stage,
        })
    }

    fn run(mut self) {
        let mut last_sync = Instant::now();
        loop {
            match self.next_work(last_sync) {
                Work::CreateStandby(id) => self.create_standby(id),
                Work::Write(batch) => {
                    let written = self.write_batch(&batch);
                    match self.shared.config.sync {
                        SyncPolicy::EveryCommit => self.commit(batch, written),
                        SyncPolicy::Interval(d) => {
                            if last_sync.elapsed() >= d {
                                let _ = self.sync_unsynced();
                                last_sync = Instant::now();
                            }
                            self.finish(batch, written);
                        }
                        SyncPolicy::None => self.finish(batch, written),
                    }
                }
                Work::SyncInterval => {
                    let _ = self.sync_unsynced();
                    last_sync = Instant::now();
                }
                Work::Exit => {
                    if let Some((stage, handle)) = self.stage.take() {
                        stage.lock().closed = true;
                        stage.work.notify_all();
                        let _ = handle.join();
                    }
                    let _ = self.sync_unsynced();
                    return;
                }
            }
        }
    }

    /// `every-commit`: syncs the written batch here, or hands it to the sync stage when that is
    /// already busy or more work waits (then the next batch is written meanwhile).
    fn commit(&mut self, batch: Batch, written: Result<(), SpoolError>) {
        let Some(segment) = batch.chunks.last().map(|c| c.segment) else {
            return self.finish(batch, written);
        };
        if written.is_err() {
            return self.finish(batch, written);
        }
        let hand_off = match &self.stage {
            Some((stage, _)) => {
                !stage.is_idle() || {
                    let st = self.lock_state();
                    st.pending.due(
                        &self.shared.config,
                        st.pending_bytes,
                        st.closed,
                        st.arrivals,
                    )
                }
            }
            None => false,
        };
        if !hand_off {
            let result = self.sync_segment(segment);
            return self.finish(batch, result);
        }
        let (Some((stage, _)), Some(seg)) = (&self.stage, self.files.get(&segment)) else {
            let result = self.sync_segment(segment);
            return self.finish(batch, result);
        };
        let written = WrittenBatch {
            outcome: Arc::clone(&batch.outcome),
            records: batch.records,
            bytes: batch.chunks.iter().map(|c| c.bytes.len() as u64).sum(),
            segment,
            end: self.written_end.get(&segment).copied().unwrap_or(0),
            file: Arc::clone(&seg.file),
            path: seg.path.clone(),
        };
        let stage = Arc::clone(stage);
        self.recycle(batch.chunks);
        stage.push(written);
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_work(&mut self, last_sync: Instant) -> Work {
        let shared = Arc::clone(&self.shared);
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let wait_left =
                st.pending
                    .wait_left(&shared.config, st.pending_bytes, st.closed, st.arrivals);
            let standby_wanted = st.standby.is_none() || st.reserve.is_none();
            // A message's batch goes before a standby's creation (milliseconds of fallocate
            // and syncs), gathering or not.
            let message_waits = st.pending.urgent_since.is_some() && standby_wanted;
            if wait_left == Some(Duration::ZERO) || message_waits {
                let batch = mem::replace(&mut st.pending, Batch::new());
                st.pending_bytes = 0;
                return Work::Write(batch);
            }
            if st.closed {
                return Work::Exit;
            }
            let now = Instant::now();
            let retry_due = st.standby_failure.as_ref().is_none_or(|(_, at)| now >= *at);
            if (st.standby.is_none() || st.reserve.is_none()) && retry_due {
                let id = st.next_id;
                st.next_id += 1;
                return Work::CreateStandby(id);
            }
            let mut timeout = Duration::from_secs(1);
            if let Some(left) = wait_left {
                timeout = timeout.min(left);
            }
            if let Some((_, at)) = &st.standby_failure {
                timeout = timeout.min(at.saturating_duration_since(now));
            }
            if let SyncPolicy::Interval(d) = shared.config.sync {
                if !self.unsynced.is_empty() {
                    let due = last_sync + d;
                    if now >= due {
                        return Work::SyncInterval;
                    }
                    timeout = timeout.min(due - now);
                }
            }
            st = shared
                .work
                .wait_timeout(st, timeout)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn create_standby(&mut self, id: u64) {
        let result = create_segment(&self.shared.config, id);
        let shared = Arc::clone(&self.shared);
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(seg) => {
                self.files.insert(id, seg);
                // The reserve is refilled first: it is what lets a full spool drain.
                if st.reserve.is_none() {
                    st.reserve = Some(id);
                } else {
                    st.standby = Some(id);
                }
                st.standby_failure = None;
            }
            Err(SpoolError::Full(f) | SpoolError::Io(f)) => {
                st.standby_failure = Some((f, Instant::now() + STANDBY_RETRY));
            }
            Err(other) => {
                let f = IoFailure {
                    op: IoOp::Create,
                    path: self.shared.config.dir.clone(),
                    kind: std::io::ErrorKind::Other,
                    message: other.to_string(),
                };
                st.standby_failure = Some((f, Instant::now() + STANDBY_RETRY));
            }
        }
        drop(st);
        self.shared.standby_ready.notify_all();
    }

    /// Writes every chunk in order. Before the first write into a new segment, everything
    /// written into the previous one is made durable (with `every-commit`), so that only the
    /// newest segment holding data can end in a torn write; recovery relies on it.
    fn write_batch(&mut self, batch: &Batch) -> Result<(), SpoolError> {
        let every_commit = self.shared.config.sync == SyncPolicy::EveryCommit;
        // Chunks are in segment order, so once this batch has written a chunk, the previous
        // segment at a change is one it wrote to (its tickets cover it).
        let mut wrote_any = false;
        for chunk in &batch.chunks {
            if every_commit && self.last_segment.is_some_and(|p| p != chunk.segment) {
                if let Some((stage, _)) = &self.stage {
                    stage.drain();
                }
                if let Some(prev) = self.last_segment {
                    let failed = self.lock_state().failed_segments.contains(&prev);
                    if failed && wrote_any {
                        // Part of this batch went into a segment that failed meanwhile: the
                        // whole batch fails (its bytes there are not durable).
                        self.shared.check_healthy(prev, IoOp::Sync)?;
                    }
                    // A failed previous segment that this batch did not write to is not synced
                    // again: its own tickets have failed already, and syncing it would fail
                    // every later batch too and wedge the log.
                    if self.files.contains_key(&prev) && !failed {
                        self.sync_segment(prev)?;
                    }
                }
            }

            self.last_segment = Some(chunk.segment);
            self.write_chunk(chunk)?;
            wrote_any = true;
            if !every_commit && !self.unsynced.contains(&chunk.segment) {
                self.unsynced.push(chunk.segment);
            }
        }
        Ok(())
    }

    fn segment(&mut self, id: u64) -> Result<&mut OpenSegment, SpoolError> {
        self.files
            .get_mut(&id)
            .ok_or_else(|| SpoolError::NotFound(format!("segment {id} is not open for writing")))
    }

    fn write_chunk(&mut self, chunk: &Chunk) -> Result<(), SpoolError> {
        self.shared.check_healthy(chunk.segment, IoOp::Write)?;
        let result = self.write_chunk_unchecked(chunk);
        match &result {
            Ok(()) => {
                let end = chunk.offset + chunk.bytes.len() as u64;
                let e = self.written_end.entry(chunk.segment).or_insert(0);
                *e = (*e).max(end);
                if self.shared.config.sync != SyncPolicy::EveryCommit {
                    // Acknowledged at the write under these (unsafe) policies: only what comes
                    // after a failure is untrusted.
                    let mut st = self.lock_state();
                    let d = st.durable_end.entry(chunk.segment).or_insert(0);
                    *d = (*d).max(end);
                }
            }
            Err(_) => self.shared.poison(chunk.segment),
        }
        result
    }

    fn write_chunk_unchecked(&mut self, chunk: &Chunk) -> Result<(), SpoolError> {
        let method = self.shared.config.append_method;
        let disk = Arc::clone(&self.shared.config.disk);
        let seg = self.segment(chunk.segment)?;
        match method {
            AppendMethod::Pwrite => disk
                .write_at(&seg.file, &seg.path, &chunk.bytes, chunk.offset)
                .map_err(io_err(IoOp::Write, &seg.path)),
            AppendMethod::MmapMsync => {
                let path = seg.path.clone();
                let map = match &mut seg.map {
                    Some(m) => m,
                    None => seg.map.insert(SegmentMapMut::open(&seg.file, &path)?),
                };
                map.write_and_sync(chunk.offset as usize, &chunk.bytes, &path)
            }
        }
    }

    fn sync_segment(&mut self, id: u64) -> Result<(), SpoolError> {
        self.shared.check_healthy(id, IoOp::Sync)?;
        let method = self.shared.config.append_method;
        let disk = Arc::clone(&self.shared.config.disk);
        let seg = self.segment(id)?;
        if method == AppendMethod::Pwrite {
            if let Err(e) = disk.sync_data(&seg.file, &seg.path) {
                let failure = SpoolError::Io(IoFailure::new(IoOp::Sync, &seg.path, &e));
                self.shared.poison(id);
                return Err(failure);
            }
        }
        let end = self.written_end.get(&id).copied().unwrap_or(0);
        self.lock_state().stats.syncs += 1;
        self.shared.confirm_sync(id, end)
    }

    fn sync_unsynced(&mut self) -> Result<(), SpoolError> {
        let ids = mem::take(&mut self.unsynced);
        let mut result = Ok(());
        for id in ids {
            if let Some(seg) = self.files.get(&id) {
                if let Err(e) = self.shared.config.disk.sync_data(&seg.file, &seg.path) {
                    result = Err(SpoolError::Io(IoFailure::new(IoOp::Sync, &seg.path, &e)));
                }
            }
        }
        result
    }

    /// Completes the batch's tickets with `result` and recycles its buffers.
    fn finish(&mut self, batch: Batch, result: Result<(), SpoolError>) {
        let bytes: u64 = batch.chunks.iter().map(|c| c.bytes.len() as u64).sum();
        {
            let mut st = self.lock_state();
            st.note_result(&result);
            if result.is_ok() {
                st.stats.commits += 1;
                st.stats.records += batch.records;
                st.stats.bytes += bytes;
            }
        }
        self.recycle(batch.chunks);
        batch.outcome.complete(result);
    }

    /// Returns batch buffers for reuse and closes files that will not be written again.
    fn recycle(&mut self, chunks: Vec<Chunk>) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        for mut chunk in chunks {
            if st.spare.len() < SPARE_BUFFERS_MAX
                && chunk.bytes.capacity() <= self.shared.config.pending_bytes_max * 2
            {
                chunk.bytes.clear();
                st.spare.push(chunk.bytes);
            }
        }
        // Keep what may still be written: the active and standby segments, segments the next
        // batch already refers to, segments awaiting an interval sync, and the last one written
        // (a roll syncs it). The sync stage holds its own handles.
        let keep = [Some(st.active), st.standby, st.reserve, self.last_segment];
        let unsynced = &self.unsynced;
        let pending = &st.pending.chunks;
        self.files.retain(|id, _| {
            keep.contains(&Some(*id))
                || unsynced.contains(id)
                || pending.iter().any(|c| c.segment == *id)
        });
    }
}

/// Reads [`UNTRUSTED_FILE`] (missing: none). Lines that do not parse are skipped.
pub fn read_untrusted(dir: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(dir.join(UNTRUSTED_FILE)).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (seg, off) = l.split_once(' ')?;
            Some((u64::from_str_radix(seg, 16).ok()?, off.trim().parse().ok()?))
        })
        .collect()
}

/// Replaces [`UNTRUSTED_FILE`] atomically and durably (temporary file, sync, rename, directory
/// sync).
pub(crate) fn write_untrusted(dir: &Path, entries: &[(u64, u64)]) -> Result<(), SpoolError> {
    use std::io::Write;
    let path = dir.join(UNTRUSTED_FILE);
    let tmp = dir.join(format!("{UNTRUSTED_FILE}.tmp"));
    let text: String = entries
        .iter()
        .map(|(s, o)| format!("{s:016x} {o}\n"))
        .collect();
    let mut f = File::create(&tmp).map_err(io_err(IoOp::Create, &tmp))?;
    f.write_all(text.as_bytes())
        .map_err(io_err(IoOp::Write, &tmp))?;
    f.sync_all().map_err(io_err(IoOp::Sync, &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(IoOp::Rename, &tmp))?;
    sync_dir(dir)
}

/// Creates a segment atomically: a `.seg.tmp` file is preallocated, given its header, synced,
/// renamed into place, and the directory is synced. A crash leaves either no segment or a
/// complete one (plus perhaps a `.tmp` file, which recovery deletes).
fn create_segment(config: &LogConfig, id: u64) -> Result<OpenSegment, SpoolError> {
    let path = config.dir.join(segment_file_name(id));
    let tmp = config.dir.join(format!("{id:016x}{TEMP_SUFFIX}"));
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(IoOp::Create, &tmp))?;
        config
            .disk
            .preallocate(&file, &tmp, config.segment_bytes)
            .map_err(|e| {
                let failure = IoFailure::new(IoOp::Preallocate, &tmp, &e);
                if failure.is_no_space() {
                    SpoolError::Full(failure)
                } else {
                    SpoolError::Io(failure)
                }
            })?;
        let header = SegmentHeader {
            format_version: FORMAT_VERSION,
            segment_id: id,
            created_micros: now_micros(),
            shard: config.shard,
        };
        config
            .disk
            .write_at(&file, &tmp, &header.encode(), 0)
            .map_err(io_err(IoOp::Write, &tmp))?;
        config
            .disk
            .sync_data(&file, &tmp)
            .map_err(io_err(IoOp::Sync, &tmp))?;
        file.sync_all().map_err(io_err(IoOp::Sync, &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(IoOp::Rename, &tmp))?;
        sync_dir(&config.dir)?;
        Ok(file)
    })();
    match result {
        Ok(file) => Ok(OpenSegment {
            file: Arc::new(file),
            path,
            map: None,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// `fsync` of a directory, so that a created, renamed or deleted entry is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(IoOp::SyncDir, dir))
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The shared completion of one group commit.
#[derive(Default)]
struct BatchOutcome {
    state: Mutex<OutcomeState>,
    done: Condvar,
}

#[derive(Default)]
struct OutcomeState {
    result: Option<Result<(), SpoolError>>,
    wakers: Vec<Waker>,
}

impl BatchOutcome {
    fn lock(&self) -> MutexGuard<'_, OutcomeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn complete(&self, result: Result<(), SpoolError>) {
        let wakers = {
            let mut st = self.lock();
            st.result = Some(result);
            mem::take(&mut st.wakers)
        };
        self.done.notify_all();
        for w in wakers {
            w.wake();
        }
    }
}

/// A claim on the commit of one appended record.
///
/// Wait for it with [`CommitTicket::wait`] (blocking) or `.await` (any executor: the sync
/// thread wakes the task). Dropping a ticket does not cancel the append.
#[must_use = "a record is durable only when its ticket completes"]
#[derive(Clone)]
pub struct CommitTicket {
    outcome: Arc<BatchOutcome>,
    location: Location,
}

impl CommitTicket {
    /// Where the record was placed (valid to read only after a successful commit).
    pub fn location(&self) -> Location {
        self.location
    }

    /// The commit's result, if it is known yet.
    pub fn try_result(&self) -> Option<Result<Location, SpoolError>> {
        let st = self.outcome.lock();
        st.result
            .as_ref()
            .map(|r| r.clone().map(|()| self.location))
    }

    /// Blocks the calling thread until the commit is known.
    pub fn wait(self) -> Result<Location, SpoolError> {
        let mut st = self.outcome.lock();
        loop {
            if let Some(r) = &st.result {
                return r.clone().map(|()| self.location);
            }
            st = self
                .outcome
                .done
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Future for CommitTicket {
    type Output = Result<Location, SpoolError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = self.outcome.lock();
        if let Some(r) = &st.result {
            return Poll::Ready(r.clone().map(|()| self.location));
        }
        if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            st.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Outcomes, QueueId};

    fn rec(i: u128) -> Record<'static> {
        Record::Outcomes(Outcomes {
            queue_id: QueueId(i),
            at_micros: 1,
            entries: vec![],
        })
    }

    fn bare_message(body: &[u8]) -> crate::codec::Message<'_> {
        crate::codec::Message {
            queue_id: QueueId(1),
            received_at_micros: 0,
            flags: 0,
            dsn_ret: Default::default(),
            tenant: "",
            sender: "",
            envid: "",
            recipients: vec![],
            body,
        }
    }

    fn small_config(dir: &Path) -> LogConfig {
        LogConfig {
            segment_bytes: SEGMENT_BYTES_MIN,
            ..LogConfig::new(dir)
        }
    }

    #[test]
    fn tickets_complete_in_order_with_distinct_locations() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(small_config(dir.path()), 1, false, 0, &[]).unwrap();
        let tickets: Vec<_> = (0..100).map(|i| log.append(&rec(i)).unwrap()).collect();
        let locs: Vec<_> = tickets.into_iter().map(|t| t.wait().unwrap()).collect();
        for w in locs.windows(2) {
            assert!(w[0] < w[1]);
        }
        let stats = log.stats();
        assert_eq!(stats.records, 100);
        assert!(stats.commits >= 1 && stats.commits <= 100);
    }

    #[test]
    fn rolls_to_a_new_segment_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(small_config(dir.path()), 1, false, 0, &[]).unwrap();
        let body = vec![b'x'; 300 << 10];
        let m = bare_message(&body);
        let locs: Vec<_> = (0..8)
            .map(|_| {
                log.append(&Record::Message(m.clone()))
                    .unwrap()
                    .wait()
                    .unwrap()
            })
            .collect();
        assert!(locs.last().unwrap().segment > 1, "{locs:?}");
    }

    /// One failed write or fdatasync fails its batch only: the log moves to a fresh segment and
    /// commits again, and its watch reports the failure until then.
    #[test]
    fn one_io_error_fails_one_batch_and_the_log_goes_on_in_a_fresh_segment() {
        use crate::disk::{DiskOp, FaultyDisk};
        for op in [DiskOp::Write, DiskOp::Sync] {
            let dir = tempfile::tempdir().unwrap();
            let disk = FaultyDisk::new();
            let config = LogConfig {
                disk: disk.clone(),
                ..small_config(dir.path())
            };
            let log = SegmentLog::open(config, 1, false, 0, &[]).unwrap();
            let watch = log.watch();
            let first = log.append(&rec(1)).unwrap().wait().unwrap();
            assert_eq!(watch.unhealthy(), None);
            disk.fail_next(op, 0);
            let failed = log.append(&rec(2)).unwrap().wait();
            assert!(
                matches!(failed, Err(SpoolError::Io(_))),
                "{op:?}: {failed:?}"
            );
            assert!(
                watch.unhealthy().is_some(),
                "{op:?}: the failure is reported"
            );
            for i in 3..20 {
                let loc = log.append(&rec(i)).unwrap().wait();
                let loc = loc.unwrap_or_else(|e| panic!("{op:?}: append {i} after one error: {e}"));
                assert!(loc.segment > first.segment, "{op:?}: a fresh segment");
            }
            assert_eq!(watch.unhealthy(), None, "{op:?}: healthy again");
            assert_eq!(disk.faults_injected(), 1);
        }
    }

    #[test]
    fn oversized_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(small_config(dir.path()), 1, false, 0, &[]).unwrap();
        let body = vec![0u8; SEGMENT_BYTES_MIN as usize];
        let m = bare_message(&body);
        assert!(matches!(
            log.append(&Record::Message(m)),
            Err(SpoolError::RecordTooLarge { .. })
        ));
    }

    #[test]
    fn appends_after_close_are_refused_and_pending_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(small_config(dir.path()), 1, false, 0, &[]).unwrap();
        let t = log.append(&rec(1)).unwrap();
        let shared = Arc::clone(&log.shared);
        log.close();
        assert!(t.wait().is_ok());
        assert!(shared.state.lock().unwrap().closed);
    }

    /// An outcome does not start a commit of its own before `outcome_commit_delay`: it rides
    /// on the commit a message starts, and alone it is committed once the delay is over.
    #[test]
    fn outcomes_ride_on_the_next_message_commit() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            outcome_commit_delay: OUTCOME_COMMIT_DELAY_MAX,
            ..small_config(dir.path())
        };
        let log = SegmentLog::open(config, 1, false, 0, &[]).unwrap();
        let outcome = log.append(&rec(1)).unwrap();
        assert!(outcome.try_result().is_none(), "committed before its delay");
        assert_eq!(log.stats().commits, 0);
        let message = log.append(&Record::Message(bare_message(b"x"))).unwrap();
        message.wait().unwrap();
        assert!(
            matches!(outcome.try_result(), Some(Ok(_))),
            "the message's commit covers the outcome before it"
        );
        assert_eq!(log.stats().commits, 1);

        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            outcome_commit_delay: Duration::from_millis(20),
            ..small_config(dir.path())
        };
        let log = SegmentLog::open(config, 1, false, 0, &[]).unwrap();
        let started = Instant::now();
        log.append(&rec(1)).unwrap().wait().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(20));
    }

    /// Outcomes waiting for their delay never fill the pending bound: at half of it (here
    /// 32 KiB) they are committed at once.
    #[test]
    fn waiting_outcomes_are_committed_before_they_fill_the_pending_bound() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            outcome_commit_delay: OUTCOME_COMMIT_DELAY_MAX,
            pending_bytes_max: 64 << 10,
            ..small_config(dir.path())
        };
        let log = SegmentLog::open(config, 1, false, 0, &[]).unwrap();
        let started = Instant::now();
        let mut last = None;
        let mut appended = 0usize;
        while appended < 32 << 10 {
            let record = rec(appended as u128);
            appended += record.frame_len();
            last = Some(log.append(&record).unwrap());
            if appended == record.frame_len() {
                // Lets the writer go back to waiting for the delay, so that the crossing has to
                // wake it (if it has not gone back yet, the test is only weaker, never wrong).
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        last.unwrap().wait().unwrap();
        assert!(
            started.elapsed() < OUTCOME_COMMIT_DELAY_MAX * 9 / 10,
            "waited for the delay: {:?}",
            started.elapsed()
        );
    }

    /// How long a pending batch may wait: messages arriving at least four times per gather
    /// window are gathered (up to the window after the first, `GATHER_RECORDS_MAX` records, or
    /// until none came for twice the mean gap); sparse ones are committed at once; outcomes
    /// alone wait for their delay.
    #[test]
    fn a_busy_log_gathers_messages_for_at_most_the_window() {
        let config = LogConfig {
            commit_gather: Duration::from_millis(10),
            outcome_commit_delay: Duration::from_secs(60),
            ..LogConfig::new("/nonexistent")
        };
        let mut batch = Batch::new();
        let busy = Arrivals {
            gap: Duration::from_millis(1),
            last: None,
        };
        let sparse = Arrivals {
            gap: Duration::from_millis(6),
            last: None,
        };
        assert_eq!(batch.wait_left(&config, 0, false, busy), None, "empty");
        batch.records = 1;
        batch.opened = Some(Instant::now());
        let left = batch.wait_left(&config, 100, false, busy).unwrap();
        assert!(left > Duration::from_secs(50), "outcomes alone: {left:?}");
        assert_eq!(
            batch.wait_left(&config, 100, true, busy),
            Some(Duration::ZERO),
            "closing commits everything"
        );
        assert_eq!(
            batch.wait_left(&config, DEFERRED_BYTES_MAX, false, busy),
            Some(Duration::ZERO),
            "too many outcome bytes"
        );
        batch.urgent_since = Some(Instant::now());
        let left = batch.wait_left(&config, 100, false, busy).unwrap();
        assert!(
            left > Duration::ZERO && left <= Duration::from_millis(10),
            "{left:?}"
        );
        assert_eq!(
            batch.wait_left(&config, 100, false, sparse),
            Some(Duration::ZERO),
            "sparse messages are not held"
        );
        batch.urgent_since = Some(Instant::now());
        let quiet = Arrivals {
            last: Some(Instant::now() - Duration::from_millis(3)),
            ..busy
        };
        assert_eq!(
            batch.wait_left(&config, 100, false, quiet),
            Some(Duration::ZERO),
            "no message for twice the mean gap: the senders all wait on this commit"
        );
        batch.urgent_since = Some(Instant::now() - Duration::from_millis(11));
        assert_eq!(
            batch.wait_left(&config, 100, false, busy),
            Some(Duration::ZERO),
            "the window is over"
        );
        batch.urgent_since = Some(Instant::now());
        batch.records = GATHER_RECORDS_MAX;
        assert_eq!(
            batch.wait_left(&config, 100, false, busy),
            Some(Duration::ZERO),
            "a full batch"
        );
        let off = LogConfig {
            commit_gather: Duration::ZERO,
            ..config.clone()
        };
        batch.records = 1;
        assert_eq!(
            batch.wait_left(&off, 100, false, busy),
            Some(Duration::ZERO)
        );
        let unsynced = LogConfig {
            sync: SyncPolicy::None,
            ..config
        };
        assert_eq!(
            batch.wait_left(&unsynced, 100, false, busy),
            Some(Duration::ZERO),
            "no fdatasync to save"
        );
    }

    /// Messages appended a millisecond apart (each alone would be its own commit) share commits
    /// when gathering is on; every ticket still completes.
    #[test]
    fn gathered_messages_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            commit_gather: Duration::from_millis(10),
            ..small_config(dir.path())
        };
        let log = SegmentLog::open(config, 1, false, 0, &[]).unwrap();
        let m = bare_message(b"x");
        let mut tickets = Vec::new();
        for _ in 0..300 {
            tickets.push(log.append(&Record::Message(m.clone())).unwrap());
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in tickets {
            t.wait().unwrap();
        }
        let stats = log.stats();
        assert_eq!(stats.records, 300);
        // The first ~40 appends bring the moving mean down from its start of 1 s; the rest
        // arrive ~10 per window (~3 if the machine is busy and sleeps run long).
        assert!(stats.commits <= 150, "{stats:?}");
    }

    #[test]
    fn bad_config_names_the_key() {
        let c = LogConfig {
            segment_bytes: 5,
            ..LogConfig::new("/nonexistent")
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("segment_bytes"), "{err}");
    }
}
