//! Commands for an instance another host owns: forwarded to its owner over
//! NATS request–reply, answered with exactly what the owner's engine said.
//!
//! Each host serves one subject, `<namespace>.rpc.<host>`. A host that gets
//! a command for an instance it does not own asks the owner the bucket
//! names; the owner runs it only while it holds the lease (otherwise it
//! answers [`Reply::NotOwner`], and the asker looks again).
//!
//! **Once.** The owner first says it has the request ([`Reply::Accepted`]),
//! then answers. A request nobody accepted within a renewal period went to
//! a host that died (NATS may hand a message to a connection it has not yet
//! seen close): the asker looks for the owner again and sends it again, with
//! the same id — an owner runs an id once and answers a repeat with the
//! first answer, and a new owner is fenced from an old owner's writes. A
//! request that was accepted and not answered within the command bound is
//! not sent again: the owner may have run it (`timed_out`).
use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::engine::{Command, EngineError, Signaled};
use crate::log::InstanceSpec;
use crate::machine::{Input, InstanceName, State};

/// A request as it travels: with the id that makes a repeat of it harmless.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Envelope {
    /// Unique per request (the asking host's id and a counter).
    pub(crate) id: String,
    /// What is asked.
    pub(crate) request: Request,
}

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

    /// What is asked, in a word (`connect`, `create`, `signal`).
    pub(crate) fn what(&self) -> &'static str {
        match self {
            Self::Command { command, .. } => command.as_str(),
            Self::Create { .. } => "create",
            Self::Signal { .. } => "signal",
        }
    }
}

/// What the owner answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    /// The request arrived and is being run: its answer follows.
    Accepted,
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

/// Answers kept for repeats of a request: enough for every request that can
/// be repeated within a command bound on a busy host.
const ANSWERS_KEPT: usize = 4096;

/// An owner's memory of the requests it has run or is running, by id.
#[derive(Default)]
pub(crate) struct Answers {
    /// Running: where else to send the answer (a repeat's inbox).
    running: HashMap<String, Vec<String>>,
    done: HashMap<String, Reply>,
    order: VecDeque<String>,
}

/// What to do with an arriving request.
pub(crate) enum Seen {
    /// New: run it.
    New,
    /// Running already: its answer will go to this inbox too.
    Running,
    /// Run already: this was its answer.
    Done(Reply),
}

impl Answers {
    /// Notes that `id` arrived, answered at `inbox`.
    pub(crate) fn arrived(&mut self, id: &str, inbox: &str) -> Seen {
        if let Some(reply) = self.done.get(id) {
            return Seen::Done(reply.clone());
        }
        if let Some(waiting) = self.running.get_mut(id) {
            waiting.push(inbox.to_owned());
            return Seen::Running;
        }
        self.running.insert(id.to_owned(), Vec::new());
        Seen::New
    }

    /// Notes `id`'s answer; returns the inboxes of its repeats, which want it
    /// too. "Not the owner" is not kept: a repeat may find this host the owner.
    pub(crate) fn finished(&mut self, id: &str, reply: &Reply) -> Vec<String> {
        let waiting = self.running.remove(id).unwrap_or_default();
        if matches!(reply, Reply::NotOwner) {
            return waiting;
        }
        self.done.insert(id.to_owned(), reply.clone());
        self.order.push_back(id.to_owned());
        while self.order.len() > ANSWERS_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.done.remove(&old);
            }
        }
        waiting
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
    fn a_request_is_run_once_and_its_repeats_get_its_answer() {
        let mut answers = Answers::default();
        assert!(matches!(answers.arrived("h-1", "inbox.1"), Seen::New));
        assert!(matches!(answers.arrived("h-1", "inbox.2"), Seen::Running));
        assert!(matches!(answers.arrived("h-2", "inbox.3"), Seen::New));
        let reply = Reply::Created;
        assert_eq!(answers.finished("h-1", &reply), vec!["inbox.2".to_owned()]);
        assert!(matches!(answers.arrived("h-1", "inbox.4"), Seen::Done(Reply::Created)));
        assert!(matches!(answers.arrived("h-3", "i"), Seen::New));
        answers.finished("h-3", &Reply::NotOwner);
        assert!(matches!(answers.arrived("h-3", "i"), Seen::New), "not the owner then; maybe now");
        for i in 0..ANSWERS_KEPT {
            answers.arrived(&format!("x-{i}"), "i");
            answers.finished(&format!("x-{i}"), &Reply::Created);
        }
        assert!(matches!(answers.arrived("h-1", "inbox.5"), Seen::New), "the oldest answers are forgotten");
    }

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
