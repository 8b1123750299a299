//! Tied embeddings on host parts: the head's copy of the embedding's table gets the same
//! gradient as the table, the sum of both uses, the embedding's first (as the pipeline's `TIE`
//! sums them).

use crate::exec::model::params::TIED_TABLE;
use crate::exec::model::{ModelError, PartId, PartParams};

/// Sums the table's two gradients into both, where `parts` hold the embedding and a tied head.
/// Does nothing for untied parts; refuses a tied head without the embedding (or the reverse
/// pair), which a caller holding only part of the model must sum through its devices.
pub fn sum_tied_grads(parts: &mut [PartParams]) -> Result<(), ModelError> {
    let at = |parts: &[PartParams], id: PartId| -> Option<(usize, usize)> {
        let p = parts.iter().position(|p| p.id == id)?;
        let t = parts[p].names.iter().position(|n| n == TIED_TABLE)?;
        Some((p, t))
    };
    let tied_head = at(parts, PartId::Head);
    let Some((h, ht)) = tied_head else {
        return Ok(());
    };
    let (e, et) = at(parts, PartId::Embedding).ok_or(ModelError::WrongInput {
        part: PartId::Head,
        reason: "a tied head's gradient needs the embedding's to be summed with".into(),
    })?;
    let (first, second) = parts.split_at_mut(h.max(e));
    let (embedding, head) = match e < h {
        true => (&mut first[e], &mut second[0]),
        false => (&mut second[0], &mut first[h]),
    };
    let (eg, hg) = (&mut embedding.grads[et], &mut head.grads[ht]);
    for (s, o) in eg.data_mut().iter_mut().zip(hg.data()) {
        *s += *o;
    }
    hg.data_mut().copy_from_slice(eg.data());
    Ok(())
}
