//! The `baton` binary: all of it is the library (`src/lib.rs`), which the end-to-end harness also
//! starts in-process (`baton::dev::start`).

fn main() -> std::process::ExitCode {
    baton::main()
}
