//! Weighted fair order among the tenants (keys or teams) whose requests
//! wait for room on a full pool: each waiting request gets a virtual finish
//! tag (its tenant's previous tag, or the pool's virtual time if later,
//! plus 1 ÷ its class's weight), and the request with the smallest tag
//! starts next. A tenant with a burst of a thousand requests therefore
//! takes turns with one that sends a request at a time, and a `high` key
//! gets four turns for a `low` key's one; a tenant that was idle gets no
//! credit for it (it starts at the current virtual time).

use std::collections::{HashMap, VecDeque};

/// Requests waiting, by tenant, in weighted fair order.
#[derive(Debug)]
pub struct FairQueue<T> {
    tenants: HashMap<String, Waiting<T>>,
    /// The tag of the last request started.
    virtual_time: f64,
    /// Ties between equal tags go to the request that came first.
    arrivals: u64,
    len: usize,
}

#[derive(Debug)]
struct Waiting<T> {
    requests: VecDeque<(f64, u64, T)>,
    last_tag: f64,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        Self {
            tenants: HashMap::new(),
            virtual_time: 0.0,
            arrivals: 0,
            len: 0,
        }
    }
}

impl<T> FairQueue<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `item` for `tenant`, whose class weighs `weight` (at least 1).
    pub fn push(&mut self, tenant: &str, weight: u32, item: T) {
        let virtual_time = self.virtual_time;
        let waiting = self
            .tenants
            .entry(tenant.to_string())
            .or_insert_with(|| Waiting {
                requests: VecDeque::new(),
                last_tag: virtual_time,
            });
        let tag = waiting.last_tag.max(virtual_time) + 1.0 / f64::from(weight.max(1));
        waiting.last_tag = tag;
        self.arrivals += 1;
        waiting.requests.push_back((tag, self.arrivals, item));
        self.len += 1;
    }

    /// The request to start next.
    pub fn pop(&mut self) -> Option<T> {
        let tenant = self
            .tenants
            .iter()
            .filter_map(|(tenant, waiting)| {
                waiting
                    .requests
                    .front()
                    .map(|(tag, arrival, _)| (*tag, *arrival, tenant))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
            .map(|(_, _, tenant)| tenant.clone())?;
        let waiting = self.tenants.get_mut(&tenant)?;
        let (tag, _, item) = waiting.requests.pop_front()?;
        if waiting.requests.is_empty() {
            self.tenants.remove(&tenant);
        }
        self.virtual_time = tag;
        self.len -= 1;
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(queue: &mut FairQueue<&'static str>, n: usize) -> Vec<&'static str> {
        (0..n).filter_map(|_| queue.pop()).collect()
    }

    #[test]
    fn a_burst_takes_turns_with_a_trickle() {
        let mut queue = FairQueue::default();
        for _ in 0..100 {
            queue.push("key:burst", 2, "burst");
        }
        queue.push("key:one", 2, "one");
        queue.push("key:one", 2, "one");
        let first = order(&mut queue, 4);
        assert_eq!(
            first.iter().filter(|t| **t == "one").count(),
            2,
            "{first:?}"
        );
        assert_eq!(queue.len(), 98);
    }

    #[test]
    fn shares_follow_the_weights() {
        let mut queue = FairQueue::default();
        for _ in 0..100 {
            queue.push("team:high", 4, "high");
            queue.push("team:low", 1, "low");
        }
        let first = order(&mut queue, 50);
        let high = first.iter().filter(|t| **t == "high").count();
        assert_eq!(high, 40, "four to one: {first:?}");
    }

    #[test]
    fn an_idle_tenant_gets_no_credit_for_its_idleness() {
        let mut queue = FairQueue::default();
        for _ in 0..10 {
            queue.push("key:a", 2, "a");
        }
        assert_eq!(order(&mut queue, 8), vec!["a"; 8]);
        for _ in 0..4 {
            queue.push("key:b", 2, "b");
        }
        // b starts at the current virtual time: it alternates with a
        // rather than taking four turns in a row.
        assert_eq!(order(&mut queue, 4), vec!["a", "b", "a", "b"]);
    }
}
