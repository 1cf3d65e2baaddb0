//! The registry: every instance's entry — at rest, live with a task, or
//! removed — and each live instance's inbox. Its lock is never held across
//! an await.
//!
//! Parking and delivery cannot race: a command is put into a live inbox
//! only under the lock (`try_send`), and a task parks (goes back to rest,
//! dropping its inbox) only under the lock and only with an empty inbox. A
//! sender that had to wait for room re-checks, under the lock, that the task
//! it waited for is still the instance's: if it parked meanwhile, the
//! command goes to the entry as it is now. No command is ever lost or sent twice.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot, watch};

use super::error::EngineError;
use super::signal::Signaled;
use crate::log::InstanceSpec;
use crate::machine::{Input, Instance, InstanceName, State};

/// Host commands queued per instance: a host that sends more waits.
pub(crate) const COMMAND_CAPACITY: usize = 16;

/// A message to an instance task.
pub(crate) enum Msg {
    /// A host command (named for errors) and where to send its result.
    Command { input: Input, command: &'static str, reply: Reply },
    /// A transport signal a host reports for a connection it holds itself,
    /// and where to say what the rules made of it.
    Signal { input: Input, reply: oneshot::Sender<Result<Signaled, EngineError>> },
    /// Stop: drop the socket, keep the recorded state.
    Shutdown,
}

impl Msg {
    /// The input a command or signal carries.
    pub(crate) fn input(&self) -> Option<&Input> {
        match self {
            Self::Command { input, .. } | Self::Signal { input, .. } => Some(input),
            Self::Shutdown => None,
        }
    }
}

/// Where a command's result goes.
pub(crate) type Reply = oneshot::Sender<Result<State, EngineError>>;

/// Who carries a live instance's application frames: the engine's own
/// transport (its connection's queue), or the host (`external:`).
#[derive(Clone, Debug)]
pub(crate) enum Carrier {
    Engine(crate::transport::Outlet),
    Host,
}

/// The current connection's carrier, shared by the instance's task (which
/// sets it) and `Engine::send` (which reads it without waking the task).
pub(crate) type CarrierSlot = std::sync::Arc<Mutex<Option<Carrier>>>;

/// An instance's current state and last sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct View {
    pub(crate) instance: Instance,
    pub(crate) seq: u64,
}

/// One instance's entry.
pub(crate) enum Entry {
    /// Reserved by a `create` in progress.
    Creating,
    /// At rest (`Closed`, nothing in flight): no task, no channels — a fleet of
    /// idle instances costs only this entry. A command that moves it wakes it.
    Idle { view: View, spec: InstanceSpec },
    /// Driven by its task; `token` tells this task's entry from a later one's.
    Live {
        inbox: mpsc::Sender<Box<Msg>>,
        view: watch::Receiver<View>,
        task: tokio::task::JoinHandle<()>,
        token: u64,
        /// Who carries the current connection's application frames.
        carrier: CarrierSlot,
    },
    /// Removed (R1), as recorded: the table answers commands on it (a
    /// repeated delete, a connect) from this state.
    Removed { view: View },
}

impl Entry {
    /// The state the entry shows (`None` while being created).
    pub(crate) fn state(&self) -> Option<State> {
        match self {
            Self::Creating => None,
            Self::Idle { view, .. } | Self::Removed { view } => Some(view.instance.state.clone()),
            Self::Live { view, .. } => Some(view.borrow().instance.state.clone()),
        }
    }
}

/// The registry of instances.
#[derive(Default)]
pub(crate) struct Registry {
    entries: Mutex<HashMap<InstanceName, Entry>>,
}

impl Registry {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashMap<InstanceName, Entry>> {
        // Only our own short critical sections hold it; none can panic midway.
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The removed instance's tombstone, set at its `Removed` transition,
    /// before any waiter hears of it: a create that follows finds the name free.
    pub(crate) fn tombstone(&self, name: &InstanceName, view: View) {
        self.lock().insert(name.clone(), Entry::Removed { view });
    }

    /// Puts a resting instance back to `Idle`, if its entry still belongs to
    /// the task holding `token` and that task's inbox is empty. Returns
    /// whether it did; the task then ends.
    pub(crate) fn park(
        &self,
        name: &InstanceName,
        token: u64,
        view: View,
        spec: InstanceSpec,
        inbox_empty: impl Fn() -> bool,
    ) -> bool {
        let mut entries = self.lock();
        let ours = matches!(entries.get(name), Some(Entry::Live { token: t, .. }) if *t == token);
        if !ours || !inbox_empty() {
            return false;
        }
        entries.insert(name.clone(), Entry::Idle { view, spec });
        true
    }

    /// A task whose instance another host took over forgets it, if its
    /// entry is still the task's own.
    pub(crate) fn forget(&self, name: &InstanceName, token: u64) {
        let mut entries = self.lock();
        if matches!(entries.get(name), Some(Entry::Live { token: t, .. }) if *t == token) {
            entries.remove(name);
        }
    }

    /// A task that ends for good (its engine shut down, or it failed) leaves
    /// what it knew: at rest as `Idle`, otherwise its live entry stays for
    /// shutdown to collect.
    pub(crate) fn leave(&self, name: &InstanceName, token: u64, view: View, spec: InstanceSpec) {
        let mut entries = self.lock();
        let ours = matches!(entries.get(name), Some(Entry::Live { token: t, .. }) if *t == token);
        if ours && matches!(view.instance.state, State::Closed { .. }) {
            entries.insert(name.clone(), Entry::Idle { view, spec });
        }
    }
}
