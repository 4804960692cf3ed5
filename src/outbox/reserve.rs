//! The reserve: disk space the outbox holds in a file of its own (`<outbox.path>/reserve`,
//! `outbox.reserve_bytes`) and gives back to its file system when a write fails for want of space.
//! sled writes to delete (a removal is a record in its log, and its log grows by a few MiB before
//! the room of removed records is used again), so an outbox that filled its disk could otherwise
//! not even remove the lines the CMS confirmed.
//!
//! While the reserve is given back the outbox counts as full: the poller sends no GET (the viewer
//! keeps the lines) and delivery settles and removes lines in the room it freed. sled never gives
//! room back to the file system, so the disk has told how many bytes of lines it holds: from then
//! on polling also pauses while the outbox holds a third of that or more (`disk_bound`: room for
//! sled's own overhead), whatever `outbox.max_bytes` says. Once delivery removed records of the
//! reserve's size (or all of them), each delivery step puts the reserve back (at most every
//! `RESTORE_EVERY`); if the disk has no room for all of it, polling resumes all the same and the
//! reserve is put back as soon as there is room.
//!
//! Owns the file and its state. Must not touch sled (the database reports its I/O errors here
//! through `Database::io`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::outbox::Outbox;

/// How often the reserve is written again while it is not held: each try writes `reserve_bytes`.
const RESTORE_EVERY: Duration = Duration::from_secs(2);

/// The file name, inside the outbox's directory (sled ignores files it did not make).
const FILE_NAME: &str = "reserve";

/// After a full disk the outbox holds at most this share of what filled it: sled's file, which
/// never shrinks, then has room for its overhead (up to 3 to 4 times the records, docs/RELIABILITY.md).
const DISK_BOUND_DIVISOR: u64 = 3;

/// The reserve of one outbox.
pub(super) struct Reserve {
    path: PathBuf,
    /// `outbox.reserve_bytes`; 0 is no reserve.
    bytes: AtomicU64,
    /// Given back after a write failed for want of space: polling pauses.
    released: AtomicBool,
    /// The file does not hold the reserve (its disk had no room for it).
    missing: AtomicBool,
    /// A release whose `disk_bound` the outbox has not set yet.
    bound_due: AtomicBool,
    /// Bytes of pending lines at most since the disk filled (`u64::MAX` before).
    disk_bound: AtomicU64,
    /// Bytes of records removed since the release: room the database has again.
    freed: AtomicU64,
    /// When the file was last written.
    last_try: Mutex<Option<Instant>>,
}

impl Reserve {
    /// The reserve of the outbox in `dir`, holding nothing until `keep` is called.
    pub(super) fn new(dir: &Path) -> Reserve {
        Reserve {
            path: dir.join(FILE_NAME),
            bytes: AtomicU64::new(0),
            released: AtomicBool::new(false),
            missing: AtomicBool::new(false),
            bound_due: AtomicBool::new(false),
            disk_bound: AtomicU64::new(u64::MAX),
            freed: AtomicU64::new(0),
            last_try: Mutex::new(None),
        }
    }

    /// Holds `bytes` from now on (0: none, and an old reserve file is deleted).
    pub(super) fn keep(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Release);
        if bytes == 0 {
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        match self.fill(bytes) {
            Ok(()) => {}
            Err(err) if is_no_space(&err) => {
                let _ = std::fs::remove_file(&self.path);
                self.missing.store(true, Ordering::Release);
                tracing::warn!(reserve_bytes = bytes, path = %self.path.display(), "the outbox's file system has no room for its reserve: it is written as soon as there is room");
            }
            Err(err) => {
                tracing::warn!(error = %err, path = %self.path.display(), "cannot write the outbox's reserve: without it, a disk the outbox fills can stop delivery until the disk has room");
                self.bytes.store(0, Ordering::Release);
            }
        }
    }

    /// Whether the reserve is given back and polling is to pause.
    pub(super) fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// A write failed for want of space: gives the reserve back, once.
    pub(super) fn release(&self) {
        let bytes = self.bytes.load(Ordering::Acquire);
        if bytes == 0 || self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        self.freed.store(0, Ordering::Release);
        self.bound_due.store(true, Ordering::Release);
        if self.missing.load(Ordering::Acquire) {
            tracing::error!(
                reserve_bytes = bytes,
                "the outbox's disk is full and its reserve could not be kept: delivery cannot remove lines until the disk has room"
            );
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                self.missing.store(true, Ordering::Release);
                tracing::warn!(
                    reserve_bytes = bytes,
                    "the outbox's disk is full: its reserve is given back so that delivery can remove confirmed lines; viewer polling pauses meanwhile (the viewer keeps the lines)"
                );
            }
            Err(err) => {
                tracing::error!(error = %err, path = %self.path.display(), "the outbox's disk is full and its reserve cannot be given back")
            }
        }
    }

    /// Records of `n_bytes` left the database.
    pub(super) fn freed(&self, n_bytes: u64) {
        if self.is_released() {
            self.freed.fetch_add(n_bytes, Ordering::Relaxed);
        }
    }

    /// The bound set after a full disk (`u64::MAX` before one), from `n_bytes`, the bytes of
    /// pending lines when the outbox first looks after the release.
    pub(super) fn disk_bound(&self, n_bytes: u64) -> u64 {
        if self.bound_due.swap(false, Ordering::AcqRel) {
            let bound = (n_bytes / DISK_BOUND_DIVISOR).max(1);
            if bound < self.disk_bound.fetch_min(bound, Ordering::AcqRel) {
                tracing::warn!(
                    outbox_bytes = n_bytes,
                    disk_bound_bytes = bound,
                    "the outbox's disk held only this many bytes of lines: until a restart, viewer polling pauses while the outbox holds a third of it (give the disk room, or lower outbox.max_bytes: the outbox takes up to 4 x outbox.max_bytes + 12 MiB + outbox.reserve_bytes on disk)"
                );
            }
        }
        self.disk_bound.load(Ordering::Acquire)
    }

    /// Ends a release once the database has room of its own again (records of the reserve's size
    /// removed since, or none left: before that, the room the reserve left is the database's, to
    /// remove lines with), and writes the reserve again while it is not held (at most every
    /// `RESTORE_EVERY`).
    pub(super) fn try_restore(&self, database_empty: bool) {
        let bytes = self.bytes.load(Ordering::Acquire);
        if self.is_released() {
            if !database_empty && self.freed.load(Ordering::Relaxed) < bytes {
                return;
            }
            self.released.store(false, Ordering::Release);
            tracing::info!("the outbox removed what filled its disk: viewer polling resumes");
            if self.missing.load(Ordering::Acquire) && self.fill(bytes).is_err() {
                let _ = std::fs::remove_file(&self.path);
                tracing::warn!(
                    reserve_bytes = bytes,
                    "the outbox's disk has no room to write its reserve again (the database keeps the room it took): it is written once there is room; give the disk room, or a disk the outbox fills again may stop delivery"
                );
                *self.last_try.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(Instant::now());
                return;
            }
        }
        if !self.missing.load(Ordering::Acquire) {
            return;
        }
        {
            let mut last_try = self.last_try.lock().unwrap_or_else(PoisonError::into_inner);
            if last_try.is_some_and(|at| at.elapsed() < RESTORE_EVERY) {
                return;
            }
            *last_try = Some(Instant::now());
        }
        match self.fill(bytes) {
            Ok(()) => {
                self.missing.store(false, Ordering::Release);
                tracing::info!(reserve_bytes = bytes, "the outbox's reserve is back");
            }
            Err(err) => {
                // What a partial file holds is room the database may need.
                let _ = std::fs::remove_file(&self.path);
                tracing::debug!(error = %err, "the outbox's reserve cannot be written yet");
            }
        }
    }

    /// Writes the file to `bytes` of zeros and syncs it: written blocks, not a sparse file, which
    /// would hold no space.
    fn fill(&self, bytes: u64) -> std::io::Result<()> {
        if std::fs::metadata(&self.path).is_ok_and(|meta| meta.len() == bytes) {
            return Ok(());
        }
        let mut file = File::create(&self.path)?;
        let chunk = vec![0u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        file.sync_all()
    }
}

/// Whether an I/O error says the file system (or the user's quota) is full. sled passes its I/O
/// errors on rewrapped, keeping the kind but not the OS code.
pub(super) fn is_no_space(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(err.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

impl Outbox {
    /// After a full disk: ends the pause once delivery removed enough, and writes the reserve
    /// again when there is room (at most every 2 s). Delivery calls it on each step.
    pub fn restore_reserve(&self) {
        // A database waiting to be reopened needs the room the reserve left to open in.
        if !self.db.is_broken() {
            self.db.reserve().try_restore(self.is_empty());
        }
    }

    /// Whether polling is to pause for the disk: the reserve is given back, or the outbox holds
    /// the share of what filled its disk it may hold since.
    pub fn is_disk_full(&self) -> bool {
        let reserve = self.db.reserve();
        reserve.is_released() || self.bytes() >= reserve.disk_bound(self.bytes())
    }
}
