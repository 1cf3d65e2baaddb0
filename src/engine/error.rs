//! The engine's errors: each says what failed for which instance.

use std::time::Duration;

use crate::log::LogError;
use crate::machine::{InputKind, InstanceName, Intent, NameError, PolicyError, Rejection, StateKind, UrlError};

/// An error of the engine's API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The name is not a valid instance name.
    #[error("invalid instance name: {0}")]
    InvalidName(#[from] NameError),
    /// The URL is not a `ws://` or `wss://` URL.
    #[error(transparent)]
    InvalidUrl(#[from] UrlError),
    /// The policy is out of range.
    #[error("invalid policy: {0}")]
    Policy(#[from] PolicyError),
    /// A setting of the engine's configuration is out of range.
    #[error("invalid engine configuration: {field} {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// No instance has this name.
    #[error("unknown instance {name}")]
    UnknownInstance {
        /// The name.
        name: InstanceName,
    },
    /// An instance with this name exists.
    #[error("instance {name} already exists")]
    AlreadyExists {
        /// The name.
        name: InstanceName,
    },
    /// The instance was removed (R1): create it again to use the name.
    #[error("instance {name} was removed; create it again to reuse the name")]
    Removed {
        /// The name.
        name: InstanceName,
    },
    /// The instance is being logged out or deleted.
    #[error("instance {name} is closing ({intent:?}); wait until it is Closed")]
    Closing {
        /// The name.
        name: InstanceName,
        /// Why it is closing.
        intent: Intent,
    },
    /// The log failed: the transition did not happen (R8).
    #[error("log failure{}: {source}", instance.as_ref().map(|n| format!(" for instance {n}")).unwrap_or_default())]
    Log {
        /// The instance, if one was concerned.
        instance: Option<InstanceName>,
        /// The log's error.
        source: Box<LogError>,
    },
    /// A command did not complete in time (a bug: every wait is bounded by the policy).
    #[error("{command} of {name} did not complete within {waited:?}")]
    TimedOut {
        /// The name.
        name: InstanceName,
        /// The command.
        command: &'static str,
        /// How long it waited.
        waited: Duration,
    },
    /// `Engine::signal` was given an input that is not a connection's signal.
    #[error("{input} is not a signal a host can report for {name}: only a connection's signals are")]
    NotASignal {
        /// The name.
        name: InstanceName,
        /// What was given.
        input: InputKind,
    },
    /// `Engine::send` on an instance that is not `Open`.
    #[error("instance {name} is {state}, not Open: it takes frames only while open")]
    NotOpen {
        /// The name.
        name: InstanceName,
        /// The state it is in.
        state: StateKind,
    },
    /// `Engine::send` found the connection's queue full.
    #[error("the send queue of {name} is full ({capacity} frames); retry when it drains")]
    SendQueueFull {
        /// The name.
        name: InstanceName,
        /// The queue's capacity.
        capacity: usize,
    },
    /// `Engine::send` would exceed the connection's send budget.
    #[error("{name} is over its send budget; retry in {retry_after:?}")]
    RateLimited {
        /// The name.
        name: InstanceName,
        /// When a frame will fit again.
        retry_after: Duration,
    },
    /// `Engine::send` on a host-driven (`external:`) instance: the host holds its socket.
    #[error("{name} is host-driven: send on the connection the host holds")]
    HostDriven {
        /// The name.
        name: InstanceName,
    },
    /// `Engine::send` raced the end of the connection (its end is being handled).
    #[error("the connection of {name} ended; the instance is about to leave Open")]
    ConnectionEnded {
        /// The name.
        name: InstanceName,
    },
    /// The engine was shut down.
    #[error("the engine is shut down")]
    ShutDown,
    /// The instance's task stopped while handling the command (a caught
    /// panic, recorded in the log); the command may have been carried out in part.
    #[error("{command} of {name} was interrupted; see its history")]
    Interrupted {
        /// The name.
        name: InstanceName,
        /// The command.
        command: &'static str,
    },
}

impl EngineError {
    /// A stable, machine-readable name for the error (the service's error
    /// `code`; what a cluster host forwards for an owner's answer).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidName(_) => "invalid_name",
            Self::InvalidUrl(_) => "invalid_url",
            Self::NotASignal { .. } => "not_a_signal",
            Self::UnknownInstance { .. } => "unknown_instance",
            Self::AlreadyExists { .. } => "already_exists",
            Self::Closing { .. } => "closing",
            Self::NotOpen { .. } => "not_open",
            Self::SendQueueFull { .. } => "send_queue_full",
            Self::RateLimited { .. } => "rate_limited",
            Self::HostDriven { .. } => "host_driven",
            Self::ConnectionEnded { .. } => "connection_ended",
            Self::Removed { .. } => "removed",
            Self::TimedOut { .. } => "timed_out",
            Self::ShutDown => "shutting_down",
            Self::Interrupted { .. } => "interrupted",
            Self::Log { .. } => "log_failure",
            Self::Policy(_) | Self::InvalidConfig { .. } => "internal",
        }
    }

    pub(crate) fn log(instance: Option<InstanceName>, source: LogError) -> Self {
        Self::Log { instance, source: Box::new(source) }
    }

    pub(crate) fn rejected(name: &InstanceName, r: Rejection) -> Self {
        match r {
            Rejection::Removed => Self::Removed { name: name.clone() },
            Rejection::Closing { intent } => Self::Closing { name: name.clone(), intent },
        }
    }

    /// A blocking task (the log's) that could not be joined.
    pub(crate) fn join(e: tokio::task::JoinError) -> Self {
        Self::log(None, LogError::Failed(e.to_string()))
    }
}

impl From<LogError> for EngineError {
    fn from(source: LogError) -> Self {
        Self::log(None, source)
    }
}
