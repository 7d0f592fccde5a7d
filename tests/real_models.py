"""A corpus of real models (Hugging Face transformers, timm, diffusers) with tiny random sizes.

Shared by ``benchmarks/coverage.py`` (the whole corpus) and ``tests/test_real_models.py`` (a few fast
cases). Every model is built from its config class (no download; ``HF_HUB_OFFLINE=1``), with the
library's non-fused attention path (``attn_implementation="eager"``, timm's ``set_fused_attn(False)``,
diffusers' classic ``AttnProcessor``).

A case's ``build(train=False, dropout=0.0)`` returns ``(model, example_inputs, expected_sites)``:

- ``model`` takes positional tensors and returns a tuple of tensors (a thin wrapper turns the
  libraries' keyword arguments and output objects into that);
- ``example_inputs`` is a tuple of tensors;
- ``expected_sites`` is the number of attention computations one forward pass runs, from the
  config (layers x attention modules per layer), never from attnfuse's report.

``train=True`` puts the model in train mode; ``dropout`` is applied to every dropout probability of
the config (0.0 makes training deterministic, so gradients can be compared to eager).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn

B = 2          # batch
SEQ = 12       # text sequence length
VOCAB = 96


# --------------------------------------------------------------------------------------------- helpers

class TupleModel(nn.Module):
    """Calls ``model(**dict(zip(names, args)), **extra)`` and returns the named outputs as a tuple."""

    def __init__(self, model: nn.Module, names: Sequence[str], outputs: Sequence[str], extra: Optional[dict] = None):
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.outputs = tuple(outputs)
        self.extra = dict(extra or {})

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)), **self.extra)
        return tuple(getattr(out, k) if not isinstance(out, (tuple, list)) else out[i]
                     for i, k in enumerate(self.outputs))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def input_ids(seq: int = SEQ, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    # avoid token 0/1/2 (pad/bos/eos in several configs)
    return torch.randint(3, vocab, (B, seq), generator=_gen(seed))


def padding_mask(seq: int = SEQ, pad: Sequence[int] = (0, 3), left: bool = False) -> torch.Tensor:
    """(B, seq) int mask, 1 = keep; row i has ``pad[i]`` padded positions (right padding unless ``left``)."""
    m = torch.ones(B, seq, dtype=torch.long)
    for i, p in enumerate(pad[:B]):
        if p:
            if left:
                m[i, :p] = 0
            else:
                m[i, seq - p:] = 0
    return m


_DROPOUT_KEY = re.compile(r"(dropout|pdrop|drop_rate|drop_path|_prob$)")  # drop_path: stochastic depth


def set_dropout(config, p: float) -> None:
    """Set every float dropout probability of a (possibly nested) HF config to ``p``."""
    for key, val in list(vars(config).items()):
        if key.startswith("_"):
            continue
        if hasattr(val, "to_dict") and hasattr(val, "model_type"):  # a sub-config
            set_dropout(val, p)
        elif _DROPOUT_KEY.search(key) and isinstance(val, float) and not isinstance(val, bool):
            setattr(config, key, p)


def _hf(cls, config, train: bool, dropout: float, attn: str = "eager"):
    set_dropout(config, dropout)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation=attn) if attn else cls(config)
    model.train(train)
    return model


# --------------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    name: str
    library: str                      # transformers | timm | diffusers
    build: Callable                   # (train=False, dropout=0.0) -> (model, inputs, sites)
    variant: str = ""                 # "causal", "padded", "causal+padded", "cross", ...
    train: bool = True                # runs in train mode too (coverage --train)
    attn_dropout: bool = True         # the model applies dropout to its attention probabilities
    tags: List[str] = field(default_factory=list)


CASES: Dict[str, Case] = {}


def case(name: str, library: str = "transformers", variant: str = "", train: bool = True,
         attn_dropout: bool = True):
    def deco(fn):
        CASES[name] = Case(name, library, fn, variant, train, attn_dropout=attn_dropout)
        return fn
    return deco


# ---- decoder-only text models: causal, and causal with a padded batch (attention_mask with zeros)

def _decoder(cls_name: str, cfg_name: str, cfg: dict, layers_key: str = "num_hidden_layers"):
    def builder(padded: bool):
        def build(train: bool = False, dropout: float = 0.0):
            import transformers
            config = getattr(transformers, cfg_name)(**cfg)
            model = _hf(getattr(transformers, cls_name), config, train, dropout)
            ids = input_ids(vocab=config.vocab_size)
            if padded:
                # left padding (the usual batching for decoders); padded query rows see only masked
                # keys, which HF fills with finfo.min (a uniform row, not NaN).
                inputs = (ids, padding_mask(left=True))
                names = ("input_ids", "attention_mask")
            else:
                inputs, names = (ids,), ("input_ids",)
            return TupleModel(model, names, ("last_hidden_state",)), inputs, getattr(config, layers_key)
        return build
    return builder


_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)

_DECODERS = {
    "gpt2": ("GPT2Model", "GPT2Config",
             dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
             "n_layer"),
    "llama": ("LlamaModel", "LlamaConfig", dict(_SMALL, num_key_value_heads=2), "num_hidden_layers"),
    "mistral": ("MistralModel", "MistralConfig",
                dict(_SMALL, num_key_value_heads=2, sliding_window=5), "num_hidden_layers"),
    "qwen2": ("Qwen2Model", "Qwen2Config", dict(_SMALL, num_key_value_heads=2), "num_hidden_layers"),
    "gemma": ("GemmaModel", "GemmaConfig", dict(_SMALL, num_key_value_heads=1, head_dim=8), "num_hidden_layers"),
    "gemma2": ("Gemma2Model", "Gemma2Config",
               dict(_SMALL, num_key_value_heads=2, head_dim=8, sliding_window=5, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, query_pre_attn_scalar=8), "num_hidden_layers"),
    "phi": ("PhiModel", "PhiConfig", dict(_SMALL, partial_rotary_factor=0.5), "num_hidden_layers"),
    "gpt_neox": ("GPTNeoXModel", "GPTNeoXConfig", dict(_SMALL, rotary_pct=0.5), "num_hidden_layers"),
    "gptj": ("GPTJModel", "GPTJConfig",
             dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=1,
                  eos_token_id=2), "n_layer"),
    "opt": ("OPTModel", "OPTConfig",
            dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, word_embed_proj_dim=32), "num_hidden_layers"),
    "bloom": ("BloomModel", "BloomConfig", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4), "n_layer"),
    "falcon": ("FalconModel", "FalconConfig",
               dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64), "num_hidden_layers"),
    "falcon_alibi": ("FalconModel", "FalconConfig",
                     dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=64, alibi=True), "num_hidden_layers"),
    # attention sinks (issue 22): one learned logit per head, concatenated to the scores and
    # sliced off after the softmax; a sliding-window layer and a full layer; a tiny MoE
    "gpt_oss": ("GptOssModel", "GptOssConfig",
                dict(_SMALL, intermediate_size=32, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                     num_experts_per_tok=2, sliding_window=5), "num_hidden_layers"),
    "mpt": ("MptModel", "MptConfig",
            dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, expansion_ratio=2),
            "n_layers"),
}
# Falcon's eager path without ALiBi applies no attention dropout (modeling_falcon.py says so itself).
_NO_ATTN_DROPOUT = {"falcon"}

for _name, (_cls, _cfg_name, _cfg, _lk) in _DECODERS.items():
    _b = _decoder(_cls, _cfg_name, _cfg, _lk)
    _ad = _name not in _NO_ATTN_DROPOUT
    case(f"{_name}-causal", variant="causal", attn_dropout=_ad)(_b(False))
    case(f"{_name}-padded", variant="causal+padded", attn_dropout=_ad)(_b(True))


@case("bloom-padded-b1", variant="causal+padded, batch 1")
def _bloom_padded_b1(train: bool = False, dropout: float = 0.0):
    """BLOOM at batch 1 with a left-padded attention_mask, as ``generate()`` runs it: item 1 of
    bloom-padded (its scores on H merged heads, viewed (1, H, Lq, Lk))."""
    model, inputs, sites = CASES["bloom-padded"].build(train, dropout)
    return model, tuple(x[1:].clone() for x in inputs), sites


# ---- encoders: plain and padded (right padding)

def _encoder(cls_name: str, cfg_name: str, cfg: dict, layers_key: str = "num_hidden_layers"):
    def builder(padded: bool):
        def build(train: bool = False, dropout: float = 0.0):
            import transformers
            config = getattr(transformers, cfg_name)(**cfg)
            model = _hf(getattr(transformers, cls_name), config, train, dropout)
            ids = input_ids(vocab=config.vocab_size)
            if padded:
                inputs, names = (ids, padding_mask()), ("input_ids", "attention_mask")
            else:
                inputs, names = (ids,), ("input_ids",)
            return TupleModel(model, names, ("last_hidden_state",)), inputs, getattr(config, layers_key)
        return build
    return builder


_ENCODERS = {
    "bert": ("BertModel", "BertConfig", dict(_SMALL), "num_hidden_layers"),
    "roberta": ("RobertaModel", "RobertaConfig", dict(_SMALL, pad_token_id=1), "num_hidden_layers"),
    "distilbert": ("DistilBertModel", "DistilBertConfig",
                   dict(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64),
                   "n_layers"),
}

for _name, (_cls, _cfg_name, _cfg, _lk) in _ENCODERS.items():
    _b = _encoder(_cls, _cfg_name, _cfg, _lk)
    case(f"{_name}", variant="")(_b(False))
    case(f"{_name}-padded", variant="padded")(_b(True))


# ---- encoder-decoders: encoder self-attention, decoder causal self-attention, cross-attention

def _enc_dec(model, padded: bool, sites: int):
    """(model, inputs, sites) for an encoder-decoder text model: token ids for both sides,
    plus an encoder padding mask when ``padded``. ``sites``: encoder self-attention layers +
    decoder self- and cross-attention layers."""
    ids, dec = input_ids(), input_ids(seq=8, seed=2)
    if padded:
        inputs = (ids, padding_mask(), dec)
        names = ("input_ids", "attention_mask", "decoder_input_ids")
    else:
        inputs, names = (ids, dec), ("input_ids", "decoder_input_ids")
    return TupleModel(model, names, ("last_hidden_state", "encoder_last_hidden_state")), inputs, sites


def _t5(padded: bool):
    def build(train: bool = False, dropout: float = 0.0):
        import transformers
        config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                       num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                       relative_attention_max_distance=16, decoder_start_token_id=0)
        model = _hf(transformers.T5Model, config, train, dropout)
        return _enc_dec(model, padded, config.num_layers + 2 * config.num_decoder_layers)
    return build


case("t5", variant="enc-dec")(_t5(False))
case("t5-padded", variant="enc-dec+padded")(_t5(True))


def _bart(padded: bool):
    def build(train: bool = False, dropout: float = 0.0):
        import transformers
        config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                         encoder_attention_heads=4, decoder_attention_heads=4,
                                         encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
        model = _hf(transformers.BartModel, config, train, dropout)
        return _enc_dec(model, padded, config.encoder_layers + 2 * config.decoder_layers)
    return build


case("bart", variant="enc-dec")(_bart(False))
case("bart-padded", variant="enc-dec+padded")(_bart(True))


@case("whisper", variant="enc-dec (audio)")
def _whisper(train: bool = False, dropout: float = 0.0):
    import transformers
    config = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2,
                                        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=8,
                                        max_target_positions=32, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2, decoder_start_token_id=1)
    model = _hf(transformers.WhisperModel, config, train, dropout)
    feats = torch.randn(B, config.num_mel_bins, 2 * config.max_source_positions, generator=_gen(3))
    dec = input_ids(seq=8, seed=2)
    sites = config.encoder_layers + 2 * config.decoder_layers
    return (TupleModel(model, ("input_features", "decoder_input_ids"), ("last_hidden_state", "encoder_last_hidden_state")),
            (feats, dec), sites)


# ---- vision (transformers)

def _pixels(size: int = 32, channels: int = 3, seed: int = 4) -> torch.Tensor:
    return torch.randn(B, channels, size, size, generator=_gen(seed))


@case("vit", variant="vision")
def _vit(train: bool = False, dropout: float = 0.0):
    import transformers
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4)
    model = _hf(transformers.ViTModel, config, train, dropout)
    return TupleModel(model, ("pixel_values",), ("last_hidden_state",)), (_pixels(),), config.num_hidden_layers


@case("deit", variant="vision")
def _deit(train: bool = False, dropout: float = 0.0):
    import transformers
    config = transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4)
    model = _hf(transformers.DeiTModel, config, train, dropout)
    return TupleModel(model, ("pixel_values",), ("last_hidden_state",)), (_pixels(),), config.num_hidden_layers


@case("swin", variant="vision (windows, shift mask, rel. bias)")
def _swin(train: bool = False, dropout: float = 0.0):
    import transformers
    config = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                     window_size=4, mlp_ratio=2.0)
    model = _hf(transformers.SwinModel, config, train, dropout)
    return TupleModel(model, ("pixel_values",), ("last_hidden_state",)), (_pixels(),), sum(config.depths)


def _clip(padded: bool):
    def build(train: bool = False, dropout: float = 0.0):
        import transformers
        text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=SEQ, bos_token_id=1, eos_token_id=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8)
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        model = _hf(transformers.CLIPModel, config, train, dropout)
        ids = input_ids()
        if padded:
            inputs = (ids, _pixels(), padding_mask())
            names = ("input_ids", "pixel_values", "attention_mask")
        else:
            inputs, names = (ids, _pixels()), ("input_ids", "pixel_values")
        sites = config.text_config.num_hidden_layers + config.vision_config.num_hidden_layers
        return TupleModel(model, names, ("text_embeds", "image_embeds")), inputs, sites
    return build


case("clip", variant="text (causal) + vision")(_clip(False))
case("clip-padded", variant="text (causal+padded) + vision")(_clip(True))


# ---- timm

class _Plain(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return (self.model.forward_features(x),)


def _timm(model_name: str, sites_of, **kw):
    def build(train: bool = False, dropout: float = 0.0):
        import timm
        import timm.layers
        timm.layers.set_fused_attn(False)  # read when the attention modules are built
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False, num_classes=0, drop_rate=dropout,
                                  attn_drop_rate=dropout, proj_drop_rate=dropout, drop_path_rate=0.0, **kw)
        model.train(train)
        assert not any(getattr(m, "fused_attn", False) for m in model.modules()), "timm fused attention still on"
        return _Plain(model), (_pixels(),), sites_of(kw)
    return build


case("timm-vit", library="timm", variant="vision")(
    _timm("vit_tiny_patch16_224", lambda kw: kw["depth"], img_size=32, patch_size=8, embed_dim=32, depth=2,
          num_heads=4))
case("timm-swin", library="timm", variant="vision (windows, shift mask, rel. bias)")(
    _timm("swin_tiny_patch4_window7_224", lambda kw: sum(kw["depths"]), img_size=32, patch_size=2,
          window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4)))


def _timm_mvitv2(cls_token: bool):
    """timm's MViTv2 (``cal_rel_pos_type``: decomposed relative position written into a slice of
    the scores through a 6-D view; issue 18 category 6), two stages, one block each."""
    def build(train: bool = False, dropout: float = 0.0):
        import timm.layers
        from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
        timm.layers.set_fused_attn(False)
        torch.manual_seed(0)
        cfg = MultiScaleVitCfg(depths=(1, 1), embed_dim=16, num_heads=(1, 2), use_cls_token=cls_token,
                               stride_q=((1, 1), (2, 2)), stride_kv_adaptive=(2, 2))
        model = MultiScaleVit(cfg, img_size=(32, 32), num_classes=0, drop_rate=dropout)
        model.train(train)
        return _Plain(model), (_pixels(),), 2
    return build


# MViTv2's attention has no dropout on its probabilities
case("timm-mvitv2", library="timm", variant="vision (decomposed rel. pos. written into the scores)",
     attn_dropout=False)(
    _timm_mvitv2(False))
case("timm-mvitv2-cls", library="timm", variant="vision (class token: rel. pos. into a slice of the scores)",
     attn_dropout=False)(
    _timm_mvitv2(True))


# ---- diffusers

class _UNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return (self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0],)


# The classic AttnProcessor applies no dropout to the attention probabilities (only after to_out).
@case("sd-unet", library="diffusers", variant="self + cross (AttnProcessor)", attn_dropout=False)
def _unet(train: bool = False, dropout: float = 0.0):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    torch.manual_seed(0)
    down = ("CrossAttnDownBlock2D", "DownBlock2D")
    up = ("UpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block = 1
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                 layers_per_block=layers_per_block, down_block_types=down, up_block_types=up,
                                 mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=32,
                                 attention_head_dim=8, norm_num_groups=16, dropout=dropout)
    model.set_attn_processor(AttnProcessor())
    model.train(train)
    # each transformer block has a self-attention and a cross-attention
    blocks = (sum(layers_per_block for t in down if t.startswith("CrossAttn"))
              + 1  # mid block
              + sum(layers_per_block + 1 for t in up if t.startswith("CrossAttn")))
    sample = torch.randn(1, 4, 8, 8, generator=_gen(5))
    ctx = torch.randn(1, 6, 32, generator=_gen(6))
    return _UNet(model), (sample, torch.tensor([10]), ctx), 2 * blocks


# ---- hand-written reproductions of attention in projects not installed here (issue 18's algebra).
# Each mirrors the attention code of the named project as it is written there; the projection
# layers around it are plain Linears.

class _Block(nn.Module):
    """``depth`` pre-LN self-attention blocks over (B, L, C); ``attend(q, k, v, *extra)`` is the
    project's attention core on (B, H, L, D)."""

    def __init__(self, attend, depth: int = 2, dim: int = 32, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.attend, self.heads, self.dropout = attend, heads, dropout
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(depth)])
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(depth)])
        self.out = nn.ModuleList([nn.Linear(dim, dim) for _ in range(depth)])

    def forward(self, x, *extra):
        b, n, c = x.shape
        for norm, qkv, out in zip(self.norms, self.qkv, self.out):
            q, k, v = qkv(norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            o = self.attend(self, q, k, v, *extra)
            x = x + out(o.transpose(1, 2).reshape(b, n, c))
        return (x,)


def _x_transformers_attend(self, q, k, v):
    """lucidrains/x-transformers ``Attend`` (causal, non-flash path): the causal mask from
    ``ones(i, j).triu(j - i + 1)``, the detached row max subtracted for stability, dropout."""
    sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
    i, j = sim.shape[-2:]
    causal_mask = torch.ones((i, j), dtype=torch.bool, device=q.device).triu(j - i + 1)
    sim = sim.masked_fill(causal_mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    attn = nn.functional.dropout(attn, self.dropout, training=self.training)
    return torch.einsum("b h i j, b h j d -> b h i d", attn, v)


def _flash_attn_ref(self, q, k, v, lengths):
    """Dao-AILab/flash-attention ``attention_ref`` (tests/test_flash_attn.py), causal with key and
    query padding: -inf fills, the fill of rows that see no key, the query-padding fill."""
    lq, lk = q.shape[-2], k.shape[-2]
    kpad = torch.arange(lk, device=q.device)[None, :] < lengths[:, None]
    qpad = torch.arange(lq, device=q.device)[None, :] < lengths[:, None]
    scores = torch.einsum("bhtd,bhsd->bhts", q / q.shape[-1] ** 0.5, k)
    scores = scores.masked_fill(~kpad[:, None, None, :], float("-inf"))
    local_mask = torch.arange(lk, device=q.device)[None, :] > torch.arange(lq, device=q.device)[:, None] + lk - lq
    scores = scores.masked_fill(local_mask, float("-inf"))
    attention = torch.softmax(scores, dim=-1).to(v.dtype)
    attention = attention.masked_fill(torch.all(local_mask, dim=-1, keepdim=True), 0.0)
    attention = attention.masked_fill(~qpad[:, None, :, None], 0.0)
    return torch.einsum("bhts,bhsd->bhtd", attention, v)


def _joint_mask_weights(self, q, k, v, lengths):
    """A fairseq/HF-eager-style layer that builds causal & padding as one (B, L, L) mask, lifts it
    with ``[:, None]``, and returns ``(out, attn_weights.to(dtype))``; the block drops the weights."""
    n = q.shape[-2]
    idx = torch.arange(n, device=q.device)
    mask = (idx[None, None, :] < lengths[:, None, None]) & (idx[None, :, None] >= idx[None, None, :])
    w = torch.matmul(q, k.transpose(2, 3)) / q.shape[-1] ** 0.5
    w = w.masked_fill(mask[:, None] == 0, torch.finfo(w.dtype).min)
    w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = w.to(torch.float16)  # noqa: F841  (output_attentions=False: dropped by the caller)
    w = nn.functional.dropout(w, self.dropout, training=self.training)
    return torch.matmul(w, v)


def _handwritten(attend, with_lengths: bool):
    def build(train: bool = False, dropout: float = 0.0):
        torch.manual_seed(0)
        model = _Block(attend, dropout=dropout).train(train)
        x = torch.randn(B, SEQ, 32, generator=_gen(7))
        inputs = (x, torch.tensor([SEQ, SEQ - 4])) if with_lengths else (x,)
        return model, inputs, 2
    return build


case("xtransformers-attend", library="hand-written", variant="causal, max shift")(
    _handwritten(_x_transformers_attend, False))
case("flash-attn-attention-ref", library="hand-written", variant="causal+padded, row fills",
     attn_dropout=False)(
    _handwritten(_flash_attn_ref, True))
case("joint-mask-dead-weights", library="hand-written", variant="causal+padded in one mask, dead weights")(
    _handwritten(_joint_mask_weights, True))


# ---- issue 18: more than two batch axes, einops grouping, nn.MultiheadAttention. x-transformers and
# vit-pytorch are not installed here: their attention is written out below as those projects spell
# it (einops traced by dynamo as reshape/permute/unsqueeze/expand), each naming the project.

class _XTransformersGqa(nn.Module):
    """x-transformers ``Attention`` with ``kv_heads``: ``rearrange(t, "b n (h d) -> b h n d")`` and
    ``repeat(k, "b h n d -> b (h r) n d", r=...)`` (einops, as dynamo traces it), einsum scores,
    causal mask from ``arange`` comparisons, dropout on the probabilities."""

    def __init__(self, dim=32, heads=4, kv_heads=2, depth=2, dropout=0.0):
        super().__init__()
        self.h, self.kvh, self.dh = heads, kv_heads, dim // heads
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            q=nn.Linear(dim, dim, bias=False), kv=nn.Linear(dim, 2 * self.dh * kv_heads, bias=False),
            o=nn.Linear(dim, dim), drop=nn.Dropout(dropout))) for _ in range(depth))

    def forward(self, x):
        b, n, _ = x.shape
        for lyr in self.layers:
            q = lyr["q"](x).reshape(b, n, self.h, self.dh).permute(0, 2, 1, 3)
            k, v = lyr["kv"](x).chunk(2, dim=-1)
            k, v = (t.reshape(b, n, self.kvh, self.dh).permute(0, 2, 1, 3) for t in (k, v))
            r = self.h // self.kvh
            k, v = (torch.unsqueeze(t, 2).expand(-1, -1, r, -1, -1).reshape(b, self.h, n, self.dh) for t in (k, v))
            s = torch.einsum("bhid,bhjd->bhij", q, k) * self.dh ** -0.5
            i = torch.arange(n, device=x.device)
            s = s.masked_fill(i[None, :] > i[:, None], -torch.finfo(s.dtype).max)
            p = lyr["drop"](s.softmax(dim=-1))
            o = torch.einsum("bhij,bhjd->bhid", p, v)
            x = x + lyr["o"](o.permute(0, 2, 1, 3).reshape(b, n, -1))
        return (x,)


@case("xtransformers-gqa", library="x-transformers (reproduction)", variant="causal, GQA via einops repeat")
def _xtransformers_gqa(train: bool = False, dropout: float = 0.0):
    torch.manual_seed(0)
    m = _XTransformersGqa(dropout=dropout).train(train)
    return m, (torch.randn(B, SEQ, 32, generator=_gen(7)),), 2


class _VitPytorchGroupedQuery(nn.Module):
    """vit-pytorch style attention with the query heads grouped against shared K/V heads:
    ``rearrange(q, "b n (g r d) -> b g r n d")`` and the 5-D einsum ``b g r i d, b g j d -> b g r i j``."""

    def __init__(self, dim=32, groups=2, reps=2, dropout=0.0):
        super().__init__()
        self.g, self.r, self.dh = groups, reps, dim // (groups * reps)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * groups * self.dh, bias=False)
        self.drop, self.out = nn.Dropout(dropout), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.g, self.r, self.dh).permute(0, 2, 3, 1, 4)
        k, v = (t.reshape(b, n, self.g, self.dh).permute(0, 2, 1, 3) for t in self.to_kv(x).chunk(2, dim=-1))
        dots = torch.einsum("bgrid,bgjd->bgrij", q, k) * self.dh ** -0.5
        attn = self.drop(dots.softmax(dim=-1))
        o = torch.einsum("bgrij,bgjd->bgrid", attn, v)
        return (self.out(o.permute(0, 3, 1, 2, 4).reshape(b, n, -1)),)


@case("vit-pytorch-grouped", library="vit-pytorch (reproduction)", variant="vision, 5-D grouped-query einsum")
def _vit_pytorch_grouped(train: bool = False, dropout: float = 0.0):
    torch.manual_seed(0)
    m = _VitPytorchGroupedQuery(dropout=dropout).train(train)
    return m, (torch.randn(B, 16, 32, generator=_gen(8)),), 1


class _Windows5d(nn.Module):
    """Window attention kept on (B, nW, H, N, N) scores, with a relative-position bias (H, N, N) and
    a shifted-window mask (nW, N, N) broadcast over the batch (Swin's terms, windows as an axis)."""

    def __init__(self, dim=32, heads=4, nw=4, n=4, dropout=0.0):
        super().__init__()
        self.h = heads
        self.qkv, self.proj, self.drop = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Dropout(dropout)
        self.rel = nn.Parameter(torch.randn(heads, n, n, generator=_gen(9)) * 0.1)
        keep = (torch.rand(nw, n, n, generator=_gen(10)) > 0.3) | torch.eye(n, dtype=torch.bool)
        self.register_buffer("mask", torch.zeros(nw, n, n).masked_fill(~keep, -100.0))

    def forward(self, x):  # (B, nW, N, C)
        b, nw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, nw, n, 3, self.h, c // self.h).permute(3, 0, 1, 4, 2, 5)
        attn = (q * (c // self.h) ** -0.5) @ k.transpose(-2, -1) + self.rel + self.mask.unsqueeze(1)
        attn = self.drop(attn.softmax(dim=-1))
        return (self.proj((attn @ v).transpose(2, 3).reshape(b, nw, n, c)),)


@case("windows-5d", library="torch (reproduction)", variant="vision (B, windows, H, N, N)")
def _windows_5d(train: bool = False, dropout: float = 0.0):
    torch.manual_seed(0)
    return _Windows5d(dropout=dropout).train(train), (torch.randn(B, 4, 4, 32, generator=_gen(11)),), 1


class _MhaBlocks(nn.Module):
    """``nn.TransformerEncoderLayer``-style blocks on ``nn.MultiheadAttention`` (need_weights default)
    and an attention-pooling head: a learned query over the tokens."""

    def __init__(self, dim=32, heads=4, dropout=0.0):
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
                                  for _ in range(2))
        self.pool = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.query = nn.Parameter(torch.randn(1, 1, dim, generator=_gen(12)) * 0.5)

    def forward(self, x, pad):
        for a in self.attn:
            x = x + a(x, x, x, key_padding_mask=pad)[0]
        return (self.pool(self.query.expand(x.shape[0], -1, -1), x, x, key_padding_mask=pad)[0],)


@case("torch-mha", library="torch", variant="nn.MultiheadAttention, padded, attention pool")
def _torch_mha(train: bool = False, dropout: float = 0.0):
    torch.manual_seed(0)
    pad = padding_mask() == 0
    return _MhaBlocks(dropout=dropout).train(train), (torch.randn(B, SEQ, 32, generator=_gen(13)), pad), 3


# --------------------------------------------------------------------------------------------- checks

def flatten(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flatten(o)]
    raise TypeError(f"unexpected output type {type(out)}")


def errors(ref, got) -> Tuple[float, float]:
    """(max abs error, max abs error / max abs reference) over all output tensors."""
    abs_err, rel_err = 0.0, 0.0
    for r, g in zip(flatten(ref), flatten(got), strict=True):
        d = (r.detach().double() - g.detach().double()).abs().max().item() if r.numel() else 0.0
        scale = max(r.detach().double().abs().max().item(), 1e-12) if r.numel() else 1.0
        abs_err, rel_err = max(abs_err, d), max(rel_err, d / scale)
    return abs_err, rel_err


def loss_of(out) -> torch.Tensor:
    """A scalar loss with a fixed pseudo-random weighting of every output element (so no gradient is uniform)."""
    total = 0.0
    for i, t in enumerate(flatten(out)):
        w = torch.randn(t.shape, generator=_gen(100 + i), dtype=t.dtype)
        total = total + (t * w).sum()
    return total


def grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_errors(ref: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> Tuple[float, float]:
    """(max abs, max relative) gradient error; a missing gradient is an infinite error.

    Relative to the tensor's largest reference gradient, floored at 1e-3 of the largest gradient of
    the model: some gradients are mathematically zero and only rounding noise in eager (e.g. a key
    projection's bias: adding a constant along the key axis does not change a softmax)."""
    if set(ref) != set(got):
        return float("inf"), float("inf")
    abs_err, rel_err = 0.0, 0.0
    floor = 1e-3 * max((g.double().abs().max().item() for g in ref.values()), default=1.0)
    for k in ref:
        d = (ref[k].double() - got[k].double()).abs().max().item()
        scale = max(ref[k].double().abs().max().item(), floor, 1e-12)
        abs_err, rel_err = max(abs_err, d), max(rel_err, d / scale)
    return abs_err, rel_err


FUSED_OP_NAMES = ("attnfuse::flash_attention",)


def count_fused(gm: torch.fx.GraphModule) -> int:
    """Number of ``attnfuse::flash_attention`` calls in a graph (and its submodules' graphs)."""
    n = 0
    for mod in gm.modules():
        g = getattr(mod, "graph", None)
        if not isinstance(g, torch.fx.Graph):
            continue
        for node in g.nodes:
            if node.op == "call_function":
                name = getattr(node.target, "name", None)
                name = name() if callable(name) else name
                if (name in FUSED_OP_NAMES or node.target is torch.ops.attnfuse.flash_attention
                        or str(node.target).startswith("attnfuse.flash_attention")):
                    n += 1
    return n


def softmax_snippet(gm: torch.fx.GraphModule, node_name: Optional[str] = None, before: int = 8,
                    after: int = 4, limit: int = 1) -> str:
    """A few lines of the graph's code around the softmax ``node_name`` (or the first ``limit`` softmaxes)."""
    lines = gm.code.splitlines()
    hits = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if node_name is not None:
            if stripped.startswith(f"{node_name} =") or stripped.startswith(f"{node_name}:"):
                hits.append(i)
        elif "softmax" in stripped and "=" in stripped:
            hits.append(i)
    out = []
    for i in hits[:limit]:
        out.extend(lines[max(0, i - before): i + after + 1])
        out.append("    ...")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- compiling

TOL = 1e-4        # fp32: max |compiled - eager| / max |eager| over the outputs
GRAD_TOL = 1e-3   # fp32 gradients: the same, per parameter


@dataclass
class Compiled:
    """What a compile with one backend gave."""
    ok: bool = False
    error: str = ""
    fused: int = 0                   # fused sites in the forward graph(s)
    graphs: int = 0                  # graphs compiled (1 = no graph break)
    out: object = None
    compile_s: float = 0.0           # first call (compile + run)
    near_misses: list = field(default_factory=list)   # [(kind, reason, location, snippet)]
    fusions: list = field(default_factory=list)       # attnfuse Fusion records
    model: Optional[nn.Module] = None
    graph_modules: list = field(default_factory=list)  # the graphs attnfuse rewrote (after the rewrite)


def square_tensors(gm: torch.fx.GraphModule, length: int) -> List[str]:
    """Nodes of ``gm`` whose (example) value has two or more axes of size ``length``: at a
    sequence length no other size of the model equals, the (Lq, Lk) tensors."""
    out = []
    for n in gm.graph.nodes:
        v = n.meta.get("example_value", n.meta.get("val"))
        if isinstance(v, torch.Tensor) and sum(int(s) == length for s in v.shape) >= 2:
            out.append(f"{n.name}{tuple(v.shape)}")
    return out


def _clone(inputs):
    return tuple(t.clone() for t in inputs)


def _run(model, inputs, train: bool):
    if train:
        return model(*inputs)
    with torch.no_grad():
        return model(*inputs)


def compile_attnfuse(model: nn.Module, inputs, *, inner: str = "eager", train: bool = False,
                     impl: str = "torch", strict: bool = False, backward: bool = False) -> Compiled:
    """``torch.compile`` with the attnfuse backend; counts ``attnfuse::flash_attention`` nodes in every
    graph handed to the inner compiler and keeps the report's near misses with a graph snippet."""
    import time
    import torch._dynamo
    from attnfuse.backend import attnfuse_backend

    res = Compiled()
    options = {"inner": inner, "strict": strict, "impl": impl}

    def counting_backend(gm, example_inputs, **kw):
        compiled = attnfuse_backend(gm, example_inputs, options=options)  # rewrites gm in place
        res.graphs += 1
        res.graph_modules.append(gm)
        res.fused += count_fused(gm)
        from attnfuse.backend import last_report
        rep = last_report()
        if rep is not None:
            res.fusions += list(rep.fusions)
            for m in rep.near_misses:
                res.near_misses.append((m.kind, m.reason, m.location, softmax_snippet(gm, m.node)))
            for e in rep.errors:
                res.near_misses.append(("error", e, None, ""))
        return compiled

    torch._dynamo.reset()
    res.model = torch.compile(model, backend=counting_backend)
    t0 = time.perf_counter()
    try:
        res.out = _run(res.model, _clone(inputs), train)
        if backward:
            loss_of(res.out).backward()
        res.ok = True
    except Exception as e:  # noqa: BLE001
        res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    res.compile_s = time.perf_counter() - t0
    return res


_FWD_SDPA = []


def _count_sdpa(graph: torch.fx.Graph) -> None:
    n = 0
    for node in graph.nodes:
        if node.op == "call_function":
            name = str(node.target)
            if "scaled_dot_product" in name and "backward" not in name:
                n += 1
    _FWD_SDPA.append(n)


def compile_inductor(model: nn.Module, inputs, *, train: bool = False, backward: bool = False) -> Compiled:
    """Default ``torch.compile`` (Inductor); counts SDPA nodes in its post-grad graphs (forward ones only:
    in training the backward graph's ``*_backward`` nodes are not counted)."""
    import time
    import torch._dynamo
    import torch._inductor.config as cfg

    res = Compiled()
    torch._dynamo.reset()
    _FWD_SDPA.clear()
    old = (cfg.post_grad_custom_post_pass, cfg.fx_graph_cache, cfg.pattern_matcher)
    cfg.post_grad_custom_post_pass = _count_sdpa
    cfg.fx_graph_cache = False      # the pass must see every graph
    cfg.pattern_matcher = True      # Inductor's attention fusion lives in its pattern matcher
    try:
        res.model = torch.compile(model)
        t0 = time.perf_counter()
        try:
            res.out = _run(res.model, _clone(inputs), train)
            if backward:
                loss_of(res.out).backward()
            res.ok = True
        except Exception as e:  # noqa: BLE001
            res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        res.compile_s = time.perf_counter() - t0
    finally:
        cfg.post_grad_custom_post_pass, cfg.fx_graph_cache, cfg.pattern_matcher = old
    res.fused = sum(_FWD_SDPA)
    res.graphs = len(_FWD_SDPA)
    return res


# ---- issue 18 (the rest): more families, registered from their own module (this one is long enough)
def _register_more() -> None:
    import importlib
    import sys as _sys
    here = _sys.modules[__name__]
    pkg = __name__.rpartition(".")[0]
    families = importlib.import_module(f"{pkg}.real_families" if pkg else "real_families")
    families.register(here)


_register_more()
