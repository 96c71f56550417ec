//! What the overlapped rules (`overlap.rs`, `elastic_overlap.rs`) share: an anchor kept on every
//! worker and the sum all-reduce that moves it, started at one merge and collected at the next,
//! with its checkpoint entries.

use super::RuleError;
use crate::comm::{Communicator, PendingSum};
use crate::state::StateRecord;

/// An anchor (the common initial model until the first merge) and the sum all-reduce in flight
/// towards its next value. The payload of the sum is kept so that a checkpoint taken while it
/// travels can start it again: a resumed run re-issues the same all-reduce at its first merge and
/// continues bit for bit.
#[derive(Debug, Default)]
pub(crate) struct InFlightAnchor {
    anchor: Option<Vec<f32>>,
    sent: Option<Vec<f32>>,
    pending: Option<PendingSum>,
}

impl InFlightAnchor {
    /// The anchor starts at the initial model (unless a checkpoint restored one).
    pub(crate) fn start(&mut self, initial: &[f32]) {
        if self.anchor.is_none() {
            self.anchor = Some(initial.to_vec());
        }
    }

    /// The anchor as of the last merge.
    pub(crate) fn anchor(&self) -> Option<&[f32]> {
        self.anchor.as_deref()
    }

    /// The anchor of the rule registered as `rule`, which must have been started (or restored).
    pub(crate) fn started(&self, rule: &'static str) -> Result<&[f32], RuleError> {
        self.anchor().ok_or_else(|| RuleError::BadState {
            rule,
            reason: "the rule was not started with the initial model".into(),
        })
    }

    /// The anchor, for a rule that moves it itself.
    pub(crate) fn anchor_mut(&mut self) -> Option<&mut Vec<f32>> {
        self.anchor.as_mut()
    }

    /// Replaces the anchor.
    pub(crate) fn set_anchor(&mut self, anchor: Vec<f32>) {
        self.anchor = Some(anchor);
    }

    /// Starts the all-reduce of `payload`.
    pub(crate) fn start_sum(&mut self, payload: Vec<f32>, comm: &mut dyn Communicator) -> Result<(), RuleError> {
        self.sent = Some(payload.clone());
        self.pending = Some(comm.start_all_reduce_sum(payload)?);
        Ok(())
    }

    /// The sum started at the previous merge (started again first after a resume), if any.
    pub(crate) fn collect(&mut self, comm: &mut dyn Communicator) -> Result<Option<Vec<f32>>, RuleError> {
        if self.pending.is_none()
            && let Some(sent) = &self.sent
        {
            self.pending = Some(comm.start_all_reduce_sum(sent.clone())?);
        }
        Ok(match self.pending.take() {
            Some(pending) => Some(pending.wait()?),
            None => None,
        })
    }

    /// `anchor` and this worker's payload of the sum in flight (`in-flight`), for a checkpoint,
    /// added to `record`.
    pub(crate) fn record_into(&self, record: StateRecord) -> StateRecord {
        record.with_held("anchor", self.anchor.as_ref()).with_held("in-flight", self.sent.as_ref())
    }

    /// Takes what [`InFlightAnchor::record_into`] saved out of `record` (the sum is started
    /// again at the next [`InFlightAnchor::collect`]).
    pub(crate) fn load(&mut self, record: &mut StateRecord) {
        self.anchor = record.take_buffer("anchor");
        self.sent = record.take_buffer("in-flight");
        self.pending = None;
    }
}
