"""Configuration of an exported LoopMDM (looped masked diffusion LM, Lee et al.).

Self-contained: imports only transformers, so a folder written by `loopmdm export` loads with
`AutoConfig.from_pretrained(folder, trust_remote_code=True)` without the loopmdm package.
Field names follow the project's `model:` config section.
"""

from transformers import PretrainedConfig

BLOCK_STYLES = ("dit", "llama")
TIME_INPUTS = ("sigma", "1000t")
SCHEDULES = ("loglinear", "linear", "cosine")


class LoopMDMConfig(PretrainedConfig):
    """prelude (layers [0, loop_start)) -> loop_block (layers [loop_start, loop_end), run
    num_loops times with shared weights) -> coda (layers [loop_end, n_layers)) -> head.

    vocab_size counts the real tokens (the head's width); the diffusion [MASK] token is the
    extra id `mask_id = vocab_size` (the tokenizer's mask_token_id), which the embedding has
    and the head never predicts."""

    model_type = "loopmdm"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers"}

    vocab_size: int = 2048
    block: str = "dit"  # "dit" (MDLM's DDiT with adaLN) or "llama" (RMSNorm, SwiGLU, no conditioning)
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    mlp_ratio: float = 4.0
    cond_dim: int = 128
    time_conditioning: bool = False  # false: the denoiser ignores t (MDLM's default)
    time_input: str = "sigma"  # what the timestep embedder sees: sigma(t) = -log alpha(t), or 1000 t
    noise_schedule: str = "loglinear"  # alpha(t) of the training run, for sigma(t)
    noise_eps: float = 1e-3
    dropout: float = 0.0
    attention_dropout: bool = False
    rope_base: float = 10000.0
    loop_start: int | None = 1  # both None: no loop block (the plain MDM baseline)
    loop_end: int | None = 3
    max_train_loops: int = 12  # training drew S ~ U{1..max_train_loops}
    num_loops: int | None = None  # default loop count of forward(); None = max_train_loops
    input_injection: bool = False  # re-add the prelude output before each iteration after the first
    max_position_embeddings: int = 128  # the training sequence length (RoPE has no hard limit)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.num_loops is None:
            self.num_loops = self.max_train_loops if self.loop_start is not None else 1
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @property
    def mask_id(self) -> int:
        """The diffusion [MASK] token: one id past the real vocabulary (as in the loopmdm package)."""
        return self.vocab_size

    def validate_architecture(self):
        if self.block not in BLOCK_STYLES:
            raise ValueError(f"block={self.block!r}; choose one of {BLOCK_STYLES}")
        if self.time_input not in TIME_INPUTS or self.noise_schedule not in SCHEDULES:
            raise ValueError(f"time_input={self.time_input!r} / noise_schedule={self.noise_schedule!r}; "
                             f"choose from {TIME_INPUTS} / {SCHEDULES}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even width")
        if (self.loop_start is None) != (self.loop_end is None):
            raise ValueError("set both loop_start and loop_end, or neither")
        if self.loop_start is not None and not 0 <= self.loop_start < self.loop_end <= self.n_layers:
            raise ValueError(f"loop range [{self.loop_start}, {self.loop_end}) must lie in [0, n_layers={self.n_layers}]")
        if not isinstance(self.num_loops, int) or isinstance(self.num_loops, bool) or self.num_loops < 1:
            raise ValueError(f"num_loops={self.num_loops!r} must be an integer >= 1")


__all__ = ["LoopMDMConfig"]
