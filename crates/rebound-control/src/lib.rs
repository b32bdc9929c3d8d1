//! The configuration server's domain, without IO: the lifecycle state machine
//! of a replicated item ([`machine`]), the prechecks run before a job moves
//! data ([`prechecks`]) and timestamps ([`time`]). The server and the store
//! use these; the tests here cover every state and action.

pub mod machine;
pub mod prechecks;
pub mod time;

pub use machine::{Decision, Effect, Refusal, Request, StepPlan, Transition, decide};
