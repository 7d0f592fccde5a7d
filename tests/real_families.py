"""More real-model families for the coverage corpus (issue 18, the rest): Hugging Face transformers
and timm models that exercise issue 18's categories, registered into ``real_models.CASES`` by
:func:`register` (``real_models`` calls it; this module imports nothing from it, so the corpus is
one module object however the tests import it). Tiny random configs, no downloads.

x-transformers and vit-pytorch are not installed here (nor is einops); their attention is
reproduced by hand in ``real_models`` (``xtransformers-*``, ``vit-pytorch-grouped``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def register(R: Any) -> None:
    """Add this module's cases to ``R.CASES`` (``R``: the ``real_models`` module)."""
    case, _hf, TupleModel = R.case, R._hf, R.TupleModel

    def text(cls_name, cfg_name, cfg, layers, *, padded=False, left=False, extra_names=(), extra_inputs=()):
        def build(train: bool = False, dropout: float = 0.0):
            import transformers
            config = getattr(transformers, cfg_name)(**cfg)
            model = _hf(getattr(transformers, cls_name), config, train, dropout)
            ids = R.input_ids(vocab=config.vocab_size)
            names, inputs = ["input_ids"], [ids]
            if padded:
                names.append("attention_mask")
                inputs.append(R.padding_mask(left=left))
            return (TupleModel(model, names + list(extra_names), ("last_hidden_state",)),
                    tuple(inputs) + tuple(extra_inputs), layers(config))
        return build

    small = dict(R._SMALL)
    n_layers = lambda c: c.num_hidden_layers  # noqa: E731

    # ---- decoders: multi-query, qk-norm, parallel blocks (transformers)
    case("gpt_bigcode-padded", variant="causal+padded, multi-query (one K/V head)")(
        text("GPTBigCodeModel", "GPTBigCodeConfig",
             dict(vocab_size=R.VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True),
             lambda c: c.n_layer, padded=True, left=True))
    case("qwen3-padded", variant="causal+padded, q/k RMS norm, GQA")(
        text("Qwen3Model", "Qwen3Config", dict(small, num_key_value_heads=2, head_dim=8), n_layers,
             padded=True, left=True))
    case("starcoder2-padded", variant="causal+padded, sliding window, GQA")(
        text("Starcoder2Model", "Starcoder2Config", dict(small, num_key_value_heads=2, sliding_window=5),
             n_layers, padded=True, left=True))
    case("cohere-causal", variant="causal, parallel block, GQA")(
        text("CohereModel", "CohereConfig", dict(small, num_key_value_heads=2), n_layers))

    # category 11b: Hugging Face 5.x builds the mask from position_ids (packed sequences)
    packed = torch.cat([torch.arange(5), torch.arange(R.SEQ - 5)])
    case("llama-packed", variant="packed sequences via position_ids (mask from input values)")(
        text("LlamaModel", "LlamaConfig", dict(small, num_key_value_heads=2), n_layers,
             extra_names=("position_ids",), extra_inputs=(torch.stack([packed, torch.arange(R.SEQ)]),)))

    # category 10: a static KV cache (20 slots, 12 filled) with its 4-D mask passed in, as
    # generate(..., cache_implementation="static") builds it outside the compiled forward
    case("llama-static-cache", variant="static KV cache, 4-D mask as a graph input, left padding",
         train=False)(lambda train=False, dropout=0.0: _static_cache(R, train, dropout))

    # ---- encoders with relative attention (category 12: disentangled c2p/p2c terms)
    case("deberta-v2-padded", variant="padded, disentangled relative attention (c2p+p2c)")(
        text("DebertaV2Model", "DebertaV2Config",
             dict(vocab_size=R.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, relative_attention=True,
                  pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16),
             n_layers, padded=True))
    case("electra-padded", variant="padded")(
        text("ElectraModel", "ElectraConfig",
             dict(vocab_size=R.VOCAB, embedding_size=16, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
             n_layers, padded=True))

    # ---- vision (transformers)
    def vision(cls_name, cfg_name, cfg, sites):
        def build(train: bool = False, dropout: float = 0.0):
            import transformers
            config = getattr(transformers, cfg_name)(**cfg)
            model = _hf(getattr(transformers, cls_name), config, train, dropout)
            return TupleModel(model, ("pixel_values",), ("last_hidden_state",)), (R._pixels(),), sites(config)
        return build

    case("swinv2", variant="vision (cosine attention, log-spaced CPB bias, windows)")(
        vision("Swinv2Model", "Swinv2Config", dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2],
                                                   num_heads=[2, 4], window_size=4, mlp_ratio=2.0),
               lambda c: sum(c.depths)))
    # ViTDet's attention applies no dropout to its probabilities
    case("vitdet", variant="vision (decomposed 2-D rel. pos. through a view)", attn_dropout=False)(
        vision("VitDetModel", "VitDetConfig", dict(image_size=32, pretrain_image_size=32, patch_size=8,
                                                   hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   mlp_ratio=2, use_relative_position_embeddings=True),
               n_layers))
    case("dinov2", variant="vision")(
        vision("Dinov2Model", "Dinov2Config", dict(image_size=32, patch_size=8, hidden_size=32,
                                                   num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2),
               n_layers))
    case("beit", variant="vision (relative position bias table, class token)")(
        vision("BeitModel", "BeitConfig", dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               use_relative_position_bias=True), n_layers))

    # ---- timm
    def timm_case(name, model_name, sites, variant, **kw):
        case(name, library="timm", variant=variant)(R._timm(model_name, lambda _kw: sites, **kw))

    timm_case("timm-beit", "beit_base_patch16_224", 2, "vision (rel. pos. bias incl. class token)",
              img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    timm_case("timm-cait", "cait_xxs24_224", 3, "vision (talking heads; class attention)",
              img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, depth_token_only=1)
    timm_case("timm-xcit", "xcit_nano_12_p16_224", 3, "vision (cross-covariance attention; class attention)",
              img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4, cls_attn_layers=1)
    def timm_wrapped(name, model_name, sites, variant, wrap, size=32, **kw):
        base = R._timm(model_name, lambda _kw: sites, **kw)

        def build(train: bool = False, dropout: float = 0.0):
            plain, _, n = base(train, dropout)
            return wrap(plain.model), (R._pixels(size),), n
        case(name, library="timm", variant=variant)(build)

    # 64 px: every stage's spatial reduction still leaves 4 keys (at 32 px each attention has 1 key)
    timm_wrapped("timm-pvt_v2", "pvt_v2_b0", 4, "vision (spatial-reduction attention: K/V from fewer tokens)",
                 lambda m: R._Plain(m), size=64,
                 depths=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2))
    timm_case("timm-eva", "eva02_tiny_patch14_224", 2, "vision (rotary, SwiGLU)",
              img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4)
    # forward_head runs the MAP attention-pool head (a learned query over the tokens)
    timm_wrapped("timm-vit-map", "vit_base_patch16_siglip_224", 3, "vision (attention-pool head: a learned query)",
                 _Pooled, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, global_pool="map")
    timm_case("timm-convit", "convit_tiny", 2, "vision (gated positional self-attention)",
              img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, local_up_to_layer=1)


class _Pooled(nn.Module):
    """A timm model's features and its pooling head (``forward_head``, no classifier)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return (self.model.forward_head(self.model.forward_features(x)),)


class _StaticCacheLlama(nn.Module):
    """LLaMA prefill into a fresh ``StaticCache`` of ``max_len`` slots, the 4-D float mask given."""

    def __init__(self, model, config, max_len: int):
        super().__init__()
        self.model, self.config, self.max_len = model, config, max_len

    def forward(self, ids, mask):
        import transformers
        cache = transformers.StaticCache(config=self.config, max_cache_len=self.max_len)
        out = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache,
                         cache_position=torch.arange(ids.shape[1]), use_cache=True)
        return (out.last_hidden_state,)


def _static_cache(R: Any, train: bool = False, dropout: float = 0.0):
    import transformers
    config = transformers.LlamaConfig(**dict(R._SMALL, num_key_value_heads=2))
    model = R._hf(transformers.LlamaModel, config, train, dropout)
    max_len, ids = 20, R.input_ids()
    pad = R.padding_mask(left=True).bool()                                   # (B, L), left padding
    filled = torch.cat([pad, torch.zeros(R.B, max_len - R.SEQ, dtype=torch.bool)], 1)
    keep = (torch.arange(max_len)[None, :] <= torch.arange(R.SEQ)[:, None])[None] & filled[:, None, :]
    mask = torch.zeros(R.B, 1, R.SEQ, max_len).masked_fill(~keep[:, None], torch.finfo(torch.float32).min)
    return _StaticCacheLlama(model, config, max_len), (ids, mask), config.num_hidden_layers
