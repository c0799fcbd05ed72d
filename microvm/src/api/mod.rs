//! Cloud Hypervisor's REST API: typed bodies and an HTTP client over its Unix socket.

pub mod client;
pub mod types;

pub use client::{
    patience, ApiClient, ApiError, ClientError, BOOT_TIMEOUT, DEFAULT_API_TIMEOUT, PATIENCE_ENV,
};
pub use types::*;
