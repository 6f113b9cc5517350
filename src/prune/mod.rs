//! Visual-token pruning (../shared/STAR.md). So far: the cost model reports print next to
//! measured time.

pub mod cost;
