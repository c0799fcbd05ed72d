//! Templates: the published unit (root filesystem, handler, warm-up, limits).

pub mod rootfs;
pub mod spec;
