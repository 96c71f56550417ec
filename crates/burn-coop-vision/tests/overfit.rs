//! A tiny CNN memorizes 256 real training images: labels and pixels are wired correctly.

mod common;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use burn_coop_vision::{Cifar10, CifarBatcher, CifarSource, CifarSplit, Verify};
use common::real_archive;

#[derive(Module, Debug)]
struct TinyCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    fc: Linear,
    relu: Relu,
}

impl TinyCnn {
    fn new(device: &Device) -> Self {
        let conv = |i, o| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Self {
            conv1: conv(3, 32),
            conv2: conv(32, 64),
            fc: LinearConfig::new(64 * 8 * 8, 10).init(device),
            relu: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.relu.forward(self.conv1.forward(x));
        let x = self.relu.forward(self.conv2.forward(x));
        self.fc.forward(x.flatten::<2>(1, 3))
    }
}

fn accuracy(model: &TinyCnn, data: &Cifar10, batcher: &CifarBatcher, device: &Device) -> f64 {
    let indices: Vec<usize> = (0..data.len()).collect();
    let batch = batcher.batch_indices(data, &indices, 0, device);
    let predicted = model.forward(batch.images).argmax(1).flatten::<1>(0, 1);
    let correct: i64 = predicted.equal(batch.targets).int().sum().into_scalar();
    correct as f64 / data.len() as f64
}

#[test]
fn tiny_model_overfits_256_real_images() {
    let Some(archive) = real_archive() else {
        return;
    };
    let train = Cifar10::load(&CifarSource::Archive(archive), CifarSplit::Train, Verify::Official).unwrap();
    let indices: Vec<usize> = (0..256).collect();
    let data = train.subset(&indices);
    assert_eq!(data.label(0), 6);

    let device = Device::flex().autodiff();
    device.seed(1);
    let batcher = CifarBatcher::new();
    let mut model = TinyCnn::new(&device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let eval_device = Device::flex();

    let initial = accuracy(&model.valid(), &data, &batcher, &eval_device);
    let mut final_accuracy = initial;
    for epoch in 0..60u64 {
        for chunk in indices.chunks(64) {
            let batch = batcher.batch_indices(&data, chunk, epoch, &device);
            let logits = model.forward(batch.images);
            let loss = loss_fn.forward(logits, batch.targets);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(2e-3, model, grads);
        }
        final_accuracy = accuracy(&model.valid(), &data, &batcher, &eval_device);
        if final_accuracy >= 0.99 {
            println!("epoch {epoch}: training accuracy {final_accuracy:.3}");
            break;
        }
    }
    println!("training accuracy: initial {initial:.3}, final {final_accuracy:.3}");
    assert!(initial < 0.3, "an untrained model cannot already be accurate ({initial})");
    assert!(final_accuracy >= 0.95, "training accuracy {final_accuracy}");
}
