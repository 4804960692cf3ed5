//! What the relay process sets for itself at start, before the configuration (and so the password)
//! is read: no core dump, the soft open-file limit raised to the hard one, and files private to the
//! relay's user whatever the umask.
//!
//! Part of the binary, not the library: the library forbids unsafe code, and these are three system
//! calls (`setrlimit`, `getrlimit`, `prctl`, `umask`) that std does not wrap, called through `libc`. Must not:
//! read the configuration or log (logging starts later; the caller logs what this returns).

use std::io;

/// The soft open-file limit aimed at when the hard limit is unlimited: Linux's default
/// `fs.nr_open`, above which `setrlimit` refuses.
const UNLIMITED_NOFILE_TARGET: u64 = 1 << 20;

/// Makes sure a crash or a watchdog abort writes no core dump holding the password or the token:
/// `RLIMIT_CORE` to 0 (soft and hard, so no child or later call raises it) and the process marked
/// non-dumpable (`PR_SET_DUMPABLE` 0: no core even where `fs.suid_dumpable` = 2 pipes one to a
/// handler, and no `ptrace` attach or `/proc/PID/mem` read by the same non-root user). The
/// systemd units say `LimitCORE=0` as well.
pub fn forbid_core_dumps() -> io::Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct passed by reference and keeps no pointer to it.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_DUMPABLE takes plain integers; no memory is passed.
        let zero: libc::c_ulong = 0;
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, zero, zero, zero, zero) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: systemd's default soft limit is 1,024, which
/// an operator's port held open by many clients would exhaust, failing the CMS client with "Too many
/// open files". The relay uses epoll (tokio), never `select`, so descriptors above 1,024 are safe.
/// Returns the soft limit before and after.
pub fn raise_file_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed by mutable reference and keeps no pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    let target = if limit.rlim_max == libc::RLIM_INFINITY {
        UNLIMITED_NOFILE_TARGET.max(before)
    } else {
        limit.rlim_max
    };
    if before >= target {
        return Ok((before, before));
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above; setrlimit only reads the struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, target))
}

/// Every file the relay creates is its user's alone (0600, directories 0700), whatever umask it was
/// started under: the outbox holds chat and who opted out, and sled creates files in it while the
/// relay runs (snapshots, blobs). `Outbox::open` tightens what exists at open.
pub fn private_files() {
    // SAFETY: umask(2) only replaces the process's file mode creation mask and cannot fail; it is
    // called before any thread is started.
    unsafe {
        libc::umask(0o077);
    }
}
