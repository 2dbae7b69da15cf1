//! Undo for ADD: each step that changed something registers how to undo
//! it; unless the guard is disarmed, dropping it undoes them newest first.

use tracing::warn;

type Undo<'a> = Box<dyn FnOnce() -> Result<(), String> + 'a>;

/// Why an undo step failed: the error with all its sources.
pub fn why(e: impl std::error::Error) -> String {
    tabby_errors::chain(&e).to_string()
}

/// Undo steps of a failed ADD (a guard, not a flag: it also runs on early return and panic).
#[derive(Default)]
pub struct Rollback<'a> {
    steps: Vec<(&'static str, Undo<'a>)>,
}

impl<'a> Rollback<'a> {
    /// An empty guard.
    pub fn new() -> Self {
        Self { steps: Vec::new() }
    }

    /// Registers how to undo the step just done.
    pub fn push(&mut self, what: &'static str, undo: impl FnOnce() -> Result<(), String> + 'a) {
        self.steps.push((what, Box::new(undo)));
    }

    /// The ADD succeeded: keep everything.
    pub fn disarm(mut self) {
        self.steps.clear();
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        while let Some((what, undo)) = self.steps.pop() {
            match undo() {
                Ok(()) => warn!(step = what, "rolled back"),
                Err(e) => warn!(step = what, error = %e, "rollback step failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn a_dropped_guard_undoes_newest_first_and_keeps_going_after_a_failure() {
        let log = RefCell::new(Vec::new());
        {
            let mut rb = Rollback::new();
            rb.push("a", || {
                log.borrow_mut().push("a");
                Ok(())
            });
            rb.push("b", || {
                log.borrow_mut().push("b");
                Err("boom".into())
            });
        }
        assert_eq!(*log.borrow(), vec!["b", "a"]);
    }

    #[test]
    fn a_disarmed_guard_undoes_nothing() {
        let log = RefCell::new(Vec::<&str>::new());
        let mut rb = Rollback::new();
        rb.push("a", || {
            log.borrow_mut().push("a");
            Ok(())
        });
        rb.disarm();
        assert!(log.borrow().is_empty());
    }
}
