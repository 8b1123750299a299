//! f32 CPU kernels, each forward with its backward and explicit arguments. Parallel loops
//! split work so that every sum runs in a fixed order: results do not depend on thread count.

pub mod attention;
pub mod bias;
pub mod cross_entropy;
mod disjoint;
pub mod embedding;
pub mod fast_exp;
pub mod matmul;
pub mod reduce;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
