//! Completions on a manager session: the scheduler serves the pool
//! [`POOL`](baton_api::completion::POOL), where a service that holds a manager client session
//! asks "tell me when batch B (or export E) of org O is finished" (`AwaitCompletionRequest`) and
//! is answered a `CompletionNotice` once it is.
//!
//! A client session receives only the answers to its own requests, so the completion is the
//! answer to a request rather than a message pushed into the session. That is what makes it as
//! durable as the session: the manager journals the request and the answer, keeps the answer in
//! the session's queue while the service is away (it gets it when it resumes the session), and
//! hands a request its scheduler never answered to the scheduler that registers next under the
//! same server id (a restarted one), or, after the manager's `--server-grace`, to another
//! scheduler of the pool. The client library hands each answer to the service once.
//!
//! So the scheduler keeps nothing: its set of waiting requests is in memory, rebuilt from the
//! requests the manager delivers again after a restart. A request is looked at when it arrives
//! (a finished batch is answered at once) and then every `--webhook-poll`, one store read per
//! waiting request. Only a definite answer is sent: the notice, or NOT_FOUND / INVALID_ARGUMENT;
//! a store error leaves the request waiting for the next look.

use std::collections::HashMap;
use std::time::Duration;

use baton_api::completion::{AWAIT_COMPLETION, COMPLETION_NOTICE, POOL, rpc_status};
use baton_manager_client::{Connector, ServerEvent, ServerReplier, ServerSession};
use baton_mesh::proto::v1 as pb;
use baton_mesh::proto::{from_any, to_any};
use baton_store::Store;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// What a request waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    Batch { org_id: String, batch_id: String },
    Export { org_id: String, export_id: String },
}

/// A request: its subject, or the error that answers it at once.
fn subject_of(payload: Option<&prost_types::Any>) -> Result<Subject, Status> {
    let payload = payload.ok_or_else(|| Status::invalid_argument("the request carries no payload"))?;
    let request: pb::AwaitCompletionRequest = from_any(AWAIT_COMPLETION, payload).map_err(Status::invalid_argument)?;
    if request.org_id.is_empty() {
        return Err(Status::invalid_argument("org_id is required"));
    }
    use pb::await_completion_request::Subject as S;
    match request.subject {
        Some(S::BatchId(batch_id)) if !batch_id.is_empty() => Ok(Subject::Batch { org_id: request.org_id, batch_id }),
        Some(S::ExportId(export_id)) if !export_id.is_empty() => {
            Ok(Subject::Export { org_id: request.org_id, export_id })
        }
        _ => Err(Status::invalid_argument("batch_id or export_id is required")),
    }
}

/// The notice of `subject` if it is finished, None while it is not; Err for a store error (the
/// request goes on waiting).
async fn look(store: &Store, subject: &Subject) -> Result<Option<pb::CompletionNotice>, baton_store::Error> {
    use pb::completion_notice::Result as R;
    let found = match subject {
        Subject::Batch { org_id, batch_id } => store
            .batch(org_id, batch_id)
            .await
            .map(|b| b.is_finished().then(|| R::Batch(baton_api::batches::batch_to_pb(&b)))),
        Subject::Export { org_id, export_id } => store
            .export_of_completion(org_id, export_id)
            .await
            .map(|e| e.state.is_final().then(|| R::Export(baton_api::exports::export_to_pb(&e)))),
    };
    match found {
        Ok(result) => Ok(result.map(|r| pb::CompletionNotice { result: Some(r) })),
        Err(e @ baton_store::Error::NotFound(_)) => {
            let status = Status::from(baton_api::Error::from(e));
            Ok(Some(pb::CompletionNotice { result: Some(R::Error(rpc_status(&status))) }))
        }
        Err(e) => Err(e),
    }
}

fn error_notice(status: &Status) -> pb::CompletionNotice {
    pb::CompletionNotice { result: Some(pb::completion_notice::Result::Error(rpc_status(status))) }
}

/// The requests waiting for their batch or export, by session and request number.
struct Waiting {
    store: Store,
    replier: ServerReplier,
    requests: HashMap<(String, u64), Subject>,
}

impl Waiting {
    /// Answers the request if its subject is finished (or unknown); keeps it otherwise. Err: the
    /// server session is gone.
    async fn answer_if_finished(&mut self, key: (String, u64)) -> Result<(), Status> {
        let Some(subject) = self.requests.get(&key) else { return Ok(()) };
        match look(&self.store, subject).await {
            Ok(Some(notice)) => {
                self.replier.reply(&key.0, key.1, to_any(COMPLETION_NOTICE, &notice), Vec::new()).await?;
                self.requests.remove(&key);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, session = %key.0, seq = key.1, "cannot look at a completion awaited; trying again")
            }
        }
        Ok(())
    }
}

/// Serves the completions pool as server `server_id` of the manager at `manager` until
/// `shutdown`: answers each `AwaitCompletionRequest` once its batch or export is finished,
/// looking at the waiting ones every `poll`.
pub async fn serve(
    store: Store,
    connector: Connector,
    manager: String,
    server_id: String,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let mut session = ServerSession::register(&connector, &manager, POOL, &server_id);
    let mut waiting = Waiting { store, replier: session.replier(), requests: HashMap::new() };
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let answered = tokio::select! {
            () = shutdown.cancelled() => return,
            event = session.next() => match event {
                Some(ServerEvent::Request { session_id, seq, payload, .. }) => match subject_of(payload.as_ref()) {
                    Ok(subject) => {
                        let key = (session_id, seq);
                        waiting.requests.insert(key.clone(), subject);
                        waiting.answer_if_finished(key).await
                    }
                    Err(status) => {
                        tracing::info!(session = %session_id, seq, error = %status.message(), "a completion request refused");
                        let notice = to_any(COMPLETION_NOTICE, &error_notice(&status));
                        waiting.replier.reply(&session_id, seq, notice, Vec::new()).await
                    }
                },
                Some(ServerEvent::Bound { .. } | ServerEvent::Accepted { .. }) => Ok(()),
                None => Err(Status::unavailable("the server session task stopped")),
            },
            _ = tick.tick() => {
                let mut result = Ok(());
                let keys: Vec<_> = waiting.requests.keys().cloned().collect();
                for key in keys {
                    result = waiting.answer_if_finished(key).await;
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
        };
        metrics::gauge!("baton_scheduler_completions_awaited").set(waiting.requests.len() as f64);
        if let Err(e) = answered {
            // only a stopped session task fails a reply; the process is shutting down
            tracing::warn!(error = %e, "the completions server session stopped");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(org: &str, subject: Option<pb::await_completion_request::Subject>) -> prost_types::Any {
        to_any(AWAIT_COMPLETION, &pb::AwaitCompletionRequest { org_id: org.into(), subject })
    }

    #[test]
    fn a_request_names_an_org_and_a_batch_or_an_export() {
        use pb::await_completion_request::Subject as S;
        assert_eq!(
            subject_of(Some(&request("o", Some(S::BatchId("b".into()))))).unwrap(),
            Subject::Batch { org_id: "o".into(), batch_id: "b".into() }
        );
        assert_eq!(
            subject_of(Some(&request("o", Some(S::ExportId("e".into()))))).unwrap(),
            Subject::Export { org_id: "o".into(), export_id: "e".into() }
        );
        let refused = |payload: Option<&prost_types::Any>| {
            let status = subject_of(payload).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            status.message().to_owned()
        };
        assert!(refused(None).contains("no payload"));
        assert!(refused(Some(&request("", Some(S::BatchId("b".into()))))).contains("org_id"));
        assert!(refused(Some(&request("o", None))).contains("batch_id or export_id"));
        assert!(refused(Some(&request("o", Some(S::BatchId(String::new()))))).contains("batch_id or export_id"));
        let other = to_any("baton.v1.GetBatchRequest", &pb::GetBatchRequest { batch_id: "b".into() });
        assert!(refused(Some(&other)).contains("expected a baton.v1.AwaitCompletionRequest"));
    }
}
