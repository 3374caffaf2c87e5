//! Holds the end-to-end test binary `it`; see `it/main.rs`.
