//! Node credentials of local mode: a YAML map `node-name: token`.

use std::collections::HashMap;
use std::path::Path;

use super::error::CaError;

#[derive(Clone, Default)]
pub struct NodeTokens {
    tokens: HashMap<String, String>,
}

impl std::fmt::Debug for NodeTokens {
    // Tokens are secrets: only the node names are printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.tokens.keys()).finish()
    }
}

impl NodeTokens {
    pub fn load(path: &Path) -> Result<NodeTokens, CaError> {
        let text = std::fs::read_to_string(path).map_err(|e| CaError::file(path, e))?;
        NodeTokens::parse(&text).map_err(|message| CaError::Tokens { path: path.display().to_string(), message })
    }

    pub fn parse(text: &str) -> Result<NodeTokens, String> {
        let tokens: HashMap<String, String> =
            serde_yaml::from_str(text).map_err(|e| format!("expected a map of node name to token: {e}"))?;
        if let Some((node, _)) = tokens.iter().find(|(_, token)| token.trim().is_empty()) {
            return Err(format!("node {node:?} has an empty token"));
        }
        Ok(NodeTokens { tokens: tokens.into_iter().map(|(node, token)| (node, token.trim().to_string())).collect() })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Whether `token` is `node`'s. The comparison takes the same time wherever the first
    /// difference is, so response timing does not reveal a token prefix.
    pub fn authenticate(&self, node: &str, token: &str) -> bool {
        let Some(expected) = self.tokens.get(node) else { return false };
        let (a, b) = (expected.as_bytes(), token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}
