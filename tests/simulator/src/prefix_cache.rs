//! vLLM's automatic prefix caching, roughly, for the simulator's prefill times and metrics.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Prompt words per prefix-cache block.
const BLOCK_WORDS: usize = 16;

/// vLLM's automatic prefix caching, roughly: a prompt's leading blocks of
/// words, each keyed by the hash of everything before and in it; a request
/// reuses the leading blocks already cached.
#[derive(Default)]
pub(crate) struct PrefixCache {
    /// Block key to when it was last used.
    pub(crate) blocks: HashMap<u64, u64>,
    clock: u64,
    pub(crate) queried_tokens: u64,
    pub(crate) hit_tokens: u64,
}

impl PrefixCache {
    /// Looks `prompt` up and caches its blocks; returns how many of its words were cached.
    pub(crate) fn serve(&mut self, prompt: &str, capacity: usize) -> u64 {
        let words: Vec<&str> = prompt.split_whitespace().collect();
        self.queried_tokens += words.len() as u64;
        if capacity == 0 {
            return 0;
        }
        let mut hasher = std::hash::DefaultHasher::new();
        let mut cached = 0;
        let mut still_hitting = true;
        for block in words.chunks(BLOCK_WORDS) {
            if block.len() < BLOCK_WORDS {
                break; // only whole blocks are cached, as in vLLM
            }
            block.hash(&mut hasher);
            let key = hasher.finish();
            self.clock += 1;
            match self.blocks.insert(key, self.clock) {
                Some(_) if still_hitting => cached += block.len() as u64,
                _ => still_hitting = false,
            }
        }
        while self.blocks.len() > capacity {
            let oldest = self
                .blocks
                .iter()
                .min_by_key(|(_, used)| **used)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.blocks.remove(&oldest);
            }
        }
        self.hit_tokens += cached;
        cached
    }
}
