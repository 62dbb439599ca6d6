//! What the broker tells about itself: counters, `$SYS` topics, Prometheus.

pub mod counters;
pub mod log_limit;
pub mod metrics;
pub mod sys;
