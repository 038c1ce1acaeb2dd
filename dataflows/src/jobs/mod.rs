//! Jobs: complete dataflows that `dima up --job NAME` runs.

pub mod count;
