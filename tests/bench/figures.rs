//! The summary table of `scripts/bench.sh`: each area records its headline figures, each with the
//! peer measured in the same run (a raw load, a raw scan, or another system) and its target, and
//! the table printed at the end says, figure by figure, whether the target is met. The table is
//! Markdown, headed by the date and the machine, to be kept in `docs/performance.md` as it is.

use std::sync::Mutex;

/// What a figure must be.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// At least this value.
    AtLeast(f64),
    /// At most this value.
    AtMost(f64),
    /// At least this ratio of the peer's figure.
    OfPeer(f64),
    /// No target: shown for the record.
    None,
}

/// One measured figure.
#[derive(Debug, Clone)]
struct Figure {
    what: String,
    value: f64,
    unit: &'static str,
    peer: Option<(String, f64)>,
    target: Target,
}

static FIGURES: Mutex<Vec<Figure>> = Mutex::new(Vec::new());

/// Records a figure for the table: `what` measured at `value` `unit`, beside `peer` (its name
/// and figure, in the same unit), against `target`.
pub fn record(what: impl Into<String>, value: f64, unit: &'static str, peer: Option<(&str, f64)>, target: Target) {
    let peer = peer.map(|(name, v)| (name.to_owned(), v));
    FIGURES.lock().unwrap().push(Figure { what: what.into(), value, unit, peer, target });
}

/// A peer the issue names but this bench does not run yet: the figure's row says so, and its
/// target is not met.
pub fn record_unmeasured_peer(what: impl Into<String>, value: f64, unit: &'static str, peer: &str, ratio: f64) {
    let what = format!("{} (peer {peer}: not measured yet)", what.into());
    FIGURES.lock().unwrap().push(Figure { what, value, unit, peer: None, target: Target::OfPeer(ratio) });
}

fn number(v: f64) -> String {
    if v.abs() >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
}

/// The table of every figure recorded, or None when there is none.
pub fn table() -> Option<String> {
    let figures = FIGURES.lock().unwrap();
    if figures.is_empty() {
        return None;
    }
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut out = format!(
        "bench summary, {date}, {cores} cores ({machine})\n\n| figure | value | peer | ratio | target | met |\n|---|---|---|---|---|---|\n"
    );
    for f in figures.iter() {
        let value = format!("{} {}", number(f.value), f.unit);
        let (peer, ratio) = match &f.peer {
            Some((name, v)) => (format!("{name}: {} {}", number(*v), f.unit), format!("{:.2}×", f.value / v)),
            None => ("—".to_owned(), "—".to_owned()),
        };
        let (target, met) = match f.target {
            Target::AtLeast(t) => (format!("≥ {} {}", number(t), f.unit), f.value >= t),
            Target::AtMost(t) => (format!("≤ {} {}", number(t), f.unit), f.value <= t),
            Target::OfPeer(r) => (format!("≥ {r:.2}× peer"), f.peer.as_ref().is_some_and(|(_, v)| f.value >= r * v)),
            Target::None => ("—".to_owned(), true),
        };
        let met = match f.target {
            Target::None => "—",
            _ if met => "yes",
            _ => "no",
        };
        out.push_str(&format!("| {} | {value} | {peer} | {ratio} | {target} | {met} |\n", f.what));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_is_judged_against_its_figure_or_its_peer() {
        record("fast enough", 120.0, "ops/s", None, Target::AtLeast(100.0));
        record("quick enough", 30.0, "ms", None, Target::AtMost(20.0));
        record("half the raw load", 60.0, "rows/s", Some(("raw", 100.0)), Target::OfPeer(0.5));
        record_unmeasured_peer("as fast as a broker", 120.0, "ops/s", "core NATS", 1.0);
        let table = table().unwrap();
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| figure")).collect();
        assert!(rows[0].ends_with("| ≥ 100 ops/s | yes |"), "{}", rows[0]);
        assert!(rows[1].ends_with("| ≤ 20.00 ms | no |"), "{}", rows[1]);
        assert!(rows[2].contains("| raw: 100 rows/s | 0.60× | ≥ 0.50× peer | yes |"), "{}", rows[2]);
        assert!(rows[3].contains("not measured yet") && rows[3].ends_with("| no |"), "{}", rows[3]);
    }
}
