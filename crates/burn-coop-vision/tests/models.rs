//! Parameter counts, output shapes and a forward/backward pass of the ResNets on Flex.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData, s};
use burn_coop_vision::ModelError;
use burn_coop_vision::models::{CifarResNetConfig, ResNet18Config, Shortcut, count_trainable_params};

#[test]
fn cifar_resnet_parameter_counts_option_a() {
    let device = Device::flex();
    let expected = [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962)];
    for (depth, params) in expected {
        let model = CifarResNetConfig::new(depth).init(&device).unwrap();
        assert_eq!(count_trainable_params(&model), params, "ResNet-{depth} option A");
    }
    // Burn's own count adds the BatchNorm running statistics (2 per channel of every BN).
    let model = CifarResNetConfig::resnet20().init(&device).unwrap();
    let bn_channels = 16 + 3 * 2 * 16 + 3 * 2 * 32 + 3 * 2 * 64;
    assert_eq!(model.num_params(), 269_722 + 2 * bn_channels);
}

#[test]
fn cifar_resnet_parameter_counts_option_b() {
    let device = Device::flex();
    for (depth, params) in [(20, 272_474), (56, 855_770), (110, 1_730_714)] {
        let model = CifarResNetConfig::new(depth).with_shortcut(Shortcut::Projection).init(&device).unwrap();
        assert_eq!(count_trainable_params(&model), params, "ResNet-{depth} option B");
    }
}

#[test]
fn resnet18_parameter_count() {
    let model = ResNet18Config::new().init(&Device::flex());
    assert_eq!(count_trainable_params(&model), 11_173_962);
}

#[test]
fn invalid_depth_is_a_typed_error() {
    for depth in [0, 2, 19, 21, 100] {
        let err = CifarResNetConfig::new(depth).init(&Device::flex()).unwrap_err();
        assert_eq!(err, ModelError::InvalidDepth { depth });
    }
    assert_eq!(CifarResNetConfig::resnet110().blocks_per_stage(), Ok(18));
    assert_eq!(CifarResNetConfig::new(8).blocks_per_stage(), Ok(1));
}

#[test]
fn output_shapes() {
    let device = Device::flex();
    let x = Tensor::<4>::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    for shortcut in [Shortcut::ZeroPad, Shortcut::Projection] {
        let model = CifarResNetConfig::resnet20().with_shortcut(shortcut).init(&device).unwrap();
        assert_eq!(model.forward(x.clone()).dims(), [2, 10]);
    }
    let model = CifarResNetConfig::new(8).with_num_classes(7).init(&device).unwrap();
    assert_eq!(model.forward(x.clone()).dims(), [2, 7]);
    let model = ResNet18Config::new().init(&device);
    assert_eq!(model.forward(x.slice(s![0..1])).dims(), [1, 10]);
}

#[test]
fn forward_backward_on_flex_autodiff() {
    let device = Device::flex().autodiff();
    device.seed(7);
    let model = CifarResNetConfig::resnet20().init(&device).unwrap();
    let x = Tensor::<4>::random([4, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, 1, 4, 1], [4]), &device);
    let (loss, logits) = model.forward_classification(x, y);
    assert_eq!(logits.dims(), [4, 10]);
    let loss_value: f32 = loss.clone().into_scalar();
    assert!(loss_value.is_finite() && loss_value > 0.0, "loss {loss_value}");
    let grads = loss.backward();

    // Every trainable parameter has a finite, non-zero gradient.
    struct GradCheck<'a> {
        grads: &'a burn::tensor::Gradients,
        with_grad: usize,
        nonzero: usize,
    }
    impl burn::module::ModuleVisitor for GradCheck<'_> {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
            if let Some(g) = p.val().grad(self.grads) {
                self.with_grad += 1;
                let sum: f32 = g.abs().sum().into_scalar();
                assert!(sum.is_finite());
                if sum > 0.0 {
                    self.nonzero += 1;
                }
            }
        }
    }
    let mut check = GradCheck { grads: &grads, with_grad: 0, nonzero: 0 };
    model.visit(&mut check);
    // 19 convolutions + 19 BatchNorms (gamma, beta) + linear (weight, bias).
    assert_eq!(check.with_grad, 19 + 19 * 2 + 2);
    assert_eq!(check.nonzero, check.with_grad);
}
