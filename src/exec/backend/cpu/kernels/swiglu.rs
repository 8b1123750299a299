//! SwiGLU: `act = silu(gate) * up`, the gated MLP activation of Llama.

use multiversion::multiversion;
use rayon::prelude::*;

use crate::exec::backend::cpu::kernels::fast_exp;

const CHUNK: usize = 4096;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp::exp(-x))
}

pub fn swiglu_forward(act: &mut [f32], gate: &[f32], up: &[f32]) {
    act.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((a, g), u)| forward_chunk(a, g, u));
}

#[multiversion(targets = "simd")]
fn forward_chunk(act: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((a, g), u) in act.iter_mut().zip(gate).zip(up) {
        *a = g * sigmoid(*g) * u;
    }
}

/// Given `d_act` (in `d_up`'s buffer on entry), writes `d_gate` and `d_up`, and `act` as the
/// forward computed it (the down projection's weight gradient needs it; recomputing it here
/// shares the sigmoid and one pass over `gate` and `up`).
pub fn swiglu_backward(
    act: &mut [f32],
    d_gate: &mut [f32],
    d_act_to_d_up: &mut [f32],
    gate: &[f32],
    up: &[f32],
) {
    act.par_chunks_mut(CHUNK)
        .zip(d_gate.par_chunks_mut(CHUNK))
        .zip(d_act_to_d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(((a, dg), du), (g, u))| backward_chunk(a, dg, du, g, u));
}

#[multiversion(targets = "simd")]
fn backward_chunk(
    act: &mut [f32],
    d_gate: &mut [f32],
    d_act_to_d_up: &mut [f32],
    gate: &[f32],
    up: &[f32],
) {
    let outs = act
        .iter_mut()
        .zip(d_gate.iter_mut().zip(d_act_to_d_up.iter_mut()));
    for ((a, (dg, du)), (g, u)) in outs.zip(gate.iter().zip(up)) {
        let s = sigmoid(*g);
        let silu = g * s;
        let da = *du;
        *a = silu * u;
        *dg = da * u * s * (1.0 + g * (1.0 - s));
        *du = da * silu;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let g = [-2.0f32, -0.3, 0.0, 0.7, 3.0];
        let u = [0.5f32, -1.0, 2.0, 1.5, -0.2];
        let f = |g: f32, u: f32| (g as f64) / (1.0 + (-(g as f64)).exp()) * u as f64;
        let mut dg = [0.0; 5];
        let mut du = [1.0; 5];
        let mut act = [f32::NAN; 5];
        swiglu_backward(&mut act, &mut dg, &mut du, &g, &u);
        let mut fwd = [0.0; 5];
        swiglu_forward(&mut fwd, &g, &u);
        assert_eq!(act, fwd, "the backward's act is the forward's, bit for bit");
        for i in 0..5 {
            let e = 1e-3;
            let fg = (f(g[i] + e, u[i]) - f(g[i] - e, u[i])) / (2.0 * e as f64);
            let fu = (f(g[i], u[i] + e) - f(g[i], u[i] - e)) / (2.0 * e as f64);
            assert!((fg - dg[i] as f64).abs() < 1e-3, "{i}: {fg} {}", dg[i]);
            assert!((fu - du[i] as f64).abs() < 1e-3, "{i}: {fu} {}", du[i]);
        }
    }
}
