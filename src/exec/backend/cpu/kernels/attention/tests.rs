use super::*;

/// Materialises the whole score matrix: the plain definition to hold the kernel against.
fn naive_forward(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape) -> Vec<f32> {
    let (s, d, qw, kw) = (sh.seq, sh.head_dim, sh.q_width(), sh.kv_width());
    let mut out = vec![0.0; q.len()];
    for b in 0..sh.batch {
        for h in 0..sh.heads {
            let g = h / sh.group();
            for i in 0..s {
                let qi = &q[(b * s + i) * qw + h * d..][..d];
                let sc: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &k[(b * s + j) * kw + g * d..][..d];
                        qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                for (j, x) in sc.iter().enumerate() {
                    let p = (x - mx).exp() / z;
                    for e in 0..d {
                        out[(b * s + i) * qw + h * d + e] +=
                            (p * v[(b * s + j) * kw + g * d + e] as f64) as f32;
                    }
                }
            }
        }
    }
    out
}

fn inputs(sh: AttnShape, salt: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = sh.batch * sh.seq;
    let make = |len: usize, f: f32| -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + salt) * f).sin()).collect()
    };
    (
        make(n * sh.q_width(), 0.37),
        make(n * sh.kv_width(), 0.53),
        make(n * sh.kv_width(), 0.71),
    )
}

const SHAPE: AttnShape = AttnShape {
    batch: 2,
    seq: 300, // more than one query block and one key block
    heads: 4,
    kv_heads: 2,
    head_dim: 8,
};

#[test]
fn flash_forward_matches_naive() {
    let sh = SHAPE;
    let (q, k, v) = inputs(sh, 0.0);
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; sh.batch * sh.heads * sh.seq];
    attention_forward(&mut out, &mut lse, &q, &k, &v, sh);
    let want = naive_forward(&q, &k, &v, sh);
    for (a, b) in out.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn backward_matches_finite_differences() {
    // Several query blocks and two key blocks, kept small so the naive reference is quick.
    let sh = AttnShape {
        batch: 1,
        heads: 2,
        kv_heads: 1,
        ..SHAPE
    };
    let (q, k, v) = inputs(sh, 1.0);
    let (w, _, _) = inputs(sh, 5.0); // loss = Σ w · out
    let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
        naive_forward(q, k, v, sh)
            .iter()
            .zip(&w)
            .map(|(a, b)| (a * b) as f64)
            .sum()
    };
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; sh.batch * sh.heads * sh.seq];
    attention_forward(&mut out, &mut lse, &q, &k, &v, sh);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    let mut delta = vec![0.0; lse.len()];
    attention_backward(
        &mut dq, &mut dk, &mut dv, &mut delta, &w, &q, &k, &v, &out, &lse, sh,
    );
    let e = 1e-2f32;
    let check = |name: &str, grad: &[f32], which: usize| {
        for idx in (0..grad.len()).step_by(53) {
            let mut bufs = [q.clone(), k.clone(), v.clone()];
            bufs[which][idx] += e;
            let up = loss(&bufs[0], &bufs[1], &bufs[2]);
            bufs[which][idx] -= 2.0 * e;
            let down = loss(&bufs[0], &bufs[1], &bufs[2]);
            let fd = (up - down) / (2.0 * e as f64);
            assert!(
                (fd - grad[idx] as f64).abs() < 2e-3,
                "{name}[{idx}]: {fd} vs {}",
                grad[idx]
            );
        }
    };
    check("dq", &dq, 0);
    check("dk", &dk, 1);
    check("dv", &dv, 2);
}
