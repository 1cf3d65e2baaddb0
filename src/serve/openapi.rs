//! The OpenAPI document, generated from the handlers' types with `utoipa`:
//! derive macros on the types the handlers already use, no router of its
//! own (so `axum` stays the only routing), no runtime cost beyond building
//! the document on request. (`aide` would have meant routing through its
//! wrappers and `schemars` derives on every type.)

use utoipa::OpenApi;

use super::api;

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "instance-lifecycle",
        description = "The lifecycle engine as a service: instances, their transitions, host-driven sessions, webhooks.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        api::create,
        api::list,
        api::get,
        api::connect,
        api::logout,
        api::restart,
        api::delete,
        api::history,
        api::signal,
        api::send,
        api::frames,
        api::effects,
        api::events,
        api::diagram,
        api::fleet,
        api::table,
        api::health,
        api::metrics,
        api::webhooks,
        api::dead_letters,
        api::retry_dead,
    ),
    components(schemas(
        api::CreateInstance,
        api::SendFrame,
        api::TransportKind,
        api::InstanceView,
        api::Created,
        api::Health,
        super::events::EventBody,
        super::events::CloseView,
        super::fleet::FleetView,
        super::fleet::FleetRow,
        super::fleet::EdgeCount,
        super::fleet::ActionView,
        super::fleet::TableEdge,
        crate::transport::HostSignal,
        crate::transport::Initiator,
        crate::transport::HostEffect,
        crate::transport::HostAction,
        super::webhook::DeadLetter,
        super::webhook::WebhookStatus,
        super::webhook::WebhookFormat,
        super::error::ErrorBody,
        super::error::ErrorDetail,
    ))
)]
pub struct ApiDoc;
