pub mod agent;
pub mod errors;
pub mod journal;
pub mod sync;
