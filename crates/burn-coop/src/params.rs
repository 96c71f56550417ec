//! Flat parameter buffers for any Burn [`Module`].
//!
//! Merge rules work on one contiguous `f32` buffer per worker: every float tensor of the module,
//! in visiting order, flattened and concatenated. [`ParamLayout`] records which tensor sits where
//! so the merged buffer can be written back with the same [`ParamId`]s, shapes, devices, dtypes
//! and `require_grad` flags.

use std::ops::Range;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{DType, Tensor, TensorCreationOptions, TensorData};
use serde::{Deserialize, Serialize};

use crate::compress::{Segment, Segments};

/// What happens to buffers — float tensors that do not require gradients, such as BatchNorm's
/// running mean and variance — at a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BufferPolicy {
    /// Buffers are merged with the same rule as the weights (PyTorch's `PeriodicModelAverager`
    /// averages buffers too). The evaluated average model then carries averaged statistics.
    #[default]
    Merge,
    /// Buffers stay local to each worker: only trainable parameters are exchanged.
    KeepLocal,
}

/// Whether a tensor is trained or a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TensorRole {
    /// A tensor that requires gradients.
    Parameter,
    /// A float tensor that does not require gradients (BatchNorm running statistics, frozen
    /// weights).
    Buffer,
}

/// Where one tensor lives in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The tensor's parameter id.
    pub id: ParamId,
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// Trained parameter or buffer.
    pub role: TensorRole,
    /// Offset in the flat buffer, or `None` when the policy leaves it out.
    pub offset: Option<usize>,
}

impl Slot {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The mapping between a module's float tensors and a flat buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    slots: Vec<Slot>,
    len: usize,
    policy: BufferPolicy,
}

/// A module whose tensors no longer match the layout recorded earlier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Different number of float tensors.
    #[error("the module now has {found} float tensors but the layout recorded {expected}")]
    TensorCount {
        /// Tensors in the layout.
        expected: usize,
        /// Tensors in the module.
        found: usize,
    },
    /// A tensor's id or shape changed.
    #[error("tensor {index} of the module is {found} but the layout recorded {expected}")]
    TensorChanged {
        /// Position in visiting order.
        index: usize,
        /// What the layout holds.
        expected: String,
        /// What the module holds.
        found: String,
    },
    /// A flat buffer of the wrong length.
    #[error("a flat buffer of {found} values was given for a layout of {expected}")]
    BufferLength {
        /// Layout length.
        expected: usize,
        /// Buffer length.
        found: usize,
    },
    /// A tensor's data could not be read.
    #[error("cannot read tensor {id}: {cause}")]
    Read {
        /// The tensor's id.
        id: ParamId,
        /// What failed.
        cause: String,
    },
}

impl ParamLayout {
    /// Records the layout of `module`'s float tensors under `policy`.
    pub fn of<M: Module>(module: &M, policy: BufferPolicy) -> Self {
        let mut visitor = LayoutVisitor { slots: Vec::new() };
        module.visit(&mut visitor);
        let mut len = 0;
        let slots = visitor
            .slots
            .into_iter()
            .map(|mut slot| {
                let included = slot.role == TensorRole::Parameter || policy == BufferPolicy::Merge;
                if included {
                    slot.offset = Some(len);
                    len += slot.len();
                }
                slot
            })
            .collect();
        Self { slots, len, policy }
    }

    /// Length of the flat buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the flat buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every float tensor of the module in visiting order, including those left out.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The buffer policy this layout was made with.
    pub fn policy(&self) -> BufferPolicy {
        self.policy
    }

    /// Number of values that are trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.slots.iter().filter(|s| s.role == TensorRole::Parameter).map(Slot::len).sum()
    }

    /// The flat buffer split into its tensors for compression: one segment per included tensor,
    /// buffers (BatchNorm running statistics) marked exact. A module without any trainable
    /// tensor (one built on a device without autodiff, where nothing requires gradients) has
    /// every tensor compressed, rather than all of them sent exact.
    pub fn segments(&self) -> Segments {
        let trains = self.slots.iter().any(|slot| slot.role == TensorRole::Parameter && slot.offset.is_some());
        Segments::new(
            self.slots
                .iter()
                .filter(|slot| slot.offset.is_some())
                .map(|slot| Segment { len: slot.len(), exact: trains && slot.role == TensorRole::Buffer }),
        )
    }

    /// Copies the module's tensors into `out` (resized to [`ParamLayout::len`]).
    pub fn flatten_into<M: Module>(&self, module: &M, out: &mut Vec<f32>) -> Result<(), LayoutError> {
        flush_buffers(module);
        self.flatten_bucket_into(module, &self.whole(), out)
    }

    /// The whole flat buffer as one bucket.
    fn whole(&self) -> LayoutBucket {
        LayoutBucket { slots: 0..self.slots.len(), values: 0..self.len }
    }

    /// The included tensors grouped, in order, into buckets of consecutive tensors holding at
    /// most `max_values` values together; a tensor larger than that is a bucket of its own.
    /// Every value of the flat buffer is in exactly one bucket.
    pub fn buckets(&self, max_values: usize) -> Vec<LayoutBucket> {
        let mut buckets: Vec<LayoutBucket> = Vec::new();
        for (index, slot) in self.slots.iter().enumerate() {
            let Some(offset) = slot.offset else { continue };
            let end = offset + slot.len();
            match buckets.last_mut() {
                Some(last) if end - last.values.start <= max_values => {
                    last.slots.end = index + 1;
                    last.values.end = end;
                }
                _ => buckets.push(LayoutBucket { slots: index..index + 1, values: offset..end }),
            }
        }
        buckets
    }

    /// Copies the tensors of `bucket` into `out` (resized to the bucket's values). Pending
    /// running statistics must have been applied first ([`flush_buffers`]).
    pub fn flatten_bucket_into<M: Module>(
        &self,
        module: &M,
        bucket: &LayoutBucket,
        out: &mut Vec<f32>,
    ) -> Result<(), LayoutError> {
        out.clear();
        out.resize(bucket.values.len(), 0.0);
        let mut visitor = FlattenVisitor { layout: self, bucket, index: 0, out, error: None };
        module.visit(&mut visitor);
        let index = visitor.index;
        if let Some(error) = visitor.error {
            return Err(error);
        }
        self.check_count(index)
    }

    /// Returns the module's tensors as a new flat buffer.
    pub fn flatten<M: Module>(&self, module: &M) -> Result<Vec<f32>, LayoutError> {
        let mut out = Vec::new();
        self.flatten_into(module, &mut out)?;
        Ok(out)
    }

    /// Writes `flat` back into the module's tensors, keeping ids, shapes, devices, dtypes,
    /// autodiff and `require_grad`. Tensors left out by the policy are untouched.
    pub fn unflatten<M: Module>(&self, module: M, flat: &[f32]) -> Result<M, LayoutError> {
        self.unflatten_bucket(module, &self.whole(), flat)
    }

    /// Writes `values`, the bucket's values, back into its tensors; the other tensors are
    /// untouched.
    pub fn unflatten_bucket<M: Module>(
        &self,
        module: M,
        bucket: &LayoutBucket,
        values: &[f32],
    ) -> Result<M, LayoutError> {
        if values.len() != bucket.values.len() {
            return Err(LayoutError::BufferLength { expected: bucket.values.len(), found: values.len() });
        }
        let mut mapper = WriteBackMapper { layout: self, bucket, index: 0, flat: values, error: None };
        let module = module.map(&mut mapper);
        let index = mapper.index;
        if let Some(error) = mapper.error {
            return Err(error);
        }
        self.check_count(index)?;
        Ok(module)
    }

    /// Merges one tensor of the module in its own memory: the tensor at `slot` is taken out of
    /// the module, `merge` changes its values (as `f32`) in place, and it is put back, keeping
    /// everything [`ParamLayout::unflatten`] keeps. On Burn's CPU backend, a tensor only the
    /// module holds is neither copied out nor back. When `merge` fails, the tensor is put back
    /// with whatever values it then holds and the error is returned.
    pub fn merge_tensor_in_place<M: Module, E>(
        &self,
        module: M,
        slot: usize,
        merge: &mut dyn FnMut(&mut [f32]) -> Result<(), E>,
    ) -> Result<M, InPlaceError<E>> {
        let mut mapper = InPlaceMapper { layout: self, slot, index: 0, merge, error: None };
        let module = module.map(&mut mapper);
        let index = mapper.index;
        if let Some(error) = mapper.error {
            return Err(error);
        }
        self.check_count(index).map_err(InPlaceError::Layout)?;
        Ok(module)
    }

    fn check_count(&self, found: usize) -> Result<(), LayoutError> {
        if found == self.slots.len() {
            Ok(())
        } else {
            Err(LayoutError::TensorCount { expected: self.slots.len(), found })
        }
    }

    /// The slot expected at `index`, checked against the tensor actually found there.
    fn expect(&self, index: usize, id: ParamId, shape: &[usize]) -> Result<&Slot, LayoutError> {
        let slot =
            self.slots.get(index).ok_or(LayoutError::TensorCount { expected: self.slots.len(), found: index + 1 })?;
        if slot.id != id || slot.shape != shape {
            return Err(LayoutError::TensorChanged {
                index,
                expected: format!("id {} with shape {:?}", slot.id, slot.shape),
                found: format!("id {id} with shape {shape:?}"),
            });
        }
        Ok(slot)
    }
}

/// Applies pending running-statistic updates.
///
/// Burn's `RunningState` (BatchNorm's running mean and variance) keeps the value of the last
/// forward pass pending until its next use; visiting the module — to flatten it, or to build a
/// record for a checkpoint — would otherwise read the value from one step earlier and a later
/// use would overwrite whatever was written in between. `Module::valid` applies the pending
/// updates of every running state in place, which is all this does (the copy it returns is
/// dropped).
pub fn flush_buffers<M: Module>(module: &M) {
    drop(module.valid());
}

fn role_of<const D: usize>(tensor: &Tensor<D>) -> TensorRole {
    if tensor.is_require_grad() { TensorRole::Parameter } else { TensorRole::Buffer }
}

struct LayoutVisitor {
    slots: Vec<Slot>,
}

impl ModuleVisitor for LayoutVisitor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        self.slots.push(Slot {
            id: param.id,
            shape: tensor.shape().iter().copied().collect(),
            role: role_of(&tensor),
            offset: None,
        });
    }
}

/// A run of consecutive tensors of a [`ParamLayout`] and the values they fill in the flat
/// buffer ([`ParamLayout::buckets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutBucket {
    /// The tensors, as indices into [`ParamLayout::slots`].
    pub slots: Range<usize>,
    /// Their values in the flat buffer.
    pub values: Range<usize>,
}

struct FlattenVisitor<'a> {
    layout: &'a ParamLayout,
    bucket: &'a LayoutBucket,
    index: usize,
    out: &'a mut [f32],
    error: Option<LayoutError>,
}

impl ModuleVisitor for FlattenVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let index = self.index;
        self.index += 1;
        if self.error.is_some() {
            return;
        }
        let tensor = param.val();
        let shape: Vec<usize> = tensor.shape().iter().copied().collect();
        let slot = match self.layout.expect(index, param.id, &shape) {
            Ok(slot) => slot,
            Err(error) => {
                self.error = Some(error);
                return;
            }
        };
        let Some(offset) = slot.offset.filter(|_| self.bucket.slots.contains(&index)) else { return };
        let offset = offset - self.bucket.values.start;
        let target = &mut self.out[offset..offset + slot.len()];
        if let Err(cause) = read_f32(tensor, target) {
            self.error = Some(LayoutError::Read { id: param.id, cause });
        }
    }
}

/// Copies a tensor's values, converted to `f32`, into `target`.
fn read_f32<const D: usize>(tensor: Tensor<D>, target: &mut [f32]) -> Result<(), String> {
    let data = tensor.inner().try_into_data().map_err(|e| e.to_string())?;
    if data.dtype() == DType::F32 {
        target.copy_from_slice(data.as_slice::<f32>().map_err(|e| format!("{e:?}"))?);
    } else {
        let data = data.convert::<f32>();
        target.copy_from_slice(data.as_slice::<f32>().map_err(|e| format!("{e:?}"))?);
    }
    Ok(())
}

struct WriteBackMapper<'a> {
    layout: &'a ParamLayout,
    bucket: &'a LayoutBucket,
    index: usize,
    flat: &'a [f32],
    error: Option<LayoutError>,
}

impl ModuleMapper for WriteBackMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let index = self.index;
        self.index += 1;
        if self.error.is_some() {
            return param;
        }
        let (id, old, mapper) = param.consume();
        let shape: Vec<usize> = old.shape().iter().copied().collect();
        let slot = match self.layout.expect(index, id, &shape) {
            Ok(slot) => slot,
            Err(error) => {
                self.error = Some(error);
                return Param::from_mapped_value(id, old, mapper);
            }
        };
        let Some(offset) = slot.offset.filter(|_| self.bucket.slots.contains(&index)) else {
            return Param::from_mapped_value(id, old, mapper);
        };
        let offset = offset - self.bucket.values.start;
        let values = self.flat[offset..offset + slot.len()].to_vec();
        let updated = rebuild_like(&old, TensorData::new(values, shape), id);
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Why [`ParamLayout::merge_tensor_in_place`] failed: the module or the merge.
#[derive(Debug)]
pub enum InPlaceError<E> {
    /// The module does not match the layout, or a tensor could not be read.
    Layout(LayoutError),
    /// The merge failed.
    Merge(E),
}

struct InPlaceMapper<'a, E> {
    layout: &'a ParamLayout,
    slot: usize,
    index: usize,
    merge: &'a mut dyn FnMut(&mut [f32]) -> Result<(), E>,
    error: Option<InPlaceError<E>>,
}

impl<E> ModuleMapper for InPlaceMapper<'_, E> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let index = self.index;
        self.index += 1;
        if self.error.is_some() || index != self.slot {
            return param;
        }
        let (id, old, mapper) = param.consume();
        let shape: Vec<usize> = old.shape().iter().copied().collect();
        if let Err(error) = self.layout.expect(index, id, &shape) {
            self.error = Some(InPlaceError::Layout(error));
            return Param::from_mapped_value(id, old, mapper);
        }
        let like = Like::of(&old);
        let read = old.inner().try_into_data().map_err(|e| e.to_string());
        let mut data = match read {
            Ok(data) if data.dtype() == DType::F32 => data,
            Ok(data) => data.convert::<f32>(),
            Err(cause) => {
                // The tensor is gone with its failed read: the error ends the run.
                self.error = Some(InPlaceError::Layout(LayoutError::Read { id, cause }));
                let zeros = TensorData::new(vec![0.0f32; shape.iter().product()], shape);
                return Param::from_mapped_value(id, like.build(zeros, id), mapper);
            }
        };
        match data.as_mut_slice::<f32>() {
            Ok(values) => {
                if let Err(error) = (self.merge)(values) {
                    self.error = Some(InPlaceError::Merge(error));
                }
            }
            Err(cause) => {
                self.error = Some(InPlaceError::Layout(LayoutError::Read { id, cause: format!("{cause:?}") }));
            }
        }
        Param::from_mapped_value(id, like.build(data, id), mapper)
    }
}

/// What a rebuilt tensor takes from the one it replaces.
struct Like {
    device: burn::tensor::Device,
    dtype: DType,
    autodiff: bool,
    checkpointing: Option<burn::tensor::GradientCheckpointingStrategy>,
    require_grad: bool,
    distributed: bool,
}

impl Like {
    fn of<const D: usize>(tensor: &Tensor<D>) -> Self {
        // The autodiff settings can only be read from an autodiff tensor.
        let autodiff = tensor.is_autodiff();
        Self {
            device: tensor.device(),
            dtype: tensor.dtype(),
            autodiff,
            checkpointing: if autodiff { tensor.gradient_checkpointing_strategy() } else { None },
            require_grad: autodiff && tensor.is_require_grad(),
            distributed: autodiff && tensor.is_distributed(),
        }
    }

    fn build<const D: usize>(&self, data: TensorData, id: ParamId) -> Tensor<D> {
        let options = TensorCreationOptions::new(self.device.clone().without_autodiff()).with_dtype(self.dtype);
        let mut tensor = Tensor::<D>::from_data(data, options);
        if !self.autodiff {
            return tensor;
        }
        tensor = tensor.autodiff();
        if let Some(strategy) = self.checkpointing {
            tensor = tensor.with_gradient_checkpointing_strategy(strategy);
        }
        if self.require_grad {
            tensor = tensor.require_grad();
        }
        if self.distributed {
            tensor = tensor.set_distributed(id);
        }
        tensor
    }
}

/// A tensor holding `data` with everything else — device, dtype, autodiff, checkpointing
/// strategy, `require_grad`, distributed flag — taken from `like`.
fn rebuild_like<const D: usize>(like: &Tensor<D>, data: TensorData, id: ParamId) -> Tensor<D> {
    Like::of(like).build(data, id)
}

/// A hash (FNV-1a over the bit patterns) of all a module's float tensors, parameters and
/// buffers, in visiting order. It does not depend on autodiff, so a trained model and its
/// `valid()` copy have the same fingerprint; equal fingerprints mean bit-identical models.
pub fn parameter_fingerprint<M: Module>(module: &M) -> Result<u64, LayoutError> {
    let flat = ParamLayout::of(module, BufferPolicy::Merge).flatten(module)?;
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for value in flat {
        for byte in value.to_bits().to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Ok(hash)
}
