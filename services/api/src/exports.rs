//! Exports on the wire: an export's record as its `ExportStatus` (GetExport, WatchExport,
//! ListExports, and the completion notice on a manager session).

use baton_mesh::proto::timestamp;
use baton_mesh::proto::v1 as pb;
use baton_store::exports::{ExportInfo, ExportReason, ExportState};

fn state_to_pb(state: ExportState) -> pb::ExportState {
    match state {
        ExportState::Producing => pb::ExportState::Producing,
        ExportState::Complete => pb::ExportState::Complete,
        ExportState::Failed => pb::ExportState::Failed,
        ExportState::Cancelled => pb::ExportState::Cancelled,
    }
}

fn reason_to_pb(reason: ExportReason) -> pb::ExportReason {
    match reason {
        ExportReason::LargeResults => pb::ExportReason::LargeResults,
        ExportReason::LongRunning => pb::ExportReason::LongRunning,
    }
}

/// An export's record as its wire status.
pub fn export_to_pb(export: &ExportInfo) -> pb::ExportStatus {
    pb::ExportStatus {
        export_id: export.id.clone(),
        state: state_to_pb(export.state) as i32,
        reason: reason_to_pb(export.reason) as i32,
        object: export.object.clone(),
        first_rows: export.first_rows,
        parts_total: export.parts_total,
        parts_ready: export.parts_ready,
        rows_ready: export.rows_ready,
        estimated_total: export.estimated_total,
        total_known: export.total_known,
        as_of_seq: export.as_of_seq,
        create_time: timestamp(export.created_at_ms),
        expire_time: timestamp(export.expires_at_ms),
        finish_time: timestamp(export.finished_at_ms),
        error: export.error.clone(),
        parts: export
            .parts
            .iter()
            .map(|p| pb::ExportPart { number: p.number - 1, rows: p.rows, bytes: p.bytes })
            .collect(),
        // GetExport adds it (`completion::delivery_to_pb`)
        completion: None,
    }
}
