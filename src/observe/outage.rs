//! Logging an outage of a dependency once, not once per failed call: a
//! warning when it starts, a line when it ends. The Redis cache and the trace
//! exporter share it, so an operator sees the same two lines for either.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether a dependency is currently failing; reports only the transitions.
#[derive(Debug, Default)]
pub struct Outage {
    down: AtomicBool,
}

/// What one observation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Started,
    Ended,
}

impl Outage {
    /// Notes a failed call; `Some(Started)` only for the first of an outage.
    pub fn failed(&self) -> Option<Transition> {
        (!self.down.swap(true, Ordering::Relaxed)).then_some(Transition::Started)
    }

    /// Notes a successful call; `Some(Ended)` only for the first after an outage.
    pub fn succeeded(&self) -> Option<Transition> {
        self.down
            .swap(false, Ordering::Relaxed)
            .then_some(Transition::Ended)
    }

    /// `failed` or `succeeded`, by `ok`.
    pub fn observe(&self, ok: bool) -> Option<Transition> {
        if ok { self.succeeded() } else { self.failed() }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_only_the_start_and_the_end_of_an_outage() {
        let outage = Outage::default();
        assert_eq!(outage.observe(true), None, "nothing to report while up");
        assert_eq!(outage.observe(false), Some(Transition::Started));
        assert_eq!(outage.observe(false), None, "one line per outage");
        assert!(outage.is_down());
        assert_eq!(outage.observe(true), Some(Transition::Ended));
        assert_eq!(outage.observe(true), None);
        assert_eq!(outage.observe(false), Some(Transition::Started));
    }
}
