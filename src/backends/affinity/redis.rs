//! The map of stored responses in Redis: one hash per response id
//! (`owner`, `model`, `endpoint`), expiring after the TTL, shared by every
//! edge and worker.

use std::collections::HashMap;

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::config::Options;

use super::{AffinityError, AffinityMap, Holder, ResponsesConfig};

pub struct RedisAffinity {
    client: Client,
    key_prefix: String,
    ttl_secs: i64,
    options: Options,
}

impl RedisAffinity {
    pub async fn connect(url: &str, config: &ResponsesConfig) -> Self {
        Self {
            client: crate::backends::redis::connect(url, config.timeout, "responses").await,
            key_prefix: config.key_prefix.clone(),
            ttl_secs: i64::try_from(config.ttl.as_secs())
                .unwrap_or(i64::MAX)
                .max(1),
            options: crate::backends::redis::one_attempt(config.timeout),
        }
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.key_prefix)
    }

    /// Sets fields of `id`'s hash and its TTL, in one round trip.
    async fn set(&self, id: &str, fields: &[(&str, &str)]) -> Result<(), AffinityError> {
        let key = self.key(id);
        let pipeline = self.client.with_options(&self.options).pipeline();
        let _: () = pipeline.hset(&key, fields.to_vec()).await.map_err(failed)?;
        let _: () = pipeline
            .expire(&key, self.ttl_secs, None)
            .await
            .map_err(failed)?;
        let _: ((), ()) = pipeline.all().await.map_err(failed)?;
        Ok(())
    }
}

fn failed(err: Error) -> AffinityError {
    AffinityError(err.to_string())
}

#[async_trait]
impl AffinityMap for RedisAffinity {
    async fn claim(&self, id: &str, owner: &str, model: &str) -> Result<(), AffinityError> {
        self.set(id, &[("owner", owner), ("model", model)]).await
    }

    async fn place(&self, id: &str, endpoint: &str) -> Result<(), AffinityError> {
        // With the TTL again: a write after the claim expired leaves no
        // lasting key (and, without an owner, is never found).
        self.set(id, &[("endpoint", endpoint)]).await
    }

    async fn find(&self, id: &str) -> Result<Option<Holder>, AffinityError> {
        let mut fields: HashMap<String, String> = self
            .client
            .with_options(&self.options)
            .hgetall(self.key(id))
            .await
            .map_err(failed)?;
        let Some(owner) = fields.remove("owner") else {
            return Ok(None);
        };
        Ok(Some(Holder {
            owner,
            model: fields.remove("model").unwrap_or_default(),
            endpoint: fields.remove("endpoint"),
        }))
    }
}
