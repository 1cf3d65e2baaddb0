//! Errors: the service's own ([`ServeError`], at start-up) and the API's
//! ([`ApiError`], one per failed request, as `{"error": {"code", "message"}}`
//! with the HTTP status that says what happened — never a 200 carrying an error).

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::EngineError;
use crate::log::LogError;

/// Why the service could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration file could not be read or parsed.
    #[error("configuration {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A setting is out of range.
    #[error("invalid setting {field}: {reason}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Listening beyond this machine without an API key would hand every
    /// instance to anyone who can reach the port.
    #[error("refusing to listen on {addr} without an API key: set api_key (or --api-key) to listen beyond 127.0.0.1")]
    Unprotected {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The engine could not open its log or start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The cluster could not be joined or left.
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The service's own data in the log could not be read or written.
    #[error("service data in the log: {0}")]
    Log(#[from] LogError),
    /// The HTTP client for webhooks could not be built.
    #[error("webhook client: {0}")]
    Client(String),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Server(std::io::Error),
}

/// A failed request, as the API answers it.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable, machine-readable code (`unknown_instance`, `invalid_name`, …).
    pub code: std::borrow::Cow<'static, str>,
    /// What happened, for a person.
    pub message: String,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable: `unauthorized`, `forbidden`, `unknown_instance`,
    /// `already_exists`, `removed`, `closing`, `invalid_name`, `invalid_url`,
    /// `invalid_body`, `not_a_signal`, `too_many_subscribers`, `timed_out`,
    /// `shutting_down`, `log_failure`, `not_found`, `internal`.
    pub code: String,
    /// What happened, for a person.
    pub message: String,
}

impl ApiError {
    /// An error with its status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code: code.into(), message: message.into() }
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an API key is required: send it in the `apikey` header or as `Authorization: Bearer KEY`",
        )
    }

    pub(crate) fn forbidden(what: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", format!("this key does not open {what}"))
    }

    pub(crate) fn body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl ApiError {
    /// The HTTP status of an error code (the engine's, forwarded or not).
    pub(crate) fn status_of(code: &str) -> StatusCode {
        match code {
            "invalid_name" | "invalid_url" | "not_a_signal" | "invalid_body" => StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_instance" | "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "closing" | "owned_elsewhere" | "token_taken" | "not_open" | "host_driven"
            | "connection_ended" => StatusCode::CONFLICT,
            "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
            "send_queue_full" => StatusCode::SERVICE_UNAVAILABLE,
            "removed" => StatusCode::GONE,
            "timed_out" => StatusCode::GATEWAY_TIMEOUT,
            "shutting_down" | "log_failure" | "cluster_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let code = e.code();
        Self { status: Self::status_of(code), code: code.into(), message: e.to_string() }
    }
}

impl From<crate::cluster::ClusterError> for ApiError {
    fn from(e: crate::cluster::ClusterError) -> Self {
        use crate::cluster::ClusterError;
        match e {
            ClusterError::Engine(e) => e.into(),
            // The owner's own answer, as it gave it.
            ClusterError::Remote { code, message, .. } => {
                Self { status: Self::status_of(&code), code: code.into(), message }
            }
            e => {
                let code = e.code().to_owned();
                Self { status: Self::status_of(&code), code: code.into(), message: e.to_string() }
            }
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "log_failure", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.into_owned(), message: self.message } };
        (self.status, Json(body)).into_response()
    }
}
