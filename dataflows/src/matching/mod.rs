//! Dispatch matching: exact assignment solvers, the driver value function
//! learned online by temporal-difference updates, the batch matcher that
//! combines them, and the city simulator that compares matching policies.

pub mod assign;
mod auction;
pub mod batch;
pub mod operator;
pub mod scenario;
pub mod simulate;
pub mod sparse;
pub mod value;

pub use assign::{AssignError, Assignment, Problem, hungarian};
pub use batch::{DriverGrid, OpenRequest, PlanContext, Planned, Policy, Travel, plan};
pub use scenario::{Scenario, ScenarioError};
pub use simulate::{SimReport, Simulation, simulate};
pub use value::{TdSample, TdUpdate, ValueKey, ValueParams, ValueTable};
