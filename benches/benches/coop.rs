//! `cargo bench -p burn-coop-benches [-- --smoke] [-- --only P1,P3] [-- --python PATH]`: runs the
//! benchmarks and prints one Markdown table with the machine and the date.

use std::process::ExitCode;

use burn_coop_benches::alloc::CountingAllocator;
use burn_coop_benches::{Options, Scale, report};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn main() -> ExitCode {
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => options.scale = Scale::Smoke,
            "--only" => options.only.extend(args.next().unwrap_or_default().split(',').map(|s| s.trim().to_string())),
            "--python" => options.python = args.next(),
            // cargo passes `--bench`; test-harness flags are not ours.
            _ => {}
        }
    }
    match burn_coop_benches::run(&options) {
        Ok(rows) => {
            println!("{}", burn_coop_benches::machine::describe());
            println!();
            print!("{}", report::markdown(&rows));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("benchmark failed: {error}");
            ExitCode::FAILURE
        }
    }
}
