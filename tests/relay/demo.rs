//! The demo's closing lines add up for a newcomer, region by region: every line said in each of
//! its two regions is accounted for by name, and a line typed in the CMS is said in both.

use std::process::Command;

/// The numbers in `line`, in order.
fn numbers(line: &str) -> Vec<u64> {
    line.split(|c: char| !c.is_ascii_digit())
        .filter_map(|word| word.parse().ok())
        .collect()
}

#[test]
fn the_demos_closing_lines_name_every_part_of_what_was_said_in_each_region() {
    // Act: the demo as a newcomer runs it, for a few seconds.
    let output = Command::new(env!("CARGO_BIN_EXE_opensim-chat-relay"))
        .args(["demo", "--duration", "8s"])
        .env_remove("RELAY_CONFIG")
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");

    for region in ["Welcome", "Sandbox"] {
        // Assert: said = stored + commands + kept out + waiting + unread in each region, "stored"
        // is the number of stored lines the demo printed for it, and some were stored.
        let closing = stdout
            .lines()
            .find(|line| line.starts_with(&format!("--- grid -> cms in {region}:")))
            .unwrap_or_else(|| panic!("a closing line for {region}: {stdout}"));
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
            .filter(|l| l.starts_with("grid -> cms #") && l.contains(&format!(" {region} ")))
            .count() as u64;
        assert_eq!(n[1], n_printed, "{stdout}");
        assert!(n_printed > 0, "nothing stored from {region}: {stdout}");

        // The in-world line: typed lines said there plus the relay's own = the lines printed as
        // said in-world in that region.
        let in_world = stdout
            .lines()
            .find(|line| line.starts_with(&format!("--- cms -> grid in {region}:")))
            .unwrap_or_else(|| panic!("the in-world line for {region}: {stdout}"));
        let n = numbers(in_world);
        let n_said_in_world = stdout
            .lines()
            .filter(|l| l.contains(&format!("said in-world in {region:<8} on channel")))
            .count() as u64;
        assert_eq!(n[1] + n[2], n_said_in_world, "{in_world}");
    }
}
