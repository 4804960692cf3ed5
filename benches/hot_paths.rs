//! Criterion benchmarks of the relay's hot paths: parsing a viewer chat response, building a CMS
//! batch body, and the outbox's append + flush and remove.
//!
//! ```sh
//! cargo bench --bench hot_paths                 # everything
//! cargo bench --bench hot_paths -- parse_chat   # one group
//! ```
//!
//! Compare figures within one run: the machines are shared and noisy. The outbox benchmarks include
//! the flush (an fsync of sled's log), so they measure the disk as much as the code.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use opensim_chat_relay::cms::wire::{ChatItem, encode_batch, sanitize_message};
use opensim_chat_relay::lookingglass::wire::parse_chat;
use opensim_chat_relay::model::CapturedLine;
use opensim_chat_relay::outbox::Outbox;
use opensim_chat_relay::zone::Zone;

const SPEAKERS: [&str; 3] = ["Alice Resident", "Bob Builder", "J\u{fc}rgen M\u{fc}ller"];

fn polled_at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 0, 41, 0)
        .single()
        .expect("a valid instant")
}

/// A chat GET body of `n_lines` entries shaped like spec §2.9: the viewer's hand-written JSON (every
/// non-ASCII character escaped), `Time` on the 12-hour clock, `1`-suffixed keys for lines of the
/// same millisecond, a mix of avatars, a whisper, an object and a system line.
fn viewer_body(n_lines: usize) -> Vec<u8> {
    let mut body = String::from("{");
    for idx in 0..n_lines {
        // Ten lines per millisecond: the key of the second and later ones gets `1`s appended.
        let millis = 43 + idx / 10;
        let time = format!(
            "2026112201{:02}{:02}{:03}",
            (millis / 60_000) % 60,
            (millis / 1000) % 60,
            millis % 1000
        );
        let key = format!("{time}{}", "1".repeat(idx % 10));
        let (from, message, kind, entry_type, owner) = match idx % 10 {
            7 => (
                "Object",
                "I am a box".to_owned(),
                "Normal",
                "ChatTypeObjectChat",
                "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            ),
            8 => (
                "Second Life",
                "sys notice".to_owned(),
                "Normal",
                "ChatTypeNormal",
                "00000000-0000-0000-0000-000000000000",
            ),
            9 => (
                SPEAKERS[2],
                "Unicode: caf\\u00E9 \\u65E5\\u672C \\uD83D\\uDE00 \\\"quoted\\\" I <3 you"
                    .to_owned(),
                "Whisper",
                "ChatTypeNormal",
                "11111111-2222-3333-4444-555555555557",
            ),
            n => (
                SPEAKERS[n % 2],
                format!("hello #{idx}, nice build over there at the plaza"),
                "Normal",
                "ChatTypeNormal",
                "11111111-2222-3333-4444-555555555555",
            ),
        };
        if idx > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            r#""{key}":{{"Time":"{time}","From":"{from}","Message":"{message}","Type":"{kind}","EntryType":"{entry_type}","Position":"<128.5, 130.25, 22.12346>","OwnerID":"{owner}"}}"#
        ));
    }
    body.push('}');
    body.into_bytes()
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_chat");
    let zone: Zone = "Europe/Amsterdam".parse().expect("zone");
    for n_lines in [1, 100, 10_000] {
        let body = viewer_body(n_lines);
        let parsed = parse_chat(&body, polled_at(), zone).expect("the body parses");
        assert_eq!(
            parsed.lines.len(),
            n_lines,
            "every generated entry is usable"
        );
        group.throughput(Throughput::Elements(n_lines as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n_lines), &body, |b, body| {
            b.iter(|| parse_chat(body, polled_at(), zone).expect("parses"))
        });
    }
    group.finish();
}

fn chat_items(n_lines: usize) -> Vec<ChatItem> {
    (0..n_lines)
        .map(|idx| ChatItem {
            user_id: if idx % 3 == 2 {
                -1
            } else {
                3 + (idx % 2) as i64
            },
            message: sanitize_message(&format!(
                "[{}] hello #{idx}, nice build over there at the plaza",
                SPEAKERS[idx % 3]
            )),
            timestamp: "2026-11-22 01:41:00".to_owned(),
            from_cms: 0,
        })
        .collect()
}

fn cms_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("cms_batch_body");
    for n_lines in [1, 100] {
        let items = chat_items(n_lines);
        group.throughput(Throughput::Elements(n_lines as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n_lines), &items, |b, items| {
            b.iter(|| encode_batch(items))
        });
    }
    group.finish();
}

fn captured(n_lines: usize) -> Vec<CapturedLine> {
    (0..n_lines)
        .map(|idx| CapturedLine {
            source: opensim_chat_relay::model::LineSource::Avatar,
            speaker: SPEAKERS[idx % 3].to_owned(),
            owner_id: Some("11111111-2222-3333-4444-555555555555".to_owned()),
            message: format!("hello #{idx}, nice build over there at the plaza"),
            spoken_at: polled_at(),
            captured_at: polled_at(),
            region: String::new(),
        })
        .collect()
}

fn outbox(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let outbox = Outbox::open(dir.path(), 8 << 20).expect("the outbox opens");
    let mut group = c.benchmark_group("outbox");
    group.measurement_time(Duration::from_secs(5));
    for n_lines in [1, 100] {
        let lines = captured(n_lines);
        group.throughput(Throughput::Elements(n_lines as u64));
        group.bench_with_input(
            BenchmarkId::new("append_flush", n_lines),
            &lines,
            |b, lines| {
                b.iter(|| runtime.block_on(outbox.append(lines)).expect("append"));
            },
        );
        // Keep the tree small between iterations: remove what the appends left.
        drain(&runtime, &outbox);
        group.bench_with_input(
            BenchmarkId::new("remove_flush", n_lines),
            &lines,
            |b, lines| {
                b.iter_batched(
                    || {
                        runtime.block_on(outbox.append(lines)).expect("append");
                        outbox
                            .oldest(lines.len())
                            .expect("read")
                            .into_iter()
                            .map(|pending| pending.id)
                            .collect::<Vec<u64>>()
                    },
                    |ids| runtime.block_on(outbox.remove(&ids)).expect("remove"),
                    BatchSize::SmallInput,
                );
            },
        );
        group.bench_with_input(BenchmarkId::new("oldest", n_lines), &lines, |b, lines| {
            runtime.block_on(outbox.append(lines)).expect("append");
            b.iter(|| outbox.oldest(lines.len()).expect("read"));
        });
        drain(&runtime, &outbox);
    }
    group.finish();
}

fn drain(runtime: &tokio::runtime::Runtime, outbox: &Outbox) {
    loop {
        let ids: Vec<u64> = outbox
            .oldest(10_000)
            .expect("read")
            .into_iter()
            .map(|pending| pending.id)
            .collect();
        if ids.is_empty() {
            return;
        }
        runtime.block_on(outbox.remove(&ids)).expect("remove");
    }
}

criterion_group!(benches, parse, cms_batch, outbox);
criterion_main!(benches);
