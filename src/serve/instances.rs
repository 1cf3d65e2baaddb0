//! Where the service's instances are: this host's engine, or — in a
//! cluster — whichever host owns each one. Every route asks here, so a
//! route answers the same on every host: commands run on the owner (see
//! `cluster::Cluster::command`), reads come from the log of record with
//! read-your-writes.

use super::error::ApiError;
use super::events::EventBody;
use crate::cluster::Cluster;
use crate::engine::{Command, Engine, EngineError, Signaled};
use crate::log::InstanceSpec;
use crate::machine::{Input, InstanceName, Policy, State};

/// This host's engine, or the cluster it is one host of.
#[derive(Clone)]
pub(crate) enum Instances {
    /// One host: the engine and its log are everything.
    Local(Engine),
    /// One host of a cluster: the stream is the log of record.
    Cluster(Cluster),
}

impl Instances {
    /// The engine this host runs.
    pub(crate) fn engine(&self) -> &Engine {
        match self {
            Self::Local(engine) => engine,
            Self::Cluster(cluster) => cluster.engine(),
        }
    }

    /// The cluster, when this is one host of one.
    pub(crate) fn cluster(&self) -> Option<&Cluster> {
        match self {
            Self::Local(_) => None,
            Self::Cluster(cluster) => Some(cluster),
        }
    }

    /// Creates an instance (in a cluster: claimed here, or created by its
    /// owner) with its own API token: on one host the token's digest is
    /// committed in the `Created` record (one commit for both); in a cluster
    /// it goes to the token bucket afterwards ([`super::auth::Auth::created`]).
    pub(crate) async fn create(&self, name: &str, spec: InstanceSpec, token: &str) -> Result<(), ApiError> {
        match self {
            Self::Local(engine) => {
                Ok(engine.create_with_token(name, spec, Some(crate::log::Digest::of(token.as_bytes()))).await?)
            }
            Self::Cluster(cluster) => Ok(cluster.create(name, spec).await?),
        }
    }

    /// Runs a host command where the instance is owned; the state it ended in.
    pub(crate) async fn command(&self, name: &str, command: Command) -> Result<State, ApiError> {
        match self {
            Self::Local(engine) => Ok(engine.command(name, command).await?),
            Self::Cluster(cluster) => Ok(cluster.command(name, command).await?),
        }
    }

    /// Reports a host-held connection's signal where the instance is owned.
    pub(crate) async fn signal(&self, name: &str, input: Input) -> Result<Signaled, ApiError> {
        match self {
            Self::Local(engine) => Ok(engine.signal(name, input).await?),
            Self::Cluster(cluster) => Ok(cluster.signal(name, input).await?),
        }
    }

    /// An instance's state; a removed one is the `removed` error.
    pub(crate) async fn state(&self, name: &str) -> Result<State, ApiError> {
        match self {
            Self::Local(engine) => Ok(engine.state(name)?),
            Self::Cluster(cluster) => Ok(cluster.state(name).await?),
        }
    }

    /// An instance's state as last recorded, a removed one's too (until purged).
    pub(crate) async fn recorded(&self, name: &str) -> Result<State, ApiError> {
        match self {
            Self::Local(engine) => match engine.state(name) {
                Err(EngineError::Removed { .. }) => {
                    let history = engine.history(name).await?;
                    history.last().map(|r| r.to.state.clone()).ok_or_else(|| ApiError::internal("no records"))
                }
                other => Ok(other?),
            },
            Self::Cluster(cluster) => {
                let instance = InstanceName::new(name).map_err(EngineError::from)?;
                match cluster.row(&instance).await? {
                    Some(row) => Ok(row.instance.state),
                    None => Err(EngineError::UnknownInstance { name: instance }.into()),
                }
            }
        }
    }

    /// Every instance that is not removed, by name.
    pub(crate) async fn list(&self) -> Result<Vec<(InstanceName, State)>, ApiError> {
        match self {
            Self::Local(engine) => Ok(engine.list()),
            Self::Cluster(cluster) => Ok(cluster.list().await?),
        }
    }

    /// An instance's records as events (in a cluster: numbered by stream
    /// sequence, each with the host that wrote it).
    pub(crate) async fn history(&self, name: &str, policy: &Policy) -> Result<Vec<EventBody>, ApiError> {
        match self {
            Self::Local(engine) => Ok(engine.history(name).await?.iter().map(|r| EventBody::of(r, policy)).collect()),
            Self::Cluster(cluster) => {
                let instance = InstanceName::new(name).map_err(EngineError::from)?;
                let entries = cluster.reader().entries(&instance).await?;
                if entries.is_empty() {
                    return Err(EngineError::UnknownInstance { name: instance }.into());
                }
                Ok(entries
                    .iter()
                    .filter_map(|(seq, _, entry)| EventBody::of_entry(&instance, *seq, entry.as_ref().ok()?, policy))
                    .collect())
            }
        }
    }

    /// The newest position of the log of record that the service's views cover
    /// (in a cluster: after waiting for this host's view to reach the stream's end).
    pub(crate) async fn position(&self) -> Result<u64, ApiError> {
        match self {
            Self::Local(engine) => Ok(engine.log().committed()),
            Self::Cluster(cluster) => {
                cluster.sync(None).await?;
                Ok(cluster.view().applied())
            }
        }
    }
}
