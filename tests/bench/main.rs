//! `baton-bench`: the benchmarks behind `scripts/bench.sh`. Each starts the real (release)
//! `baton` binary, drives it over gRPC, and prints its figures; the last line is a summary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_mesh::proto::v1 as pb;
use baton_store::Backend;
use baton_tests::{Server, authed, create_org, record};
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Figures {
    requests_per_s: f64,
    records_per_s: f64,
    p50: Duration,
    p99: Duration,
}

/// Upserts `size`-record requests from `clients` concurrent clients for `seconds`.
async fn upsert_load(server: &Server, size: usize, clients: usize, seconds: f64) -> Figures {
    let org = Arc::new(create_org(server, "bench").await);
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let org = org.clone();
        let mut intake = server.intake().await;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0usize;
            while Instant::now() < stop {
                let records = (0..size)
                    .map(|k| {
                        record(
                            json!({"code": format!("c{c}-{}", (n * size + k) % 20_000), "name": "bench", "amount": n}),
                        )
                    })
                    .collect();
                let started = Instant::now();
                intake
                    .upsert(authed(pb::UpsertRequest { object: "account".into(), records }, &org.key))
                    .await
                    .expect("upsert");
                latencies.push(started.elapsed());
                n += 1;
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    Figures {
        requests_per_s: all.len() as f64 / elapsed,
        records_per_s: (all.len() * size) as f64 / elapsed,
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
    }
}

async fn intake(seconds: f64) {
    let mut summary = Vec::new();
    for backend in baton_store::testing::backends() {
        let name = match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        };
        for size in [1usize, 200] {
            let server = Server::start(backend, &["--max-in-flight-per-org", "64"]).await;
            let f = upsert_load(&server, size, 8, seconds).await;
            println!(
                "intake {name:8} {size:3}-record upserts, 8 clients, {seconds}s: {:8.0} req/s {:9.0} records/s  p50 {:6.2} ms  p99 {:6.2} ms",
                f.requests_per_s,
                f.records_per_s,
                ms(f.p50),
                ms(f.p99)
            );
            summary.push(format!("{name} {size}rec {:.0} req/s p99 {:.1}ms", f.requests_per_s, ms(f.p99)));
        }
    }
    println!("summary: intake upserts: {}", summary.join("; "));
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let area = args.next().unwrap_or_default();
    let seconds: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5.0);
    match area.as_str() {
        "intake" => intake(seconds).await,
        other => {
            eprintln!("baton-bench: unknown area {other:?}; areas: intake");
            std::process::exit(64);
        }
    }
}
