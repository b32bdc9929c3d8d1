pub mod agent;
pub mod client;
pub mod errors;
pub mod journal;
pub mod server;
pub mod sync;
