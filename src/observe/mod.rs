//! What the broker tells about itself: counters, `$SYS` topics, Prometheus.

pub mod counters;
pub mod metrics;
pub mod sys;
