//! Which compute device libtorch uses: CUDA when a GPU is visible, else the CPU.

use serde::Serialize;

/// The device every model in this process runs on.
pub fn default_device() -> tch::Device {
    tch::Device::cuda_if_available()
}

/// What a node offers for inference and training.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    /// Device used by default: `cpu` or `cuda:0`.
    pub device: String,
    /// Number of CUDA devices visible to libtorch.
    pub cuda_devices: usize,
    /// Intra-op CPU threads libtorch uses.
    pub cpu_threads: usize,
    /// Logical CPUs of the machine.
    pub cpus: usize,
}

impl DeviceReport {
    /// Asks libtorch about the devices of this machine.
    pub fn probe() -> Self {
        let cuda_devices = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
        DeviceReport {
            device: match default_device() {
                tch::Device::Cuda(i) => format!("cuda:{i}"),
                _ => "cpu".into(),
            },
            cuda_devices,
            cpu_threads: usize::try_from(tch::get_num_threads()).unwrap_or(0),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        }
    }
}
