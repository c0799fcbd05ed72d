//! Cloud Hypervisor's REST API: typed bodies and an HTTP client over its Unix socket.

pub mod client;
pub mod types;

pub use client::{ApiClient, ApiError, ClientError, DEFAULT_API_TIMEOUT};
pub use types::*;
