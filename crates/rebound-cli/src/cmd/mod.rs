pub mod errors;
pub mod sync;
