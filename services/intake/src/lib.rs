//! The intake: baton's front door for real-time record requests (Upsert, Delete, Get, Query),
//! and the admin API (orgs, API keys, object schemas).
//!
//! Real-time requests are bounded by [`Limits`]: records per request, a deadline, and requests in
//! flight per org and overall. A request over a limit, or stopped at its deadline (its transaction
//! rolled back), answers RESOURCE_EXHAUSTED with `ErrorInfo{reason: RESUBMIT_AS_BATCH}` (Query:
//! `RESUBMIT_AS_EXPORT`), so that the client sends the same work as a batch (or an export).
//!
//! Exports ([`export`]) answer their first portion at once and a token for the rest, which the
//! workers produce as parts.
//!
//! The intake is stateless: everything it knows is in the store. It never talks to workers.

mod admin;
pub mod export;
mod limits;

use std::time::Duration;

use baton_mesh::auth::{AuthConfig, org_of};
use baton_mesh::config::{ServeOptions, parse_duration};
use baton_mesh::proto::v1 as pb;
use baton_mesh::server::MeshServer;
use baton_mesh::status::{LimitExceeded, RESUBMIT_AS_BATCH, RESUBMIT_AS_EXPORT};
use baton_store::blobs::Blobs;
use baton_store::{FieldError, Store};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub use admin::AdminService;
pub use baton_api::Error;
use baton_api::convert;
pub use limits::Limits;

/// The real-time limits, as flags and `BATON_*` variables.
#[derive(clap::Args, Debug, Clone)]
pub struct IntakeOptions {
    /// The most records a real-time Upsert or Delete may carry, and the largest Query page.
    #[arg(long, env = "BATON_MAX_RECORDS", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_records: u32,

    /// How long a real-time request may run before it is rolled back and rejected.
    #[arg(long, env = "BATON_DEADLINE", default_value = "2s", value_parser = parse_duration)]
    pub deadline: Duration,

    /// Real-time requests in flight per org; more are rejected.
    #[arg(long, env = "BATON_MAX_IN_FLIGHT_PER_ORG", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_in_flight_per_org: u32,

    /// Real-time requests in flight overall; more are rejected.
    #[arg(long, env = "BATON_MAX_IN_FLIGHT", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_in_flight: u32,

    /// How long an export's parts are kept; after it they are deleted and its token answers
    /// NOT_FOUND (expired).
    #[arg(long, env = "BATON_EXPORT_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub export_retention: Duration,
}

impl IntakeOptions {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.deadline < Duration::from_millis(1) || self.deadline > Duration::from_secs(600) {
            return Err(format!("--deadline must be between 1ms and 10m, got {:?}", self.deadline));
        }
        if self.max_in_flight_per_org > self.max_in_flight {
            return Err("--max-in-flight-per-org cannot exceed --max-in-flight".into());
        }
        if self.export_retention > Duration::from_secs(366 * 24 * 3600) {
            return Err(format!("--export-retention must be at most a year, got {:?}", self.export_retention));
        }
        Ok(())
    }
}

/// The Intake gRPC service.
#[derive(Debug, Clone)]
pub struct IntakeService {
    store: Store,
    blobs: Blobs,
    limits: Limits,
    export_retention: Duration,
}

impl IntakeService {
    /// An intake over `store`, reading export parts from `blobs`.
    pub fn new(store: Store, blobs: Blobs, options: &IntakeOptions) -> Self {
        Self { store, blobs, limits: Limits::new(options), export_retention: options.export_retention }
    }

    fn check_count(&self, count: usize, reason: &'static str) -> Result<(), Error> {
        let max = self.limits.max_records();
        if count > max {
            return Err(Error::Limit(LimitExceeded {
                reason,
                limit_name: "max_records",
                limit: max as u64,
                observed: count as u64,
                retry_after: None,
            }));
        }
        Ok(())
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.limits.deadline()
    }
}

/// Rejects an empty required field.
pub(crate) fn require(value: &str, field: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::Invalid(vec![FieldError::new(field, "required")]));
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::intake_server::Intake for IntakeService {
    async fn upsert(&self, request: Request<pb::UpsertRequest>) -> Result<Response<pb::UpsertResponse>, Status> {
        let org = org_of(&request)?;
        let request = request.into_inner();
        require(&request.object, "object")?;
        self.check_count(request.records.len(), RESUBMIT_AS_BATCH)?;
        if request.records.is_empty() {
            return Err(Error::Invalid(vec![FieldError::new("records", "at least one record")]).into());
        }
        let records = convert::records_from_pb(&request.records).map_err(Error::Invalid)?;
        let _permit = self.limits.admit(&org, RESUBMIT_AS_BATCH)?;
        let (outcomes, last_seq) = self
            .store
            .upsert(&org, &request.object, records, self.deadline())
            .await
            .map_err(|e| Error::from(e).deadline_as(RESUBMIT_AS_BATCH))?;
        Ok(Response::new(pb::UpsertResponse {
            results: outcomes
                .into_iter()
                .map(|o| pb::UpsertResult { id: o.id, version: o.version, created: o.created })
                .collect(),
            last_seq,
        }))
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let org = org_of(&request)?;
        let request = request.into_inner();
        require(&request.object, "object")?;
        self.check_count(request.ids.len(), RESUBMIT_AS_BATCH)?;
        if request.ids.is_empty() {
            return Err(Error::Invalid(vec![FieldError::new("ids", "at least one id")]).into());
        }
        let _permit = self.limits.admit(&org, RESUBMIT_AS_BATCH)?;
        let (outcomes, last_seq) = self
            .store
            .delete(&org, &request.object, request.ids, self.deadline())
            .await
            .map_err(|e| Error::from(e).deadline_as(RESUBMIT_AS_BATCH))?;
        Ok(Response::new(pb::DeleteResponse {
            results: outcomes
                .into_iter()
                .map(|o| pb::DeleteResult { id: o.id, deleted: o.deleted, version: o.version })
                .collect(),
            last_seq,
        }))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Record>, Status> {
        let org = org_of(&request)?;
        let request = request.into_inner();
        require(&request.object, "object")?;
        require(&request.id, "id")?;
        let _permit = self.limits.admit(&org, RESUBMIT_AS_EXPORT)?;
        let (record, schema) = self
            .store
            .get(&org, &request.object, &request.id, self.deadline())
            .await
            .map_err(|e| Error::from(e).deadline_as(RESUBMIT_AS_EXPORT))?;
        Ok(Response::new(convert::record_to_pb(&record, &schema)))
    }

    async fn query(&self, request: Request<pb::QueryRequest>) -> Result<Response<pb::QueryResponse>, Status> {
        let org = org_of(&request)?;
        let request = request.into_inner();
        require(&request.object, "object")?;
        if request.page_size < 0 {
            return Err(Error::Invalid(vec![FieldError::new("page_size", "cannot be negative")]).into());
        }
        let page_size = if request.page_size == 0 { self.limits.max_records() } else { request.page_size as usize };
        self.check_count(page_size, RESUBMIT_AS_EXPORT)?;
        let after = if request.page_token.is_empty() {
            None
        } else {
            let bytes = hex::decode(&request.page_token)
                .map_err(|_| Error::Invalid(vec![FieldError::new("page_token", "not a token returned by Query")]))?;
            Some(
                String::from_utf8(bytes).map_err(|_| {
                    Error::Invalid(vec![FieldError::new("page_token", "not a token returned by Query")])
                })?,
            )
        };
        let _permit = self.limits.admit(&org, RESUBMIT_AS_EXPORT)?;
        let page = self
            .store
            .query(
                &org,
                &request.object,
                &request.filter,
                &request.fields,
                page_size,
                after.as_deref(),
                self.deadline(),
            )
            .await
            .map_err(|e| Error::from(e).deadline_as(RESUBMIT_AS_EXPORT))?;
        Ok(Response::new(pb::QueryResponse {
            records: page.records.iter().map(|r| convert::record_to_pb(r, &page.schema)).collect(),
            next_page_token: page.next_after.map(hex::encode).unwrap_or_default(),
        }))
    }

    async fn apply_changes(
        &self,
        request: Request<pb::ApplyChangesRequest>,
    ) -> Result<Response<pb::ApplyChangesResponse>, Status> {
        let org = org_of(&request)?;
        let request = request.into_inner();
        require(&request.link_id, "link_id")?;
        if request.changes.len() > MAX_APPLY_CHANGES {
            return Err(Error::Invalid(vec![FieldError::new(
                "changes",
                format!("at most {MAX_APPLY_CHANGES} changes per request, got {}", request.changes.len()),
            )])
            .into());
        }
        let changes = convert::changes_from_pb(&request.changes).map_err(Error::Invalid)?;
        let outcome =
            self.store.apply_changes(&org, &request.link_id, &changes, request.snapshot).await.map_err(Error::from)?;
        Ok(Response::new(pb::ApplyChangesResponse {
            watermark: outcome.watermark,
            applied: outcome.applied as i32,
            skipped: outcome.skipped as i32,
            rejected: outcome
                .rejected
                .into_iter()
                .map(|(seq, record_id, reason)| pb::RejectedChange { seq, record_id, reason })
                .collect(),
        }))
    }

    async fn export(&self, request: Request<pb::ExportRequest>) -> Result<Response<pb::ExportResponse>, Status> {
        self.serve_export(request).await.map(Response::new)
    }

    async fn get_export(&self, request: Request<pb::GetExportRequest>) -> Result<Response<pb::ExportStatus>, Status> {
        self.serve_get_export(request).await.map(Response::new)
    }

    type WatchExportStream = export::GrpcStream<pb::ExportStatus>;

    async fn watch_export(
        &self,
        request: Request<pb::WatchExportRequest>,
    ) -> Result<Response<Self::WatchExportStream>, Status> {
        self.serve_watch_export(request).await.map(Response::new)
    }

    type FetchPartStream = export::GrpcStream<pb::ExportRows>;

    async fn fetch_part(
        &self,
        request: Request<pb::FetchPartRequest>,
    ) -> Result<Response<Self::FetchPartStream>, Status> {
        self.serve_fetch_part(request).await.map(Response::new)
    }

    async fn cancel_export(
        &self,
        request: Request<pb::CancelExportRequest>,
    ) -> Result<Response<pb::ExportStatus>, Status> {
        self.serve_cancel_export(request).await.map(Response::new)
    }

    async fn list_exports(
        &self,
        request: Request<pb::ListExportsRequest>,
    ) -> Result<Response<pb::ListExportsResponse>, Status> {
        self.serve_list_exports(request).await.map(Response::new)
    }
}

/// The most changes one ApplyChanges request may carry.
pub const MAX_APPLY_CHANGES: usize = 10_000;

/// Adds the intake and admin services to a server.
pub fn add_services(
    server: MeshServer,
    store: &Store,
    blobs: &Blobs,
    options: &IntakeOptions,
    serve: &ServeOptions,
) -> MeshServer {
    // The transport refuses a request message over the limit before reading it (protecting
    // memory); the mesh layer turns its answer into RESOURCE_EXHAUSTED MESSAGE_TOO_LARGE.
    // Responses may be larger (a Query page of large records).
    let limit = serve.max_message_bytes();
    let intake = IntakeService::new(store.clone(), blobs.clone(), options);
    server
        .add_service(
            pb::intake_server::IntakeServer::new(intake)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit.saturating_mul(4)),
        )
        .add_service(
            pb::admin_server::AdminServer::new(AdminService::new(store.clone())).max_decoding_message_size(limit),
        )
}

/// Runs a standalone intake (with the admin API) until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    serve: ServeOptions,
    options: IntakeOptions,
    store: Store,
    blobs: Blobs,
    admin_token: Option<String>,
    listener: TcpListener,
    metrics: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), baton_mesh::server::Error> {
    let auth = AuthConfig {
        admin_token: admin_token.map(Into::into),
        keys: Some(baton_api::keys::StoreKeys::of(&store)),
        ..Default::default()
    };
    let server = add_services(MeshServer::new(serve.clone(), auth), &store, &blobs, &options, &serve);
    server.serve(listener, metrics, shutdown).await
}
