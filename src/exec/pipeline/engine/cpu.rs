//! The host's engine: tensors are host buffers, so a move or a send is bookkeeping.

use std::borrow::Cow;
use std::ops::Range;

use crate::exec::backend::CpuBackend;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::part::{MicroTokens, PartOutput, PartStash, backward_part, forward_part};
use crate::exec::model::{LlamaConfig, PartCtx, PartId, PartParams};
use crate::exec::optim::clip::part_squares;
use crate::exec::optim::update_elements;
use crate::exec::tensor::Tensor;

use crate::exec::pipeline::PipelineError;

use crate::exec::transport::frame::WireTensor;

use super::{At, Engine, HostMessage, HostPart, Kept, Update};

type Result<T> = std::result::Result<T, PipelineError>;

/// Elements `within` of a host tensor, or an error naming it.
pub fn host_range(t: &Tensor, within: Range<usize>) -> Result<&[f32]> {
    let (name, len) = (t.name(), t.len());
    (t.data().get(within.clone())).ok_or_else(|| outside(name, len, &within))
}

/// Overwrites elements `within` of a host tensor with `src`, or an error naming it.
pub fn host_write(t: &mut Tensor, within: Range<usize>, src: &[f32]) -> Result<()> {
    let (name, len) = (t.name().to_string(), t.len());
    let at = (t.data_mut().get_mut(within.clone())).ok_or_else(|| outside(&name, len, &within))?;
    if at.len() != src.len() {
        return Err(PipelineError::Reduction(format!(
            "{} values cannot overwrite elements {within:?} of {name}",
            src.len()
        )));
    }
    at.copy_from_slice(src);
    Ok(())
}

fn outside(name: &str, len: usize, within: &Range<usize>) -> PipelineError {
    PipelineError::Reduction(format!("{name} holds {len} elements, not {within:?}"))
}

/// The host's engine: every device is a pool of host memory and kernels run on `backend`.
pub struct CpuEngine {
    pub backend: CpuBackend,
}

impl CpuEngine {
    fn ctx<'a>(&'a self, at: At<'a>) -> PartCtx<'a, CpuBackend> {
        PartCtx {
            backend: &self.backend,
            pool: at.pool,
            config: at.config,
            micro: at.micro,
        }
    }
}

impl Engine for CpuEngine {
    type Tensor = Tensor;
    type Stash = PartStash;
    type Part = PartParams;
    type Message = HostMessage;

    fn forward(
        &self,
        at: At<'_>,
        part: &PartParams,
        input: Option<Tensor>,
        tokens: MicroTokens<'_>,
    ) -> Result<(PartStash, PartOutput)> {
        Ok(forward_part(&self.ctx(at), part, input, tokens)?)
    }

    fn backward(
        &self,
        at: At<'_>,
        part: &mut PartParams,
        stash: PartStash,
        grad_output: Option<Tensor>,
        loss_scale: f32,
    ) -> Result<Option<Tensor>> {
        Ok(backward_part(
            &self.ctx(at),
            part,
            stash,
            grad_output,
            loss_scale,
        )?)
    }

    fn keep_input(&self, first: PartStash) -> Kept<Tensor, PartStash> {
        match first.into_input() {
            Ok(input) => Kept::Input(input),
            Err(embedding) => Kept::Stash(embedding),
        }
    }

    fn regroup(&self, t: Tensor, group: MemGroup) -> Tensor {
        t.regroup(group)
    }

    fn move_tensor(
        &self,
        _device: u32,
        t: Tensor,
        to: &PoolRef,
        group: MemGroup,
        _to_host: bool,
    ) -> Result<Tensor> {
        Ok(t.transfer(to, group)?)
    }

    fn move_stash(
        &self,
        _device: u32,
        s: PartStash,
        to: &PoolRef,
        _to_host: bool,
    ) -> Result<PartStash> {
        Ok(s.relocate(&self.backend, to, false)?)
    }

    /// The host buffer changes hands: the sender's bytes are given back now, the receiver's
    /// taken when it receives.
    fn send(&self, _device: u32, t: Tensor) -> Result<HostMessage> {
        let (name, shape, data) = t.into_data();
        Ok(HostMessage { name, shape, data })
    }

    fn receive(&self, _device: u32, m: HostMessage, pool: &PoolRef) -> Result<Tensor> {
        let group = MemGroup::Activations;
        Ok(Tensor::from_data(pool, m.name, &m.shape, m.data, group)?)
    }

    fn wire_out(&self, device: u32, t: Tensor) -> Result<WireTensor> {
        let HostMessage { name, shape, data } = self.send(device, t)?;
        Ok(WireTensor {
            name,
            shape,
            data,
            bf16: false,
        })
    }

    fn wire_in(&self, device: u32, t: WireTensor, pool: &PoolRef) -> Result<Tensor> {
        let WireTensor {
            name, shape, data, ..
        } = t;
        self.receive(device, HostMessage { name, shape, data }, pool)
    }

    fn values<'t>(
        &self,
        _device: u32,
        t: &'t Tensor,
        within: Range<usize>,
    ) -> Result<Cow<'t, [f32]>> {
        host_range(t, within).map(Cow::Borrowed)
    }

    fn len(&self, t: &Tensor) -> usize {
        t.len()
    }

    fn adopt(&self, part: PartParams, host: &PoolRef) -> Result<PartParams> {
        let mut part = part;
        for (list, group) in [
            (&mut part.weights, MemGroup::Weights),
            (&mut part.grads, MemGroup::Gradients),
        ] {
            *list = std::mem::take(list)
                .into_iter()
                .map(|t| t.transfer(host, group))
                .collect::<std::result::Result<_, _>>()?;
        }
        Ok(part)
    }

    fn part_id(&self, part: &PartParams) -> PartId {
        part.id
    }

    fn params_mut<'p>(
        &self,
        part: &'p mut PartParams,
    ) -> (&'p mut Vec<Tensor>, &'p mut Vec<Tensor>) {
        (&mut part.weights, &mut part.grads)
    }

    fn param_names<'p>(&self, part: &'p PartParams) -> &'p [String] {
        &part.names
    }

    fn param_lens(&self, part: &PartParams) -> Vec<usize> {
        part.weights.iter().map(Tensor::len).collect()
    }

    fn host_zeros(
        &self,
        host: &PoolRef,
        name: &str,
        len: usize,
        group: MemGroup,
    ) -> Result<Tensor> {
        Ok(Tensor::zeros(host, name, &[len], group)?)
    }

    fn grad_squares(&self, _device: u32, part: &PartParams) -> Result<f64> {
        Ok(part_squares(part).sum_of_squares)
    }

    fn update(
        &self,
        _device: u32,
        u: Update<'_>,
        w: &mut Tensor,
        g: &mut Tensor,
        local: Range<usize>,
        moments: Option<(&mut Tensor, &mut Tensor)>,
        within: Range<usize>,
    ) -> Result<()> {
        let (m, v): (&mut [f32], &mut [f32]) = match moments {
            Some((m, v)) => (&mut m.data_mut()[within.clone()], &mut v.data_mut()[within]),
            None => (&mut [], &mut []),
        };
        update_elements(
            u.config,
            u.coeffs,
            u.clip_factor,
            &mut w.data_mut()[local.clone()],
            &mut g.data_mut()[local],
            m,
            v,
        );
        Ok(())
    }

    fn zero_grads(&self, _device: u32, part: &mut PartParams) -> Result<()> {
        part.zero_grads();
        Ok(())
    }

    fn host_part<'p>(
        &self,
        _device: u32,
        part: &'p PartParams,
        _host: &PoolRef,
        _config: &LlamaConfig,
    ) -> Result<HostPart<'p>> {
        Ok(HostPart::Lent(part))
    }

    fn load_part(&self, _device: u32, part: &mut PartParams, from: &PartParams) -> Result<()> {
        part.copy_weights_from(from);
        Ok(())
    }

    fn read(&self, _device: u32, t: &Tensor, within: Range<usize>, dst: &mut [f32]) -> Result<()> {
        let values = host_range(t, within.clone())?;
        if values.len() != dst.len() {
            return Err(PipelineError::Reduction(format!(
                "elements {within:?} of {} cannot fill {} values",
                t.name(),
                dst.len()
            )));
        }
        dst.copy_from_slice(values);
        Ok(())
    }

    fn write(&self, _device: u32, t: &mut Tensor, within: Range<usize>, src: &[f32]) -> Result<()> {
        host_write(t, within, src)
    }

    fn sum_here(&self, device: u32, copies: &mut [&mut Tensor]) -> Result<()> {
        // Host tensors: where they are does not change the sum.
        self.sum_replicas(device, copies)
    }

    fn sum_replicas(&self, _device: u32, copies: &mut [&mut Tensor]) -> Result<()> {
        check_lengths(copies)?;
        let Some((first, rest)) = copies.split_first_mut() else {
            return Ok(());
        };
        let sum = first.data_mut();
        for other in rest.iter() {
            for (s, o) in sum.iter_mut().zip(other.data()) {
                *s += *o;
            }
        }
        for other in rest.iter_mut() {
            other.data_mut().copy_from_slice(sum);
        }
        Ok(())
    }

    /// Sums each range into copy 0's elements (so in replica order), moves the sum to its
    /// owner's copy and zeroes the rest: no buffer besides the copies.
    fn scatter_ranges(
        &self,
        _device: u32,
        copies: &mut [&mut Tensor],
        owned: &[(usize, Range<usize>)],
    ) -> Result<()> {
        check_ranges(copies, owned)?;
        let Some((first, rest)) = copies.split_first_mut() else {
            return Ok(());
        };
        for (owner, range) in owned {
            let sum = &mut first.data_mut()[range.clone()];
            for other in rest.iter() {
                for (s, o) in sum.iter_mut().zip(&other.data()[range.clone()]) {
                    *s += *o;
                }
            }
            for (r, other) in rest.iter_mut().enumerate() {
                let values = &mut other.data_mut()[range.clone()];
                if r + 1 == *owner {
                    values.copy_from_slice(sum);
                } else {
                    values.fill(0.0);
                }
            }
            if *owner != 0 {
                sum.fill(0.0);
            }
        }
        Ok(())
    }

    fn gather_ranges(
        &self,
        _device: u32,
        copies: &mut [&mut Tensor],
        owned: &[(usize, Range<usize>)],
    ) -> Result<()> {
        check_ranges(copies, owned)?;
        for (owner, range) in owned {
            let (before, rest) = copies.split_at_mut(*owner);
            let Some((src, after)) = rest.split_first_mut() else {
                continue;
            };
            let values = &src.data()[range.clone()];
            for dst in before.iter_mut().chain(after.iter_mut()) {
                dst.data_mut()[range.clone()].copy_from_slice(values);
            }
        }
        Ok(())
    }
}

/// Every copy has the first's length.
fn check_lengths(copies: &[&mut Tensor]) -> Result<()> {
    let Some(first) = copies.first() else {
        return Ok(());
    };
    let len = first.len();
    if let Some(other) = copies.iter().find(|t| t.len() != len) {
        return Err(PipelineError::Reduction(format!(
            "{} has {len} elements in one replica and {} in another",
            first.name(),
            other.len()
        )));
    }
    Ok(())
}

/// Every copy has the first's length, and every owner and range is within them.
fn check_ranges(copies: &[&mut Tensor], owned: &[(usize, Range<usize>)]) -> Result<()> {
    check_lengths(copies)?;
    let Some(first) = copies.first() else {
        return Ok(());
    };
    let len = first.len();
    if let Some((owner, range)) = (owned.iter()).find(|(o, r)| *o >= copies.len() || r.end > len) {
        return Err(PipelineError::Reduction(format!(
            "{}: replica {owner} of {} cannot own elements {range:?} of {len}",
            first.name(),
            copies.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::device::{MemGroup, Pool};

    /// Ranged reads and writes of a host tensor refuse, by name, a range it does not hold or
    /// a buffer of another length, instead of panicking.
    #[test]
    fn ranges_a_tensor_does_not_hold_are_refused_by_name() {
        let engine = CpuEngine {
            backend: CpuBackend::default(),
        };
        let pool = Pool::new("test", 1 << 10);
        let data = vec![1.0, 2.0, 3.0];
        let mut t = Tensor::from_data(&pool, "w", &[3], data, MemGroup::Weights).unwrap();
        let mut two = [0f32; 2];
        engine.read(0, &t, 1..3, &mut two).unwrap();
        assert_eq!(two, [2.0, 3.0]);
        let err = engine.read(0, &t, 2..4, &mut two).unwrap_err().to_string();
        assert!(err.contains("w holds 3 elements, not 2..4"), "{err}");
        let err = engine.read(0, &t, 0..3, &mut two).unwrap_err().to_string();
        assert!(
            err.contains("elements 0..3 of w cannot fill 2 values"),
            "{err}"
        );
        let err = engine.write(0, &mut t, 0..1, &two).unwrap_err().to_string();
        assert!(
            err.contains("2 values cannot overwrite elements 0..1 of w"),
            "{err}"
        );
    }
}
