//! fanmq
