//! The in-process map of stored responses: bounded, entries expiring after the TTL.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{AffinityError, AffinityMap, Holder};

pub struct MemoryAffinity {
    ttl: Duration,
    max_entries: usize,
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_id: HashMap<String, (Holder, Instant)>,
    /// Ids in the order they were claimed, to expire and evict from the front.
    order: VecDeque<(Instant, String)>,
}

impl MemoryAffinity {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries: max_entries.max(1),
            inner: Mutex::default(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Entries) -> R) -> Result<R, AffinityError> {
        let mut entries = self
            .inner
            .lock()
            .map_err(|_| AffinityError("the in-process map is poisoned".into()))?;
        let now = Instant::now();
        while let Some((expires, _)) = entries.order.front() {
            if *expires > now && entries.order.len() <= self.max_entries {
                break;
            }
            if let Some((_, id)) = entries.order.pop_front() {
                entries.by_id.remove(&id);
            }
        }
        Ok(f(&mut entries))
    }
}

#[async_trait]
impl AffinityMap for MemoryAffinity {
    async fn claim(&self, id: &str, owner: &str, model: &str) -> Result<(), AffinityError> {
        let expires = Instant::now() + self.ttl;
        self.with(|entries| {
            let holder = Holder {
                owner: owner.to_string(),
                model: model.to_string(),
                endpoint: None,
            };
            if entries
                .by_id
                .insert(id.to_string(), (holder, expires))
                .is_none()
            {
                entries.order.push_back((expires, id.to_string()));
            }
        })
    }

    async fn place(&self, id: &str, endpoint: &str) -> Result<(), AffinityError> {
        self.with(|entries| {
            if let Some((holder, _)) = entries.by_id.get_mut(id) {
                holder.endpoint = Some(endpoint.to_string());
            }
        })
    }

    async fn find(&self, id: &str) -> Result<Option<Holder>, AffinityError> {
        let now = Instant::now();
        self.with(|entries| {
            entries
                .by_id
                .get(id)
                .filter(|(_, expires)| *expires > now)
                .map(|(holder, _)| holder.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_expire_and_the_oldest_are_evicted_first() {
        let map = MemoryAffinity::new(Duration::from_millis(50), 2);
        map.claim("a", "k1", "m").await.unwrap();
        map.place("a", "http://e1").await.unwrap();
        let found = map.find("a").await.unwrap().unwrap();
        assert_eq!(
            (found.owner.as_str(), found.endpoint.as_deref()),
            ("k1", Some("http://e1"))
        );
        map.claim("b", "k1", "m").await.unwrap();
        map.claim("c", "k1", "m").await.unwrap();
        assert!(
            map.find("a").await.unwrap().is_none(),
            "evicted beyond max_entries"
        );
        assert!(map.find("c").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(map.find("c").await.unwrap().is_none(), "expired");
        map.place("zzz", "http://e1").await.unwrap();
        assert!(
            map.find("zzz").await.unwrap().is_none(),
            "placing needs a claim"
        );
    }
}
