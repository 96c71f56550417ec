//! What only worker 0 of the burn-train strategy does: events, validation, checkpoints, early
//! stopping.

use std::ops::RangeInclusive;

use burn::train::metric::store::EventStoreClient;
use burn::train::{
    EventProcessorTraining, InferenceStep, Interrupter, Learner as TrainLearner, LearnerEvent, LearnerModel,
    LearningCheckpointer, SupervisedTrainingEventProcessor, TrainingItem, ValidLoader,
};

use super::worker::{EpochEnd, Worker};
use crate::error::CoopError;

/// What only worker 0 does: events, validation, checkpoints, early stopping.
pub(super) struct Leader<M: LearnerModel> {
    pub(super) processor: SupervisedTrainingEventProcessor<M>,
    pub(super) checkpointer: Option<LearningCheckpointer<M>>,
    pub(super) early_stopping: Option<Box<dyn burn::train::CloneEarlyStoppingStrategy>>,
    pub(super) event_store: std::sync::Arc<EventStoreClient>,
    pub(super) valid: ValidLoader<M>,
    pub(super) interrupter: Interrupter,
}

impl<M: LearnerModel> Leader<M> {
    pub(super) fn run(&mut self, worker: &mut Worker<M>, epochs: RangeInclusive<usize>) -> Result<(), CoopError> {
        let train_items = worker.loader.num_items();
        let valid_items = self.valid.num_items();
        let interrupter = self.interrupter.clone();
        let mut stop = false;
        let mut own: Option<M> = None;
        for epoch in epochs {
            if worker.agree([stop || interrupter.should_stop(), false])?[0] {
                break;
            }
            if let Some(model) = own.take() {
                worker.learner.load_model(model.into_record());
            }
            interrupter.fail_on_error(
                self.processor
                    .process_train(LearnerEvent::StartSplit { epoch_number: epoch, total_items: train_items }),
            );
            let processor = &mut self.processor;
            let end = worker.train_epoch(|item, progress, iteration, lr| {
                let item = TrainingItem::new(item, progress, Some(iteration), Some(lr));
                interrupter.fail_on_error(processor.process_train(LearnerEvent::ProcessedItem(item)));
            })?;
            interrupter.fail_on_error(self.processor.process_train(LearnerEvent::EndSplit(epoch)));
            if end == EpochEnd::Interrupted {
                break;
            }
            own = worker.end_epoch()?;

            interrupter.fail_on_error(
                self.processor
                    .process_valid(LearnerEvent::StartSplit { epoch_number: epoch, total_items: valid_items }),
            );
            self.validate(&worker.learner);
            interrupter.fail_on_error(self.processor.process_valid(LearnerEvent::EndSplit(epoch)));
            interrupter.fail_on_error(self.processor.process_train(LearnerEvent::EndEpoch(epoch)));
            if self.checkpointer.is_some() || self.early_stopping.is_some() {
                interrupter.fail_on_error(self.processor.flush());
            }
            if interrupter.should_stop() {
                stop = true;
                continue;
            }
            if let Some(checkpointer) = &mut self.checkpointer {
                checkpointer.checkpoint(&worker.learner, epoch, &self.event_store);
            }
            if let Some(early_stopping) = &mut self.early_stopping
                && early_stopping.should_stop(epoch, &self.event_store)
            {
                stop = true;
            }
        }
        Ok(())
    }

    fn validate(&mut self, learner: &TrainLearner<M>) {
        let model = learner.model().valid();
        let mut iterator = self.valid.iter();
        let mut iteration = 0;
        while let Some(item) = iterator.next() {
            let item = match item {
                Ok(item) => item,
                Err(err) => {
                    self.interrupter.fail(err);
                    break;
                }
            };
            let progress = iterator.progress();
            iteration += 1;
            let output = InferenceStep::step(&model, item);
            let item = TrainingItem::new(output, progress, Some(iteration), None);
            self.interrupter.fail_on_error(self.processor.process_valid(LearnerEvent::ProcessedItem(item)));
            if self.interrupter.should_stop() {
                break;
            }
        }
    }
}
