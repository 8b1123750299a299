//! Token embedding: a row gather forward, a scatter-add backward.

/// `out[t] = table[ids[t]]`; ids were checked against the vocabulary when the batch was made.
pub fn embedding_forward(out: &mut [f32], table: &[f32], ids: &[i32], hidden: usize) {
    for (row, &id) in out.chunks_mut(hidden).zip(ids) {
        let id = id as usize;
        row.copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
    }
}

/// `d_table[ids[t]] += d_out[t]`, in token order so repeated ids sum deterministically.
pub fn embedding_backward(d_table: &mut [f32], d_out: &[f32], ids: &[i32], hidden: usize) {
    for (row, &id) in d_out.chunks(hidden).zip(ids) {
        let id = id as usize;
        for (d, g) in d_table[id * hidden..(id + 1) * hidden].iter_mut().zip(row) {
            *d += g;
        }
    }
}
