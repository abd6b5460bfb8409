"""Public configurations of the Stable Diffusion families' denoisers and text encoders.

The values of each model's ``unet/config.json`` (``transformer/config.json`` for SD3 and FLUX) and
``text_encoder*/config.json`` on the Hugging Face hub (diffusers / transformers keyword arguments), so
that full-size architectures can be built with random or empty weights where no checkpoint can be
downloaded: architecture tests on the meta device and the closed-form benchmark (``make bench``).
"""

from __future__ import annotations

# ------------------------------------------------------------------ UNet configs (unet/config.json)

_COMMON_UNET = dict(
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
)

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5 (same UNet as CompVis/stable-diffusion-v1-4)
    _COMMON_UNET,
    sample_size=64,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    attention_head_dim=8,
)

SD21_UNET = dict(  # stabilityai/stable-diffusion-2-1
    SD15_UNET,
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
    upcast_attention=True,
)

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0
    _COMMON_UNET,
    sample_size=128,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280],
    transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048,
    attention_head_dim=[5, 10, 20],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 * 256 time ids
)

# ------------------------------------------------------------------ MMDiT configs (transformer/config.json)

SD3_MEDIUM_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3-medium-diffusers (SD3Transformer2DModel)
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,  # CLIP-L + CLIP-G token states (768 + 1280, zero-padded) and T5-XXL's
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # CLIP-L + CLIP-G pooled
    pos_embed_max_size=192,
)

FLUX1_DEV_TRANSFORMER = dict(  # black-forest-labs/FLUX.1-dev (FluxTransformer2DModel)
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,  # T5-XXL token states
    pooled_projection_dim=768,  # CLIP-L pooled
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# ------------------------------------------------------------------ text encoder configs

_COMMON_TEXT = dict(
    vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1
)

CLIP_VIT_L_TEXT = dict(  # OpenAI CLIP ViT-L/14: SD 1.x text_encoder, SDXL text_encoder
    _COMMON_TEXT,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)

OPENCLIP_VIT_H_TEXT = dict(  # OpenCLIP ViT-H/14 as shipped in SD 2.x (last of 24 blocks dropped)
    _COMMON_TEXT,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)

OPENCLIP_BIGG_TEXT = dict(  # OpenCLIP ViT-bigG/14: SDXL text_encoder_2 (with projection)
    _COMMON_TEXT,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)

T5_XXL_TEXT = dict(  # google/t5-v1_1-xxl encoder: SD3 text_encoder_3, FLUX text_encoder_2 (T5EncoderModel)
    vocab_size=32128,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
)
