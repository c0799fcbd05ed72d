//! thaw's engine: templates, isolation tiers, invocations, sessions.
//!
//! Module map: [`template`] parses and builds templates; [`tier`] picks where a template
//! runs: [`container`] is the container tier (runc + CRIU), [`microvm`] the Cloud Hypervisor
//! tier, both behind the contract in [`backend`] (the only place that maps a tier to its
//! code), [`sandbox`] a live sandbox of any; [`agent`] speaks the guest-init protocol; [`engine`] ties them into
//! publish/invoke/exec; [`session`] keeps clones alive, pauses and resumes them; [`store`] is durable metadata; [`cleanup`] recovers from crashes;
//! [`doctor`] checks the host.

pub mod agent;
pub mod audit;
pub mod backend;
pub mod bench;
pub mod cleanup;
pub mod container;
pub mod doctor;
pub mod egress;
pub mod engine;
pub mod error;
pub mod keys;
pub mod live;
pub mod microvm;
pub mod paths;
pub mod progress;
pub mod sandbox;
pub mod session;
pub mod store;
pub mod template;
pub mod tier;

pub use engine::Engine;
pub use error::{Error, Result};
pub use paths::Paths;
