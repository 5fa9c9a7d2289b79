//! The HTTP listener's routes.

pub mod status;
