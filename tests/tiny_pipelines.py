"""Tiny diffusers pipeline folders built from local components (no hub): seeded tiny transformers, VAEs and text
encoders, and tokenizers built with `tokenizers` (byte-level, no merges: every byte one token), saved with
save_pretrained. Used by the tests of `edit`, `encode`, `build --model PIPELINE_DIR`, LoRA and refit."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]


def _alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def bpe_vocab(word_ends: bool = False) -> dict:
    """Byte-level symbols (every byte one token: BPE without merges), then the special tokens; with word_ends also
    each symbol with CLIP's end-of-word suffix."""
    symbols = _alphabet()
    if word_ends:
        symbols += [s + "</w>" for s in _alphabet()]
    return {s: i for i, s in enumerate(symbols + SPECIALS)}


def clip_tokenizer():
    import transformers

    return transformers.CLIPTokenizer(vocab=bpe_vocab(word_ends=True), merges=[], model_max_length=77)


def t5_tokenizer():
    """A unigram over single characters (what T5's tokenizer class builds from a piece list)."""
    import string

    import transformers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def qwen_tokenizer(chat_template: str | None = None):
    import transformers

    vocab = bpe_vocab()
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    if chat_template:
        tok.chat_template = chat_template
    return tok


def _seeded(seed, make):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make().eval()


# --- FLUX.1 Kontext ------------------------------------------------------------------------------------
def kontext_pipeline(folder, *, transformer=None, vae_blocks: int = 4):
    """FluxKontextPipeline with tiny-kontext's transformer (joint_attention_dim 32, pooled 16), a CLIP of width 16,
    a T5 of width 32 and an AutoencoderKL with 4 latent channels (vae_blocks blocks: 2 ** (vae_blocks - 1) pixels
    per latent)."""
    import diffusers
    import transformers

    from topi_export.models import build_builtin

    transformer = transformer if transformer is not None else build_builtin("tiny-kontext")
    v = len(bpe_vocab(word_ends=True))
    clip = _seeded(1, lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=513, eos_token_id=512, pad_token_id=512)))
    t5 = _seeded(2, lambda: transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=v, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1)))
    vae = _seeded(3, lambda: diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks, block_out_channels=(4,) * vae_blocks, layers_per_block=1,
        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1, scaling_factor=0.5))
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    from topi_export.models.flux_kontext import SCHEDULER

    pipe = diffusers.FluxKontextPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                                         text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
                                         transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


# --- FLUX.2 [klein] ------------------------------------------------------------------------------------
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def flux2_transformer(seed: int = 0, guidance_embeds: bool = False):
    """tiny-flux2's shape with the text width of the tiny Qwen3 (3 layers of 16 = 48)."""
    import diffusers

    from topi_export.models.flux2 import tiny_config

    return _seeded(seed, lambda: diffusers.Flux2Transformer2DModel(
        **dict(tiny_config(), joint_attention_dim=48, guidance_embeds=guidance_embeds)))


def flux2_vae():
    import diffusers

    return _seeded(4, lambda: diffusers.AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False))


def klein_pipeline(folder, *, transformer=None, is_distilled: bool = False):
    """Flux2KleinPipeline: a Qwen3 of width 16 with 28 layers (the pipeline stacks hidden states 9, 18 and 27)."""
    import diffusers
    import transformers

    from topi_export.models.flux2 import SCHEDULER

    v = len(bpe_vocab())
    qwen3 = _seeded(5, lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=v - len(SPECIALS))))
    pipe = diffusers.Flux2KleinPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER),
                                        vae=flux2_vae(), text_encoder=qwen3, tokenizer=qwen_tokenizer(QWEN3_TEMPLATE),
                                        transformer=transformer if transformer is not None else flux2_transformer(),
                                        is_distilled=is_distilled)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


# --- Qwen-Image-Edit-Plus ------------------------------------------------------------------------------
def qwen_transformer(seed: int = 0):
    import diffusers

    from topi_export.models.qwen_edit import tiny_config

    return _seeded(seed, lambda: diffusers.QwenImageTransformer2DModel(**tiny_config()))


def qwen_vae():
    import diffusers

    return _seeded(6, lambda: diffusers.AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4))


def qwen_edit_plus_pipeline(folder, *, transformer=None):
    """QwenImageEditPlusPipeline: a Qwen2.5-VL of width 32 (the transformer's joint_attention_dim) with a one-block
    vision tower, its processor (Qwen2-VL image processor + the byte tokenizer)."""
    import diffusers
    import transformers

    from topi_export.models.qwen_edit import SCHEDULER

    vocab = bpe_vocab()
    ids = {name: vocab[name] for name in SPECIALS}
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, window_size=56,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    encoder = _seeded(7, lambda: transformers.Qwen2_5_VLForConditionalGeneration(config))
    tok = qwen_tokenizer()
    pipe = diffusers.QwenImageEditPlusPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=qwen_vae(), text_encoder=encoder,
        tokenizer=tok, processor=None, transformer=transformer if transformer is not None else qwen_transformer())
    pipe.save_pretrained(folder, safe_serialization=True)
    # the processor is saved as its parts: transformers 5 cannot build a Qwen2VLProcessor without a video
    # processor, which needs torchvision (not installable beside the CPU torch here)
    folder = Path(folder)
    tok.save_pretrained(folder / "processor")
    transformers.Qwen2VLImageProcessor().save_pretrained(folder / "processor")
    index = json.loads((folder / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
