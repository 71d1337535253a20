//! Prefix affinity: remembers which node last served a conversation so its continuation can go
//! back to the node whose KV cache still holds the prefix. Bounded, oldest entries evicted.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::NodeId;

fn hash_turns(model: &str, turns: &[(&str, &str)]) -> u64 {
    let mut h = DefaultHasher::new();
    model.hash(&mut h);
    for (role, content) in turns {
        role.hash(&mut h);
        content.hash(&mut h);
    }
    h.finish()
}

/// `(lookup, store)` keys for a chat request: `lookup` identifies the conversation as it was
/// when a node last answered it (everything but the last assistant reply and the new user turn),
/// `store` identifies it as the node will hold it after this request.
pub fn conversation_keys(model: &str, turns: &[(&str, &str)]) -> (Option<u64>, u64) {
    let lookup = (turns.len() >= 3)
        .then(|| hash_turns(model, turns.get(..turns.len() - 2).unwrap_or_default()));
    (lookup, hash_turns(model, turns))
}

#[derive(Debug)]
pub struct PrefixCache {
    map: HashMap<u64, NodeId>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl PrefixCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn get(&self, key: u64) -> Option<NodeId> {
        self.map.get(&key).copied()
    }

    pub fn insert(&mut self, key: u64, node: NodeId) {
        if self.map.insert(key, node).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    /// Forgets a node (it went offline: its cache is gone).
    pub fn forget_node(&mut self, node: NodeId) {
        self.map.retain(|_, n| *n != node);
        self.order.retain(|k| self.map.contains_key(k));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_finds_the_node_that_served_the_prefix() {
        let first = [("user", "hi")];
        let (lookup, store) = conversation_keys("m", &first);
        assert_eq!(lookup, None);
        let mut c = PrefixCache::new(8);
        c.insert(store, NodeId(4));
        let next = [
            ("user", "hi"),
            ("assistant", "hello"),
            ("user", "how are you?"),
        ];
        let (lookup, _) = conversation_keys("m", &next);
        assert_eq!(lookup.and_then(|k| c.get(k)), Some(NodeId(4)));
        let other_model = conversation_keys("other", &next).0;
        assert_eq!(other_model.and_then(|k| c.get(k)), None);
    }

    #[test]
    fn bounded_and_forgets_offline_nodes() {
        let mut c = PrefixCache::new(2);
        c.insert(1, NodeId(1));
        c.insert(2, NodeId(2));
        c.insert(3, NodeId(1));
        assert_eq!((c.get(1), c.len()), (None, 2));
        c.forget_node(NodeId(1));
        assert_eq!((c.get(3), c.get(2), c.len()), (None, Some(NodeId(2)), 1));
    }
}
