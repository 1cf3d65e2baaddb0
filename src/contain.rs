//! Containing panics of code we do not own (sled 0.34 panics on some damaged
//! files, upstream #1527 #1533): the panic becomes a value, and nothing is
//! printed for it — not the default hook's message, not a backtrace — so a
//! person sees one typed error instead of a crash report.
//!
//! The process's panic hook is wrapped once: while a thread is inside
//! [`quietly`], a panic on that thread is caught silently; every other panic
//! goes to the hook that was installed before (so tests, hosts and their
//! own hooks behave as before). A host that installs its own hook after
//! ours replaces this; contained panics then print, and are still contained.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

thread_local! {
    static QUIET: Cell<u32> = const { Cell::new(0) };
}

fn install_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
}

/// Runs `f`; a panic in it becomes `Err(message)` and prints nothing.
pub(crate) fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    QUIET.with(|q| q.set(q.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(q.get().saturating_sub(1)));
    result.map_err(|panic| panic_message(&panic))
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_contained_panic_is_a_value_and_nesting_is_fine() {
        assert_eq!(super::quietly(|| 7), Ok(7));
        let r: Result<(), String> = super::quietly(|| panic!("tried to serialize Uninitialized"));
        assert_eq!(r, Err("tried to serialize Uninitialized".to_owned()));
        let nested = super::quietly(|| super::quietly(|| panic!("inner")).is_err());
        assert_eq!(nested, Ok(true));
    }
}
