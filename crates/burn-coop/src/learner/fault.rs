//! Faults injected on purpose (`--inject-fault RANK@STEP[:KIND]`): how a run behaves when a
//! worker fails, shown and tested without waiting for a machine to break.
//!
//! A fault fires on worker `RANK` right after its local step `STEP` (1-based, the merge of that
//! step included):
//!
//! | kind | what the worker does | what the others see |
//! |---|---|---|
//! | `panic` (default) | its thread panics | a lost peer at their next collective |
//! | `nan` | its parameters become NaN | the next merge stops every worker, naming it |
//! | `hang` | it stops making progress (sleeps three peer timeouts, then fails) | a timeout naming it, after `--peer-timeout` |
//! | `exit` | it stops at once with an error (its thread ends; under MPI its process exits) | a lost peer at their next collective |
//!
//! A `hang` needs a peer timeout: without one the others would wait for it forever.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How an injected fault makes a worker fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The worker's thread panics.
    Panic,
    /// The worker's parameters become NaN.
    Nan,
    /// The worker stops making progress.
    Hang,
    /// The worker stops at once (under MPI its process exits).
    Exit,
}

impl FaultKind {
    /// Every kind, in the order of the documentation.
    pub const ALL: [Self; 4] = [Self::Panic, Self::Nan, Self::Hang, Self::Exit];

    /// The kind's name in `--inject-fault`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Panic => "panic",
            Self::Nan => "nan",
            Self::Hang => "hang",
            Self::Exit => "exit",
        }
    }
}

/// One fault to inject: worker `rank` fails with `kind` right after its local step `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InjectedFault {
    /// The worker that fails.
    pub rank: usize,
    /// The local step (1-based) after which it fails.
    pub step: u64,
    /// How it fails.
    pub kind: FaultKind,
}

/// A fault specification that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fault '{text}': {reason} (expected RANK@STEP[:panic|nan|hang|exit], e.g. 1@200:nan)")]
pub struct FaultParseError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for InjectedFault {
    type Err = FaultParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason: &str| FaultParseError { text: text.to_string(), reason: reason.to_string() };
        let (rank, rest) = text.split_once('@').ok_or_else(|| error("no '@' between the rank and the step"))?;
        let (step, kind) = match rest.split_once(':') {
            Some((step, kind)) => (step, Some(kind)),
            None => (rest, None),
        };
        let rank = rank.trim().parse::<usize>().map_err(|_| error("the rank is not a whole number"))?;
        let step = step.trim().parse::<u64>().map_err(|_| error("the step is not a whole number"))?;
        if step == 0 {
            return Err(error("steps count from 1"));
        }
        let kind = match kind.map(str::trim) {
            None => FaultKind::Panic,
            Some(name) => FaultKind::ALL
                .into_iter()
                .find(|kind| kind.name() == name)
                .ok_or_else(|| error(&format!("unknown kind '{name}'")))?,
        };
        Ok(Self { rank, step, kind })
    }
}

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}:{}", self.rank, self.step, self.kind.name())
    }
}

impl Serialize for InjectedFault {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InjectedFault {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks faults against a run of `workers` workers: every rank exists, the peer timeout is a
/// positive number of seconds, and a hang has a timeout to end it. The error says what is wrong.
pub fn check_faults(faults: &[InjectedFault], workers: usize, peer_timeout: Option<f64>) -> Result<(), String> {
    if let Some(seconds) = peer_timeout
        && !(seconds.is_finite() && seconds > 0.0)
    {
        return Err(format!("the peer timeout must be a positive number of seconds, not {seconds}"));
    }
    for fault in faults {
        if fault.rank >= workers {
            return Err(format!(
                "the fault {fault} is for worker {}, but the run has {workers} workers (ranks 0 to {})",
                fault.rank,
                workers - 1
            ));
        }
        if fault.kind == FaultKind::Hang && peer_timeout.is_none() {
            return Err(format!(
                "the fault {fault} hangs a worker, which the others would wait for forever: give a peer timeout"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_read_and_print_alike() {
        let fault: InjectedFault = "2@15:nan".parse().unwrap();
        assert_eq!(fault, InjectedFault { rank: 2, step: 15, kind: FaultKind::Nan });
        assert_eq!(fault.to_string(), "2@15:nan");
        let fault: InjectedFault = "0@1".parse().unwrap();
        assert_eq!(fault, InjectedFault { rank: 0, step: 1, kind: FaultKind::Panic });
        for kind in FaultKind::ALL {
            let text = format!("3@7:{}", kind.name());
            assert_eq!(text.parse::<InjectedFault>().unwrap().to_string(), text);
        }
        let json = serde_json::to_string(&vec![fault]).unwrap();
        assert_eq!(json, "[\"0@1:panic\"]");
        assert_eq!(serde_json::from_str::<Vec<InjectedFault>>(&json).unwrap(), vec![fault]);
    }

    #[test]
    fn bad_faults_say_what_is_wrong() {
        for (text, reason) in [
            ("2", "no '@'"),
            ("x@3", "the rank is not a whole number"),
            ("1@-3", "the step is not a whole number"),
            ("1@0", "steps count from 1"),
            ("1@4:crash", "unknown kind 'crash'"),
        ] {
            let error = text.parse::<InjectedFault>().unwrap_err().to_string();
            assert!(error.contains(&format!("'{text}'")) && error.contains(reason), "{error}");
        }
    }

    #[test]
    fn a_fault_must_fit_the_run() {
        let fault = |text: &str| text.parse::<InjectedFault>().unwrap();
        assert_eq!(check_faults(&[fault("3@5")], 4, None), Ok(()));
        let error = check_faults(&[fault("4@5")], 4, None).unwrap_err();
        assert!(error.contains("worker 4, but the run has 4 workers"), "{error}");
        let error = check_faults(&[fault("1@5:hang")], 4, None).unwrap_err();
        assert!(error.contains("give a peer timeout"), "{error}");
        assert_eq!(check_faults(&[fault("1@5:hang")], 4, Some(2.0)), Ok(()));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(check_faults(&[], 4, Some(bad)).unwrap_err().contains("positive number of seconds"));
        }
    }
}
