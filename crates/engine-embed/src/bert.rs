//! A BERT encoder for sentence embeddings, on candle's tensors. It follows candle-transformers'
//! `bert` model (MIT OR Apache-2.0) and Hugging Face's `BertModel`, with what its CPU profile
//! showed: the exact GELU through libm's scalar `erff` took ~16 % of an encode, now a
//! branch-free rational `erf` the compiler vectorizes; the query, key and value projections are
//! one matrix product instead of three; softmax is candle's fused last-dimension kernel. Only
//! what sentence embeddings need: no pooler, no dropout, token type 0 for every token.

use candle_core::{
    CpuStorage, CustomOp1, D, DType, Device, Layout, Module, Result, Shape, Tensor, bail,
};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

/// The fields of a Hugging Face BERT `config.json` the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Config {
    pub(crate) vocab_size: usize,
    pub(crate) hidden_size: usize,
    pub(crate) num_hidden_layers: usize,
    pub(crate) num_attention_heads: usize,
    pub(crate) intermediate_size: usize,
    #[serde(default = "gelu")]
    pub(crate) hidden_act: String,
    pub(crate) max_position_embeddings: usize,
    #[serde(default = "two")]
    pub(crate) type_vocab_size: usize,
    #[serde(default = "eps")]
    pub(crate) layer_norm_eps: f64,
    #[serde(default)]
    pub(crate) position_embedding_type: Option<String>,
    #[serde(default)]
    pub(crate) model_type: Option<String>,
}

fn gelu() -> String {
    "gelu".into()
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}

impl Config {
    /// Refuses what this encoder does not implement, naming it.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        // RoBERTa-style models share BERT's tensor names but number positions from an offset.
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "bert") {
            return Err(format!("model type `{t}` is not supported (only `bert`)"));
        }
        if self.hidden_act != "gelu" {
            return Err(format!(
                "activation `{}` is not supported (only `gelu`)",
                self.hidden_act
            ));
        }
        if let Some(p) = self
            .position_embedding_type
            .as_deref()
            .filter(|p| *p != "absolute")
        {
            return Err(format!("position embeddings `{p}` are not supported"));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "{} attention heads do not divide the hidden size {}",
                self.num_attention_heads, self.hidden_size
            ));
        }
        if self.type_vocab_size == 0 {
            return Err("no token type embeddings".into());
        }
        Ok(())
    }
}

/// A linear layer whose weight is kept transposed, `(inputs, outputs)` row-major. gemm computes
/// a row-major product as its transpose, so this weight is then already in the column-major
/// form its kernel reads; kept as Hugging Face stores it, gemm repacked the whole weight on
/// every product (a third of the CPU for single texts, in a profile).
struct Dense {
    weight_t: Tensor,
    bias: Tensor,
}

impl Dense {
    fn new(weight: &Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    /// `(batch, tokens, inputs)` → `(batch, tokens, outputs)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, tokens, inputs) = x.dims3()?;
        let outputs = self.weight_t.dim(1)?;
        x.reshape((batch * tokens, inputs))?
            .matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?
            .reshape((batch, tokens, outputs))
    }
}

struct Layer {
    /// Query, key and value in one product: `hidden` → `3 × hidden`.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: LayerNorm,
    up: Dense,
    down: Dense,
    out_norm: LayerNorm,
}

pub(crate) struct Bert {
    words: Embedding,
    positions: Embedding,
    /// Token type 0's embedding, added to every token.
    token_type: Tensor,
    norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    device: Device,
}

fn linear(vb: &VarBuilder, inputs: usize, outputs: usize) -> Result<(Tensor, Tensor)> {
    Ok((
        vb.get((outputs, inputs), "weight")?,
        vb.get(outputs, "bias")?,
    ))
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        eps,
    ))
}

impl Bert {
    /// Loads Hugging Face BERT weights (`embeddings.*`, `encoder.layer.N.*`, optionally under
    /// `bert.`).
    pub(crate) fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let words = Embedding::new(emb.get((cfg.vocab_size, h), "word_embeddings.weight")?, h);
        let positions = Embedding::new(
            emb.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            h,
        );
        let token_type = emb
            .get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?
            .get(0)?;
        let norm = layer_norm(emb.pp("LayerNorm"), h, cfg.layer_norm_eps)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let att = l.pp("attention");
                let (q, qb) = linear(&att.pp("self.query"), h, h)?;
                let (k, kb) = linear(&att.pp("self.key"), h, h)?;
                let (v, vb_) = linear(&att.pp("self.value"), h, h)?;
                let qkv = Dense::new(
                    &Tensor::cat(&[q, k, v], 0)?,
                    Tensor::cat(&[qb, kb, vb_], 0)?,
                )?;
                let (w, b) = linear(&att.pp("output.dense"), h, h)?;
                let (uw, ub) = linear(&l.pp("intermediate.dense"), h, cfg.intermediate_size)?;
                let (dw, db) = linear(&l.pp("output.dense"), cfg.intermediate_size, h)?;
                Ok(Layer {
                    qkv,
                    attention_out: Dense::new(&w, b)?,
                    attention_norm: layer_norm(att.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
                    up: Dense::new(&uw, ub)?,
                    down: Dense::new(&dw, db)?,
                    out_norm: layer_norm(l.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            words,
            positions,
            token_type,
            norm,
            layers,
            heads: cfg.num_attention_heads,
            hidden: h,
            device: vb.device().clone(),
        })
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// The last hidden states `(batch, tokens, hidden)` of token ids `(batch, tokens)`, where
    /// `mask` (same shape) is 1 for a text's tokens and 0 for padding.
    pub(crate) fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, tokens) = ids.dims2()?;
        let positions = Tensor::arange(0u32, tokens as u32, &self.device)?;
        let x = self
            .words
            .forward(ids)?
            .broadcast_add(&self.positions.forward(&positions)?)?
            .broadcast_add(&self.token_type)?;
        let mut x = self.norm.forward(&x)?;
        // 0 where a token may be attended to, f32::MIN on padding (as Hugging Face does).
        let bias = mask
            .to_dtype(DType::F32)?
            .affine(f64::from(f32::MAX), f64::from(f32::MIN))?
            .reshape((batch, 1, 1, tokens))?;
        for layer in &self.layers {
            x = self.layer(layer, &x, &bias)?;
        }
        Ok(x)
    }

    fn layer(&self, l: &Layer, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (batch, tokens, hidden) = x.dims3()?;
        let head = hidden / self.heads;
        let qkv = l.qkv.forward(x)?;
        // (batch, tokens, hidden) → (batch, heads, tokens, head)
        let split = |i: usize| {
            qkv.narrow(D::Minus1, i * hidden, hidden)?
                .reshape((batch, tokens, self.heads, head))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? / (head as f64).sqrt())?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((
            batch,
            tokens,
            self.hidden,
        ))?;
        let x = l
            .attention_norm
            .forward(&(l.attention_out.forward(&context)? + x)?)?;
        let up = l.up.forward(&x)?.apply_op1_no_bwd(&Gelu)?;
        l.out_norm.forward(&(l.down.forward(&up)? + &x)?)
    }
}

/// erf on f32 without branches, so a loop of it vectorizes: the rational approximation on
/// [-4, 4] (erf is ±1 in f32 beyond) that Eigen and XLA use for float. Within 2e-6 of
/// candle's exact `gelu_erf`, relative to max(1, |gelu|) (tested).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    x * p / q
}

/// GELU, exact form: x · ½ · (1 + erf(x / √2)), as BERT's `gelu` activation.
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf-rational"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("gelu: the input must be contiguous");
        };
        let xs = &storage.as_slice::<f32>()?[start..end];
        let ys: Vec<f32> = xs
            .iter()
            .map(|&x| 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)))
            .collect();
        Ok((CpuStorage::F32(ys), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn gelu_agrees_with_the_exact_one() {
        let xs: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 / 1000.0).collect();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let ours = t.apply_op1_no_bwd(&Gelu).unwrap().to_vec1::<f32>().unwrap();
        let exact = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        let worst = ours
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(worst < 2e-6, "largest difference {worst}");
        // Far out, GELU is the identity on the right and 0 on the left.
        assert!((ours[ours.len() - 1] - 12.0).abs() < 1e-5);
        assert!(ours[0].abs() < 1e-5);
        assert!((ours[12_000]).abs() < 1e-12, "gelu(0) = {}", ours[12_000]);
    }

    #[test]
    fn unsupported_configurations_are_named() {
        let cfg: Config = serde_json::from_str(
            r#"{"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                "num_attention_heads": 3, "intermediate_size": 16,
                "max_position_embeddings": 4, "hidden_act": "gelu"}"#,
        )
        .unwrap();
        assert!(cfg.check().unwrap_err().contains("3 attention heads"));
        let tanh = Config {
            num_attention_heads: 2,
            hidden_act: "gelu_new".into(),
            ..cfg.clone()
        };
        assert!(tanh.check().unwrap_err().contains("gelu_new"));
        let roberta = Config {
            num_attention_heads: 2,
            model_type: Some("roberta".into()),
            ..cfg.clone()
        };
        assert!(roberta.check().unwrap_err().contains("roberta"));
        let ok = Config {
            num_attention_heads: 2,
            ..cfg
        };
        assert!(ok.check().is_ok());
    }
}
