//! `RecentlySaid`: the relay's short memory of what it said in-world, shared by both directions.
//!
//! `inworld` and `notice` record each text they hand to the viewer (and, on channel 0, that an echo
//! is due); `poller` asks it whether a viewer line is such an echo (when the viewer gives no own
//! name) and which echoes never came back (another client drained the viewer's queue). `app` creates
//! the one memory and hands it to all three. Must not do I/O or know either peer: it holds texts and
//! instants only.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a said text is remembered for echo detection: the simulator echoes within a second; a
/// minute allows for a slow viewer poll.
const ECHO_MEMORY: Duration = Duration::from_secs(60);

/// How long the simulator may take to echo a line said on channel 0 before the echo counts as taken
/// by another consumer of the viewer's chat queue. OpenSim echoes within milliseconds; 10 s leaves room
/// for a busy region and a slow viewer.
pub const ECHO_DEADLINE: Duration = Duration::from_secs(10);

/// Texts the relay said in-world recently, for the poller to recognise their echo, and the echoes
/// still awaited, for the poller to notice when another client drains the viewer's queue.
#[derive(Debug, Default)]
pub struct RecentlySaid {
    texts: Mutex<VecDeque<(String, Instant)>>,
    /// When each line said on channel 0 was handed to the viewer, oldest first, until an echo came
    /// back for it.
    awaited: Mutex<VecDeque<Instant>>,
}

impl RecentlySaid {
    /// Remembers a said text.
    pub fn remember(&self, text: &str) {
        let mut texts = self
            .texts
            .lock()
            .expect("echo memory lock is never poisoned");
        texts.retain(|(_, at)| at.elapsed() < ECHO_MEMORY);
        texts.push_back((text.to_owned(), Instant::now()));
    }

    /// Expects the echo of a line about to be said on channel 0 (recorded before the POST, so the
    /// echo cannot be polled before it is awaited).
    pub fn await_echo(&self) {
        self.awaited().push_back(Instant::now());
    }

    /// The line awaited last could not be said after all.
    pub fn forget_last_awaited(&self) {
        self.awaited().pop_back();
    }

    /// An echo of the relay's own avatar came back: the oldest awaited line is accounted for.
    pub fn echo_arrived(&self) {
        self.awaited().pop_front();
    }

    /// Removes and counts the awaited echoes due (said more than `ECHO_DEADLINE` ago) before a
    /// viewer GET that started at `poll_started` and has been read without them: the viewer
    /// handed them to someone else.
    pub fn take_missing_echoes(&self, poll_started: Instant) -> usize {
        let mut awaited = self.awaited();
        let n_missing = awaited
            .iter()
            .take_while(|said| **said + ECHO_DEADLINE <= poll_started)
            .count();
        awaited.drain(..n_missing);
        n_missing
    }

    fn awaited(&self) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
        self.awaited
            .lock()
            .expect("echo memory lock is never poisoned")
    }

    /// Whether `text` is the echo of something said recently; each said text matches one echo.
    pub fn take_echo(&self, text: &str) -> bool {
        let mut texts = self
            .texts
            .lock()
            .expect("echo memory lock is never poisoned");
        texts.retain(|(_, at)| at.elapsed() < ECHO_MEMORY);
        match texts.iter().position(|(said, _)| said == text) {
            Some(idx) => {
                texts.remove(idx);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_echo_not_back_before_a_later_poll_past_its_deadline_is_missing() {
        let said = RecentlySaid::default();
        said.await_echo();
        said.await_echo();
        let said_at = Instant::now();
        assert_eq!(said.take_missing_echoes(said_at), 0, "not due yet");
        said.echo_arrived();
        assert_eq!(said.take_missing_echoes(said_at + ECHO_DEADLINE * 2), 1);
        assert_eq!(said.take_missing_echoes(said_at + ECHO_DEADLINE * 3), 0);
    }

    #[test]
    fn each_said_text_absorbs_one_echo() {
        let said = RecentlySaid::default();
        said.remember("hello");
        assert!(said.take_echo("hello"));
        assert!(!said.take_echo("hello"));
    }
}
