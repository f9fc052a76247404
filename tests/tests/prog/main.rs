//! The `BPF_PROG_TEST_RUN` tier: fixture tables (an input frame, the expected verdict, output
//! frame, mark and drop counter) and the differential fuzzer, run through the real programs
//! with maps filled by the agent's own code. One binary, a module per subject.

mod fuzz;
mod run;
mod run_external;
mod run_overlay;
