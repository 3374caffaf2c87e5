//! Cross-cutting plumbing shared by every catalog service.
//!
//! Each service composes its configuration from the pieces here, initialises telemetry once, and gets
//! its PostgreSQL pool and Kafka clients from here, so that every process is set up the same way.

pub mod breaker;
pub mod cache;
pub mod config;
pub mod db;
pub mod event_store;
pub mod kafka;
pub mod lag;
pub mod media;
pub mod metrics;
pub mod progress;
pub mod read_model;
pub mod shutdown;
pub mod telemetry;
