"""The model's shape, read from a checkpoint's config.json; LM-Infinite's knobs; the error type."""

import sys
from dataclasses import MISSING, dataclass, fields


class UserError(Exception):
    """A problem with the user's input: the CLIs print its one-line message and exit with code 2."""


@dataclass(frozen=True)
class LlamaConfig:
    """Field names are the keys of a Hugging Face Llama config.json."""

    vocab_size: int  # rows of the embedding and of the LM head
    hidden_size: int  # d_model
    intermediate_size: int  # SwiGLU hidden width
    num_hidden_layers: int  # transformer blocks
    num_attention_heads: int  # H, query heads
    num_key_value_heads: int  # H_kv, key/value heads (GQA when < H)
    head_dim: int  # hd, per-head width
    max_position_embeddings: int  # L_pretrain, the length the model was trained on
    rope_theta: float = 10000.0  # RoPE base: frequencies theta^(-2f/hd)
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Validate a parsed config.json; refuse anything this forward pass does not compute."""
        if not isinstance(d, dict):
            refuse("expected a JSON object", "fix the file or re-convert the checkpoint")
        unsupported = {  # key -> the only value we compute correctly
            "model_type": "llama",
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
        }
        for key, ok in unsupported.items():
            if key in d and d[key] != ok:
                refuse(
                    f"{key}={d[key]!r} is not supported (only {ok!r})",
                    "use a plain Llama checkpoint",
                )
        d = dict(d)
        rope = d.get("rope_parameters")  # transformers >= 5 nests rope_theta here
        if rope is not None:
            # the scaling type as transformers reads it ("type" in older files)
            kind = isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                refuse(
                    f"rope_parameters={rope!r} is not supported (only rope_type 'default')",
                    "use a checkpoint without RoPE scaling",
                )
            d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
        if "head_dim" not in d and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            d["head_dim"] = hidden // heads
        d.setdefault("num_key_value_heads", heads)
        # some configs list several; the first one ends generation
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else None
        kwargs = {}
        for f in fields(cls):
            if f.name in d:
                kwargs[f.name] = _checked(f.name, d[f.name], f.type)
            elif f.default is MISSING:
                refuse(f"missing field {f.name!r}", "add it or re-convert the checkpoint")
        cfg = cls(**kwargs)
        if cfg.num_hidden_layers > 10_000:  # its tensor names are listed before any file is read
            refuse(
                f"num_hidden_layers={cfg.num_hidden_layers}, more than any Llama has (10,000 at "
                "most here)"
            )
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            refuse(
                f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={cfg.num_key_value_heads}"
            )
        if cfg.head_dim % 2:
            refuse(f"head_dim={cfg.head_dim} must be even for RoPE")
        return cfg


def refuse(problem, fix="fix config.json"):
    """A config.json that cannot be used: one line naming the problem and the fix."""
    raise UserError(f"config.json: {problem}; {fix}")


@dataclass(frozen=True)
class LambdaConfig:
    """LM-Infinite's knobs (DESIGN.md §1, paper §4). Vanilla attention is the absence of one
    (None)."""

    n_global: int  # G: the first G tokens stay visible to every later token ("starting tokens")
    n_local: int  # L: each token sees the L most recent tokens, itself included
    d_max: int  # D: no pair is scored at a relative distance larger than this
    # decoding tokens also see, per head, the top_k middle keys (G <= j, i - j >= L) ...
    top_k: int = 0
    top_k_from_layer: int = 0  # ... in the layers from this one on ...
    top_k_distance: int = 0  # ... scored at this distance (for_model's default: L // 2)

    @classmethod
    def for_model(
        cls,
        cfg: LlamaConfig,
        n_global=10,
        n_local=None,
        d_max=None,
        top_k=0,
        top_k_from_layer=0,
        top_k_distance=None,
    ):
        """The paper's defaults: G = 10, L = D = the length the model was trained on; no top-k
        middle tokens."""
        n_local = cfg.max_position_embeddings if n_local is None else n_local
        d_max = n_local if d_max is None else d_max
        top_k_distance = n_local // 2 if top_k_distance is None else top_k_distance
        if top_k and top_k_from_layer >= cfg.num_hidden_layers:
            raise UserError(
                f"top_k_from_layer (--top-k-from-layer) is {top_k_from_layer}; the model has "
                f"{cfg.num_hidden_layers} layers (0..{cfg.num_hidden_layers - 1})"
            )
        return cls(n_global, n_local, d_max, top_k, top_k_from_layer, top_k_distance)

    def __post_init__(self):
        for name, value in vars(self).items():
            least = 1 if name == "n_local" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                flag = "--top-k-middle" if name == "top_k" else "--" + name.replace("_", "-")
                raise UserError(f"{name} ({flag}) is {value!r}; it must be an integer >= {least}")


def _checked(name, value, type_):
    """The value if it has the field's type (ints must be positive), else a UserError naming the
    field."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    number = integer or isinstance(value, float)
    ok, want = {  # type -> is the value one, what one is
        int: (integer and value > 0, "a positive integer"),
        float: (number and 0 < value <= sys.float_info.max, "a positive finite number"),
        bool: (isinstance(value, bool), "true or false"),
        int | None: (value is None or integer and value >= 0, "a token id or null"),
    }[type_]
    if not ok:
        refuse(f"field {name!r} is {value!r}, expected {want}")
    return float(value) if type_ is float else value
