//! Where a completion is pushed, on the wire: the `CompletionTarget` a batch header or an export
//! request names (checked here, for SubmitBatch and Export alike) and the `CompletionDelivery`
//! GetBatch and GetExport show; and the completion awaited on a manager session: the pool a
//! scheduler serves it in and the full names of its request and answer.

use baton_mesh::proto::timestamp;
use baton_mesh::proto::v1 as pb;
use baton_store::FieldError;
use baton_store::completions::{Delivery, DeliveryState};

/// The manager pool in which a scheduler answers `AwaitCompletionRequest`s.
pub const POOL: &str = "completions";
/// The full name of the request a service sends in [`POOL`] to be told of a completion.
pub const AWAIT_COMPLETION: &str = "baton.v1.AwaitCompletionRequest";
/// The full name of its answer.
pub const COMPLETION_NOTICE: &str = "baton.v1.CompletionNotice";

/// A status as a `google.rpc.Status`, its details (ErrorInfo, BadRequest) kept.
pub fn rpc_status(status: &tonic::Status) -> tonic_types::pb::Status {
    use prost::Message;
    // a status with details carries them as an encoded google.rpc.Status of its own
    match tonic_types::pb::Status::decode(status.details()) {
        Ok(full) if !status.details().is_empty() => full,
        _ => tonic_types::pb::Status {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: Vec::new(),
        },
    }
}

/// The longest webhook URL.
pub const MAX_WEBHOOK_URL: usize = 2048;

/// The webhook URL of a completion target, checked: an `http` or `https` URL with a host, at
/// most [`MAX_WEBHOOK_URL`] characters, with no user name or password (the signature, not the
/// URL, is the credential). `field` is where the target is in the request (`completion`,
/// `header.completion`); a problem is a violation of `{field}.webhook_url`. None: no target.
pub fn webhook_of(target: Option<&pb::CompletionTarget>, field: &str) -> Result<Option<String>, FieldError> {
    let Some(pb::completion_target::Target::WebhookUrl(url)) = target.and_then(|t| t.target.as_ref()) else {
        return Ok(None);
    };
    let invalid = |why: String| FieldError::new(format!("{field}.webhook_url"), why);
    if url.len() > MAX_WEBHOOK_URL {
        return Err(invalid(format!("at most {MAX_WEBHOOK_URL} characters")));
    }
    let parsed = url::Url::parse(url).map_err(|e| invalid(format!("not a URL ({e}): {url:?}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!("an http:// or https:// URL, got scheme {:?}", parsed.scheme())));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("a URL with a host: {url:?}")));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid("no user name or password in the URL (deliveries are signed)".into()));
    }
    Ok(Some(url.clone()))
}

/// The wire form of a completion's delivery.
pub fn delivery_to_pb(d: &Delivery) -> pb::CompletionDelivery {
    pb::CompletionDelivery {
        webhook_url: d.url.clone(),
        state: match d.state {
            DeliveryState::Waiting => pb::CompletionDeliveryState::Waiting,
            DeliveryState::Pending => pb::CompletionDeliveryState::Pending,
            DeliveryState::Delivered => pb::CompletionDeliveryState::Delivered,
            DeliveryState::Failed => pb::CompletionDeliveryState::Failed,
        } as i32,
        attempts: d.attempts,
        acknowledgments: d.acknowledgments,
        last_error: d.last_error.clone(),
        last_attempt_time: timestamp(d.last_attempt_ms),
        next_attempt_time: if d.state == DeliveryState::Pending { timestamp(d.next_attempt_ms) } else { None },
        delivered_time: timestamp(d.delivered_at_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(url: &str) -> pb::CompletionTarget {
        pb::CompletionTarget { target: Some(pb::completion_target::Target::WebhookUrl(url.into())) }
    }

    #[test]
    fn webhooks_are_http_or_https_urls_with_a_host() {
        assert_eq!(webhook_of(None, "completion"), Ok(None));
        assert_eq!(webhook_of(Some(&pb::CompletionTarget::default()), "completion"), Ok(None));
        for good in ["http://127.0.0.1:8080/hook", "https://hooks.example.com/baton?x=1"] {
            assert_eq!(webhook_of(Some(&hook(good)), "completion"), Ok(Some(good.to_owned())), "{good}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_WEBHOOK_URL));
        for (bad, why) in [
            ("ftp://example.com/x", "an http:// or https:// URL"),
            ("mailto:ops@example.com", "an http:// or https:// URL"),
            ("example.com/hook", "not a URL"),
            ("", "not a URL"),
            ("http://", "not a URL"),
            ("http://:8080/hook", "not a URL"),
            ("https://user:pw@example.com/", "no user name or password"),
            (long.as_str(), "at most 2048 characters"),
        ] {
            let e = webhook_of(Some(&hook(bad)), "header.completion").unwrap_err();
            assert_eq!(e.field, "header.completion.webhook_url", "{bad}");
            assert!(e.description.contains(why), "{bad}: {}", e.description);
        }
    }
}
