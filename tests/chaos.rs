//! The short seeded fault campaign over real processes (`baton_tests::campaign`): every fault kind
//! at least once, the double failure among them, then a history check. `scripts/chaos.sh manager
//! --faults N --seed S` runs the long one.

use std::time::Duration;

use baton_tests::campaign::{Config, Kind, run};

/// Every kind of fault once, then two drawn at random, against two managers on a real etcd; the
/// recorded history must show every acknowledged request answered exactly once, terms never going
/// back, one acknowledger per term and restart data never stale, and the driver must have seen
/// no manager without the latest acknowledgments take over. The seed is printed (and taken from
/// `BATON_CHAOS_SEED`), so a failure replays with the same schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seeded_campaign_of_every_fault_kind_loses_nothing() {
    let seed = std::env::var("BATON_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand_seed);
    println!("chaos seed {seed} (BATON_CHAOS_SEED={seed} replays this schedule)");
    let config = Config {
        faults: Kind::ALL.len() + 2,
        seed,
        managers: 2,
        ttl_secs: 2,
        sessions: 3,
        servers: 2,
        pace: Duration::from_millis(20),
        bench_bin: env!("CARGO_BIN_EXE_baton-bench").into(),
        kinds: Vec::new(),
        every_kind_first: true,
    };
    let outcome = tokio::time::timeout(Duration::from_secs(170), run(config, baton_tests::TempDir::new()))
        .await
        .expect("the campaign finished within 170 s");
    let lines = outcome.lines(seed);
    for line in &lines {
        println!("{line}");
    }
    assert!(outcome.ok(), "the campaign found a violation:\n{}", lines.join("\n"));
    assert_eq!(outcome.figures.len(), Kind::ALL.len(), "every fault kind ran: {:?}", outcome.figures.keys());
    assert!(!outcome.figures[&Kind::DoubleFailure].is_empty(), "a double failure ran");
    assert!(outcome.report.acked >= 500, "enough traffic to mean something: {} acknowledged", outcome.report.acked);
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000
}
