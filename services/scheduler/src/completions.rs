//! Completions pushed: the delivery loop that POSTs a finished batch's or export's completion to
//! the webhook it named, signed, until the receiver acknowledges it.
//!
//! The scheduler runs it because it already watches batches to their end and holds the store; any
//! number of schedulers may run it on one database. Each tick (`--webhook-poll`) it
//! 1. finds WAITING deliveries whose batch or export has finished, builds each one's body (a JSON
//!    document, [`batch_body`], [`export_body`]) and makes it PENDING with that body
//!    ([`Store::ready_completion`], conditional: one scheduler does it);
//! 2. claims PENDING deliveries that are due, with a lease ([`Store::claim_completions`]: one
//!    scheduler wins each), and POSTs each one in a task of its own, at most [`CONCURRENCY`] at
//!    once;
//! 3. records each answer ([`Store::record_delivery`]): a 2xx is DELIVERED; anything else (an
//!    error status, a redirect, a transport error, no answer within `--webhook-timeout`) is
//!    retried after a backoff (`--webhook-backoff` doubling up to `--webhook-backoff-max`), and
//!    given up (FAILED) when the next attempt would start later than `--webhook-give-up` after
//!    the completion.
//!
//! Everything is in the store, so a restarted scheduler (or another one) carries on; a restarted
//! scheduler first gives up the leases of its own last run ([`Store::release_completion_claims`]).
//! Delivery is at least once: an attempt whose scheduler dies after the POST and before the record
//! is made again, and a scheduler that stalls past its lease may race another one. The receiver
//! deduplicates by the `Baton-Delivery` header, the batch or export id; the store counts every
//! 2xx it is told of (`acknowledgments`).
//!
//! Signing: the body is signed with HMAC-SHA256 under the org's webhook secret, `Baton-Signature:
//! t=<unix seconds>,v1=<hex of HMAC(org secret, "<t>.<body>")>`. The org's secret is derived from
//! the scheduler's `--webhook-secret` ([`org_secret`]: the hex HMAC-SHA256 of the org id under
//! it), so that one org cannot sign completions another org's receiver would accept, and no secret
//! per org is stored; the operator hands each org its own (README, "Completion webhooks"). A
//! scheduler without `--webhook-secret` sends nothing unsigned: its attempts fail with that cause.
//!
//! Reach: unless `--webhook-allow-internal`, a webhook reaches public addresses only (an address
//! literal is checked before the attempt, a name's addresses when it is resolved,
//! [`is_internal`]), so that an org cannot make the scheduler call services inside the
//! deployment; redirects are never followed, for the same reason and because a redirect is not an
//! acknowledgment.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use baton_mesh::config::parse_duration;
use baton_mesh::now_ms;
use baton_store::Store;
use baton_store::batches::{BatchInfo, BatchState};
use baton_store::completions::{Attempted, Claimed, Kind};
use baton_store::exports::{ExportInfo, ExportState};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Deliveries attempted at once by one scheduler.
pub const CONCURRENCY: usize = 16;
/// Completions made ready, and claimed, per tick at most.
const BATCH: u32 = 100;
/// How long a claim outlives the attempt's timeout: the margin for recording the answer.
const LEASE_MARGIN: Duration = Duration::from_secs(10);
/// The most bytes of an error answer's body kept in `last_error`.
const ANSWER_EXCERPT: usize = 200;

/// How completions are delivered, as flags and `BATON_*` variables.
#[derive(clap::Args, Debug, Clone)]
pub struct WebhookOptions {
    /// The secret completion webhooks are signed with: each org's signing secret is derived from
    /// it (the hex HMAC-SHA256 of the org id under it; see the README). Without it no completion
    /// is sent (none goes out unsigned): attempts fail, and are retried, until it is set.
    #[arg(long, env = "BATON_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// How often finished batches and exports, and deliveries due, are looked for (also the
    /// completions awaited on manager sessions).
    #[arg(long, env = "BATON_WEBHOOK_POLL", default_value = "1s", value_parser = parse_duration)]
    pub webhook_poll: Duration,

    /// How long an attempt waits for the receiver's answer.
    #[arg(long, env = "BATON_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,

    /// The wait before the second attempt; each next wait doubles, up to `--webhook-backoff-max`.
    #[arg(long, env = "BATON_WEBHOOK_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub webhook_backoff: Duration,

    /// The longest wait between two attempts.
    #[arg(long, env = "BATON_WEBHOOK_BACKOFF_MAX", default_value = "60s", value_parser = parse_duration)]
    pub webhook_backoff_max: Duration,

    /// How long after the completion attempts go on: no attempt starts later, and the delivery
    /// is then recorded FAILED.
    #[arg(long, env = "BATON_WEBHOOK_GIVE_UP", default_value = "24h", value_parser = parse_duration)]
    pub webhook_give_up: Duration,

    /// Lets webhooks reach loopback, private, link-local and other internal addresses. By
    /// default an org's webhook may only reach public addresses, so that it cannot make the
    /// scheduler call services inside the deployment (an attempt is refused, and retried, with
    /// that cause).
    #[arg(long, env = "BATON_WEBHOOK_ALLOW_INTERNAL")]
    pub webhook_allow_internal: bool,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            webhook_secret: None,
            webhook_poll: Duration::from_secs(1),
            webhook_timeout: Duration::from_secs(10),
            webhook_backoff: Duration::from_secs(1),
            webhook_backoff_max: Duration::from_secs(60),
            webhook_give_up: Duration::from_secs(24 * 3600),
            webhook_allow_internal: false,
        }
    }
}

impl WebhookOptions {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        let between = |name: &str, d: Duration, low: Duration, high: Duration| {
            if d < low || d > high {
                return Err(format!("--{name} must be between {low:?} and {high:?}, got {d:?}"));
            }
            Ok(())
        };
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        between("webhook-poll", self.webhook_poll, ms(10), s(60))?;
        between("webhook-timeout", self.webhook_timeout, ms(100), s(300))?;
        between("webhook-backoff", self.webhook_backoff, ms(10), s(3600))?;
        between("webhook-backoff-max", self.webhook_backoff_max, self.webhook_backoff, s(24 * 3600))?;
        between("webhook-give-up", self.webhook_give_up, ms(100), s(30 * 24 * 3600))?;
        if self.webhook_secret.as_deref().is_some_and(|s| s.len() < 16) {
            return Err("--webhook-secret must be at least 16 characters".into());
        }
        Ok(())
    }

    /// When to try again after `attempts` failed attempts of a completion that became ready at
    /// `ready_at_ms`, the last one ending at `now_ms`: None when that is past the give-up deadline.
    pub fn retry_at(&self, attempts: u32, ready_at_ms: i64, now_ms: i64) -> Option<i64> {
        let doublings = attempts.saturating_sub(1).min(31);
        let wait = self.webhook_backoff.saturating_mul(1u32 << doublings).min(self.webhook_backoff_max);
        let at = now_ms.saturating_add(wait.as_millis() as i64);
        (at <= ready_at_ms.saturating_add(self.webhook_give_up.as_millis() as i64)).then_some(at)
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac_hex(key: &[u8], message: &[u8]) -> String {
    // HMAC takes a key of any length
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

/// The webhook secret of `org`: the hex HMAC-SHA256 of the org id under the scheduler's secret
/// (`printf %s ORG_ID | openssl dgst -sha256 -hmac SECRET`).
pub fn org_secret(secret: &str, org: &str) -> String {
    hmac_hex(secret.as_bytes(), org.as_bytes())
}

/// The `Baton-Signature` header of `body` sent at `t` (unix seconds), under the org's secret.
pub fn signature(org_secret: &str, t: i64, body: &str) -> String {
    let signed = format!("{t}.{body}");
    format!("t={t},v1={}", hmac_hex(org_secret.as_bytes(), signed.as_bytes()))
}

fn rfc3339(ms: i64) -> serde_json::Value {
    if ms <= 0 {
        return serde_json::Value::Null;
    }
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(at).to_string().into()
}

/// The event of a completion (`Baton-Event`, and the body's `event`).
pub fn event(kind: Kind) -> &'static str {
    match kind {
        Kind::Batch => "batch.completed",
        Kind::Export => "export.completed",
    }
}

/// The body of a finished batch's completion.
pub fn batch_body(b: &BatchInfo) -> serde_json::Value {
    let t = &b.totals;
    let state = match b.state {
        BatchState::Cancelled => "CANCELLED",
        _ => "DONE",
    };
    serde_json::json!({
        "event": event(Kind::Batch),
        "delivery_id": b.id,
        "org_id": b.org_id,
        "batch": {
            "batch_id": b.id,
            "object": b.spec.object,
            "operation": b.spec.operation.as_str().to_uppercase(),
            "request_id": b.spec.request_id.clone().unwrap_or_default(),
            "state": state,
            "records": t.records,
            "records_committed": t.records_committed,
            "chunks": t.chunks,
            "committed": t.committed,
            "committed_after_retry_resources": t.committed_after_retry_resources,
            "committed_after_retry_workload": t.committed_after_retry_workload,
            "aborted": t.aborted,
            "cancelled": t.cancelled,
            "create_time": rfc3339(b.created_at_ms),
            "finish_time": rfc3339(b.finished_at_ms),
        },
    })
}

/// The body of a finished export's completion.
pub fn export_body(e: &ExportInfo) -> serde_json::Value {
    serde_json::json!({
        "event": event(Kind::Export),
        "delivery_id": e.id,
        "org_id": e.org_id,
        "export": {
            "export_id": e.id,
            "object": e.object,
            "state": e.state.as_str(),
            "error": e.error,
            "as_of_seq": e.as_of_seq,
            "first_rows": e.first_rows,
            "parts_ready": e.parts_ready,
            "rows_ready": e.rows_ready,
            "create_time": rfc3339(e.created_at_ms),
            "finish_time": rfc3339(e.finished_at_ms),
            "expire_time": rfc3339(e.expires_at_ms),
        },
    })
}

/// Whether an export's state is final.
fn finished(state: ExportState) -> bool {
    !matches!(state, ExportState::Producing)
}

/// Whether `ip` is an address inside a deployment rather than on the internet: loopback,
/// unspecified, private (RFC 1918, IPv6 unique local), link-local, shared (100.64/10), `0/8`,
/// broadcast, multicast, or an IPv4-mapped IPv6 address of one of those.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let [first, second, ..] = a.octets();
            a.is_loopback()
                || a.is_unspecified()
                || a.is_private()
                || a.is_link_local()
                || a.is_broadcast()
                || a.is_multicast()
                || first == 0
                || (first == 100 && (second & 0xc0) == 64)
        }
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || a.to_ipv4_mapped().is_some_and(|v4| is_internal(IpAddr::V4(v4)))
        }
    }
}

/// Refuses a webhook URL whose host is an internal address literal (names are checked when
/// resolved, by [`PublicOnly`]).
fn check_literal(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL ({e})"))?;
    let ip = match parsed.host() {
        Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
        Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
        _ => return Ok(()),
    };
    if is_internal(ip) {
        return Err(format!("{ip} is an internal address (--webhook-allow-internal allows it)"));
    }
    Ok(())
}

/// A resolver that keeps only the public addresses of a name (and fails when none is left), so
/// that a webhook cannot reach inside the deployment through a name.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_owned();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all.iter().copied().filter(|a| !is_internal(a.ip())).collect();
            if public.is_empty() {
                let all: Vec<String> = all.iter().map(|a| a.ip().to_string()).collect();
                let why = format!(
                    "{name} resolves to internal addresses only ({}); --webhook-allow-internal allows them",
                    all.join(", ")
                );
                return Err(why.into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An error with its sources, on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

/// The delivery loop and what its attempts share.
struct Deliverer {
    store: Store,
    options: WebhookOptions,
    client: reqwest::Client,
    me: String,
}

impl Deliverer {
    /// Makes the finished WAITING completions PENDING, each with its body. A row that cannot be
    /// made ready is skipped (and logged) without holding up the others.
    async fn ready(&self) -> Result<(), baton_store::Error> {
        for (kind, id, org) in self.store.finished_waiting(BATCH).await? {
            let made = async {
                let Some(body) = self.body(kind, &org, &id).await? else { return Ok(false) };
                self.store.ready_completion(&id, &body.to_string()).await
            };
            match made.await {
                Ok(true) => tracing::debug!(subject = %id, org = %org, "completion ready to deliver"),
                Ok(false) => {}
                Err(e) => tracing::warn!(subject = %id, org = %org, error = %e, "cannot make a completion ready"),
            }
        }
        Ok(())
    }

    /// The body of the completion of `kind` `id`, or None if it is not finished after all.
    async fn body(&self, kind: Kind, org: &str, id: &str) -> Result<Option<serde_json::Value>, baton_store::Error> {
        Ok(match kind {
            Kind::Batch => {
                let batch = self.store.batch(org, id).await?;
                batch.is_finished().then(|| batch_body(&batch))
            }
            Kind::Export => {
                let export = self.store.export_of_completion(org, id).await?;
                finished(export.state).then(|| export_body(&export))
            }
        })
    }

    /// POSTs a claimed completion: Ok on a 2xx answer, otherwise what went wrong.
    async fn post(&self, c: &Claimed) -> Result<(), String> {
        let Some(secret) = &self.options.webhook_secret else {
            return Err("this scheduler has no --webhook-secret: completions are never sent unsigned".into());
        };
        if !self.options.webhook_allow_internal {
            check_literal(&c.url)?;
        }
        let t = now_ms() / 1000;
        let response = self
            .client
            .post(&c.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Baton-Delivery", &c.subject_id)
            .header("Baton-Event", event(c.kind))
            .header("Baton-Attempt", c.attempts.to_string())
            .header("Baton-Signature", signature(&org_secret(secret, &c.org_id), t, &c.body))
            .body(c.body.clone())
            .send()
            .await
            .map_err(|e| chain(&e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        // the start of the answer, for the record
        let mut excerpt = Vec::new();
        let mut response = response;
        while excerpt.len() < ANSWER_EXCERPT {
            match response.chunk().await {
                Ok(Some(bytes)) => excerpt.extend_from_slice(&bytes),
                _ => break,
            }
        }
        excerpt.truncate(ANSWER_EXCERPT);
        let excerpt = String::from_utf8_lossy(&excerpt);
        let excerpt = excerpt.trim();
        Err(if excerpt.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {excerpt}") })
    }

    /// Attempts a claimed completion and records the answer.
    async fn attempt(&self, c: Claimed) {
        let answer = self.post(&c).await;
        let attempted = match answer {
            Ok(()) => {
                tracing::info!(subject = %c.subject_id, org = %c.org_id, attempts = c.attempts, "completion delivered");
                Attempted::Acknowledged
            }
            Err(error) => {
                let retry_at_ms = self.options.retry_at(c.attempts, c.ready_at_ms, now_ms());
                match retry_at_ms {
                    Some(at) => tracing::warn!(
                        subject = %c.subject_id, url = %c.url, attempts = c.attempts, %error,
                        retry_in_ms = at - now_ms(), "completion not delivered; retrying"
                    ),
                    None => tracing::warn!(
                        subject = %c.subject_id, url = %c.url, attempts = c.attempts, %error,
                        "completion not delivered; given up"
                    ),
                }
                Attempted::Failed { error, retry_at_ms }
            }
        };
        if let Err(e) = self.store.record_delivery(&c.subject_id, &self.me, &attempted).await {
            // the lease runs out and the attempt is made again: at least once
            tracing::warn!(subject = %c.subject_id, error = %e, "cannot record a completion's delivery");
        }
    }
}

/// Runs the delivery loop of scheduler `me` until `shutdown`.
pub async fn run(store: Store, options: WebhookOptions, me: String, shutdown: CancellationToken) {
    if options.webhook_secret.is_none() {
        tracing::info!("no --webhook-secret: completion webhooks are not sent (their attempts fail until it is set)");
    }
    let mut client = reqwest::Client::builder();
    if !options.webhook_allow_internal {
        client = client.dns_resolver(Arc::new(PublicOnly));
    }
    let client = client
        .timeout(options.webhook_timeout)
        // a receiver answers; a redirect is a misconfigured URL, not an acknowledgment
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("baton/", env!("CARGO_PKG_VERSION")))
        .build();
    let client = match client {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %chain(&e), "cannot build the webhook client; completions are not delivered");
            return;
        }
    };
    let lease = options.webhook_timeout + LEASE_MARGIN;
    let deliverer = Arc::new(Deliverer { store, options, client, me });
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let attempts = tokio_util::task::TaskTracker::new();
    let mut settled = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(deliverer.options.webhook_poll) => {}
        }
        if !settled {
            match deliverer.store.release_completion_claims(&deliverer.me).await {
                Ok(n) => {
                    settled = true;
                    if n > 0 {
                        tracing::info!(deliveries = n, "attempts of the last run given up; due again");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot give up the last run's delivery claims; retrying");
                    continue;
                }
            }
        }
        if let Err(e) = deliverer.ready().await {
            tracing::warn!(error = %e, "cannot look for finished batches and exports to deliver");
        }
        let free = slots.available_permits() as u32;
        if free == 0 {
            continue;
        }
        let claimed = match deliverer.store.claim_completions(&deliverer.me, lease, free.min(BATCH)).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim completions to deliver");
                continue;
            }
        };
        for c in claimed {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let deliverer = deliverer.clone();
            attempts.spawn(async move {
                deliverer.attempt(c).await;
                drop(slot);
            });
        }
    }
    // the attempts under way record their outcome (the node's grace bounds the wait)
    attempts.close();
    attempts.wait().await;
    tracing::info!("completion delivery stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_bound_and_gives_up_at_the_deadline() {
        let options = WebhookOptions {
            webhook_backoff: Duration::from_secs(1),
            webhook_backoff_max: Duration::from_secs(60),
            webhook_give_up: Duration::from_secs(3600),
            ..Default::default()
        };
        let waits: Vec<i64> = (1..=9).map(|n| options.retry_at(n, 0, 1_000).unwrap() - 1_000).collect();
        assert_eq!(waits, [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]);
        assert_eq!(options.retry_at(u32::MAX, 0, 0), Some(60_000));
        // the next attempt would start after the deadline: given up
        assert_eq!(options.retry_at(1, 0, 3_599_000), Some(3_600_000));
        assert_eq!(options.retry_at(1, 0, 3_599_001), None);
    }

    #[test]
    fn signatures_are_hmac_sha256_of_the_time_and_body_under_the_org_secret() {
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?")
        assert_eq!(
            hmac_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let org = org_secret("s3cret-s3cret-s3cret", "org_1");
        assert_eq!(org, hmac_hex(b"s3cret-s3cret-s3cret", b"org_1"));
        assert_ne!(org, org_secret("s3cret-s3cret-s3cret", "org_2"));
        let header = signature(&org, 1_700_000_000, "{}");
        assert_eq!(header, format!("t=1700000000,v1={}", hmac_hex(org.as_bytes(), b"1700000000.{}")));
    }

    #[test]
    fn webhooks_reach_only_public_addresses_unless_allowed() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in ["8.8.8.8", "100.128.0.1", "172.32.0.1", "2001:4860:4860::8888", "::ffff:8.8.8.8"] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
        assert_eq!(check_literal("https://hooks.example.com/x"), Ok(()));
        assert_eq!(check_literal("http://8.8.8.8:8080/x"), Ok(()));
        for url in ["http://127.0.0.1:9000/x", "http://[::1]/x", "http://169.254.169.254/latest"] {
            assert!(check_literal(url).unwrap_err().contains("--webhook-allow-internal"), "{url}");
        }
    }

    #[test]
    fn options_are_checked() {
        assert_eq!(WebhookOptions::default().validate(), Ok(()));
        let short = WebhookOptions { webhook_secret: Some("short".into()), ..Default::default() };
        assert!(short.validate().unwrap_err().contains("--webhook-secret"));
        let inverted = WebhookOptions { webhook_backoff_max: Duration::from_millis(500), ..Default::default() };
        assert!(inverted.validate().unwrap_err().starts_with("--webhook-backoff-max"));
    }
}
