//! A raw pointer handed to parallel tasks that each write their own elements of one buffer
//! (attention's heads, a product's row ranges).

#[derive(Clone, Copy)]
pub(crate) struct Disjoint(pub(crate) *mut f32);

// SAFETY: the tasks sharing one write disjoint elements; each use says which.
unsafe impl Send for Disjoint {}
unsafe impl Sync for Disjoint {}

impl Disjoint {
    // A method, not field access, so closures capture the whole Send + Sync wrapper.
    pub(crate) fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
