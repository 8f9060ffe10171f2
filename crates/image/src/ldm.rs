//! Single-file Stable Diffusion 1.x checkpoints in the original (CompVis
//! "LDM") layout — what most downloads are — read as the diffusers
//! components the rest of the crate loads: each tensor name is rewritten
//! to its diffusers name (`model.diffusion_model.…` → the UNet,
//! `first_stage_model.…` → the VAE, `cond_stage_model.transformer.…` →
//! the CLIP text encoder), and the configs are SD 1.x's.

/// Which component a tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Unet,
    Vae,
    TextEncoder,
}

/// The layout of a checkpoint's UNet, read off its tensor names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// ResNet blocks per level of the down path (2 for SD).
    pub layers: usize,
    /// Levels of the VAE decoder (4 for SD).
    pub vae_levels: usize,
}

impl Layout {
    /// From every tensor name of the file: the first downsampler's input
    /// block gives the UNet's blocks per level; the VAE's up levels are
    /// counted.
    pub fn of<'a>(names: impl Iterator<Item = &'a str> + Clone) -> Option<Self> {
        let first_down = names
            .clone()
            .filter_map(|n| {
                let r = n.strip_prefix("model.diffusion_model.input_blocks.")?;
                let (i, rest) = r.split_once('.')?;
                rest.starts_with("0.op.").then(|| i.parse::<usize>().ok())?
            })
            .min()?;
        let vae_levels = names
            .filter_map(|n| {
                let r = n.strip_prefix("first_stage_model.decoder.up.")?;
                r.split_once('.')?.0.parse::<usize>().ok()
            })
            .max()
            .map_or(0, |m| m + 1);
        (first_down >= 2).then_some(Self {
            layers: first_down - 1,
            vae_levels,
        })
    }
}

fn resnet(rest: &str) -> String {
    for (old, new) in [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
        ("nin_shortcut.", "conv_shortcut."),
    ] {
        if let Some(r) = rest.strip_prefix(old) {
            return format!("{new}{r}");
        }
    }
    rest.to_string()
}

fn vae_attention(rest: &str) -> String {
    for (old, new) in [
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ] {
        if let Some(r) = rest.strip_prefix(old) {
            return format!("{new}{r}");
        }
    }
    rest.to_string()
}

/// `a.b.rest` → (a as a number, b as a number, rest).
fn two_indices(s: &str) -> Option<(usize, usize, &str)> {
    let (i, r) = s.split_once('.')?;
    let (j, rest) = r.split_once('.')?;
    Some((i.parse().ok()?, j.parse().ok()?, rest))
}

fn unet(n: &str, l: usize) -> Option<String> {
    let per = l + 1;
    Some(if let Some(r) = n.strip_prefix("time_embed.0.") {
        format!("time_embedding.linear_1.{r}")
    } else if let Some(r) = n.strip_prefix("time_embed.2.") {
        format!("time_embedding.linear_2.{r}")
    } else if let Some(r) = n.strip_prefix("input_blocks.0.0.") {
        format!("conv_in.{r}")
    } else if let Some(r) = n.strip_prefix("out.0.") {
        format!("conv_norm_out.{r}")
    } else if let Some(r) = n.strip_prefix("out.2.") {
        format!("conv_out.{r}")
    } else if let Some(r) = n.strip_prefix("input_blocks.") {
        let (i, j, rest) = two_indices(r)?;
        let (b, k) = ((i.checked_sub(1)?) / per, (i - 1) % per);
        match (j, rest.strip_prefix("op.")) {
            (0, Some(op)) => format!("down_blocks.{b}.downsamplers.0.conv.{op}"),
            (0, None) => format!("down_blocks.{b}.resnets.{k}.{}", resnet(rest)),
            (1, _) => format!("down_blocks.{b}.attentions.{k}.{rest}"),
            _ => return None,
        }
    } else if let Some(r) = n.strip_prefix("middle_block.") {
        let (j, rest) = r.split_once('.')?;
        match j {
            "0" => format!("mid_block.resnets.0.{}", resnet(rest)),
            "1" => format!("mid_block.attentions.0.{rest}"),
            "2" => format!("mid_block.resnets.1.{}", resnet(rest)),
            _ => return None,
        }
    } else if let Some(r) = n.strip_prefix("output_blocks.") {
        let (i, j, rest) = two_indices(r)?;
        let (b, k) = (i / per, i % per);
        match (j, rest.strip_prefix("conv.")) {
            (0, _) => format!("up_blocks.{b}.resnets.{k}.{}", resnet(rest)),
            (1 | 2, Some(c)) => format!("up_blocks.{b}.upsamplers.0.conv.{c}"),
            (1, None) => format!("up_blocks.{b}.attentions.{k}.{rest}"),
            _ => return None,
        }
    } else {
        return None;
    })
}

fn vae(n: &str, levels: usize) -> Option<String> {
    if n.starts_with("post_quant_conv.") || n.starts_with("quant_conv.") {
        return Some(n.to_string());
    }
    let d = n.strip_prefix("decoder.")?;
    Some(if let Some(r) = d.strip_prefix("norm_out.") {
        format!("decoder.conv_norm_out.{r}")
    } else if d.starts_with("conv_in.") || d.starts_with("conv_out.") {
        n.to_string()
    } else if let Some(r) = d.strip_prefix("mid.block_1.") {
        format!("decoder.mid_block.resnets.0.{}", resnet(r))
    } else if let Some(r) = d.strip_prefix("mid.block_2.") {
        format!("decoder.mid_block.resnets.1.{}", resnet(r))
    } else if let Some(r) = d.strip_prefix("mid.attn_1.") {
        format!("decoder.mid_block.attentions.0.{}", vae_attention(r))
    } else if let Some(r) = d.strip_prefix("up.") {
        let (i, rest) = r.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let b = levels.checked_sub(i + 1)?;
        if let Some(r) = rest.strip_prefix("upsample.conv.") {
            format!("decoder.up_blocks.{b}.upsamplers.0.conv.{r}")
        } else {
            let r = rest.strip_prefix("block.")?;
            let (l, rest) = r.split_once('.')?;
            format!("decoder.up_blocks.{b}.resnets.{l}.{}", resnet(rest))
        }
    } else {
        return None;
    })
}

/// The component and diffusers name of checkpoint tensor `name`, or `None`
/// for tensors no component reads (the VAE encoder, EMA copies, …).
pub fn rename(name: &str, layout: Layout) -> Option<(Part, String)> {
    if let Some(r) = name.strip_prefix("model.diffusion_model.") {
        return unet(r, layout.layers).map(|n| (Part::Unet, n));
    }
    if let Some(r) = name.strip_prefix("first_stage_model.") {
        return vae(r, layout.vae_levels).map(|n| (Part::Vae, n));
    }
    if let Some(r) = name.strip_prefix("cond_stage_model.transformer.") {
        let r = if r.starts_with("text_model.") {
            r.to_string()
        } else {
            format!("text_model.{r}")
        };
        return Some((Part::TextEncoder, r));
    }
    None
}

/// The component configs a single file does not carry.
#[derive(Clone, Debug)]
pub struct Configs {
    pub unet: serde_json::Value,
    pub vae: serde_json::Value,
    pub text: serde_json::Value,
}

impl Default for Configs {
    /// Stable Diffusion 1.x's (what diffusers' `from_single_file` assumes
    /// for these checkpoints).
    fn default() -> Self {
        Self {
            unet: serde_json::json!({"attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
                "flip_sin_to_cos": true, "freq_shift": 0, "sample_size": 64}),
            vae: serde_json::json!({"norm_num_groups": 32, "scaling_factor": 0.18215}),
            text: serde_json::json!({"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_names_map_to_diffusers() {
        let l = Layout {
            layers: 2,
            vae_levels: 4,
        };
        let cases = [
            (
                "model.diffusion_model.time_embed.0.weight",
                "time_embedding.linear_1.weight",
            ),
            (
                "model.diffusion_model.input_blocks.0.0.bias",
                "conv_in.bias",
            ),
            (
                "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
                "down_blocks.0.resnets.0.conv1.weight",
            ),
            (
                "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "model.diffusion_model.input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "model.diffusion_model.input_blocks.11.0.emb_layers.1.bias",
                "down_blocks.3.resnets.1.time_emb_proj.bias",
            ),
            (
                "model.diffusion_model.middle_block.1.proj_in.weight",
                "mid_block.attentions.0.proj_in.weight",
            ),
            (
                "model.diffusion_model.middle_block.2.out_layers.3.weight",
                "mid_block.resnets.1.conv2.weight",
            ),
            (
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "model.diffusion_model.output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "model.diffusion_model.output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            (
                "model.diffusion_model.output_blocks.9.0.out_layers.0.weight",
                "up_blocks.3.resnets.0.norm2.weight",
            ),
            ("model.diffusion_model.out.2.weight", "conv_out.weight"),
        ];
        for (ldm, want) in cases {
            assert_eq!(
                rename(ldm, l),
                Some((Part::Unet, want.to_string())),
                "{ldm}"
            );
        }
        let vae = [
            (
                "first_stage_model.decoder.up.3.block.0.nin_shortcut.weight",
                None,
            ),
            (
                "first_stage_model.decoder.up.0.block.2.conv1.weight",
                Some("decoder.up_blocks.3.resnets.2.conv1.weight"),
            ),
            (
                "first_stage_model.decoder.up.3.upsample.conv.bias",
                Some("decoder.up_blocks.0.upsamplers.0.conv.bias"),
            ),
            (
                "first_stage_model.decoder.mid.attn_1.proj_out.weight",
                Some("decoder.mid_block.attentions.0.to_out.0.weight"),
            ),
            (
                "first_stage_model.decoder.norm_out.weight",
                Some("decoder.conv_norm_out.weight"),
            ),
            (
                "first_stage_model.post_quant_conv.weight",
                Some("post_quant_conv.weight"),
            ),
        ];
        for (ldm, want) in vae {
            let want = want.unwrap_or("decoder.up_blocks.0.resnets.0.conv_shortcut.weight");
            assert_eq!(rename(ldm, l), Some((Part::Vae, want.to_string())), "{ldm}");
        }
        assert_eq!(
            rename(
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                l
            ),
            Some((
                Part::TextEncoder,
                "text_model.final_layer_norm.weight".into()
            ))
        );
        assert_eq!(rename("first_stage_model.encoder.conv_in.weight", l), None);
        assert_eq!(rename("model_ema.decay", l), None);
        let names = [
            "model.diffusion_model.input_blocks.3.0.op.weight",
            "model.diffusion_model.input_blocks.6.0.op.weight",
            "first_stage_model.decoder.up.3.block.0.conv1.weight",
        ];
        assert_eq!(Layout::of(names.iter().copied()), Some(l));
    }
}
