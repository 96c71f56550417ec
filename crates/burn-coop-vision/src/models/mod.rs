//! ResNets for CIFAR: [`CifarResNet`] (ResNet-20/32/44/56/110) and [`ResNet18`], both a
//! [`ResidualNetwork`].

pub mod block;
pub mod cifar_resnet;
pub mod residual;
pub mod resnet18;

pub use block::{BasicBlock, Shortcut};
pub use cifar_resnet::{CifarResNet, CifarResNetConfig};
pub use residual::ResidualNetwork;
pub use resnet18::{ResNet18, ResNet18Config};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// Number of trainable parameters of a module: every float tensor except BatchNorm running
/// statistics (`running_mean`, `running_var`), which Burn's `num_params` also counts.
pub fn count_trainable_params<M: Module>(module: &M) -> usize {
    let mut counter = TrainableCounter::default();
    module.visit(&mut counter);
    counter.count
}

#[derive(Default)]
struct TrainableCounter {
    path: Vec<String>,
    count: usize,
}

impl ModuleVisitor for TrainableCounter {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let running = matches!(self.path.last().map(String::as_str), Some("running_mean" | "running_var"));
        if !running {
            self.count += param.lazy_shape().num_elements();
        }
    }
}
