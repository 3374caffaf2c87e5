//! End-to-end tests of the catalog against the real PostgreSQL, Redis and Kafka-protocol broker.
//!
//! Each test gets its own PostgreSQL schema and its own topic prefix (see `helpers`), so tests run in
//! parallel. `just test` starts the broker; `TEST_KAFKA_BROKERS` points elsewhere if needed.

// Helpers are `pub` for the sibling test modules; nothing here is reachable from outside.
#![allow(unreachable_pub)]

mod api;
mod auth;
mod broker_faults;
mod cache;
mod changes;
mod chaos;
mod compose;
mod db_faults;
mod downstream;
mod edits;
mod fuzz;
mod hardening;
mod helpers;
mod history;
mod list;
mod metrics;
mod openapi;
mod pipeline;
mod procs;
mod projector;
mod replay;
