//! When a SUSPENDED or VERIFYING link is probed, and what the answers do to it: the timing and
//! the thresholds, apart from the store and the network so that they are tested on paused time.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use baton_store::sync::LinkState;
use tokio_util::sync::CancellationToken;

/// What a probe's answer does to a SUSPENDED or VERIFYING link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProbeStep {
    /// SUSPENDED and no answer: stay, and probe again after a longer wait.
    StaySuspended,
    /// Answered, this many in a row, fewer than the threshold: VERIFYING.
    Verifying(u32),
    /// Answered, the threshold reached: back to work.
    Resume(u32),
    /// VERIFYING and no answer: SUSPENDED again, the count back to 0.
    Suspend,
}

/// The timing and the thresholds of probing, apart from the store and the network so that they
/// are tested on paused time: while SUSPENDED a link is probed after waits that double from its
/// probe interval (with jitter, at most 32 intervals or 30 s, never less than one interval); the
/// first answer makes it VERIFYING, probed every interval, and `verify_threshold` answers in a
/// row resume it. A failure while VERIFYING suspends it again, the waits starting over.
#[derive(Debug, Default)]
pub(super) struct Probing {
    /// The waits while SUSPENDED (None: the next suspension starts at one interval).
    backoff: Option<backon::ExponentialBackoff>,
}

impl Probing {
    /// Waits (or until `cancel`) before the next probe of a link in `state`.
    pub(super) async fn wait(&mut self, state: LinkState, interval: Duration, cancel: &CancellationToken) {
        let delay = if state == LinkState::Suspended {
            let delays = self.backoff.get_or_insert_with(|| {
                ExponentialBuilder::default()
                    .with_min_delay(interval)
                    .with_max_delay((interval * 32).min(Duration::from_secs(30)).max(interval))
                    .with_factor(2.0)
                    .with_jitter()
                    .without_max_times()
                    .build()
            });
            delays.next().unwrap_or(interval)
        } else {
            interval
        };
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }

    /// What an answer (or its absence) does to a link in `state` after `consecutive_ok` answers.
    pub(super) fn step(&mut self, state: LinkState, consecutive_ok: u32, threshold: u32, answered: bool) -> ProbeStep {
        match (answered, state) {
            (false, LinkState::Suspended) => ProbeStep::StaySuspended,
            (false, _) => {
                self.reset();
                ProbeStep::Suspend
            }
            (true, _) => {
                self.reset();
                let ok = if state == LinkState::Suspended { 1 } else { consecutive_ok + 1 };
                if ok >= threshold { ProbeStep::Resume(ok) } else { ProbeStep::Verifying(ok) }
            }
        }
    }

    /// The next suspension's waits start at one interval again.
    pub(super) fn reset(&mut self) {
        self.backoff = None;
    }
}

#[cfg(test)]
mod tests {
    //! The probing's timing and thresholds on paused time: the waits are exact, so each gap
    //! between probes is checked against the rule.
    use tokio::time::Instant;

    use super::*;

    /// Probes a link whose target answers as `answers` says (one per probe) until it resumes,
    /// by the rules of [`Probing`]; answers each probe's time since the start and the link's
    /// state when it went out, and the last step.
    async fn probe_until_resumed(
        interval: Duration,
        threshold: u32,
        answers: &[bool],
    ) -> (Vec<(Duration, LinkState)>, ProbeStep) {
        let cancel = CancellationToken::new();
        let mut probing = Probing::default();
        let (mut state, mut ok) = (LinkState::Suspended, 0);
        let start = Instant::now();
        let mut probes = Vec::new();
        let mut last = ProbeStep::StaySuspended;
        for &answered in answers {
            probing.wait(state, interval, &cancel).await;
            probes.push((start.elapsed(), state));
            last = probing.step(state, ok, threshold, answered);
            (state, ok) = match last {
                ProbeStep::StaySuspended | ProbeStep::Suspend => (LinkState::Suspended, 0),
                ProbeStep::Verifying(n) => (LinkState::Verifying, n),
                ProbeStep::Resume(_) => break,
            };
        }
        (probes, last)
    }

    /// The gaps between successive probes (the first from the start).
    fn gaps(probes: &[(Duration, LinkState)]) -> Vec<Duration> {
        let mut before = Duration::ZERO;
        probes
            .iter()
            .map(|&(at, _)| {
                let gap = at - before;
                before = at;
                gap
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspended_link_backs_off_doubling_with_jitter_up_to_its_cap() {
        let interval = Duration::from_secs(1);
        let (probes, last) = probe_until_resumed(interval, 1, &[false; 8]).await;
        assert_eq!(last, ProbeStep::StaySuspended);
        // nominal waits 1, 2, 4, 8, 16 s, then the cap (30 s, under 32 intervals); jitter adds
        // less than the nominal wait
        let nominal = [1, 2, 4, 8, 16, 30, 30, 30].map(Duration::from_secs);
        for (k, (gap, wait)) in gaps(&probes).into_iter().zip(nominal).enumerate() {
            assert!(gap >= wait && gap < wait * 2, "probe {k}: waited {gap:?}, nominal {wait:?}");
        }
        // a short interval is capped at 32 intervals
        let (probes, _) = probe_until_resumed(Duration::from_millis(100), 1, &[false; 8]).await;
        let last_gap = *gaps(&probes).last().unwrap();
        assert!(last_gap >= Duration::from_millis(3200) && last_gap < Duration::from_millis(6400), "{last_gap:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_link_resumes_after_threshold_answers_in_a_row_probed_every_interval() {
        let interval = Duration::from_secs(2);
        // down twice, answers twice, fails once while VERIFYING, then answers three times
        let answers = [false, false, true, true, false, true, true, true];
        let (probes, last) = probe_until_resumed(interval, 3, &answers).await;
        assert_eq!(last, ProbeStep::Resume(3));
        let states: Vec<LinkState> = probes.iter().map(|p| p.1).collect();
        use LinkState::{Suspended as S, Verifying as V};
        assert_eq!(states, [S, S, S, V, V, S, V, V]);
        let gaps = gaps(&probes);
        // VERIFYING: exactly one interval apart
        for k in [3, 4, 6, 7] {
            assert_eq!(gaps[k], interval, "probe {k} while verifying");
        }
        // suspended again: the waits start over at one interval (not 8 s, where they had got to)
        assert!(gaps[5] >= interval && gaps[5] < interval * 2, "{:?}", gaps[5]);
        assert!(gaps[2] >= interval * 4, "the third wait of the first suspension: {:?}", gaps[2]);
    }

    #[test]
    fn a_threshold_of_one_resumes_on_the_first_answer_and_a_count_carries_through_verifying() {
        let mut p = Probing::default();
        assert_eq!(p.step(LinkState::Suspended, 0, 1, true), ProbeStep::Resume(1));
        assert_eq!(p.step(LinkState::Suspended, 0, 3, true), ProbeStep::Verifying(1));
        assert_eq!(p.step(LinkState::Verifying, 1, 3, true), ProbeStep::Verifying(2));
        assert_eq!(p.step(LinkState::Verifying, 2, 3, true), ProbeStep::Resume(3));
        assert_eq!(p.step(LinkState::Verifying, 2, 3, false), ProbeStep::Suspend);
        assert_eq!(p.step(LinkState::Suspended, 0, 3, false), ProbeStep::StaySuspended);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_ends_at_once() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let start = Instant::now();
        Probing::default().wait(LinkState::Verifying, Duration::from_secs(60), &cancel).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
