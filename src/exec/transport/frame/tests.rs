//! Frames round-trip bit for bit; a cut, flipped or malformed frame is an error.
use super::*;
use crate::exec::transport::{Collective, MessageKind};

fn tensor_frame() -> Frame {
    Frame::Tensor {
        step: 3,
        to: 1,
        key: MessageKey {
            kind: MessageKind::Gradient,
            mb: 2,
            chunk: 5,
        },
        tensor: WireTensor {
            name: "act".into(),
            shape: vec![2, 3],
            data: vec![1.0, -2.5, f32::MIN_POSITIVE, 0.1, -0.0, 7e30],
            bf16: false,
        },
    }
}

/// A bf16 tensor's values, widened: they travel in 2 bytes each and arrive the same.
fn bf16_tensor_frame() -> Frame {
    let data: Vec<f32> = [
        1.0f32,
        -2.5,
        0.15625,
        -0.0,
        65536.0,
        half::bf16::MAX.to_f32(),
    ]
    .to_vec();
    Frame::Tensor {
        step: 3,
        to: 0,
        key: MessageKey {
            kind: MessageKind::Activation,
            mb: 1,
            chunk: 0,
        },
        tensor: WireTensor {
            name: "act".into(),
            shape: vec![3, 2],
            data,
            bf16: true,
        },
    }
}

#[test]
fn a_bf16_tensor_travels_in_half_the_bytes() {
    let bytes = |frame: &Frame| {
        let mut out = Vec::new();
        frame.write_to(&mut out).unwrap();
        out
    };
    let half = bytes(&bf16_tensor_frame());
    let Frame::Tensor {
        step,
        to,
        key,
        mut tensor,
    } = bf16_tensor_frame()
    else {
        unreachable!()
    };
    tensor.bf16 = false;
    let whole = bytes(&Frame::Tensor {
        step,
        to,
        key,
        tensor,
    });
    assert_eq!(whole.len() - half.len(), 6 * 2);
}

fn every_kind() -> Vec<Frame> {
    vec![
        Frame::Hello {
            rank: 1,
            ranks: 2,
            fingerprint: 0xdead_beef_0123,
        },
        tensor_frame(),
        bf16_tensor_frame(),
        Frame::Reduce {
            step: 9,
            stage: 1,
            chunk: 2,
            replica: 3,
            what: Collective::Scatter,
            grads: vec![vec![vec![0.5, 1.5], vec![]], vec![vec![3.0]]],
        },
        Frame::Meet {
            step: 4,
            squares: vec![
                (PartId::Embedding, 1.25),
                (PartId::Layer(3), 2.0),
                (PartId::Head, 0.1),
            ],
            losses: vec![(0, 3.5), (7, 1e-9)],
        },
        Frame::Checkpoint {
            step: 2,
            staging: ".step-2.00ff00ff00ff00ff.partial".into(),
        },
        Frame::Written { step: 2 },
        Frame::Abort {
            reason: "device 1: out of memory".into(),
        },
        Frame::Bye,
        Frame::Beat,
        Frame::Probe {
            payload: vec![7, 0, 255],
        },
        Frame::Probe { payload: vec![] },
        Frame::Setup {
            key: "nccl/3".into(),
            bytes: (0..=255).collect(),
        },
        Frame::Setup {
            key: String::new(),
            bytes: vec![],
        },
    ]
}

#[test]
fn every_frame_kind_round_trips_bit_for_bit() {
    let frames = every_kind();
    let mut stream = Vec::new();
    for f in &frames {
        f.write_to(&mut stream).unwrap();
    }
    let mut input = &stream[..];
    for f in &frames {
        assert_eq!(&Frame::read_from(&mut input).unwrap(), f);
    }
    assert!(matches!(
        Frame::read_from(&mut input),
        Err(FrameError::Closed)
    ));
    let Frame::Tensor { tensor, .. } = Frame::read_from(&mut &tensor_frame().encode()[..]).unwrap()
    else {
        panic!("not a tensor frame");
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let Frame::Tensor { tensor: sent, .. } = tensor_frame() else {
        unreachable!()
    };
    assert_eq!(bits(&tensor.data), bits(&sent.data));
}

#[test]
fn a_flipped_bit_anywhere_after_the_magic_is_refused() {
    let bytes = tensor_frame().encode();
    for at in 4..bytes.len() {
        let mut bad = bytes.clone();
        bad[at] ^= 0x10;
        let err = Frame::read_from(&mut &bad[..]).unwrap_err();
        // A flipped length reads as a short or over-long frame; anything else fails
        // the checksum.
        assert!(
            matches!(
                err,
                FrameError::Checksum { .. } | FrameError::Truncated(_) | FrameError::TooLarge(_)
            ),
            "byte {at}: {err}"
        );
    }
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(matches!(
        Frame::read_from(&mut &bad[..]),
        Err(FrameError::BadMagic(_))
    ));
}

#[test]
fn a_truncated_frame_is_an_error_at_every_cut() {
    let bytes = tensor_frame().encode();
    for cut in 1..bytes.len() {
        let err = Frame::read_from(&mut &bytes[..cut]).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated(_)),
            "cut at {cut}: {err}"
        );
        assert!(err.to_string().starts_with("truncated frame"), "{err}");
    }
    assert!(matches!(
        Frame::read_from(&mut &bytes[..0]),
        Err(FrameError::Closed)
    ));
}

#[test]
fn a_checksummed_frame_whose_content_does_not_parse_is_malformed() {
    // A tensor whose shape says 6 values but carries 2, with a valid checksum.
    let mut w = Writer(Vec::new());
    w.0.extend_from_slice(&MAGIC);
    w.0.push(2);
    w.u64(0);
    w.u64(0);
    w.u32(0);
    w.key(MessageKey {
        kind: MessageKind::Activation,
        mb: 0,
        chunk: 0,
    });
    w.tensor(&WireTensor {
        name: "x".into(),
        shape: vec![2, 3],
        data: vec![1.0, 2.0],
        bf16: false,
    });
    let len = (w.0.len() - HEADER) as u64;
    w.0[5..HEADER].copy_from_slice(&len.to_le_bytes());
    let crc = CASTAGNOLI.checksum(&w.0[4..]);
    w.u32(crc);
    let err = Frame::read_from(&mut &w.0[..]).unwrap_err().to_string();
    assert!(
        err.contains("tensor x of shape [2, 3] carries 2 values"),
        "{err}"
    );
}
