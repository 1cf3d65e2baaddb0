//! Commands for an instance another host owns: forwarded to its owner over
//! NATS request–reply, answered with exactly what the owner's engine said.
//!
//! Each host serves one subject, `<namespace>.rpc.<host>`. A host that gets
//! a command for an instance it does not own asks the owner the bucket
//! names; the owner runs it only while it holds the lease (otherwise it
//! answers [`Reply::NotOwner`], and the asker looks again). A request the
//! owner never answered in time is not sent again: the owner may have run
//! it, and a command must reach the owner once.

use serde::{Deserialize, Serialize};

use crate::engine::{Command, EngineError, Signaled};
use crate::log::InstanceSpec;
use crate::machine::{Input, InstanceName, State};

/// What one host asks another.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    /// A host command.
    Command {
        /// The instance.
        name: InstanceName,
        /// Which.
        command: Command,
    },
    /// A create of a name the asked host owns (it answers `already_exists`,
    /// or creates a removed one again).
    Create {
        /// The instance.
        name: InstanceName,
        /// What it connects to.
        spec: InstanceSpec,
    },
    /// A signal of a connection the client's host holds (`transport: external`).
    Signal {
        /// The instance.
        name: InstanceName,
        /// The signal.
        input: Input,
    },
}

impl Request {
    pub(crate) fn name(&self) -> &InstanceName {
        match self {
            Self::Command { name, .. } | Self::Create { name, .. } | Self::Signal { name, .. } => name,
        }
    }
}

/// What the owner answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    /// A command's answer: the state it ended in.
    State(State),
    /// A create's answer.
    Created,
    /// A signal's answer.
    Signaled(Signaled),
    /// The engine's error, by its stable code.
    Failed {
        /// [`EngineError::code`].
        code: String,
        /// What it said.
        message: String,
    },
    /// This host does not own the instance (any more): ask its owner.
    NotOwner,
}

impl Reply {
    pub(crate) fn failed(e: &EngineError) -> Self {
        Self::Failed { code: e.code().to_owned(), message: e.to_string() }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        // Plain data with string keys: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The subject a host serves requests on (host ids may hold `.`, a token separator).
pub(crate) fn subject(namespace: &str, host: &str) -> String {
    format!("{namespace}.rpc.{}", host.replace('.', "="))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_read_back_as_written() {
        let name = InstanceName::new("a.b").unwrap();
        let request = Request::Command { name: name.clone(), command: Command::Logout };
        let back: Request = serde_json::from_slice(&serde_json::to_vec(&request).unwrap()).unwrap();
        assert!(matches!(back, Request::Command { command: Command::Logout, .. }));
        assert_eq!(back.name(), &name);
        let failed = Reply::failed(&EngineError::Removed { name });
        let back: Reply = serde_json::from_slice(&failed.encode()).unwrap();
        let Reply::Failed { code, message } = back else { panic!("{back:?}") };
        assert_eq!((code.as_str(), message.contains("a.b")), ("removed", true));
        assert_eq!(subject("lc", "gw.1"), "lc.rpc.gw=1");
    }
}
