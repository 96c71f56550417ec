//! `coop data fetch` and `coop data verify`.

use std::path::PathBuf;

use burn_coop_vision::{CLASS_NAMES, Cifar10, LocateOptions, Verify, locate};
use clap::{Args, Subcommand};

/// Where to look for the data.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// CIFAR-10 archive or folder (also: BURN_COOP_CIFAR10; default: datasets/cifar10).
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
}

/// `coop data` subcommands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Find CIFAR-10 locally or download it into datasets/cifar10 (checksums verified).
    Fetch(DataArgs),
    /// Check every CIFAR-10 file against the official md5 sums and count the images.
    Verify(DataArgs),
}

fn options(args: &DataArgs, download: bool) -> LocateOptions {
    let options = LocateOptions::new().with_download(download);
    match &args.data {
        Some(path) => options.with_path(path),
        None => options,
    }
}

/// Runs a `coop data` subcommand.
pub fn run(command: &DataCommand) -> Result<(), String> {
    let (args, download) = match command {
        DataCommand::Fetch(args) => (args, true),
        DataCommand::Verify(args) => (args, false),
    };
    let source = locate(&options(args, download)).map_err(|e| e.to_string())?;
    let (train, test) = Cifar10::load_splits(&source, Verify::Official).map_err(|e| e.to_string())?;
    println!("CIFAR-10 at {}: every file matches its official md5", source.path().display());
    println!("{:<12} {:>7} {:>7}", "class", "train", "test");
    let (train_counts, test_counts) = (train.class_counts(), test.class_counts());
    for (class, name) in CLASS_NAMES.iter().enumerate() {
        println!("{name:<12} {:>7} {:>7}", train_counts[class], test_counts[class]);
    }
    println!("{:<12} {:>7} {:>7}", "total", train.len(), test.len());
    Ok(())
}
