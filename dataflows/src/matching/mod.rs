//! Dispatch matching: assignment solvers (so far), later the value function
//! learned online and the matching operator.

pub mod assign;
pub mod sparse;

pub use assign::{AssignError, Assignment, Problem, hungarian};
