//! The outbox's sled database: opening it, its trees, the ids it hands out, the conversion of sled's
//! errors, and opening it again in place after an I/O error.
//!
//! After an I/O error (disk full) sled 0.34 fails every later write until the database is opened
//! again, so `Database` reopens it on its next use, once no operation holds the failed handles. What
//! the reopened database holds is what was flushed, exactly as after a crash: a write whose flush
//! failed returned its error to the caller, which still has the data (the poller keeps the lines it
//! read, delivery's marks and removals are redone or reconciled).
//!
//! A write that fails for want of space also gives the outbox's reserve back (`reserve`).
//!
//! Must not know what a record holds or what the trees mean to the stages: the record is
//! `record`'s, the depth counters and the watermark are `Outbox`'s (a reopen hands it the new
//! database to count them again).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::outbox::OutboxError;
use crate::outbox::reserve::{Reserve, is_no_space};

/// The open sled database and its trees. Replaced as a whole when the database is reopened.
pub(super) struct Store {
    pub(super) db: sled::Db,
    /// Lines not yet confirmed by the CMS, keyed by a big-endian id from `Database::new_id`.
    pub(super) pending: sled::Tree,
    /// Lines the CMS refused, with the reason, under their pending key.
    pub(super) dead: sled::Tree,
    /// Records that could not be decoded and what is known of viewer answers that could not be read
    /// (`dead`).
    pub(super) quarantine: sled::Tree,
    /// The cursors (`Cursor`).
    pub(super) meta: sled::Tree,
    /// The speakers who opted out (`privacy`).
    pub(super) privacy: sled::Tree,
}

/// How long an open waits for a file lock that this process may still hold. sled's flusher thread
/// keeps a dropped database's lock until it next wakes (every 500 ms by default), so an outbox
/// dropped and opened again in one process (the reopen after an I/O error, `outbox` tests) can find
/// it held for a moment; another process holding it is reported once this has passed.
const OWN_LOCK_WAIT: Duration = Duration::from_secs(2);

impl Store {
    pub(super) fn open(path: &Path, cache_bytes: u64) -> Result<Store, OutboxError> {
        create_private_dir(path);
        let started = Instant::now();
        let db = loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(cache_bytes)
                .open()
                .map_err(|source| open_error(path, source))
            {
                Err(OutboxError::Locked { .. }) if started.elapsed() < OWN_LOCK_WAIT => {
                    std::thread::sleep(Duration::from_millis(25));
                }
                opened => break opened?,
            }
        };
        let open_tree = |name: &str| {
            db.open_tree(name)
                .map_err(|source| open_error(path, source))
        };
        make_private(path);
        Ok(Store {
            pending: open_tree("pending")?,
            dead: open_tree("dead")?,
            quarantine: open_tree("quarantine")?,
            meta: open_tree("meta")?,
            privacy: open_tree("privacy")?,
            db,
        })
    }

    /// An id above every key stored in the trees keyed by ids.
    fn next_free_id(&self) -> u64 {
        [&self.pending, &self.dead, &self.quarantine]
            .into_iter()
            .map(last_key)
            .max()
            .map_or(0, |last| last.saturating_add(1))
    }

    /// Pending lines and their bytes, counted from the records.
    pub(super) fn count_pending(&self) -> (usize, u64) {
        let n_bytes = self
            .pending
            .iter()
            .values()
            .flatten()
            .map(|v| v.len() as u64)
            .sum();
        (self.pending.len(), n_bytes)
    }

    /// Dead letters and quarantined records, counted from the records (a read of both trees: at
    /// open and reopen only).
    pub(super) fn count_kept(&self) -> (usize, usize) {
        (self.dead.len(), self.quarantine.len())
    }
}

/// The outbox holds chat and the list of who opted out: its directory is the relay's user's alone
/// (0700), whatever the umask it was started under (a relay run by hand gets 0755 from umask 022).
/// Created so before sled opens it (sled would create it with the umask's mode).
fn create_private_dir(path: &Path) {
    use std::os::unix::fs::DirBuilderExt;
    if path.exists() {
        return;
    }
    // An error is sled's to report, with its advice, when it opens the directory.
    let _ = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path);
}

/// Takes away every permission the relay's user does not need from the directory (0700) and what
/// sled keeps in it (directories 0700, files 0600): an outbox made by an older relay, or files sled
/// created under a loose umask. sled creates files later too (snapshots, blobs): `main` sets the
/// process's umask to 077 for those, and the directory's mode keeps everyone else out meanwhile.
/// A change that fails (the directory belongs to another user) is warned about, not fatal: the
/// relay still works, and the operator is told what to fix.
fn make_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut to_visit = vec![(path.to_owned(), true)];
    while let Some((path, is_dir)) = to_visit.pop() {
        let private = if is_dir { 0o700 } else { 0o600 };
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.permissions().mode() & 0o077 != 0
            && let Err(err) =
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(private))
        {
            tracing::warn!(path = %path.display(), error = %err, "outbox file readable by other users and its mode cannot be changed: chmod {private:o} it (it holds chat and the opt-outs)");
        }
        if is_dir && let Ok(entries) = std::fs::read_dir(&path) {
            for entry in entries.flatten() {
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                to_visit.push((entry.path(), is_dir));
            }
        }
    }
}

/// Why the database at `path` cannot be opened, with the fix an operator needs: another process
/// holds it, the relay's user may not write it, or it is damaged.
fn open_error(path: &Path, source: sled::Error) -> OutboxError {
    let shown = path.display().to_string();
    // sled reports a held file lock as an I/O error "could not acquire lock".
    if source.to_string().contains("lock") {
        return OutboxError::Locked { path: shown };
    }
    let sled::Error::Io(io) = &source else {
        return OutboxError::Open {
            path: shown,
            source,
        };
    };
    let os_error = io
        .raw_os_error()
        .map_or_else(String::new, |code| format!(" (os error {code})"));
    let (user, name) = current_user();
    let detail = match io.kind() {
        std::io::ErrorKind::PermissionDenied => {
            let owner = owner_of(path).map_or_else(String::new, |owner| {
                format!(", and the directory belongs to {owner}")
            });
            format!(
                "permission denied{os_error}{owner}: give {user} read and write access to the directory and every file in it (chown -R {name} {shown}), or run the relay as its owner"
            )
        }
        std::io::ErrorKind::ReadOnlyFilesystem => format!(
            "the file system is read-only{os_error}: mount it read-write, or under systemd (ProtectSystem=strict) keep outbox.path in the unit's StateDirectory= or add it to ReadWritePaths="
        ),
        _ => {
            return OutboxError::Open {
                path: shown,
                source,
            };
        }
    };
    OutboxError::NotWritable {
        path: shown,
        user,
        detail,
    }
}

/// Who this process runs as: `user NAME (uid N)` (or `uid N` when no name is known) and the name
/// for a command line (the uid when none). Linux: the effective uid from `/proc/self/status` (not
/// the owner of `/proc/self`, which is root once the process made itself non-dumpable), and the name
/// looked up in `/etc/passwd` (a systemd `DynamicUser` has none there).
fn current_user() -> (String, String) {
    let effective_uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("Uid:"))?;
            line.split_whitespace().nth(2)?.parse::<u32>().ok()
        });
    let Some(uid) = effective_uid else {
        return ("the relay's user".to_owned(), "<user>".to_owned());
    };
    match user_name(uid) {
        Some(name) => (format!("user {name} (uid {uid})"), name),
        None => (format!("uid {uid}"), uid.to_string()),
    }
}

/// Who owns `path`, as `NAME (uid N)`, if it can be seen.
fn owner_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(path).ok()?.uid();
    Some(match user_name(uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    })
}

/// The name of `uid` in `/etc/passwd`.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let listed: u32 = fields.nth(1)?.parse().ok()?;
        (listed == uid).then(|| name.to_owned())
    })
}

/// The last key of a tree keyed by big-endian ids (0 when it is empty or cannot be read).
pub(super) fn last_key(tree: &sled::Tree) -> u64 {
    tree.last()
        .ok()
        .flatten()
        .and_then(|(key, _)| <[u8; 8]>::try_from(key.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

/// The open database; `store` is `None` only after a reopen failed. An operation clones the `Arc`
/// for its duration, so a reopen can tell when nobody uses the failed handles any more.
struct Slot {
    store: Option<Arc<Store>>,
    /// When the next reopen may be tried.
    next_reopen: Option<Instant>,
    /// Reopens tried since the database last stayed healthy for `REOPEN_MAX`.
    n_reopens: u32,
    /// When the last reopen succeeded.
    reopened_at: Option<Instant>,
    /// The error that made the database fail, or the last reopen fail: what `/readyz` shows.
    cause: String,
}

/// A failed database is opened again after this long, doubling with each try up to `REOPEN_MAX`
/// while it keeps failing (an open that works, followed by a write that fails again, counts as a
/// try): an open reads the whole database, and a disk stays full for a while.
const REOPEN_FIRST: Duration = Duration::from_secs(1);
const REOPEN_MAX: Duration = Duration::from_secs(10);

/// The database of one outbox directory, reopened in place after an I/O error.
pub(super) struct Database {
    path: PathBuf,
    cache_bytes: u64,
    /// The open database, and when a reopen was last tried.
    slot: Mutex<Slot>,
    /// An I/O error was seen: reopen before the next use.
    broken: AtomicBool,
    /// No id this process hands out is below this (`new_id`).
    next_id: AtomicU64,
    /// The room given back to the file system when a write fails for want of it.
    reserve: Reserve,
    /// Held for each flush: one `flush_async` at a time. sled 0.34 runs a flush on its own I/O
    /// threads, which wait for each other's buffers; with a dozen flushes at once (a relay with
    /// eight regions, each poller and presence task flushing) every one of them waited, the tokio
    /// workers blocked in their next write, and the relay hung.
    flushing: tokio::sync::Mutex<()>,
}

impl Database {
    /// The database `store`, just opened at `path`.
    pub(super) fn new(path: &Path, cache_bytes: u64, store: Store) -> Database {
        let next_id = store.next_free_id();
        Database {
            path: path.to_owned(),
            cache_bytes,
            slot: Mutex::new(Slot {
                store: Some(Arc::new(store)),
                next_reopen: None,
                n_reopens: 0,
                reopened_at: None,
                cause: String::new(),
            }),
            broken: AtomicBool::new(false),
            next_id: AtomicU64::new(next_id),
            reserve: Reserve::new(path),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    /// The outbox's reserve of disk space.
    pub(super) fn reserve(&self) -> &Reserve {
        &self.reserve
    }

    /// The directory.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The open database, reopened first if an I/O error broke it; `reopened` is given the new
    /// database before anyone can use it.
    pub(super) fn store(&self, reopened: impl FnOnce(&Store)) -> Result<Arc<Store>, OutboxError> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_broken() {
            self.reopen(&mut slot, reopened)?;
        }
        slot.store
            .clone()
            .ok_or_else(|| OutboxError::Reopen("the outbox is not open".into()))
    }

    /// The open database as it is, never reopened, for `OutboxReader`: while an I/O error has left
    /// it to be reopened, why (the failed handles are left alone, so that a read delays no reopen).
    pub(super) fn peek(&self) -> Result<Arc<Store>, String> {
        let slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        match &slot.store {
            Some(store) if !self.is_broken() => Ok(store.clone()),
            _ => Err(format!(
                "{}; the outbox is reopened on its next use by a stage",
                slot.cause
            )),
        }
    }

    /// The open database as it is, without reopening it: a test's stand-in for an operation that
    /// still holds the failed handles.
    #[cfg(test)]
    pub(super) fn current(&self) -> Option<Arc<Store>> {
        let slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        slot.store.clone()
    }

    /// Whether an I/O error left the database to be reopened.
    pub(super) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Drops the failed database once no operation holds it, and opens it again. sled recovers what
    /// was flushed. Blocks the callers for the time an open takes (a rare event: after a write
    /// error, at most every `REOPEN_FIRST` to `REOPEN_MAX`).
    fn reopen(&self, slot: &mut Slot, reopened: impl FnOnce(&Store)) -> Result<(), OutboxError> {
        if slot
            .store
            .as_ref()
            .is_some_and(|store| Arc::strong_count(store) > 1)
        {
            return Err(OutboxError::Reopen(format!(
                "{}; the outbox is reopened once the operations using it end",
                slot.cause
            )));
        }
        let now = Instant::now();
        if let Some(next) = slot.next_reopen.filter(|next| now < *next) {
            return Err(OutboxError::Reopen(format!(
                "{}; the outbox is reopened in {}",
                slot.cause,
                humantime::format_duration(Duration::from_secs((next - now).as_secs() + 1))
            )));
        }
        if slot
            .reopened_at
            .is_some_and(|at| at.elapsed() >= REOPEN_MAX)
        {
            slot.n_reopens = 0;
        }
        let wait = REOPEN_FIRST
            .saturating_mul(1 << slot.n_reopens.min(16))
            .min(REOPEN_MAX);
        slot.n_reopens += 1;
        slot.next_reopen = Some(now + wait);
        // sled lets go of its file lock when the last handle is dropped.
        slot.store = None;
        let store = Store::open(&self.path, self.cache_bytes).map_err(|err| {
            // Not OutboxError::Open's text: its advice (move the directory aside) is for damage.
            slot.cause = match err {
                OutboxError::Open { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            OutboxError::Reopen(format!("{}; reopening the outbox failed", slot.cause))
        })?;
        self.next_id
            .fetch_max(store.next_free_id(), Ordering::AcqRel);
        reopened(&store);
        slot.store = Some(Arc::new(store));
        slot.reopened_at = Some(Instant::now());
        self.broken.store(false, Ordering::Release);
        Ok(())
    }

    /// A new key, above every key handed out before. sled's `generate_id` alone is not enough: it
    /// persists its counter lazily, so a database reopened after an I/O error can hand out again
    /// the ids a failed ingest was given, which its retry has stored since.
    pub(super) fn new_id(&self, store: &Store) -> Result<u64, OutboxError> {
        let generated = self.io(store.db.generate_id())?;
        let mut next = self.next_id.load(Ordering::Acquire);
        loop {
            let id = generated.max(next);
            match self.next_id.compare_exchange(
                next,
                id.saturating_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(id),
                Err(current) => next = current,
            }
        }
    }

    /// Converts a sled error, noting an I/O error so that the next use reopens the database, and
    /// giving the reserve back when the disk is full.
    pub(super) fn io<T>(&self, result: sled::Result<T>) -> Result<T, OutboxError> {
        result.map_err(|err| {
            if let sled::Error::Io(io) = &err
                && is_no_space(io)
            {
                self.reserve.release();
            }
            if matches!(err, sled::Error::Io(_)) && !self.broken.swap(true, Ordering::AcqRel) {
                let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
                slot.cause = err.to_string();
            }
            OutboxError::Storage(err)
        })
    }

    /// Flushes everything written to `store` so far.
    pub(super) async fn flush(&self, store: &Store) -> Result<(), OutboxError> {
        // A flush started after the caller's writes covers them, so waiting for the one before
        // loses no durability.
        let _one_at_a_time = self.flushing.lock().await;
        self.io(store.db.flush_async().await)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn an_outbox_left_readable_by_others_is_made_private_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("outbox");
        drop(Store::open(&path, 1 << 20).expect("open"));
        let chmod = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        chmod(&path, 0o755);
        chmod(&path.join("db"), 0o644);

        drop(Store::open(&path, 1 << 20).expect("reopen"));

        assert_eq!(mode(&path), 0o700);
        assert_eq!(mode(&path.join("db")), 0o600);
        let fresh = dir.path().join("new").join("outbox");
        drop(Store::open(&fresh, 1 << 20).expect("open"));
        assert_eq!(mode(&fresh), 0o700);
    }
}
