//! Batches and chunks on the wire.

use baton_mesh::proto::timestamp;
use baton_mesh::proto::v1 as pb;
use baton_store::batches::{BatchInfo, BatchOp, BatchState, ChunkInfo, ChunkState, PartState};

/// The wire form of a chunk state (in a worker's ChunkDone, in the scheduler's chunk statuses).
pub fn chunk_state_to_pb(state: ChunkState) -> pb::ChunkState {
    match state {
        ChunkState::Pending => pb::ChunkState::Pending,
        ChunkState::Released => pb::ChunkState::Released,
        ChunkState::Running => pb::ChunkState::Running,
        ChunkState::Committed => pb::ChunkState::Committed,
        ChunkState::CommittedAfterRetryResources => pb::ChunkState::CommittedAfterRetryResources,
        ChunkState::CommittedAfterRetryWorkload => pb::ChunkState::CommittedAfterRetryWorkload,
        ChunkState::Aborted => pb::ChunkState::Aborted,
        ChunkState::Cancelled => pb::ChunkState::Cancelled,
    }
}

/// The wire form of a batch operation.
pub fn op_to_pb(op: BatchOp) -> pb::BatchOperation {
    match op {
        BatchOp::Upsert => pb::BatchOperation::Upsert,
        BatchOp::Insert => pb::BatchOperation::Insert,
        BatchOp::Update => pb::BatchOperation::Update,
        BatchOp::Delete => pb::BatchOperation::Delete,
    }
}

/// The wire form of a batch.
pub fn batch_to_pb(b: &BatchInfo) -> pb::Batch {
    let (t, spec) = (&b.totals, &b.spec);
    pb::Batch {
        batch_id: b.id.clone(),
        object: spec.object.clone(),
        operation: op_to_pb(spec.operation) as i32,
        chunk_size: spec.chunk_size,
        policy: Some(pb::ReleasePolicy {
            not_before_time: timestamp(spec.not_before_ms),
            max_parallel_chunks: spec.max_parallel,
            records_per_second: spec.records_per_second,
        }),
        request_id: spec.request_id.clone().unwrap_or_default(),
        state: match b.state {
            BatchState::Staging => pb::BatchState::Staging,
            BatchState::Running => pb::BatchState::Running,
            BatchState::Done => pb::BatchState::Done,
            BatchState::Cancelled => pb::BatchState::Cancelled,
        } as i32,
        totals: Some(pb::BatchTotals {
            chunks: t.chunks,
            records: t.records,
            pending: t.pending,
            in_flight: t.in_flight,
            committed: t.committed,
            committed_after_retry_resources: t.committed_after_retry_resources,
            committed_after_retry_workload: t.committed_after_retry_workload,
            aborted: t.aborted,
            cancelled: t.cancelled,
            records_committed: t.records_committed,
        }),
        create_time: timestamp(b.created_at_ms),
        finish_time: timestamp(b.finished_at_ms),
        // GetBatch adds it (`completion::delivery_to_pb`)
        completion: None,
    }
}

/// The wire form of a chunk's status.
pub fn chunk_to_pb(c: &ChunkInfo) -> pb::ChunkStatus {
    pb::ChunkStatus {
        index: c.index,
        first_record: c.first_record,
        records: c.records,
        state: chunk_state_to_pb(c.state) as i32,
        attempts: c.attempts,
        worker: c.worker.clone(),
        last_cause: c.last_cause.clone(),
        start_time: timestamp(c.started_at_ms),
        finish_time: timestamp(c.finished_at_ms),
        error_count: c.error_count,
        records_committed: c.records_committed,
        parts: c
            .parts
            .iter()
            .map(|p| pb::ChunkPart {
                first_record: c.first_record + u64::from(p.range.first),
                records: p.range.records,
                state: match p.state {
                    PartState::Pending => pb::ChunkPartState::Pending,
                    PartState::Committed => pb::ChunkPartState::Committed,
                    PartState::Aborted => pb::ChunkPartState::Aborted,
                } as i32,
                cause: p.cause.clone(),
                finish_time: timestamp(p.finished_at_ms),
            })
            .collect(),
    }
}
