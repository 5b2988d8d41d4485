//! The Sync gRPC service.

use std::sync::Arc;
use std::time::Duration;

use baton_mesh::auth::org_of;
use baton_mesh::now_ms;
use baton_mesh::proto::v1 as pb;
use baton_mesh::proto::{duration, duration_ms, timestamp};
use baton_store::FieldError;
use baton_store::Store;
use baton_store::sync::{Link, LinkState, LinkTransition, NewLink, RejectPolicy, TrimmedPolicy};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::extract::{self, Extraction};
use crate::{Error, SyncOptions};

/// The Sync gRPC service.
#[derive(Debug, Clone)]
pub struct SyncService {
    store: Store,
    options: SyncOptions,
    /// Wakes the link manager (a link was created or resumed).
    wake: Arc<Notify>,
    shutdown: CancellationToken,
}

impl SyncService {
    /// A sync service over `store`.
    pub fn new(store: Store, options: SyncOptions, wake: Arc<Notify>, shutdown: CancellationToken) -> Self {
        Self { store, options, wake, shutdown }
    }

    async fn link_to_pb(&self, link: &Link) -> Result<pb::Link, Error> {
        let high_water = self.store.high_water(&link.org_id).await?;
        let lag_ms = match self.store.first_change_time_after(&link.org_id, link.cursor_seq).await? {
            Some(at) => (now_ms() - at).max(0),
            None => 0,
        };
        Ok(pb::Link {
            id: link.id.clone(),
            target_endpoint: link.target_endpoint.clone(),
            objects: link.objects.clone(),
            state: state_to_pb(link.state) as i32,
            verify_threshold: link.verify_threshold as i32,
            probe_interval: Some(duration(link.probe_interval.as_millis() as u64)),
            on_reject: match link.on_reject {
                RejectPolicy::DeadLetter => pb::RejectPolicy::DeadLetter,
                RejectPolicy::Stop => pb::RejectPolicy::Stop,
            } as i32,
            cursor_seq: link.cursor_seq,
            lag_seq: (high_water - link.cursor_seq).max(0),
            lag: Some(duration(lag_ms as u64)),
            consecutive_ok: link.consecutive_ok as i32,
            last_cause: link.last_cause.clone(),
            dead_letters: self.store.dead_letter_count(&link.id).await?,
            create_time: timestamp(link.created_at_ms),
            on_trimmed: match link.on_trimmed {
                TrimmedPolicy::Rebootstrap => pb::TrimmedPolicy::Rebootstrap,
                TrimmedPolicy::Fail => pb::TrimmedPolicy::Fail,
            } as i32,
            target_ca_pem: link.target_ca_pem.clone(),
        })
    }

    fn event_to_pb(t: &LinkTransition, link: Option<pb::Link>) -> pb::LinkEvent {
        pb::LinkEvent {
            from: t.from.map_or(pb::LinkState::Unspecified, state_to_pb) as i32,
            to: state_to_pb(t.to) as i32,
            cause: t.cause.clone(),
            event_time: timestamp(t.at_ms),
            link,
        }
    }
}

/// A store link state as its protobuf enum.
pub fn state_to_pb(state: LinkState) -> pb::LinkState {
    match state {
        LinkState::Bootstrapping => pb::LinkState::Bootstrapping,
        LinkState::Streaming => pb::LinkState::Streaming,
        LinkState::Suspended => pb::LinkState::Suspended,
        LinkState::Verifying => pb::LinkState::Verifying,
        LinkState::Paused => pb::LinkState::Paused,
        LinkState::Failed => pb::LinkState::Failed,
    }
}

/// The rows per page of ListLinkHistory and ListDeadLetters when the request sets none, and the
/// most a request may ask for.
const DEFAULT_PAGE: u32 = 1_000;
const MAX_PAGE: u32 = 10_000;
/// How often WatchLink reads the link for a change of state (a link's transitions are rare and
/// one indexed read each; the stream ends when the client goes).
const WATCH_LINK_POLL: Duration = Duration::from_millis(50);

/// A list request's start (the position after which its page begins; 0 for the first page) and
/// page size. The token is the position of the last row of the page before.
fn page(page_size: u32, page_token: &str) -> Result<(i64, u32), Error> {
    let mut errors = Vec::new();
    if page_size > MAX_PAGE {
        errors.push(FieldError::new("page_size", format!("at most {MAX_PAGE}")));
    }
    let after = match page_token {
        "" => 0,
        token => token.parse::<i64>().unwrap_or_else(|_| {
            errors.push(FieldError::new("page_token", "not a token this RPC answered"));
            0
        }),
    };
    if !errors.is_empty() {
        return Err(Error::Invalid(errors));
    }
    Ok((after, if page_size == 0 { DEFAULT_PAGE } else { page_size }))
}

fn require(value: &str, field: &str) -> Result<(), Error> {
    if value.is_empty() { Err(Error::Invalid(vec![FieldError::new(field, "required")])) } else { Ok(()) }
}

#[tonic::async_trait]
impl pb::sync_server::Sync for SyncService {
    type ExtractStream = ReceiverStream<Result<pb::ExtractResponse, Status>>;

    async fn extract(&self, request: Request<pb::ExtractRequest>) -> Result<Response<Self::ExtractStream>, Status> {
        let org = org_of(&request)?;
        let request = request.into_inner();
        let chunk_size = match request.chunk_size {
            0 => 1000,
            n @ 1..=10_000 => n as usize,
            n => {
                return Err(Error::Invalid(vec![FieldError::new(
                    "chunk_size",
                    format!("between 1 and 10000, got {n}"),
                )])
                .into());
            }
        };
        let objects = if request.objects.is_empty() {
            self.store.list_objects(&org).await.map_err(Error::from)?.into_iter().map(|o| o.name).collect()
        } else {
            for object in &request.objects {
                self.store.object(&org, object).await.map_err(Error::from)?;
            }
            request.objects
        };
        if let Some(after) = request.after_seq {
            self.store.ensure_retained(&org, after).await.map_err(Error::from)?;
            let high_water = self.store.high_water(&org).await.map_err(Error::from)?;
            if after > high_water || after < 0 {
                return Err(Error::OutOfRange(format!(
                    "after_seq {after} is not a seq of this org (its last change is seq {high_water})"
                ))
                .into());
            }
        }
        let (tx, rx) = mpsc::channel(4);
        let extraction =
            Extraction { org, objects, after_seq: request.after_seq, chunk_size, fallback: self.options.change_poll };
        tokio::spawn(extract::run(self.store.clone(), extraction, tx, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn create_link(&self, request: Request<pb::CreateLinkRequest>) -> Result<Response<pb::Link>, Status> {
        let org = org_of(&request)?;
        let r = request.into_inner();
        let mut errors = Vec::new();
        if !(r.target_endpoint.starts_with("http://") || r.target_endpoint.starts_with("https://"))
            || tonic::transport::Endpoint::from_shared(r.target_endpoint.clone()).is_err()
        {
            errors.push(FieldError::new("target_endpoint", "an http:// or https:// URL of the target's gRPC endpoint"));
        }
        if r.target_api_key.is_empty() {
            errors.push(FieldError::new("target_api_key", "required"));
        }
        if !(0..=1000).contains(&r.verify_threshold) {
            errors.push(FieldError::new("verify_threshold", "between 1 and 1000 (0 for the default, 3)"));
        }
        let probe_interval_ms = duration_ms(r.probe_interval.as_ref()).unwrap_or(u64::MAX);
        if probe_interval_ms != 0 && !(10..=600_000).contains(&probe_interval_ms) {
            errors.push(FieldError::new("probe_interval", "between 10 ms and 10 min (unset for the default, 1 s)"));
        }
        let on_reject = match pb::RejectPolicy::try_from(r.on_reject) {
            Ok(pb::RejectPolicy::Unspecified | pb::RejectPolicy::DeadLetter) => RejectPolicy::DeadLetter,
            Ok(pb::RejectPolicy::Stop) => RejectPolicy::Stop,
            Err(_) => {
                errors.push(FieldError::new("on_reject", "REJECT_POLICY_DEAD_LETTER or REJECT_POLICY_STOP"));
                RejectPolicy::DeadLetter
            }
        };
        let on_trimmed = match pb::TrimmedPolicy::try_from(r.on_trimmed) {
            Ok(pb::TrimmedPolicy::Unspecified) => self.options.link_on_trimmed.into(),
            Ok(pb::TrimmedPolicy::Rebootstrap) => TrimmedPolicy::Rebootstrap,
            Ok(pb::TrimmedPolicy::Fail) => TrimmedPolicy::Fail,
            Err(_) => {
                errors.push(FieldError::new("on_trimmed", "TRIMMED_POLICY_REBOOTSTRAP or TRIMMED_POLICY_FAIL"));
                TrimmedPolicy::Rebootstrap
            }
        };
        if !r.target_ca_pem.is_empty() {
            if !r.target_endpoint.starts_with("https://") {
                errors.push(FieldError::new("target_ca_pem", "only for an https:// target"));
            } else if let Err(e) = baton_mesh::tls::check_ca_pem(r.target_ca_pem.as_bytes()) {
                errors.push(FieldError::new("target_ca_pem", e));
            }
        }
        for (i, object) in r.objects.iter().enumerate() {
            if let Err(baton_store::Error::NotFound(_)) = self.store.object(&org, object).await {
                errors.push(FieldError::new(format!("objects[{i}]"), format!("no object {object:?} in this org")));
            }
        }
        if !errors.is_empty() {
            return Err(Error::Invalid(errors).into());
        }
        let new = NewLink {
            target_endpoint: r.target_endpoint,
            target_api_key: r.target_api_key,
            objects: r.objects,
            verify_threshold: if r.verify_threshold == 0 { 3 } else { r.verify_threshold as u32 },
            probe_interval: Duration::from_millis(if probe_interval_ms == 0 { 1000 } else { probe_interval_ms }),
            on_reject,
            on_trimmed,
            target_ca_pem: r.target_ca_pem,
        };
        let link = self.store.create_link(&org, &new).await.map_err(Error::from)?;
        self.wake.notify_one();
        Ok(Response::new(self.link_to_pb(&link).await?))
    }

    async fn get_link(&self, request: Request<pb::GetLinkRequest>) -> Result<Response<pb::Link>, Status> {
        let org = org_of(&request)?;
        require(&request.get_ref().link_id, "link_id")?;
        let link = self.store.link(&org, &request.get_ref().link_id).await.map_err(Error::from)?;
        Ok(Response::new(self.link_to_pb(&link).await?))
    }

    async fn list_links(
        &self,
        request: Request<pb::ListLinksRequest>,
    ) -> Result<Response<pb::ListLinksResponse>, Status> {
        let org = org_of(&request)?;
        let mut links = Vec::new();
        for link in self.store.list_links(&org).await.map_err(Error::from)? {
            links.push(self.link_to_pb(&link).await?);
        }
        Ok(Response::new(pb::ListLinksResponse { links }))
    }

    type WatchLinkStream = ReceiverStream<Result<pb::LinkEvent, Status>>;

    async fn watch_link(
        &self,
        request: Request<pb::WatchLinkRequest>,
    ) -> Result<Response<Self::WatchLinkStream>, Status> {
        let org = org_of(&request)?;
        let link_id = request.into_inner().link_id;
        require(&link_id, "link_id")?;
        let link = self.store.link(&org, &link_id).await.map_err(Error::from)?;
        let history = self.store.link_history(&link_id, 0, None).await.map_err(Error::from)?;
        let mut last_id = history.last().map_or(0, |t| t.id);
        let (tx, rx) = mpsc::channel(16);
        let first = pb::LinkEvent {
            from: pb::LinkState::Unspecified as i32,
            to: state_to_pb(link.state) as i32,
            cause: link.last_cause.clone(),
            event_time: timestamp(history.last().map_or(link.created_at_ms, |t| t.at_ms)),
            link: Some(self.link_to_pb(&link).await?),
        };
        let _ = tx.send(Ok(first)).await;
        let service = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    () = service.shutdown.cancelled() => return,
                    () = tokio::time::sleep(WATCH_LINK_POLL) => {}
                }
                let link = match service.store.link(&org, &link_id).await {
                    Ok(link) => link,
                    Err(baton_store::Error::NotFound(_)) => return,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                let Ok(events) = service.store.link_history(&link_id, last_id, None).await else { continue };
                for t in &events {
                    last_id = t.id;
                    let pb_link = service.link_to_pb(&link).await.ok();
                    if tx.send(Ok(Self::event_to_pb(t, pb_link))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn pause_link(&self, request: Request<pb::PauseLinkRequest>) -> Result<Response<pb::Link>, Status> {
        let org = org_of(&request)?;
        let link_id = &request.get_ref().link_id;
        require(link_id, "link_id")?;
        let link = self.store.link(&org, link_id).await.map_err(Error::from)?;
        let from = [
            LinkState::Bootstrapping,
            LinkState::Streaming,
            LinkState::Suspended,
            LinkState::Verifying,
            LinkState::Failed,
        ];
        self.store
            .transition_link(&link.id, &from, LinkState::Paused, "paused by hand", 0, None, None)
            .await
            .map_err(Error::from)?;
        let link = self.store.link(&org, link_id).await.map_err(Error::from)?;
        Ok(Response::new(self.link_to_pb(&link).await?))
    }

    async fn resume_link(&self, request: Request<pb::ResumeLinkRequest>) -> Result<Response<pb::Link>, Status> {
        let org = org_of(&request)?;
        let link_id = &request.get_ref().link_id;
        require(link_id, "link_id")?;
        let link = self.store.link(&org, link_id).await.map_err(Error::from)?;
        if matches!(link.state, LinkState::Paused | LinkState::Failed) {
            // A link whose cursor fell behind the change-log retention needs a new snapshot.
            let trimmed = self.store.trimmed_seq(&org).await.map_err(Error::from)?;
            let (to, bootstrapped) = if !link.bootstrapped || link.cursor_seq < trimmed {
                (LinkState::Bootstrapping, Some(false))
            } else {
                (LinkState::Streaming, None)
            };
            self.store
                .transition_link(
                    &link.id,
                    &[LinkState::Paused, LinkState::Failed],
                    to,
                    "resumed by hand",
                    0,
                    None,
                    bootstrapped,
                )
                .await
                .map_err(Error::from)?;
            self.wake.notify_one();
        }
        let link = self.store.link(&org, link_id).await.map_err(Error::from)?;
        Ok(Response::new(self.link_to_pb(&link).await?))
    }

    async fn delete_link(
        &self,
        request: Request<pb::DeleteLinkRequest>,
    ) -> Result<Response<pb::DeleteLinkResponse>, Status> {
        let org = org_of(&request)?;
        require(&request.get_ref().link_id, "link_id")?;
        self.store.delete_link(&org, &request.get_ref().link_id).await.map_err(Error::from)?;
        Ok(Response::new(pb::DeleteLinkResponse {}))
    }

    async fn list_link_history(
        &self,
        request: Request<pb::ListLinkHistoryRequest>,
    ) -> Result<Response<pb::ListLinkHistoryResponse>, Status> {
        let org = org_of(&request)?;
        let r = request.into_inner();
        let (after, size) = page(r.page_size, &r.page_token)?;
        let link = self.store.link(&org, &r.link_id).await.map_err(Error::from)?;
        let mut events = self.store.link_history(&link.id, after, Some(size + 1)).await.map_err(Error::from)?;
        let more = events.len() > size as usize;
        events.truncate(size as usize);
        Ok(Response::new(pb::ListLinkHistoryResponse {
            next_page_token: events.last().filter(|_| more).map(|t| t.id.to_string()).unwrap_or_default(),
            events: events.iter().map(|t| Self::event_to_pb(t, None)).collect(),
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let org = org_of(&request)?;
        let r = request.into_inner();
        let (after, size) = page(r.page_size, &r.page_token)?;
        let link = self.store.link(&org, &r.link_id).await.map_err(Error::from)?;
        let mut letters = self.store.dead_letters(&link.id, after, size + 1).await.map_err(Error::from)?;
        let more = letters.len() > size as usize;
        letters.truncate(size as usize);
        Ok(Response::new(pb::ListDeadLettersResponse {
            next_page_token: letters.last().filter(|_| more).map(|(id, _)| id.to_string()).unwrap_or_default(),
            dead_letters: letters
                .into_iter()
                .map(|(_, d)| pb::DeadLetter {
                    seq: d.seq,
                    object: d.object,
                    record_id: d.record_id,
                    reason: d.reason,
                    reject_time: timestamp(d.at_ms),
                })
                .collect(),
        }))
    }
}
