//! Host cleanup: named steps run once per removal, in order, one at a time
//! (Evolution API #1576: concurrent cleanup of one instance raced and looped),
//! each bounded by a time-out and isolated from panics (R10). Every step's
//! outcome goes into the log; none keeps the instance alive (R2).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::machine::{Input, InstanceName, Reason, StepOutcome, StepReport};

/// A cleanup step's future.
pub type StepFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// The host's cleanup: its step names, and how to run one for an instance.
/// Steps must be idempotent: a crash during a delete reruns the cleanup
/// from its first step after the restart.
pub trait Cleanup: Send + Sync + 'static {
    /// The steps, in the order they run (e.g. `session-store`, `files`, `cache`).
    fn steps(&self) -> Vec<String>;
    /// Runs one step for `instance`.
    fn run(&self, instance: InstanceName, step: &str) -> StepFuture;
}

/// No cleanup steps.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCleanup;

impl Cleanup for NoCleanup {
    fn steps(&self) -> Vec<String> {
        Vec::new()
    }

    fn run(&self, _: InstanceName, _: &str) -> StepFuture {
        Box::pin(async { Ok(()) })
    }
}

/// Runs every step in order and reports `CleanupFinished` on `report`.
pub(crate) async fn run(
    cleanup: Arc<dyn Cleanup>,
    instance: InstanceName,
    step_timeout: Duration,
    report: mpsc::Sender<Box<Input>>,
) {
    let mut steps = Vec::new();
    for step in cleanup.steps() {
        let mut task = tokio::spawn(cleanup.run(instance.clone(), &step));
        let outcome = match tokio::time::timeout(step_timeout, &mut task).await {
            Err(_) => {
                task.abort();
                StepOutcome::TimedOut
            }
            Ok(Ok(Ok(()))) => StepOutcome::Done,
            Ok(Ok(Err(error))) => StepOutcome::Failed { error: Reason::new(error) },
            Ok(Err(e)) if e.is_panic() => {
                StepOutcome::Panicked { message: Reason::new(crate::panic_message(&e.into_panic())) }
            }
            Ok(Err(e)) => StepOutcome::Failed { error: Reason::new(e.to_string()) },
        };
        if outcome != StepOutcome::Done {
            tracing::warn!(instance = %instance, step, ?outcome, "cleanup step did not succeed; removal goes on");
        }
        steps.push(StepReport { step, outcome });
    }
    let _ = report.send(Box::new(Input::CleanupFinished { steps })).await;
}
