//! The demo's closing lines add up for a newcomer: every line said is accounted for by name.

use std::process::Command;

/// The numbers in `line`, in order.
fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit())
        .filter_map(|word| word.parse().ok())
        .collect()
}

#[test]
fn the_demos_closing_line_names_every_part_of_what_was_said() {
    // Act: the demo as a newcomer runs it, for a few seconds.
    let output = Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"))
        .args(["demo", "--duration", "8s"])
        .env_remove("RELAY_CONFIG")
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");

    // Assert: said = stored + commands + kept out + waiting + unread, and "stored" is the number
    // of stored lines the demo printed.
    let closing = stdout
        .lines()
        .find(|line| line.starts_with("--- grid -> cms:"))
        .expect("a closing line");
    for part in [
        "stored by the CMS",
        "commands",
        "kept out",
        "waiting in the outbox",
        "not yet read",
    ] {
        assert!(closing.contains(part), "no {part:?} in {closing}");
    }
    let n = numbers(closing);
    assert_eq!(n.len(), 6, "{closing}");
    assert_eq!(n[0], n[1..].iter().sum::<u64>(), "{closing}");
    let n_printed = stdout
        .lines()
        .filter(|l| l.starts_with("grid -> cms #"))
        .count() as u64;
    assert_eq!(n[1], n_printed, "{stdout}");
    let in_world = stdout
        .lines()
        .find(|line| line.starts_with("--- cms -> grid:"))
        .expect("the in-world line");
    let n = numbers(in_world);
    let n_said_in_world = stdout
        .lines()
        .filter(|l| l.contains("said in-world on channel"))
        .count() as u64;
    assert_eq!(n[1] + n[2], n_said_in_world, "{in_world}");
}
