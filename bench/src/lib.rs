//! Pontoon's benchmarks. `cargo bench -p pontoon-bench` runs the criterion
//! micro-benchmarks of the store's hot paths in `benches/`.
