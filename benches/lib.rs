//! Holds the criterion benchmarks (`cargo bench -p benches`).
