"""Frozen config dataclasses for every component (hashable, so they can be static jit args).

`configs/*.py` files hold ml_collections data; `from_dict` turns their `model` entries into these.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np

# Class order of the released SER head.
EMOTIONS: Tuple[str, ...] = ("angry", "surprised", "happy", "sad", "neutral")
# Classes of the paralinguistic heads (OSUM-EChat recipe), in head-output order.
GENDERS: Tuple[str, ...] = ("female", "male")
AGE_GROUPS: Tuple[str, ...] = ("young", "middle-aged", "older")


def to_dtype(name: Any):
    """Accepts "float32"/"bfloat16"/"float16" or a dtype, returns a jnp dtype."""
    if isinstance(name, str):
        try:
            return jnp.dtype(name)
        except TypeError as e:
            raise ValueError(f"unknown dtype name {name!r}") from e
    return jnp.dtype(name)


# Sane bounds on sizes read from checkpoint files. Loaders check them before building key
# tables or allocating anything, so a corrupt number (num_hidden_layers: 10000000) is an
# error naming the field instead of minutes of work ending in a MemoryError. Each bound is
# several times the largest released model's value (Llama 3.1 405B: hidden 16384, 126 layers,
# 128 heads, intermediate 53248; vocabularies up to about 256k; Whisper large: 1280 wide).
SIZE_LIMITS = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "num_layers": (1, 1024),
    "num_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "head_dim": (1, 4096),
    "max_position_embeddings": (1, 1 << 24),
    "n_mels": (1, 1024),
    "d_model": (1, 1 << 17),
    "mlp_dim": (1, 1 << 20),
    "max_source_positions": (1, 1 << 20),
}


def size_problem(name: str, value: Any) -> Optional[str]:
    """Why `value` is not a plausible size `name` (a `SIZE_LIMITS` key); None when it is.

    Integral floats (4096.0) pass, as some exporters write them; bools and strings do not.
    """
    lo, hi = SIZE_LIMITS[name]
    integral = not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if integral and lo <= value <= hi:
        return None
    return f"an integer in {lo}..{hi}"


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """Whisper encoder. Defaults are tiny.en (80 mels, d 384, 4 layers, 6 heads)."""

    n_mels: int = 80
    d_model: int = 384
    num_layers: int = 4
    num_heads: int = 6
    mlp_dim: int = 1536
    max_source_positions: int = 1500  # frames after the stride-2 conv (30 s)
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # computation dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"  # "none" | "full" | "dots" | "dots_no_batch"
    # Faithful default is 30 s inputs; allow shorter mel inputs (positions are sliced).
    allow_short_inputs: bool = False


@dataclasses.dataclass(frozen=True)
class WhisperDecoderConfig:
    """Whisper text decoder (the ASR half). Defaults are tiny.en (vocab 51864, d 384, 4
    layers, 6 heads, 448 positions); multilingual vocabularies have 51865+ ids."""

    vocab_size: int = 51864
    d_model: int = 384
    num_layers: int = 4
    num_heads: int = 6
    mlp_dim: int = 1536
    max_target_positions: int = 448
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Decoder-only LM (Qwen2 and Llama families). Defaults are a tiny random test model."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    # RoPE scaling: None | "linear" | "llama3"
    rope_scaling_type: Optional[str] = None
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True  # Qwen2: True, Llama: False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Speech adapter: "linear" (frame concat, k frames -> 1 token) or "conv" (BLSP-Emo)."""

    type: str = "linear"
    k: int = 5
    hidden_dim: int = 2048
    conv_channels: int = 0  # 0 means "encoder width"; each conv outputs 2x this, GLU halves it
    conv_layers: int = 3
    conv_kernel: int = 5
    conv_stride: int = 2
    # Snap each speech embedding to the nearest row of the LLM's input embedding table
    # (straight-through gradient): the LLM then reads real token embeddings, as after a
    # word-timed `align_words` warm-up. Off in the release (continuous embeddings).
    snap_to_vocab: bool = False
    # With snapping: read the snapped tokens as text. Each run of one token keeps its first
    # position and positions snapped to `snap_silence_id` (the token `align_words` targets
    # where nothing is spoken) are dropped: the LLM attends to the kept positions only, moved
    # next to the text after `<speech>`, so it sees "How can fix the fence" rather than
    # "How How can ... fence \n \n \n". Measured on ideal layouts (true tokens): topic
    # named 0.75 compacted vs 0.25 with the silent positions left in (issue 13).
    snap_compact: bool = False
    snap_silence_id: int = -1  # -1: no token marks silence (only repeats are dropped)
    # Token ids snapping may choose from (the vocabulary `align_words` classified over: the
    # training transcripts' tokens and the silence token); empty: the whole table. Outside
    # it the nearest token of an unsure position is often a name ("Chris", "Sarah").
    snap_vocab: Tuple[int, ...] = ()
    # With compaction: a position whose nearest token's squared distance is above this share
    # of the second nearest's is ambiguous and dropped like silence (1.0 keeps all). Near
    # word boundaries the projector blends two words and snaps to a third ("learn tennis
    # chess"); 0.95 drops most such insertions and keeps the topic word in 95% of held-out
    # clips (issue 13).
    snap_ambiguity: float = 1.0


@dataclasses.dataclass(frozen=True)
class EmotionConfig:
    """Emotion extractor + SER head (+ optional arousal/valence/dominance regression head)."""

    gate_hidden: int = 128
    num_heads: int = 4
    num_queries: int = 1
    mlp_hidden: int = 2048
    num_classes: int = 5
    num_attributes: int = 0  # RE-LLM style dimensional attributes (3 = A/V/D); 0 disables
    layer_norm_eps: float = 1e-5
    # Paralinguistic heads beyond emotion (OSUM-EChat recipe) on the same pooled vector:
    # speaker gender (`GENDERS`, 2) and age group (`AGE_GROUPS`, 3); 0 disables a head.
    num_genders: int = 0
    num_age_groups: int = 0
    # Splice one embedding per paralinguistic head (its class probabilities times a learned
    # table [classes, H]) right after the emotion embedding: the prompt then holds
    # `num_tokens` emotion placeholders instead of `num_queries`.
    splice_cues: bool = False
    # The emotion read as words (a demo-scale option, like `projector.snap_to_vocab`): per
    # class, in the model's `emotions` order, the token ids the LLM reads in place of the
    # emotion embedding, e.g. " (I feel sad.)" for sad and () (nothing) for neutral. The
    # recognised class (SER argmax) picks the phrase, a discrete choice with no gradient: the
    # SER head learns from its CE (`ser_ce`), and stages 2a / 2b have nothing else to train
    # in the extractor. Empty: the paper's continuous emotion embedding.
    snap_phrases: Tuple[Tuple[int, ...], ...] = ()

    @property
    def phrase_len(self) -> int:
        """Emotion slots with `snap_phrases`: the longest phrase (at least 1)."""
        return max([1] + [len(p) for p in self.snap_phrases])

    @property
    def cue_heads(self) -> Tuple[Tuple[str, int], ...]:
        """(name, classes) of every enabled paralinguistic head, in a fixed order."""
        return tuple((n, k) for n, k in (("gender", self.num_genders),
                                         ("age", self.num_age_groups)) if k > 0)

    @property
    def num_tokens(self) -> int:
        """Emotion placeholders per prompt: the Q queries (or the longest snapped phrase),
        plus one per spliced cue head."""
        q = self.phrase_len if self.snap_phrases else self.num_queries
        return q + (len(self.cue_heads) if self.splice_cues else 0)


@dataclasses.dataclass(frozen=True)
class SpeechDecoderConfig:
    """Small causal LM turning the frozen LLM's hidden states into speech unit ids."""

    lm: LMConfig = LMConfig()
    proj_type: str = "linear"  # "linear" | "ffn"
    ffn_dim: int = 4096
    add_token_embeddings: bool = True
    gate_fusion: bool = False
    stream_n: int = 3  # text positions per chunk
    stream_m: int = 15  # unit tokens per chunk
    unit_vocab_size: int = 64
    # Token ids inside the speech decoder's vocabulary. Units are unit_offset + u.
    sep_token_id: int = 0
    unit_offset: int = 0
    eos_token_id: int = 0
    max_length: int = 2048
    max_units: int = 1024


@dataclasses.dataclass(frozen=True)
class FreezeEmpathConfig:
    """The composite model."""

    whisper: WhisperConfig = WhisperConfig()
    projector: ProjectorConfig = ProjectorConfig()
    emotion: EmotionConfig = EmotionConfig()
    llm: LMConfig = LMConfig()
    speech_decoder: Optional[SpeechDecoderConfig] = None
    speech_token_id: int = 1
    emotion_token_id: int = 2
    # Whether the placeholder token gets replaced by all speech embeddings (the prompt holds a
    # single <speech> token that is expanded) - we keep shapes static by expanding in the
    # tokenizer: the prompt holds `num_speech_tokens` copies of speech_token_id.
    system_prompt: str = (
        "You are an empathetic spoken chatbot. Please provide a very short but helpful response "
        "to the user with empathy toward the user's emotional tone."
    )
    user_template: str = "<speech>(with a <emotion> emotional tone)."
    emotions: Tuple[str, ...] = EMOTIONS
    dtype: str = "float32"

    @property
    def num_speech_tokens(self) -> int:
        frames = self.whisper.max_source_positions
        if self.projector.type == "linear":
            return frames // self.projector.k
        n = frames
        for _ in range(self.projector.conv_layers):
            n = (n + 2 * (self.projector.conv_kernel // 2) - self.projector.conv_kernel) // (
                self.projector.conv_stride
            ) + 1
        return n


_NESTED = {
    "whisper": WhisperConfig,
    "projector": ProjectorConfig,
    "emotion": EmotionConfig,
    "llm": LMConfig,
    "lm": LMConfig,
    "speech_decoder": SpeechDecoderConfig,
    "codec": "SemanticCodecConfig",
    "length_regulator": "LengthRegulatorConfig",
    "dit": "DiTConfig",
    "bigvgan": "BigVGANConfig",
}


def from_dict(cls, d: Optional[Mapping[str, Any]]):
    """Builds a (possibly nested) config dataclass from a mapping such as a ConfigDict.

    Unknown keys raise a ValueError naming them, so typos in config files never pass silently.
    """
    if d is None:
        return None
    if dataclasses.is_dataclass(d):
        return d
    if hasattr(d, "to_dict"):
        d = d.to_dict()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        if k in _NESTED and v is not None and not dataclasses.is_dataclass(v):
            sub = _NESTED[k]
            v = from_dict(globals()[sub] if isinstance(sub, str) else sub, v)
        elif isinstance(v, list):
            v = _tuples(v)  # nested too (emotion.snap_phrases), so configs stay hashable
        kwargs[k] = v
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Inverse of `from_dict` (plain nested dicts, JSON-serialisable)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


# ---- units-to-waveform decoder (the release's IndexTTS2-derived vocoder chain) ----


def _tuples(x):
    """Nested lists (as JSON / YAML give them) -> nested tuples, so configs stay hashable."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass(frozen=True)
class BigVGANConfig:
    """BigVGAN v2 generator. Defaults are `bigvgan_v2_22khz_80band_256x`."""

    num_mels: int = 80
    upsample_rates: Tuple[int, ...] = (4, 4, 2, 2, 2, 2)
    upsample_kernel_sizes: Tuple[int, ...] = (8, 8, 4, 4, 4, 4)
    upsample_initial_channel: int = 1536
    resblock: str = "1"  # "1": AMP blocks with a second dilation-1 conv per layer; "2": without
    resblock_kernel_sizes: Tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: Tuple[Tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    activation: str = "snakebeta"  # "snake" | "snakebeta"
    snake_logscale: bool = True
    use_tanh_at_final: bool = False
    use_bias_at_final: bool = False
    sampling_rate: int = 22050
    # the anti-aliased activation: 2x up, activation, 2x down with 12-tap Kaiser-sinc filters
    aa_ratio: int = 2
    aa_kernel_size: int = 12
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
                     "resblock_dilation_sizes"):
            object.__setattr__(self, name, _tuples(getattr(self, name)))
        object.__setattr__(self, "resblock", str(self.resblock))

    @property
    def hop_length(self) -> int:
        return int(np.prod(self.upsample_rates))


@dataclasses.dataclass(frozen=True)
class SemanticCodecConfig:
    """The codebook side of MaskGCT's RepCodec (all the decoder needs: `vq2emb`)."""

    codebook_size: int = 8192
    codebook_dim: int = 8
    hidden_size: int = 1024
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class LengthRegulatorConfig:
    """IndexTTS2's InterpolateRegulator for continuous input (no f0, no VQ)."""

    channels: int = 512
    in_channels: int = 1024
    sampling_ratios: Tuple[int, ...] = (1, 1, 1, 1)  # one conv/GroupNorm/Mish block each
    groups: int = 1
    out_channels: Optional[int] = None  # None: `channels`
    group_norm_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "sampling_ratios", _tuples(self.sampling_ratios))


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """IndexTTS2's DiT estimator (gpt-fast style transformer + WaveNet tail). Defaults are
    the release's `s2mel` values (checkpoints/config.yaml of IndexTTS2)."""

    hidden_dim: int = 512
    num_heads: int = 8
    depth: int = 13
    in_channels: int = 80
    content_dim: int = 512
    style_dim: int = 192
    style_condition: bool = True
    style_as_token: bool = False
    time_as_token: bool = False
    uvit_skip_connection: bool = True
    long_skip_connection: bool = True
    final_layer_type: str = "wavenet"  # "wavenet" | "mlp"
    wavenet_hidden_dim: int = 512
    wavenet_num_layers: int = 8
    wavenet_kernel_size: int = 5
    wavenet_dilation_rate: int = 1
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    frequency_embedding_size: int = 256
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def intermediate_size(self) -> int:
        # gpt-fast's rule: 2/3 of 4 * dim, rounded up to a multiple of 256
        n = int(2 * 4 * self.hidden_dim / 3)
        return n if n % 256 == 0 else n + 256 - n % 256


@dataclasses.dataclass(frozen=True)
class UnitCodecConfig:
    """The demo's own unit codec (`models.unit_codec`): speech <-> discrete units at 50 Hz.

    Analysis: STFT (`n_fft`, `hop` samples, periodic Hann) of 16 kHz audio; `frames_per_unit`
    consecutive frames make one unit (hop 160 x 2 = 20 ms: 50 Hz). Units are nearest
    codewords (k-means, `codebook_size`) of the log-magnitude frames (`feature` "logmag",
    all n_fft/2+1 bins) or of log-mel frames ("mel", `n_mels` Slaney bands). Synthesis: each
    unit's fitted log-magnitude frames -> Griffin-Lim (`griffin_lim_iters`) -> waveform."""

    sampling_rate: int = 16000
    n_fft: int = 512
    hop: int = 160
    frames_per_unit: int = 2
    codebook_size: int = 512
    feature: str = "logmag"  # "logmag" | "mel"
    n_mels: int = 80
    griffin_lim_iters: int = 32
    floor: float = 1e-5  # log(magnitude + floor)
    length_bucket: int = 64  # unit lengths are padded up to a multiple of this under jit


@dataclasses.dataclass(frozen=True)
class UnitDecoderConfig:
    """Units -> 22,050 Hz waveform: codebook lookup, length regulator, CFM with the DiT,
    BigVGAN, and the release's decoding constants."""

    codec: SemanticCodecConfig = dataclasses.field(default_factory=SemanticCodecConfig)
    length_regulator: LengthRegulatorConfig = dataclasses.field(
        default_factory=LengthRegulatorConfig)
    dit: DiTConfig = dataclasses.field(default_factory=DiTConfig)
    bigvgan: BigVGANConfig = dataclasses.field(default_factory=BigVGANConfig)
    prompt_frames: int = 0  # frames of the fixed voice's ref_mel / prompt_condition
    diffusion_steps: int = 25
    cfg_rate: float = 0.7
    frames_per_unit: float = 1.72  # 50 Hz units -> 22050/256 Hz mel frames
    max_chunk_units: int = 1500
    silence_seconds: float = 0.2
    length_bucket: int = 64  # unit lengths are padded up to a multiple of this under jit
