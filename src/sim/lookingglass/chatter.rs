//! Generated avatar chat for the simulated viewer: numbered lines from three avatars at a steady
//! rate, optionally stamped with the moment they were said and padded to a size, for `sim viewer
//! --chatter`, the demo and load tests.
//!
//! It must not touch the viewer's state directly: it speaks through a [`ViewerHandle`].

use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sim::lookingglass::ViewerHandle;

/// The avatars of the generated chatter: two that a relay typically maps and one it does not.
const CHATTER_AVATARS: [&str; 3] = ["Alice Resident", "Bob Builder", "Carol Visitor"];

/// How chatter lines look beyond `hello #N from NAME` (see
/// [`ViewerArgs`](crate::sim::lookingglass::ViewerArgs)).
#[derive(Clone, Copy, Debug, Default)]
pub struct ChatterStyle {
    /// Append ` @<unix microseconds>` of the moment the line is said.
    pub stamp: bool,
    /// Pad the line with words to at least this many bytes.
    pub min_bytes: usize,
}

/// Makes the chatter avatars say numbered lines, `lines_per_second` in all, until `shutdown` is
/// cancelled. Used by `--chatter` and by the demo.
pub fn spawn_chatter(
    handle: ViewerHandle,
    lines_per_second: f64,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    spawn_chatter_styled(handle, lines_per_second, ChatterStyle::default(), shutdown)
}

/// [`spawn_chatter`] with lines shaped by `style`. The timer ticks at most 1000 times a second;
/// each tick says every line due by then, so rates above 1000 lines/s come in small bursts.
pub fn spawn_chatter_styled(
    handle: ViewerHandle,
    lines_per_second: f64,
    style: ChatterStyle,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if !lines_per_second.is_finite() || lines_per_second <= 0.0 {
            return;
        }
        let period = Duration::from_secs_f64(1.0 / lines_per_second.min(1000.0));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = tokio::time::Instant::now();
        let mut line_number: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            // At least one line per tick (the first one at once), then catch up with the clock.
            let due = (started.elapsed().as_secs_f64() * lines_per_second) as u64;
            let until = due.max(line_number + 1);
            while line_number < until {
                line_number += 1;
                let index = usize::try_from(line_number % 3).unwrap_or(0);
                let speaker = CHATTER_AVATARS[index];
                handle.say(speaker, &chatter_line(line_number, speaker, style));
            }
        }
    })
}

fn chatter_line(line_number: u64, speaker: &str, style: ChatterStyle) -> String {
    const FILLER: &str = " the quick brown fox jumps over the lazy dog";
    let mut line = format!("hello #{line_number} from {speaker}");
    while line.len() < style.min_bytes {
        let missing = style.min_bytes - line.len();
        line.push_str(&FILLER[..missing.min(FILLER.len())]);
    }
    if style.stamp {
        let micros = Utc::now().timestamp_micros();
        line.push_str(&format!(" @{micros}"));
    }
    line
}
