//! Stored responses (the Responses API): only the key that made one may
//! name it (another key gets the same 404 as for an id that never existed),
//! a retrieve or cancel runs with the model that made it, and a request
//! whose answer a replica will store gets an id of sluice's choosing,
//! claimed for its key before it leaves, so that any edge can route what
//! follows to the replica that holds it.

use crate::backends::affinity::AffinityMap;
use crate::error::GatewayError;
use crate::protocol::InferenceRequest;
use crate::tenancy::Identity;

/// Where the queue must send a request, and what the worker records.
#[derive(Debug, Default)]
pub(super) struct Placement {
    /// The stored response it must run beside.
    pub pinned_to: Option<String>,
    /// The id its answer is stored under.
    pub stores: Option<String>,
}

fn not_found(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("Response with id '{id}' not found."))
}

/// Checks that `identity` owns the stored response `request` names, and
/// gives a retrieve or cancel the model that made it. Before the limits and
/// the model checks, which then apply to that model.
pub(super) async fn check_owner(
    affinity: &dyn AffinityMap,
    identity: &Identity,
    request: &mut InferenceRequest,
) -> Result<Option<String>, GatewayError> {
    let id = match request {
        InferenceRequest::StoredResponse(r) => r.id().to_string(),
        InferenceRequest::Responses(r) => match r.previous_response_id() {
            Some(id) => id.to_string(),
            None => return Ok(None),
        },
        _ => return Ok(None),
    };
    let holder = affinity
        .find(&id)
        .await
        .map_err(|err| GatewayError::Backend(err.to_string()))?;
    match holder {
        Some(holder) if holder.owner == identity.key_id => {
            if let InferenceRequest::StoredResponse(r) = request {
                r.set_model(holder.model);
            }
            Ok(Some(id))
        }
        _ => Err(not_found(&id)),
    }
}

/// Names a response a replica will store and claims it for `identity`,
/// with `model` as the client named it (so that a retrieve passes the same
/// model checks).
pub(super) async fn claim(
    affinity: &dyn AffinityMap,
    identity: &Identity,
    request: &mut InferenceRequest,
    model: &str,
    pinned_to: Option<String>,
) -> Result<Placement, GatewayError> {
    let responses = match request {
        InferenceRequest::Responses(responses) if responses.is_stored() => responses,
        _ => {
            return Ok(Placement {
                pinned_to,
                stores: None,
            });
        }
    };
    let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    responses.set_response_id(&id);
    affinity
        .claim(&id, &identity.key_id, model)
        .await
        .map_err(|err| GatewayError::Backend(err.to_string()))?;
    Ok(Placement {
        pinned_to,
        stores: Some(id),
    })
}
