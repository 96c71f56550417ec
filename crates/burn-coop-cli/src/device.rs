//! Burn devices by name, from the backends compiled into this binary.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

/// A device name: `flex`, `ndarray`, `wgpu`, `wgpu:cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceName(String);

/// The backends this binary was built with, in order of preference.
pub fn compiled_backends() -> Vec<&'static str> {
    [
        (cfg!(feature = "cuda"), "cuda"),
        (cfg!(feature = "wgpu"), "wgpu"),
        (cfg!(feature = "flex"), "flex"),
        (cfg!(feature = "ndarray"), "ndarray"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect()
}

impl DeviceName {
    /// The default device: the first CPU backend compiled in (never a GPU picked implicitly).
    pub fn default_for_build() -> Self {
        let backends = compiled_backends();
        let name = ["flex", "ndarray", "wgpu", "cuda"].into_iter().find(|b| backends.contains(b)).unwrap_or("flex");
        Self(name.into())
    }

    /// Opens the device.
    #[allow(unreachable_code, unused_variables)]
    pub fn open(&self) -> Device {
        let (backend, index) = self.parts();
        match backend {
            #[cfg(feature = "flex")]
            "flex" => return Device::flex(),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            "ndarray" => return Device::ndarray(),
            #[cfg(feature = "wgpu")]
            "wgpu" => {
                use burn::tensor::DeviceKind;
                return Device::wgpu(match index {
                    Some("cpu") => DeviceKind::Cpu,
                    Some(i) => DeviceKind::DiscreteGpu(i.parse().expect("validated")),
                    None => DeviceKind::DefaultDevice,
                });
            }
            #[cfg(feature = "cuda")]
            "cuda" => return Device::cuda(index.map_or(0, |i| i.parse::<usize>().expect("validated"))),
            _ => {}
        }
        unreachable!("device names are validated against the compiled backends")
    }

    fn parts(&self) -> (&str, Option<&str>) {
        match self.0.split_once(':') {
            Some((backend, index)) => (backend, Some(index)),
            None => (self.0.as_str(), None),
        }
    }
}

impl FromStr for DeviceName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let name = Self(text.trim().to_ascii_lowercase());
        let (backend, index) = name.parts();
        let known = ["flex", "ndarray", "wgpu", "cuda"];
        if !known.contains(&backend) {
            return Err(format!("unknown device '{text}': expected one of flex, ndarray, wgpu[:cpu|:N], cuda[:N]"));
        }
        if !compiled_backends().contains(&backend) {
            return Err(format!(
                "device '{text}' needs the '{backend}' backend, which this binary was built without \
                 (built with: {}); rebuild with --features {backend}",
                compiled_backends().join(", ")
            ));
        }
        match (backend, index) {
            (_, None) | ("wgpu", Some("cpu")) => Ok(name),
            ("wgpu" | "cuda", Some(i)) if i.parse::<usize>().is_ok() => Ok(name),
            _ => Err(format!("invalid device index in '{text}'")),
        }
    }
}

impl TryFrom<String> for DeviceName {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<DeviceName> for String {
    fn from(name: DeviceName) -> String {
        name.0
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
