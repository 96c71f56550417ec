//! `coop`: cooperative training of CIFAR ResNets with Burn — local SGD, elastic averaging and
//! gossip — on threads of one machine or across MPI ranks.

mod advise;
mod compare;
mod config;
mod data;
mod device;
mod plot;
mod report;
mod runs;
mod topology;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Communication-efficient distributed training for Burn (Cooperative SGD).
#[derive(Debug, Parser)]
#[command(name = "coop", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a CIFAR-10 ResNet with cooperating replicas.
    #[command(allow_negative_numbers = true)]
    Train(Box<config::TrainArgs>),
    /// Print a topology's mixing matrix W and its spectral quantities.
    Topology(topology::TopologyArgs),
    /// What the theory says about a training setting: zeta, error floor, bytes, AdaComm's tau*.
    #[command(allow_negative_numbers = true)]
    Advise(Box<advise::AdviseArgs>),
    /// The time and bytes runs needed to reach a target training loss, and their speed-ups.
    #[command(allow_negative_numbers = true)]
    Compare(compare::CompareArgs),
    /// Curves of runs on one chart (PNG or SVG by extension).
    Plot(plot::PlotArgs),
    /// A README's results tables, written from the run folders they quote (or checked).
    Report(report::ReportArgs),
    /// Obtain or check the CIFAR-10 data.
    #[command(subcommand)]
    Data(data::DataCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => train::run(&args),
        Command::Topology(args) => topology::run(&args),
        Command::Advise(args) => advise::run(&args),
        Command::Compare(args) => compare::run(&args),
        Command::Plot(args) => plot::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Data(command) => data::run(&command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
