//! The spool of one shard: the segment log plus the in-memory index of live messages, recovery
//! on open, zero-copy reads of message bodies, reclamation and compaction.
//!
//! Main type: [`Spool`]. One shard thread owns it (`&mut self` for changes); appends return
//! [`CommitTicket`]s that complete on the log's sync thread.
//!
//! # Index
//! For each live message (one with a recipient not yet terminal) the index keeps where its
//! current base record lies (the `Message`, or the latest `Rehomed` copy), its receive time and
//! 16 bytes of state per recipient. Addresses and bodies stay on disk and are read through the
//! segment maps. A message leaves the index when its last recipient becomes terminal.
//!
//! # Reclamation
//! Segments are deleted oldest first, and only when they hold no live base record. Deleting in
//! prefix order is what keeps recovery correct without tombstones: a surviving base record never
//! loses the later outcome records that apply to it, because those sit in the same or newer
//! segments. Compaction keeps one long-lived message from pinning everything behind it: the
//! oldest segment's live messages are re-appended as `Rehomed` records (state included) when
//! the spool holds more than `2 × ⌈live bytes / segment_bytes⌉ + 2` segments, or when the
//! oldest segment is older than `compact_age`. Hence the bound stated in docs/spool-format.md:
//! after reclamation settles, dead records occupy at most about as much disk as live ones plus
//! two segments (active and standby).
//!
//! # Durability
//! Index updates happen at append time; callers act on them (answer `250`, start a delivery)
//! only once the ticket completes. A segment is never deleted while a compaction copy of one of
//! its messages is uncommitted.

use std::cell::OnceCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::codec::{Message, OutcomeEntry, Outcomes, QueueId, RcptState, Record};
use crate::error::{IoOp, SpoolError, io_err};
use crate::log::{
    CommitTicket, Location, LogConfig, LogStats, LogWatch, SegmentLog, now_micros, sync_dir,
};
use crate::mmap::SegmentMap;
use crate::recovery::{RecoveryReport, recover_dir};
use crate::segment::segment_file_name;

/// Default age after which a segment's live messages are compacted: one hour.
pub const COMPACT_AGE_DEFAULT: Duration = Duration::from_secs(3600);

/// Configuration of one shard's spool.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub log: LogConfig,
    /// A sealed segment older than this has its live messages re-appended (1 min ..= 7 days).
    pub compact_age: Duration,
}

impl SpoolConfig {
    /// Defaults for a spool in `dir`.
    pub fn new(dir: impl Into<std::path::PathBuf>) -> SpoolConfig {
        SpoolConfig {
            log: LogConfig::new(dir),
            compact_age: COMPACT_AGE_DEFAULT,
        }
    }

    /// Checks every bound; the message names the key.
    pub fn validate(&self) -> Result<(), SpoolError> {
        self.log.validate()?;
        if !(Duration::from_secs(60)..=Duration::from_secs(7 * 86400)).contains(&self.compact_age) {
            return Err(SpoolError::Config(
                "compact_age must be within 60 s ..= 7 days".into(),
            ));
        }
        Ok(())
    }
}

/// Delivery state of one recipient in the index (32 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptStatus {
    pub state: RcptState,
    pub attempts: u32,
    pub next_attempt_micros: u64,
    /// The last reply, kept so that compaction can carry it into the `Rehomed` copy (bounces
    /// and delay notices quote it).
    pub last_reply: Option<Box<str>>,
}

impl RcptStatus {
    /// A recipient not yet attempted.
    pub const PENDING: RcptStatus = RcptStatus {
        state: RcptState::Pending,
        attempts: 0,
        next_attempt_micros: 0,
        last_reply: None,
    };

    fn from_outcome(e: &OutcomeEntry<'_>) -> RcptStatus {
        RcptStatus {
            state: e.state,
            attempts: e.attempts,
            next_attempt_micros: e.next_attempt_micros,
            last_reply: (!e.reply.is_empty()).then(|| e.reply.into()),
        }
    }
}

/// A message with at least one non-terminal recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveMessage {
    /// The record holding envelope and body.
    pub base: Location,
    pub received_at_micros: u64,
    pub rcpts: Box<[RcptStatus]>,
}

impl LiveMessage {
    fn is_terminal(&self) -> bool {
        self.rcpts.iter().all(|r| r.state.is_terminal())
    }
}

struct SegmentEntry {
    /// This shard's handle on the segment's map, shared with other shards through the
    /// [`SpoolReader`] registry.
    map: OnceCell<Arc<SegmentMap>>,
    live_bases: u32,
    live_bytes: u64,
    created_micros: u64,
}

impl SegmentEntry {
    fn new(created_micros: u64) -> SegmentEntry {
        SegmentEntry {
            map: OnceCell::new(),
            live_bases: 0,
            live_bytes: 0,
            created_micros,
        }
    }
}

struct OutcomeInFlight {
    ticket: CommitTicket,
    queue_id: QueueId,
    /// (recipient index, state before, state after).
    changes: Vec<(usize, RcptStatus, RcptStatus)>,
}

struct Rehome {
    ticket: CommitTicket,
    queue_id: QueueId,
    old: Location,
}

/// What one [`Spool::reclaim`] call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    pub segments_deleted: u64,
    pub messages_rehomed: u64,
    /// Live messages of the compacted segment that could not be moved (unreadable base, or a
    /// copy too large for a segment); they keep that segment on disk.
    pub messages_not_rehomed: u64,
    /// Compaction copies still waiting for commit (no segment is deleted meanwhile).
    pub rehomes_pending: u64,
}

/// Sizes of the spool, for metrics and the reclamation bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolUsage {
    /// Segment files holding records (the standby is not counted).
    pub segments: u64,
    pub bytes_on_disk: u64,
    /// Frame bytes of live base records.
    pub live_bytes: u64,
    pub live_messages: u64,
}

/// Figures a spool publishes as they change, readable from any thread ([`Spool::watch`]).
#[derive(Default, Debug)]
struct Published {
    segments: AtomicU64,
    live_messages: AtomicU64,
    live_bytes: AtomicU64,
}

/// A spool's figures and health, read live from another thread (metrics scrape, `/readyz`).
#[derive(Clone)]
pub struct SpoolWatch {
    log: LogWatch,
    published: Arc<Published>,
    segment_bytes: u64,
}

impl SpoolWatch {
    /// Sizes as of the spool's last change.
    pub fn usage(&self) -> SpoolUsage {
        let segments = self.published.segments.load(Ordering::Relaxed);
        SpoolUsage {
            segments,
            bytes_on_disk: segments * self.segment_bytes,
            live_bytes: self.published.live_bytes.load(Ordering::Relaxed),
            live_messages: self.published.live_messages.load(Ordering::Relaxed),
        }
    }

    /// Log counters as of now.
    pub fn log_stats(&self) -> LogStats {
        self.log.stats()
    }

    /// Why the spool cannot commit right now, if it cannot.
    pub fn unhealthy(&self) -> Option<String> {
        self.log.unhealthy()
    }
}

/// One shard's spool. See the module docs.
pub struct Spool {
    config: SpoolConfig,
    log: SegmentLog,
    segments: BTreeMap<u64, SegmentEntry>,
    messages: HashMap<QueueId, LiveMessage>,
    live_bytes: u64,
    counter: u64,
    rehoming: Vec<Rehome>,
    /// Messages whose last outcome makes them terminal, until that outcome is committed.
    finishing: Vec<(CommitTicket, QueueId)>,
    /// Outcome records not yet committed, with each recipient's state before and after: a
    /// failed commit puts the state back, so that nothing unacknowledged is ever copied into
    /// a compaction record as if it were durable.
    outcomes_in_flight: Vec<OutcomeInFlight>,
    /// Per message: outcome records in flight (compaction leaves such messages for later).
    in_flight: HashMap<QueueId, u32>,
    /// Segment maps shared with other shards ([`SpoolReader`]).
    registry: MapRegistry,
    published: Arc<Published>,
    /// Held while the spool is open (dropped after the log has closed).
    _lock: crate::lock::DirLock,
}

impl Spool {
    /// Recovers the spool directory and opens a fresh active segment after the newest one.
    pub fn open(config: SpoolConfig) -> Result<(Spool, RecoveryReport), SpoolError> {
        config.validate()?;
        // Before anything is read or repaired: a live spool is never recovered under its owner.
        let lock = crate::lock::DirLock::acquire(&config.log.dir)?;
        let mut builder = IndexBuilder::default();
        let untrusted = crate::log::read_untrusted(&config.log.dir);
        let (recovered, report) = recover_dir(
            &config.log.dir,
            &*config.log.disk,
            &untrusted,
            |loc, rec| builder.apply(loc, rec),
        )?;
        // Entries for segments that are gone are dropped (their ids are never used again).
        let kept: Vec<(u64, u64)> = untrusted
            .iter()
            .copied()
            .filter(|(s, _)| recovered.iter().any(|r| r.id == *s))
            .collect();
        if kept.len() != untrusted.len() {
            crate::log::write_untrusted(&config.log.dir, &kept)?;
        }
        let mut segments = BTreeMap::new();
        let registry: MapRegistry = Arc::default();
        let mut next_id: u64 = 1;
        for q in &report.quarantined {
            let name = q.file_stem().and_then(|n| n.to_str()).unwrap_or("");
            if let Ok(id) = u64::from_str_radix(name, 16) {
                next_id = next_id.max(id.saturating_add(1));
            }
        }
        // The previous run's standby and reserve (the newest segments, empty and intact) become
        // the active segment and the spares again: a restart on a full disk still has room.
        let mut empties: Vec<u64> = recovered
            .iter()
            .rev()
            .take_while(|s| {
                !kept.iter().any(|(id, _)| *id == s.id)
                    && s.records == 0
                    && s.header.is_some()
                    && s.end == crate::segment::SEGMENT_HEADER_LEN as u64
                    && report.torn_tail.as_ref().is_none_or(|t| t.segment != s.id)
                    && s.map.bytes().len() as u64 == config.log.segment_bytes
            })
            .take(3)
            .map(|s| s.id)
            .collect();
        empties.reverse();
        let tail = recovered
            .last()
            .filter(|s| {
                s.header.is_some()
                    && s.map.bytes().len() as u64 == config.log.segment_bytes
                    && s.end + 4096 <= config.log.segment_bytes
                    && !kept.iter().any(|(id, _)| *id == s.id)
            })
            .map(|s| (s.id, s.end));
        for seg in recovered {
            next_id = next_id.max(seg.id.saturating_add(1));
            let created = seg.header.map_or(0, |h| h.created_micros);
            let entry = SegmentEntry::new(created);
            let map = Arc::new(seg.map);
            registry
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(seg.id, Arc::clone(&map));
            let _ = entry.map.set(map);
            segments.insert(seg.id, entry);
        }
        let mut live_bytes = 0;
        for m in builder.messages.values() {
            if let Some(e) = segments.get_mut(&m.base.segment) {
                e.live_bases += 1;
                e.live_bytes += u64::from(m.base.len);
            }
            live_bytes += u64::from(m.base.len);
        }
        if next_id == u64::MAX {
            return Err(SpoolError::Config(
                "segment ids are exhausted (u64::MAX)".into(),
            ));
        }
        // Without one, the newest segment is appended to past its last record when it has room,
        // for records other than new messages only (it may have been the reserve): on a full
        // disk, outcomes can then still be journaled after a restart.
        let tail = tail.filter(|(id, _)| id.saturating_add(1) == next_id);
        let header_end = crate::segment::SEGMENT_HEADER_LEN as u64;
        let (first, reuse, offset, spares) = match (empties.split_first(), tail) {
            (Some((&id, spares)), _)
                if empties.last().map(|l| l.saturating_add(1)) == Some(next_id) =>
            {
                (id, true, header_end, spares)
            }
            (None, Some((id, end))) => (id, true, end, &[][..]),
            _ => (next_id, false, header_end, &[][..]),
        };
        let log = SegmentLog::open(config.log.clone(), first, reuse, offset, spares)?;
        let spool = Spool {
            config,
            log,
            segments,
            messages: builder.messages,
            live_bytes,
            counter: random_u64() & COUNTER_MASK,
            rehoming: Vec::new(),
            finishing: Vec::new(),
            outcomes_in_flight: Vec::new(),
            in_flight: HashMap::new(),
            registry,
            published: Arc::default(),
            _lock: lock,
        };
        spool.publish();
        Ok((spool, report))
    }

    /// A handle on this spool's figures and health for other threads.
    pub fn watch(&self) -> SpoolWatch {
        SpoolWatch {
            log: self.log.watch(),
            published: Arc::clone(&self.published),
            segment_bytes: self.config.log.segment_bytes,
        }
    }

    /// Publishes the sizes to watchers (a few relaxed stores; called after every change).
    fn publish(&self) {
        let p = &self.published;
        p.segments
            .store(self.segments.len() as u64, Ordering::Relaxed);
        p.live_messages
            .store(self.messages.len() as u64, Ordering::Relaxed);
        p.live_bytes.store(self.live_bytes, Ordering::Relaxed);
    }

    /// The configuration in force.
    pub fn config(&self) -> &SpoolConfig {
        &self.config
    }

    /// A new queue id for a message received at `received_at_micros`.
    pub fn next_queue_id(&mut self, received_at_micros: u64) -> QueueId {
        self.counter = (self.counter + 1) & COUNTER_MASK;
        let low = (u64::from(self.config.log.shard) << 48) | self.counter;
        QueueId((u128::from(received_at_micros) << 64) | u128::from(low))
    }

    /// Appends an accepted message and indexes it. Answer the client only when the ticket
    /// completes; if it fails, call [`Spool::abandon`].
    pub fn accept(&mut self, message: &Message<'_>) -> Result<CommitTicket, SpoolError> {
        if self.messages.contains_key(&message.queue_id) {
            return Err(SpoolError::Config(format!(
                "queue id {} is already live",
                message.queue_id
            )));
        }
        let ticket = self.log.append(&Record::Message(message.clone()))?;
        let rcpts = message
            .recipients
            .iter()
            .map(|_| RcptStatus::PENDING)
            .collect();
        let live = LiveMessage {
            base: ticket.location(),
            received_at_micros: message.received_at_micros,
            rcpts,
        };
        self.add_base(live.base);
        if live.is_terminal() {
            // No recipients: nothing to deliver; kept on disk only until reclaimed.
            self.remove_base(live.base);
        } else {
            self.messages.insert(message.queue_id, live);
        }
        self.publish();
        Ok(ticket)
    }

    /// Forgets a message whose commit failed (the client was not told `250` and will send it
    /// again). A failed commit may still have reached the disk, so every recipient is also
    /// journaled as cancelled (best effort, not awaited): after a restart the stored copy is
    /// then terminal and never delivered next to the client's retry.
    pub fn abandon(&mut self, queue_id: QueueId) {
        let Some(m) = self.messages.remove(&queue_id) else {
            return;
        };
        self.remove_base(m.base);
        let entries: Vec<OutcomeEntry<'_>> = (0..m.rcpts.len() as u32)
            .map(|rcpt_index| OutcomeEntry {
                rcpt_index,
                state: RcptState::Cancelled,
                attempts: 0,
                next_attempt_micros: 0,
                reply: "commit failed; the client was not acknowledged",
            })
            .collect();
        let record = Record::Outcomes(Outcomes {
            queue_id,
            at_micros: now_micros(),
            entries,
        });
        if let Ok(ticket) = self.log.append(&record) {
            self.track(ticket.location());
        }
        self.publish();
    }

    /// Journals outcomes for recipients of a live message and applies them to the index.
    pub fn record_outcomes(
        &mut self,
        queue_id: QueueId,
        at_micros: u64,
        entries: &[OutcomeEntry<'_>],
    ) -> Result<CommitTicket, SpoolError> {
        let live = self
            .messages
            .get(&queue_id)
            .ok_or_else(|| SpoolError::NotFound(queue_id.to_string()))?;
        if let Some(e) = entries
            .iter()
            .find(|e| e.rcpt_index as usize >= live.rcpts.len())
        {
            return Err(SpoolError::NotFound(format!(
                "{queue_id} recipient {}",
                e.rcpt_index
            )));
        }
        let record = Record::Outcomes(Outcomes {
            queue_id,
            at_micros,
            entries: entries.to_vec(),
        });
        let ticket = self.log.append(&record)?;
        let live = self
            .messages
            .get_mut(&queue_id)
            .expect("checked above, nothing removed since");
        let mut changes = Vec::with_capacity(entries.len());
        for e in entries {
            let i = e.rcpt_index as usize;
            let new = RcptStatus::from_outcome(e);
            let old = std::mem::replace(&mut live.rcpts[i], new.clone());
            changes.push((i, old, new));
        }
        let terminal = live.is_terminal();
        *self.in_flight.entry(queue_id).or_insert(0) += 1;
        self.outcomes_in_flight.push(OutcomeInFlight {
            ticket: ticket.clone(),
            queue_id,
            changes,
        });
        self.track(ticket.location());
        if terminal {
            // The message leaves the index only once this record is durable (see `settle`):
            // until then its segment must not be reclaimed.
            self.finishing.push((ticket.clone(), queue_id));
        }
        self.publish();
        Ok(ticket)
    }

    /// The index entry of a live message.
    pub fn get(&self, queue_id: QueueId) -> Option<&LiveMessage> {
        self.messages.get(&queue_id)
    }

    /// Every live message, in no particular order (messages whose last outcome is still being
    /// committed are left out: nothing remains to deliver for them).
    pub fn live(&self) -> impl Iterator<Item = (QueueId, &LiveMessage)> {
        self.messages
            .iter()
            .filter(|(_, m)| !m.is_terminal())
            .map(|(id, m)| (*id, m))
    }

    /// Number of live messages.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when no message is live.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Reads a live message's envelope and body from the segment map, without copying. The
    /// recipients' states in the result are those of the base record; the index has the current
    /// ones ([`Spool::get`]).
    pub fn message(&self, queue_id: QueueId) -> Result<Message<'_>, SpoolError> {
        let live = self
            .messages
            .get(&queue_id)
            .ok_or_else(|| SpoolError::NotFound(queue_id.to_string()))?;
        read_base(
            &self.config.log.dir,
            &self.segments,
            &self.registry,
            live.base,
        )
    }

    /// Log counters (commits, records, bytes, syncs).
    pub fn log_stats(&self) -> LogStats {
        self.log.stats()
    }

    /// Disk and index sizes.
    pub fn usage(&self) -> SpoolUsage {
        let segments = self.segments.len() as u64;
        SpoolUsage {
            segments,
            bytes_on_disk: segments * self.config.log.segment_bytes,
            live_bytes: self.live_bytes,
            live_messages: self.messages.len() as u64,
        }
    }

    /// The most segments the spool should hold for its live bytes once reclamation settles.
    pub fn segments_bound(&self) -> u64 {
        2 * self.live_bytes.div_ceil(self.config.log.segment_bytes) + 2
    }

    /// One step of reclamation: settles finished compaction copies, deletes dead segments from
    /// the oldest on, and compacts at most one segment. Cheap when there is nothing to do; call
    /// it periodically (the engine does every second).
    pub fn reclaim(&mut self) -> Result<ReclaimReport, SpoolError> {
        let report = self.reclaim_step();
        self.publish();
        report
    }

    fn reclaim_step(&mut self) -> Result<ReclaimReport, SpoolError> {
        let mut report = ReclaimReport::default();
        self.settle();
        if !self.settle_rehomes() {
            report.rehomes_pending = self.rehoming.len() as u64;
            return Ok(report);
        }
        let active = self.log.active_segment();
        let mut deleted = Vec::new();
        while let Some((&id, entry)) = self.segments.first_key_value() {
            if id >= active || entry.live_bases > 0 {
                break;
            }
            self.segments.remove(&id);
            // Readers holding the map keep it valid; new reads of this segment fail.
            self.registry
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            deleted.push(id);
        }
        // One directory sync per unlink: a crash must never keep a newer segment's deletion
        // and lose an older one's, or a surviving base could lose its later outcomes.
        for id in &deleted {
            let path = self.config.log.dir.join(segment_file_name(*id));
            match std::fs::remove_file(&path) {
                Ok(()) => sync_dir(&self.config.log.dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(IoOp::Remove, &path)(e)),
            }
        }
        report.segments_deleted = deleted.len() as u64;

        let Some((&oldest, entry)) = self.segments.first_key_value() else {
            return Ok(report);
        };
        let too_many = self.segments.len() as u64 > self.segments_bound();
        let age_limit = self.config.compact_age.as_micros() as u64;
        let too_old = entry.created_micros.saturating_add(age_limit) < now_micros();
        if oldest < active && entry.live_bases > 0 && (too_many || too_old) {
            let (moved, stuck) = self.rehome_segment(oldest)?;
            report.messages_rehomed = moved;
            report.messages_not_rehomed = stuck;
            report.rehomes_pending = self.rehoming.len() as u64;
        }
        Ok(report)
    }

    /// Re-appends every live message whose base is in `segment` as a `Rehomed` record. Returns
    /// (moved, not moved). A message whose base cannot be read back or whose copy does not fit
    /// a segment stays where it is (and pins its segment); the spool as a whole does not stop.
    /// Only a spool-wide condition (full, shut down, backpressure) ends the step early.
    fn rehome_segment(&mut self, segment: u64) -> Result<(u64, u64), SpoolError> {
        let ids: Vec<QueueId> = self
            .messages
            .iter()
            .filter(|(_, m)| m.base.segment == segment)
            .map(|(id, _)| *id)
            .collect();
        let (mut moved, mut stuck) = (0, 0);
        for queue_id in &ids {
            if self.in_flight.contains_key(queue_id) {
                // Its state in memory is not all durable yet: moved at a later step.
                continue;
            }
            let live = &self.messages[queue_id];
            let Ok(mut message) = read_base(
                &self.config.log.dir,
                &self.segments,
                &self.registry,
                live.base,
            ) else {
                stuck += 1;
                continue;
            };
            for (r, s) in message.recipients.iter_mut().zip(live.rcpts.iter()) {
                r.state = s.state;
                r.attempts = s.attempts;
                r.next_attempt_micros = s.next_attempt_micros;
                r.last_reply = s.last_reply.as_deref().unwrap_or("");
            }
            let ticket = match self.log.append(&Record::Rehomed(message)) {
                Ok(t) => t,
                Err(SpoolError::RecordTooLarge { .. } | SpoolError::Config(_)) => {
                    stuck += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            moved += 1;
            let new = ticket.location();
            let old = std::mem::replace(
                &mut self.messages.get_mut(queue_id).expect("listed above").base,
                new,
            );
            self.remove_base(old);
            self.add_base(new);
            self.rehoming.push(Rehome {
                ticket,
                queue_id: *queue_id,
                old,
            });
        }
        Ok((moved, stuck))
    }

    /// Takes messages whose final outcome has been committed out of the index, so their
    /// segments can be reclaimed. Cheap; `reclaim` calls it, and callers may call it after
    /// waiting on an outcome ticket.
    pub fn settle(&mut self) {
        let mut i = 0;
        while i < self.outcomes_in_flight.len() {
            let Some(result) = self.outcomes_in_flight[i].ticket.try_result() else {
                i += 1;
                continue;
            };
            let done = self.outcomes_in_flight.swap_remove(i);
            if let Some(n) = self.in_flight.get_mut(&done.queue_id) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(&done.queue_id);
                }
            }
            if result.is_err() {
                // Not on disk: back to the state before, unless a later outcome replaced it.
                if let Some(m) = self.messages.get_mut(&done.queue_id) {
                    for (r, old, new) in done.changes {
                        if m.rcpts.get(r) == Some(&new) {
                            m.rcpts[r] = old;
                        }
                    }
                }
            }
        }
        let mut i = 0;
        while i < self.finishing.len() {
            match self.finishing[i].0.try_result() {
                None => i += 1,
                Some(result) => {
                    let (_, queue_id) = self.finishing.swap_remove(i);
                    // A failed final outcome leaves the message live (its states already say
                    // terminal in memory; a restart would deliver it again, never lose it).
                    if result.is_ok() {
                        if let Some(m) = self.messages.remove(&queue_id) {
                            self.remove_base(m.base);
                        }
                    }
                }
            }
        }
        self.publish();
    }

    /// Processes completed compaction copies; returns true when none is pending. A failed copy
    /// puts the message's base back on its old record, whose segment was kept meanwhile.
    fn settle_rehomes(&mut self) -> bool {
        let mut i = 0;
        while i < self.rehoming.len() {
            match self.rehoming[i].ticket.try_result() {
                None => i += 1,
                Some(result) => {
                    let r = self.rehoming.swap_remove(i);
                    if result.is_err() {
                        let reverted = self.messages.get_mut(&r.queue_id).map(|m| {
                            let new = m.base;
                            m.base = r.old;
                            new
                        });
                        if let Some(new) = reverted {
                            self.remove_base(new);
                            self.add_base(r.old);
                        }
                    }
                }
            }
        }
        self.rehoming.is_empty()
    }

    /// Makes sure the segment a record went to is known, so that it is reclaimed in turn even if
    /// it holds only outcome records.
    /// A thread-safe, read-only view of this spool's segments, for the shards that deliver its
    /// messages.
    pub fn reader(&self) -> SpoolReader {
        SpoolReader {
            dir: self.config.log.dir.clone(),
            maps: Arc::clone(&self.registry),
        }
    }

    fn track(&mut self, loc: Location) {
        if self.segments.contains_key(&loc.segment) {
            return;
        }
        let entry = SegmentEntry::new(now_micros());
        // Map it now, so that other shards' readers find it in the registry. On failure they
        // (and this spool) map it on first read instead.
        let path = self.config.log.dir.join(segment_file_name(loc.segment));
        if let Ok(map) = std::fs::File::open(&path).and_then(|f| {
            SegmentMap::open(&f, &path).map_err(|e| std::io::Error::other(e.to_string()))
        }) {
            let map = Arc::new(map);
            self.registry
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(loc.segment, Arc::clone(&map));
            let _ = entry.map.set(map);
        }
        self.segments.insert(loc.segment, entry);
    }

    fn add_base(&mut self, loc: Location) {
        self.track(loc);
        let e = self
            .segments
            .entry(loc.segment)
            .or_insert_with(|| SegmentEntry::new(now_micros()));
        e.live_bases += 1;
        e.live_bytes += u64::from(loc.len);
        self.live_bytes += u64::from(loc.len);
    }

    fn remove_base(&mut self, loc: Location) {
        if let Some(e) = self.segments.get_mut(&loc.segment) {
            e.live_bases = e.live_bases.saturating_sub(1);
            e.live_bytes = e.live_bytes.saturating_sub(u64::from(loc.len));
        }
        self.live_bytes = self.live_bytes.saturating_sub(u64::from(loc.len));
    }

    /// Commits what is pending and stops the sync thread.
    pub fn close(self) {
        self.log.close();
    }

    /// Closes a spool that is to be removed: its readers forget every segment map too (so the
    /// files' space is freed once they are deleted), then [`Spool::close`].
    pub fn retire(self) {
        self.registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.close();
    }
}

/// Decodes the base record at `loc` through the segment's map (mapped on first use).
fn read_base<'s>(
    dir: &Path,
    segments: &'s BTreeMap<u64, SegmentEntry>,
    registry: &MapRegistry,
    loc: Location,
) -> Result<Message<'s>, SpoolError> {
    let entry = segments
        .get(&loc.segment)
        .ok_or_else(|| SpoolError::NotFound(format!("segment {}", loc.segment)))?;
    let path = dir.join(segment_file_name(loc.segment));
    if entry.map.get().is_none() {
        let file = std::fs::File::open(&path).map_err(io_err(IoOp::Open, &path))?;
        let map = Arc::new(SegmentMap::open(&file, &path)?);
        registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(loc.segment, Arc::clone(&map));
        let _ = entry.map.set(map);
    }
    let bytes = entry.map.get().expect("set just above").bytes();
    decode_base(bytes, &path, loc)
}

/// Decodes the `Message` or `Rehomed` frame at `loc` in a segment's bytes, checking its CRC
/// again (a pair assertion at the durability boundary).
fn decode_base<'b>(bytes: &'b [u8], path: &Path, loc: Location) -> Result<Message<'b>, SpoolError> {
    let start = loc.offset as usize;
    let frame = bytes
        .get(start..start + loc.len as usize)
        .ok_or_else(|| SpoolError::NotFound(format!("{loc:?} is past the end of the segment")))?;
    let unreadable = |error| SpoolError::Unreadable {
        path: path.to_path_buf(),
        offset: loc.offset.into(),
        error,
    };
    // Pair assertion at the durability boundary: the CRC is checked again on every read.
    let pos = crate::codec::FramePos {
        segment: loc.segment,
        offset: loc.offset.into(),
    };
    match crate::codec::decode_frame(frame, pos).map_err(unreadable)? {
        crate::codec::FrameRead::Frame(f) => match f.record().map_err(unreadable)? {
            Record::Message(m) | Record::Rehomed(m) => Ok(m),
            Record::Outcomes(_) => Err(SpoolError::NotFound(format!("{loc:?} is not a message"))),
        },
        crate::codec::FrameRead::End => {
            Err(SpoolError::NotFound(format!("{loc:?} holds no record")))
        }
    }
}

/// Segment maps by id, shared by a spool and its readers.
type MapRegistry = Arc<RwLock<HashMap<u64, Arc<SegmentMap>>>>;

/// A read-only view of another shard's spool: `Clone`, `Send` and `Sync`. Reads are zero-copy
/// from the segment maps; a [`MessageRef`] keeps its map alive, so a message stays readable even
/// if compaction moves it and its old segment is deleted meanwhile.
#[derive(Clone)]
pub struct SpoolReader {
    dir: std::path::PathBuf,
    maps: MapRegistry,
}

impl SpoolReader {
    /// A handle on the message whose base record is at `loc`. Fails with `NotFound` when the
    /// segment has been reclaimed (the caller asks the spool's shard for the current location).
    pub fn read(&self, loc: Location) -> Result<MessageRef, SpoolError> {
        let shared = self
            .maps
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&loc.segment)
            .cloned();
        let map = match shared {
            Some(m) => m,
            None => {
                // Not mapped by its spool yet: map privately (never registered, so a reader
                // cannot resurrect a deleted segment in the registry).
                let path = self.dir.join(segment_file_name(loc.segment));
                let file = std::fs::File::open(&path).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        SpoolError::NotFound(format!("segment {}", loc.segment))
                    } else {
                        // EMFILE and the like: not a moved message; the caller retries later.
                        io_err(IoOp::Open, &path)(e)
                    }
                })?;
                Arc::new(SegmentMap::open(&file, &path)?)
            }
        };
        let path = self.dir.join(segment_file_name(loc.segment));
        decode_base(map.bytes(), &path, loc)?; // checked once here, so `message` cannot fail
        Ok(MessageRef { map, loc, path })
    }
}

/// A message read through a [`SpoolReader`]; borrowing from it costs no copy.
pub struct MessageRef {
    map: Arc<SegmentMap>,
    loc: Location,
    path: std::path::PathBuf,
}

impl MessageRef {
    /// The decoded message, borrowing envelope strings and body from the map.
    pub fn message(&self) -> Result<Message<'_>, SpoolError> {
        decode_base(self.map.bytes(), &self.path, self.loc)
    }
}

const COUNTER_MASK: u64 = (1 << 48) - 1;

/// Rebuilds the index from records in write order.
#[derive(Default)]
struct IndexBuilder {
    messages: HashMap<QueueId, LiveMessage>,
}

impl IndexBuilder {
    fn apply(&mut self, loc: Location, rec: &Record<'_>) {
        match rec {
            Record::Message(m) | Record::Rehomed(m) => {
                let rcpts = m
                    .recipients
                    .iter()
                    .map(|r| RcptStatus {
                        state: r.state,
                        attempts: r.attempts,
                        next_attempt_micros: r.next_attempt_micros,
                        last_reply: (!r.last_reply.is_empty()).then(|| r.last_reply.into()),
                    })
                    .collect();
                let live = LiveMessage {
                    base: loc,
                    received_at_micros: m.received_at_micros,
                    rcpts,
                };
                if live.is_terminal() {
                    self.messages.remove(&m.queue_id);
                } else {
                    self.messages.insert(m.queue_id, live);
                }
            }
            Record::Outcomes(o) => {
                // Outcomes for an unknown queue id belong to a message whose base was reclaimed.
                let Some(live) = self.messages.get_mut(&o.queue_id) else {
                    return;
                };
                for e in &o.entries {
                    if let Some(r) = live.rcpts.get_mut(e.rcpt_index as usize) {
                        *r = RcptStatus::from_outcome(e);
                    }
                }
                if live.is_terminal() {
                    self.messages.remove(&o.queue_id);
                }
            }
        }
    }
}

/// A random 64-bit number from the standard library's per-process hash keys (no extra
/// dependency; quality is ample for spreading queue id counters).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_micros());
    h.finish()
}
