//! Which CUDA libraries this machine has. cudarc loads each one on first use and panics when
//! it is missing, so everything here asks first.
//!
//! Libraries are found by the dynamic loader (`LD_LIBRARY_PATH`, `ldconfig`): the driver
//! (`libcuda.so`), NVRTC (`libnvrtc.so.13`), cuBLAS (`libcublas.so.13`) and NCCL. cudarc looks
//! for NCCL as `libnccl.so`, while NCCL's packages ship `libnccl.so.2` (the `nvidia-nccl-cu13`
//! wheel puts it in `site-packages/nvidia/nccl/lib`): link `libnccl.so` to it in a folder on
//! `LD_LIBRARY_PATH` (`scripts/gpu-check` does).

use std::fmt;

use crate::exec::backend::cuda::CudaError;

/// Presence and versions of the CUDA libraries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Libraries {
    pub driver: bool,
    pub nvrtc: bool,
    pub cublas: bool,
    pub nccl: bool,
    /// `cuDriverGetVersion`, e.g. 13000 for 13.0.
    pub driver_version: Option<i32>,
    pub nvrtc_version: Option<(i32, i32)>,
    pub nccl_version: Option<i32>,
}

impl Libraries {
    /// Looks for each library without initialising any device.
    pub fn probe() -> Libraries {
        // SAFETY: the presence checks only try to dlopen the library.
        let (driver, nvrtc, cublas, nccl) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
                cudarc::cublas::sys::is_culib_present(),
                cudarc::nccl::sys::is_culib_present(),
            )
        };
        let driver_version = driver.then(|| {
            let mut v = 0;
            // SAFETY: the library is present; the call writes one int.
            let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
            (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(v)
        });
        let nvrtc_version = nvrtc.then(|| {
            let (mut major, mut minor) = (0, 0);
            // SAFETY: the library is present; the call writes two ints.
            let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
            (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
        });
        let nccl_version = nccl.then(|| cudarc::nccl::result::get_nccl_version().ok());
        Libraries {
            driver,
            nvrtc,
            cublas,
            nccl,
            driver_version: driver_version.flatten(),
            nvrtc_version: nvrtc_version.flatten(),
            nccl_version: nccl_version.flatten(),
        }
    }

    /// The libraries one device needs (driver, NVRTC, cuBLAS), or the first one missing.
    pub fn require_compute(&self) -> Result<(), CudaError> {
        let missing = |library: &'static str, hint: &str| {
            Err(CudaError::Unavailable {
                library,
                hint: hint.to_string(),
            })
        };
        if !self.driver {
            return missing("libcuda.so (the NVIDIA driver)", "no NVIDIA driver here");
        }
        if !self.nvrtc {
            return missing(
                "libnvrtc.so.13 (NVRTC)",
                "install the CUDA 13 toolkit or the nvidia-cuda-nvrtc wheel and put its lib \
                 folder on LD_LIBRARY_PATH",
            );
        }
        if !self.cublas {
            return missing(
                "libcublas.so.13 (cuBLAS)",
                "install the CUDA 13 toolkit or the nvidia-cublas wheel and put its lib folder \
                 on LD_LIBRARY_PATH",
            );
        }
        Ok(())
    }

    /// NCCL, which communicators between GPUs need, or how to provide it.
    pub fn require_nccl(&self) -> Result<(), CudaError> {
        match self.nccl {
            true => Ok(()),
            false => Err(CudaError::Unavailable {
                library: "libnccl.so (NCCL)",
                hint: "install NCCL (e.g. the nvidia-nccl-cu13 wheel) and link libnccl.so to its \
                       libnccl.so.2 in a folder on LD_LIBRARY_PATH"
                    .into(),
            }),
        }
    }
}

fn version(v: Option<i32>) -> String {
    v.map_or("-".into(), |v| format!("{}.{}", v / 1000, (v % 1000) / 10))
}

impl fmt::Display for Libraries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "found" } else { "missing" };
        write!(
            f,
            "driver {} (CUDA {}), nvrtc {} ({}), cublas {}, nccl {} ({})",
            yes(self.driver),
            version(self.driver_version),
            yes(self.nvrtc),
            self.nvrtc_version
                .map_or("-".into(), |(a, b)| format!("{a}.{b}")),
            yes(self.cublas),
            yes(self.nccl),
            self.nccl_version.map_or("-".into(), |v| v.to_string()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_driver_is_a_typed_error_naming_it() {
        let none = Libraries {
            driver: false,
            nvrtc: true,
            cublas: true,
            nccl: false,
            driver_version: None,
            nvrtc_version: None,
            nccl_version: None,
        };
        let err = none.require_compute().unwrap_err().to_string();
        assert!(err.starts_with("CUDA unavailable: libcuda.so"), "{err}");
        let no_blas = Libraries {
            driver: true,
            cublas: false,
            ..none
        };
        assert!(
            no_blas
                .require_compute()
                .unwrap_err()
                .to_string()
                .contains("cuBLAS")
        );
    }

    #[test]
    fn probing_never_panics_and_versions_print() {
        let libs = Libraries::probe();
        assert!(libs.to_string().starts_with("driver "));
        assert_eq!(version(Some(13000)), "13.0");
    }
}
