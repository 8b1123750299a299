//! The policy's options (what may be recomputed and what offloaded, with their text forms)
//! and its choices.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::super::error::PlanError;

/// Which stashes to drop and recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    None,
    /// Every chunk, every micro-batch.
    Full,
    /// The longest-lived chunks first, until the plan fits.
    Chronos,
    /// The search picks among the above; to this pass it means `Chronos`.
    Auto,
}

/// What to offload to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    None,
    /// Optimizer state, then long-lived stashes, until the plan fits.
    Chronos,
    /// The search picks; to this pass it means `Chronos`.
    Auto,
}

macro_rules! text_enum {
    ($ty:ty, $field:literal, $($name:literal => $v:expr),+) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                $(if *self == $v { return f.write_str($name); })+
                Ok(())
            }
        }
        impl FromStr for $ty {
            type Err = PlanError;
            fn from_str(s: &str) -> Result<Self, PlanError> {
                match s {
                    $($name => Ok($v),)+
                    _ => Err(PlanError::invalid($field, format!(
                        "unknown value `{s}`; use one of: {}", [$($name),+].join(", ")))),
                }
            }
        }
    };
}
text_enum!(Recompute, "recompute", "none" => Recompute::None, "full" => Recompute::Full,
    "chronos" => Recompute::Chronos, "auto" => Recompute::Auto);
text_enum!(Offload, "offload", "none" => Offload::None, "chronos" => Offload::Chronos,
    "auto" => Offload::Auto);

/// What the pass chose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Choices {
    pub recomputed_chunks: BTreeSet<u32>,
    pub offloaded_optimizer: BTreeSet<u32>,
    pub offloaded_stash: BTreeSet<u32>,
}

impl fmt::Display for Choices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |s: &BTreeSet<u32>| s.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let mut parts = Vec::new();
        if !self.recomputed_chunks.is_empty() {
            parts.push(format!(
                "recompute chunks {}",
                list(&self.recomputed_chunks)
            ));
        }
        if !self.offloaded_stash.is_empty() {
            parts.push(format!(
                "offload stashes of chunks {}",
                list(&self.offloaded_stash)
            ));
        }
        if !self.offloaded_optimizer.is_empty() {
            parts.push(format!(
                "offload optimizer state of chunks {}",
                list(&self.offloaded_optimizer)
            ));
        }
        if parts.is_empty() {
            write!(f, "nothing recomputed or offloaded")
        } else {
            write!(f, "{}", parts.join("; "))
        }
    }
}
