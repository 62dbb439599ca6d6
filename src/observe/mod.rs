//! What the broker tells about itself: counters, `$SYS` topics, Prometheus.

pub mod metrics;
pub mod sys;
