//! Sizes the kernels of `kernels/*.cu` are built with, as the host needs them (launches,
//! shared memory, argument structs). A leaf: it names no other CUDA module.

/// `CP_GROUP_MAX` of kernels/product_group.cu: the most products one group holds.
pub const GROUP_MAX: usize = 4;

/// `CP_ROPE_MAX_HALF`: the rope kernel takes head dimensions up to twice this.
pub(crate) const ROPE_MAX_HALF: usize = 128;

/// The largest head dimension the CUDA backend runs (its rope kernel's limit).
pub const MAX_HEAD_DIM: usize = 2 * ROPE_MAX_HALF;

/// `FA_THREADS` of kernels/flash_attention.cu: a flash kernel's block.
pub const FLASH_THREADS: u32 = 128;

/// `FA_ROWS` and `FA_STEP` of kernels/flash_attention.cu: rows of a block's tile and of each
/// step of its loop; `FA_PAD`, the elements that pad each row of a shared tile.
pub(crate) const FLASH_ROWS: usize = 64;
const FLASH_STEP: usize = 64;
const FLASH_PAD: usize = 8;

/// Bytes of dynamic shared memory a flash kernel's block uses for head dimension `head_dim`,
/// as `fa_forward_shared_bytes` and `fa_backward_shared_bytes` in kernels/flash_attention.cu
/// compute them (the host build of the kernels checks the two agree).
pub fn flash_shared_bytes(head_dim: usize, forward: bool) -> usize {
    let tile_row = (head_dim + FLASH_PAD) * 2;
    if forward {
        // The query tile, two pairs of key and value tiles.
        (FLASH_ROWS + 4 * FLASH_STEP) * tile_row
    } else {
        // Key, value, query and dO tiles, dS^T, a step's lse and delta.
        (2 * FLASH_ROWS + 2 * FLASH_STEP) * tile_row
            + FLASH_ROWS * (FLASH_STEP + FLASH_PAD) * 2
            + 2 * FLASH_STEP * 4
    }
}
