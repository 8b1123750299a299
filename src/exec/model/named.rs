//! Parameters by name: each part's weights, gradients and the products' view of its weights
//! as structs with a field per parameter, taken from the part's list by inventory name (so a
//! tensor added to a part's inventory never shifts another's position).

use crate::exec::backend::Backend;
use crate::exec::model::{ModelError, ModelResult, PartId, PartParams};

/// A part's items (one per parameter, in the part's order), taken out by inventory name.
struct Table<'n, I> {
    params_of: &'n [String],
    id: PartId,
    items: Vec<Option<I>>,
}

impl<'n, I> Table<'n, I> {
    fn new(id: PartId, params_of: &'n [String], items: impl IntoIterator<Item = I>) -> Self {
        Table {
            params_of,
            id,
            items: items.into_iter().map(Some).collect(),
        }
    }

    fn take(&mut self, name: &'static str) -> Result<I, ModelError> {
        let full = self.id.hf_name(name);
        let missing = ModelError::NotInInventory {
            part: self.id.kind(),
            name,
        };
        // A tied model's head holds its LM head under the table's name.
        let tied = |n: &String| name == head::LM_HEAD && self.id.is_tied_copy(n);
        let at = (self.params_of.iter()).position(|n| *n == full || tied(n));
        at.and_then(|i| self.items.get_mut(i)?.take())
            .ok_or(missing)
    }

    /// A parameter only some architectures have: none where the part's list lacks it.
    fn take_if_listed(&mut self, name: &'static str) -> Result<Option<I>, ModelError> {
        let full = self.id.hf_name(name);
        match self.params_of.contains(&full) {
            true => self.take(name).map(Some),
            false => Ok(None),
        }
    }
}

/// The inventory names of a layer's parameters.
pub mod layer {
    pub const INPUT_NORM: &str = "input_layernorm.weight";
    pub const Q: &str = "self_attn.q_proj.weight";
    pub const K: &str = "self_attn.k_proj.weight";
    pub const V: &str = "self_attn.v_proj.weight";
    pub const O: &str = "self_attn.o_proj.weight";
    pub const POST_NORM: &str = "post_attention_layernorm.weight";
    pub const GATE: &str = "mlp.gate_proj.weight";
    pub const UP: &str = "mlp.up_proj.weight";
    pub const DOWN: &str = "mlp.down_proj.weight";
    pub const Q_BIAS: &str = "self_attn.q_proj.bias";
    pub const K_BIAS: &str = "self_attn.k_proj.bias";
    pub const V_BIAS: &str = "self_attn.v_proj.bias";
}

/// The inventory names of the head's and the embedding's parameters.
pub mod head {
    pub const NORM: &str = "norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";
    pub const EMBED_TOKENS: &str = "embed_tokens.weight";
}

/// A layer's parameters: `N` for the norms' weights and the biases, `P` for the
/// projections'.
pub struct Layer<N, P> {
    pub input_norm: N,
    pub q: P,
    pub k: P,
    pub v: P,
    pub o: P,
    pub post_norm: N,
    pub gate: P,
    pub up: P,
    pub down: P,
    /// The q, k and v projections' biases, where the architecture has them (Qwen2).
    pub qkv_bias: Option<[N; 3]>,
}

/// The head's parameters: `N` for the final norm's weight, `P` for the LM head's.
pub struct Head<N, P> {
    pub norm: N,
    pub lm_head: P,
}

/// A layer's weights as its kernels read them.
pub type LayerWeights<'a, B> = Layer<&'a <B as Backend>::Tensor, <B as Backend>::Weight<'a>>;
/// A layer's gradients.
pub type LayerGrads<'a, T> = Layer<&'a mut T, &'a mut T>;
pub type HeadWeights<'a, B> = Head<&'a <B as Backend>::Tensor, <B as Backend>::Weight<'a>>;
pub type HeadGrads<'a, T> = Head<&'a mut T, &'a mut T>;

/// A part's named parameters, taken out of its table: norms' weights and biases through
/// `norm`, projections' through `product`.
trait Named<N, P>: Sized {
    fn take<I>(
        t: &mut Table<'_, I>,
        norm: impl Fn(I) -> N,
        product: impl Fn(I) -> P,
    ) -> Result<Self, ModelError>;
}

impl<N, P> Named<N, P> for Layer<N, P> {
    fn take<I>(
        t: &mut Table<'_, I>,
        norm: impl Fn(I) -> N,
        product: impl Fn(I) -> P,
    ) -> Result<Self, ModelError> {
        use layer::*;
        let mut p = |name| t.take(name).map(&product);
        let (q, k, v, o) = (p(Q)?, p(K)?, p(V)?, p(O)?);
        let (gate, up, down) = (p(GATE)?, p(UP)?, p(DOWN)?);
        let biases = [Q_BIAS, K_BIAS, V_BIAS].map(|name| t.take_if_listed(name));
        let qkv_bias = match biases {
            [Ok(Some(q)), Ok(Some(k)), Ok(Some(v))] => Some([norm(q), norm(k), norm(v)]),
            [Ok(None), Ok(None), Ok(None)] => None,
            _ => {
                return Err(ModelError::NotInInventory {
                    part: t.id.kind(),
                    name: "self_attn.{q,k,v}_proj.bias (all three or none)",
                });
            }
        };
        Ok(Layer {
            input_norm: norm(t.take(INPUT_NORM)?),
            q,
            k,
            v,
            o,
            post_norm: norm(t.take(POST_NORM)?),
            gate,
            up,
            down,
            qkv_bias,
        })
    }
}

impl<N, P> Named<N, P> for Head<N, P> {
    fn take<I>(
        t: &mut Table<'_, I>,
        norm: impl Fn(I) -> N,
        product: impl Fn(I) -> P,
    ) -> Result<Self, ModelError> {
        Ok(Head {
            norm: norm(t.take(head::NORM)?),
            lm_head: product(t.take(head::LM_HEAD)?),
        })
    }
}

/// Each weight of a part with its products' view.
type WeightTable<'a, B> = Table<'a, (&'a <B as Backend>::Tensor, <B as Backend>::Weight<'a>)>;

/// Each weight with its products' view.
fn weight_table<'a, B: Backend>(
    be: &'a B,
    id: PartId,
    names: &'a [String],
    weights: &'a [B::Tensor],
) -> ModelResult<B, WeightTable<'a, B>> {
    let products = be.product_weights(weights)?;
    Ok(Table::new(id, names, weights.iter().zip(products)))
}

fn weight<T, W>((t, _): (T, W)) -> T {
    t
}

fn product<T, W>((_, w): (T, W)) -> W {
    w
}

fn same<I>(i: I) -> I {
    i
}

/// A part's weights as `S` (a [`Layer`] or a [`Head`] of weights), for its forward.
fn weights_of<'a, B: Backend, S>(be: &'a B, p: &'a PartParams<B::Tensor>) -> ModelResult<B, S>
where
    B::Error: From<ModelError>,
    S: Named<&'a B::Tensor, B::Weight<'a>>,
{
    let mut t = weight_table(be, p.id, &p.names, &p.weights)?;
    Ok(S::take(&mut t, weight, product)?)
}

/// A part's weights as `S` and its gradients as `G`, for its backward.
fn params_of<'a, B: Backend, S, G>(
    be: &'a B,
    p: &'a mut PartParams<B::Tensor>,
) -> ModelResult<B, (S, G)>
where
    B::Error: From<ModelError>,
    S: Named<&'a B::Tensor, B::Weight<'a>>,
    G: Named<&'a mut B::Tensor, &'a mut B::Tensor>,
{
    let PartParams {
        id,
        names,
        weights,
        grads,
    } = p;
    let names: &[String] = names;
    let w = S::take(&mut weight_table(be, *id, names, weights)?, weight, product)?;
    let mut g = Table::new(*id, names, grads.iter_mut());
    Ok((w, G::take(&mut g, same, same)?))
}

/// A layer's weights, for its forward.
pub fn layer_weights<'a, B: Backend>(
    be: &'a B,
    p: &'a PartParams<B::Tensor>,
) -> ModelResult<B, LayerWeights<'a, B>>
where
    B::Error: From<ModelError>,
{
    weights_of(be, p)
}

/// A layer's weights and its gradients, for its backward.
pub fn layer_params<'a, B: Backend>(
    be: &'a B,
    p: &'a mut PartParams<B::Tensor>,
) -> ModelResult<B, (LayerWeights<'a, B>, LayerGrads<'a, B::Tensor>)>
where
    B::Error: From<ModelError>,
{
    params_of(be, p)
}

/// The head's weights, for its forward.
pub fn head_weights<'a, B: Backend>(
    be: &'a B,
    p: &'a PartParams<B::Tensor>,
) -> ModelResult<B, HeadWeights<'a, B>>
where
    B::Error: From<ModelError>,
{
    weights_of(be, p)
}

/// The head's weights and its gradients, for its backward.
pub fn head_params<'a, B: Backend>(
    be: &'a B,
    p: &'a mut PartParams<B::Tensor>,
) -> ModelResult<B, (HeadWeights<'a, B>, HeadGrads<'a, B::Tensor>)>
where
    B::Error: From<ModelError>,
{
    params_of(be, p)
}

/// The embedding's table.
pub fn embedding_table<T>(p: &PartParams<T>) -> Result<&T, ModelError> {
    Table::new(p.id, &p.names, &p.weights).take(head::EMBED_TOKENS)
}

/// The embedding table's gradient.
pub fn embedding_grad<T>(p: &mut PartParams<T>) -> Result<&mut T, ModelError> {
    Table::new(p.id, &p.names, p.grads.iter_mut()).take(head::EMBED_TOKENS)
}
