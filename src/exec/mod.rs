//! The executor: tensors in counted device pools, kernels behind a backend trait, the Llama
//! model as explicit per-part forward/backward, optimizers, checkpoints, and a single-device
//! training step that the pipeline runtime drives part by part.

pub mod backend;
pub mod checkpoint;
pub mod device;
pub mod kernels;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod run;
pub mod tensor;
pub mod train;
