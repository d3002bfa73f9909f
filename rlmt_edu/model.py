"""The tiny GPT every chapter trains, its checkpoints, and per-token log-probs of whole sequences.

The model is a plain ``transformers`` GPT-2 (``GPT2LMHeadModel``) built from a tiny ``GPT2Config``, so that
``generate``, ``save_pretrained`` and swapping in any other ``AutoModelForCausalLM`` keep working. Nothing
here is specific to the paper's algorithms: this is the machinery they share.

- ``ModelConfig`` / ``build_model``: a CPU-sized GPT-2 whose vocabulary is the word-level tokenizer's.
- ``save_checkpoint`` / ``load_checkpoint``: safetensors only (nothing is unpickled), written atomically.
- ``sequence_logprobs``: log π(a_t | s_t) of every token of a batch after the first, in one forward pass,
  correct for left-padded rows too.

- ``build_value_model`` / ``build_reward_model``: the same GPT-2 trunk, loaded from a checkpoint, with a
  scalar head: one value per token (the critic, §4.2) or one reward per text (the reward model, §4.4).
- ``GPT2RewardModel`` / ``build_likelihood_reward_model``: chapter 05's reward model, a GPT-2 language model
  that reads its reward through its own LM head as well as through a scalar head (beyond the paper).

Shape legend: B batch, T tokens, V vocabulary (L is a full sequence length: prompt and response).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from rlmt_edu.losses._checks import check_positive, check_tensor
from rlmt_edu.losses.nll import token_logp
from rlmt_edu.utils import atomic_save_dir

Tensor = torch.Tensor

#: The small JSON file that ``save_checkpoint`` writes beside the weights (config used, metrics, ...).
METADATA_FILE = "rlmt_edu.json"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class ModelConfig:
    """Size of the tiny GPT-2. The defaults train in seconds to minutes on a 2-core CPU."""

    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 128
    """Width of the residual stream (embedding size)."""
    n_positions: int = 64
    """Context length: the longest prompt + response the model can see."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 keeps sampling and training identical)."""
    layer_norm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of the weights."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "n_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_head: expected a divisor of n_embd={self.n_embd}, got {self.n_head}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        check_positive("layer_norm_epsilon", self.layer_norm_epsilon)
        check_positive("initializer_range", self.initializer_range)


def build_model(
    tokenizer: PreTrainedTokenizerBase, config: ModelConfig = ModelConfig(), *, seed: int = 0
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 whose vocabulary is ``tokenizer``'s, in eval mode, on the CPU.

    bos and eos are the tokenizer's ``<EOS>`` id and pad its ``<PAD>`` id, so ``generate`` needs no extra
    arguments and emits no warnings. The initialisation is drawn from ``seed`` inside a forked RNG, so building
    a model neither depends on nor disturbs the global torch random state.
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config: expected a ModelConfig, got {type(config).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    vocab_size = len(tokenizer)
    ids = {"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    for name, token_id in ids.items():
        if token_id is None or not 0 <= token_id < vocab_size:
            raise ValueError(
                f"tokenizer: expected a {name} token with an id in [0, {vocab_size}), got {token_id!r}"
            )
    gpt2_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.initializer_range,
        bos_token_id=ids["eos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(gpt2_config)
    return model.eval()


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` and ``tokenizer`` with ``save_pretrained`` (safetensors) into the folder ``path``.

    ``metadata`` (e.g. the config used and final metrics; JSON-serialisable) goes to ``rlmt_edu.json``.
    Everything is written into a temporary folder beside ``path`` first and moved into place at the end, so a
    crash half-way leaves the previous checkpoint (or nothing) at ``path``, never a half-written one.
    """
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise ValueError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
    metadata_text = None
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise ValueError(f"metadata: expected a dict or None, got {type(metadata).__name__}")
        try:
            metadata_text = json.dumps(metadata, indent=1, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"metadata: expected JSON-serialisable values, got {error}") from None

    def write(folder: Path) -> None:
        with _no_progress_bars():
            model.save_pretrained(folder)  # transformers 5 always writes model.safetensors
        tokenizer.save_pretrained(folder)
        if metadata_text is not None:
            (folder / METADATA_FILE).write_text(metadata_text, encoding="utf-8")

    return atomic_save_dir(path, write)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' per-file progress bars (noise in a notebook for a 1 MB model), then restore them."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_checkpoint_dir(path: str | Path, argument: str = "path") -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{argument}: expected an existing checkpoint folder, got {str(path)!r} (no such folder)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{argument}: expected a model checkpoint with config.json, got {str(path)!r} without one")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise ValueError(
            f"{argument}: expected safetensors weights ({' or '.join(_WEIGHT_FILES)}) in {str(path)!r}, found none"
        )
    return folder


def load_checkpoint(
    path: str | Path, *, device: str | torch.device | None = None, argument: str = "path"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a folder written by ``save_checkpoint`` (or any local causal-LM checkpoint in safetensors).

    Local files only (nothing reaches the network) and safetensors only (nothing is unpickled). The model is
    returned in eval mode on ``device`` (default: the CPU). A checkpoint of another kind, such as a reward
    model or a critic (a scalar head, see ``build_reward_model``), is refused with a ``ValueError`` naming
    ``argument``, rather than loaded as a language model whose head was never trained.
    """
    folder = _check_checkpoint_dir(path, argument)
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(
            f"{argument}: expected a tokenizer (tokenizer_config.json) beside the model in {str(path)!r}, found none"
        )
    _check_language_model(folder, argument)
    with _no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


#: The heads ``build_value_model`` and ``build_reward_model`` save, by the class name in config.json.
_SCALAR_HEADS = {"ForSequenceClassification": "a reward model", "ForTokenClassification": "a value model (critic)",
                 "RewardModel": "a reward model"}


def _check_language_model(folder: Path, argument: str) -> None:
    """Refuse a checkpoint whose config.json ``architectures`` names no causal LM (naming none is accepted)."""
    try:
        names = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{argument}: expected a readable config.json in {str(folder)!r}, got {error}") from None
    names = [str(name) for name in names] if isinstance(names, list) else []
    if names and not any(name.endswith(("LMHeadModel", "ForCausalLM")) for name in names):
        kind = next((what for suffix, what in _SCALAR_HEADS.items() if names[0].endswith(suffix)), "another model")
        raise ValueError(f"{argument}: expected a language model checkpoint, got {str(folder)!r}, "
                         f"which is {kind} ({names[0]}), not a language model")


class GPT2RewardModel(GPT2LMHeadModel):
    """A reward model R(text) for ``<USER> q <MODEL> response <EOS>`` texts with a *likelihood readout*.

        R(text) = α · (1/|a|) Σ_t log π_φ(a_t | s_t)  +  wᵀ h_last + b

    | symbol | meaning | parameter |
    |---|---|---|
    | π_φ(a_t \\| s_t) | the model's own next-token probability of response token a_t (and the <EOS>) | ``transformer``, ``lm_head`` |
    | α | the weight of the mean log-likelihood | ``likelihood_weight``, () |
    | h_last | the final hidden state at the last real token (the <EOS>) | |
    | w, b | the scalar head of §4.4's reward model | ``score``, Linear(n_embd → 1) |

    Beyond the paper. §4.4 puts a scalar head on the trunk (``build_reward_model``, ``readout="last"``);
    here the language-model head stays and is read too. Built from the SFT model with α = 1 and w = b = 0, the
    untrained reward is the SFT model's mean log-likelihood of the response, which already ranks most pairs
    as the gold score does (an SFT model rarely finds a wrong sum likely). Training with Eq. (6) then moves
    the trunk, α and the head together: what the labellers add (their length bias included) is learned on
    top of that start. ``rewards(input_ids, attention_mask)`` gives R, (B,); the inherited ``forward`` is
    the language model's, so the class loads, saves and moves like any ``GPT2LMHeadModel``.
    """

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.score = torch.nn.Linear(config.n_embd, 1)
        self.likelihood_weight = torch.nn.Parameter(torch.ones(()))
        self.post_init()

    @property
    def response_token_id(self) -> int:
        """The id of the <MODEL> token: the response is every real token after the last one of a row."""
        value = getattr(self.config, "response_token_id", None)
        if not isinstance(value, int):
            raise ValueError("config: expected response_token_id (the <MODEL> id) in the reward model's config, "
                             "got none; build it with build_likelihood_reward_model")
        return value

    def rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """R(text) of a RIGHT-padded batch (B, T) of chat texts, shape (B,). Gradients flow."""
        check_tensor("input_ids", input_ids, ndim=2, floating=False)
        check_tensor("attention_mask", attention_mask, ndim=2, floating=False)
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = attention_mask.sum(dim=1) - 1  # (B,) the last real token (right padding)
        head = self.score(hidden[rows, last])[:, 0].float()  # (B,) wᵀ h_last + b
        # log π_φ(a_t | s_t): column t of the LM head scores token t + 1
        logp = token_logp(self.lm_head(hidden[:, :-1]).float(), input_ids[:, 1:])  # (B, T-1)
        is_marker = (input_ids == self.response_token_id) & (attention_mask == 1)  # (B, T)
        if not bool(is_marker.any(dim=1).all()):
            raise ValueError("input_ids: expected a <MODEL> token in every row (texts '<USER> q <MODEL> r <EOS>')")
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
        start = torch.where(is_marker, columns, -1).max(dim=1).values  # (B,) position of the last <MODEL>
        response = (columns[:, :-1] >= start[:, None]) & (attention_mask[:, 1:] == 1)  # (B, T-1) tokens after it
        mean_logp = (logp * response).sum(dim=1) / response.sum(dim=1).clamp_min(1)  # (B,)
        return self.likelihood_weight * mean_logp + head  # (B,)


def build_likelihood_reward_model(
    init: str | Path, *, response_token_id: int | None = None, device: str | torch.device | None = None
) -> GPT2RewardModel:
    """A ``GPT2RewardModel``: from a language-model checkpoint (e.g. the SFT model) with α = 1 and a zero
    scalar head (``response_token_id``, the <MODEL> id, is then required); from a folder where one was saved
    (``save_checkpoint``), with everything it learned."""
    folder = _check_checkpoint_dir(init, argument="init")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    saved = "GPT2RewardModel" in (config.architectures or [])
    if not saved:
        if not isinstance(response_token_id, int) or isinstance(response_token_id, bool) or response_token_id < 0:
            raise ValueError(f"response_token_id: expected the <MODEL> token id (an int >= 0) to start a reward "
                             f"model from a language model, got {response_token_id!r}")
        config.response_token_id = response_token_id
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # from an LM, score and likelihood_weight are new on purpose
    try:
        with _no_progress_bars():
            model = GPT2RewardModel.from_pretrained(folder, config=config, local_files_only=True,
                                                    use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not saved:  # the start: R = the mean log-likelihood, exactly
        with torch.no_grad():
            model.score.weight.zero_()
            model.score.bias.zero_()
            model.likelihood_weight.fill_(1.0)
    return model.to(device) if device is not None else model


def build_value_model(
    init: str | Path, *, device: str | torch.device | None = None, seed: int = 0
) -> GPT2ForTokenClassification:
    """A critic: the GPT-2 trunk of the checkpoint ``init`` with a linear head giving one scalar per token.

    ``model(input_ids, attention_mask, position_ids=...).logits[..., 0]`` (B, T) is the value read at every
    position. From a language-model checkpoint (e.g. the SFT model) the head is new, drawn from ``seed``;
    from a folder where a value model was saved (``save_checkpoint``) the trained head is loaded. The head
    has no dropout (``transformers`` would put 0.1 before it), so training and use see the same function.
    """
    return _scalar_head_model(GPT2ForTokenClassification, init, device, seed, classifier_dropout=0.0)


def build_reward_model(
    init: str | Path, *, device: str | torch.device | None = None, seed: int = 0
) -> GPT2ForSequenceClassification:
    """A reward model: the GPT-2 trunk of the checkpoint ``init`` with a linear head read at the last token.

    ``model(input_ids, attention_mask).logits[:, 0]`` (B,) is one scalar per text, read at the rightmost
    token that is not the pad id (``transformers``' rule: pad on the right, so that positions need no
    correction). From a language-model checkpoint the head is new, drawn from ``seed``; from a folder where a
    reward model was saved (``save_checkpoint``) the trained head is loaded.
    """
    model = _scalar_head_model(GPT2ForSequenceClassification, init, device, seed)
    if model.config.pad_token_id is None:
        raise ValueError(f"init: expected a checkpoint whose config has a pad_token_id, got none in {str(init)!r}")
    return model


def _scalar_head_model(model_class, init, device, seed: int, **config_overrides):
    """``model_class.from_pretrained(init, num_labels=1)``, local safetensors only, the new head seeded."""
    folder = _check_checkpoint_dir(init, argument="init")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    config = AutoConfig.from_pretrained(folder, num_labels=1, local_files_only=True)
    for name, value in config_overrides.items():
        setattr(config, name, value)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new on purpose: no "newly initialized weights" notice
    try:
        with _no_progress_bars(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class.from_pretrained(folder, config=config, local_files_only=True, use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device) if device is not None else model


def load_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata`` dict saved with a checkpoint (an empty dict if none was saved)."""
    file = _check_checkpoint_dir(path) / METADATA_FILE
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def config_dict(config: ModelConfig) -> dict[str, Any]:
    """``config`` as a plain dict, e.g. for the checkpoint metadata."""
    return asdict(config)


def context_length(model: PreTrainedModel) -> int | None:
    """The longest sequence ``model`` can attend over (GPT-2's ``n_positions``), or None if it has no fixed limit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions 0, 1, 2, ... counted over the real tokens of each row only; padding gets position 0.

    With left padding, ``[PAD PAD a b]`` gets positions ``[0 0 0 1]``, so ``a`` sits at position 0 exactly as
    when the row is fed alone. (``generate`` computes positions the same way.)
    """
    positions = attention_mask.long().cumsum(dim=-1) - 1  # (B, L)
    return positions.clamp(min=0)  # (B, L)


LOGPROB_BACKENDS = ("hf", "lean", "auto")


def sequence_logprobs(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, *, temperature: float = 1.0,
    backend: str = "hf",
) -> Tensor:
    """log π(a_t | s_t) of every token after the first, from one forward pass: shape (B, L - 1).

    | symbol | argument | shape |
    |---|---|---|
    | the token sequences (prompt and response), left- or right-padded | ``input_ids`` | (B, L) |
    | 1 on real tokens, 0 on padding | ``attention_mask`` | (B, L) |
    | log π(a_t \\| s_t) for a_t = ``input_ids[:, t + 1]`` | returned | (B, L - 1) |

    Entry ``[b, t]`` is the log-probability of token ``t + 1`` of row ``b`` given tokens ``0..t``; it is 0
    where that token is padding, and where the token before it is padding (a row's first real token has no
    context to be predicted from). Positions come from the attention mask, so a left-padded row gets the same
    log-probs as the same row alone. ``temperature`` divides the logits first (1 gives the model's own π; use
    the sampler's temperature to score tokens under the distribution they were drawn from). Gradients flow.

    ``backend`` (beyond the paper, speed only): ``"hf"`` runs the ``transformers`` forward; ``"lean"`` runs GPT-2's
    forward written out over the same weights (``rollout.LeanGPT2`` without its cache), about 3× faster for the
    forward and 1.3× for forward + backward on the tiny models, with the same logits to ~1e-5
    (``tests/test_rollout.py``); ``"auto"`` takes ``"lean"`` for a GPT-2 model without active dropout, else
    ``"hf"``. Chapters 09 and 10 use ``"auto"``; the earlier chapters keep ``"hf"``, the numbers they committed.
    """
    check_tensor("input_ids", input_ids, ndim=2, floating=False)
    check_tensor("attention_mask", attention_mask, ndim=2, floating=False)
    if input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"input_ids: expected integer token ids, got dtype {input_ids.dtype}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"attention_mask: expected only 0 and 1, got values {attention_mask.unique()[:6].tolist()}")
    length = input_ids.shape[1]
    if length < 2:
        raise ValueError(f"input_ids: expected at least 2 tokens per row, got shape {tuple(input_ids.shape)}")
    limit = context_length(model)
    if limit is not None and length > limit:
        raise ValueError(f"input_ids: expected at most {limit} tokens (the model's context), got {length}")
    vocab_size = model.get_input_embeddings().num_embeddings
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        raise ValueError(
            f"input_ids: expected token ids in [0, {vocab_size}), "
            f"got range [{int(input_ids.min())}, {int(input_ids.max())}]"
        )
    temperature = check_positive("temperature", temperature)
    if not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if backend not in LOGPROB_BACKENDS:
        raise ValueError(f"backend: expected one of {LOGPROB_BACKENDS}, got {backend!r}")
    dropout = model.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    if backend == "auto":
        backend = "lean" if LeanGPT2.supports(model) and not dropout else "hf"
    elif backend == "lean" and (not LeanGPT2.supports(model) or dropout):
        raise ValueError("backend: 'lean' needs a plain GPT-2 model without active dropout (call model.eval()), "
                         f"got {type(model).__name__} (training={model.training})")
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = position_ids_from_mask(attention_mask)
    if backend == "lean":
        lean = LeanGPT2(model, input_ids.shape[0], length, cache=False)
        logits = lean.forward(input_ids, position_ids, attention_mask, all_logits=True)  # (B, L, V)
    else:
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).logits  # (B, L, V)
    # logits[:, t] has seen tokens 0..t and scores token t + 1
    logp = token_logp(logits[:, :-1].float() / temperature, input_ids[:, 1:])  # (B, L-1)
    # keep an entry only if both the scored token and the one before it are real (not padding)
    scored = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)  # (B, L-1)
    return torch.where(scored, logp, torch.zeros_like(logp))  # (B, L-1)


# ---- GPT-2's forward, written out (the sampler's and the lean log-probs' engine) ----------------------------


class LeanGPT2:
    """GPT-2's forward pass written out over a ``GPT2LMHeadModel``'s own weights, with a preallocated KV cache.

    The same computation as ``transformers``' GPT-2 (``tests/test_rollout.py`` checks the logits agree to
    1e-5), without its per-call machinery, which dominates the cost of one token on a tiny model. It reads the
    module's parameters when called and copies nothing, so it always sees the current weights. Inference only:
    no dropout, no gradients needed.

    Calling it with ``(input_ids, position_ids, mask)`` appends T tokens to the cache and returns the logits of
    the last one: call it once with the whole (left-padded) prompt, then once per generated token.
    """

    def __init__(self, model: GPT2LMHeadModel, batch_size: int, max_length: int, *, cache: bool = True):
        if not self.supports(model):
            raise ValueError(f"model: expected a GPT2LMHeadModel, got {type(model).__name__}")
        config = model.config
        self.model = model
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        weight = model.transformer.wte.weight
        # keys and values of every token seen so far, per layer: kv_cache[layer, 0] keys, kv_cache[layer, 1] values.
        # cache=False: one call with whole sequences, keys and values used where computed, so autograd can run
        # through it (a cache written in place cannot be differentiated through)
        self.kv_cache = (weight.new_zeros((config.n_layer, 2, batch_size, self.n_head, max_length, self.head_dim))
                         if cache else None)
        self.max_length = max_length
        self.key_mask = torch.zeros((batch_size, max_length), dtype=torch.bool, device=weight.device)  # (B, S)
        self.length = 0  # cache slots filled so far
        # GPT-2's "gelu_new" is the tanh approximation of GELU; torch has it as one fused kernel
        self.fused_gelu = config.activation_function in ("gelu_new", "gelu_pytorch_tanh")

    @staticmethod
    def supports(model: object) -> bool:
        """True for a plain GPT-2 language model (no cross-attention, no upcast-and-reorder attention)."""
        return (
            isinstance(model, GPT2LMHeadModel)
            and not model.config.add_cross_attention
            and not model.config.reorder_and_upcast_attn
        )

    def __call__(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor) -> Tensor:
        return self.forward(input_ids, position_ids, mask)[:, -1]  # (B, V)

    def forward(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor, *, all_logits: bool = False) -> Tensor:
        """Append ``input_ids`` (B, T) at ``position_ids`` (B, T) to the cache; ``mask`` (B, T) is 0 on padding.

        Returns the logits (B, T, V) if ``all_logits``, else those of the last token only, (B, 1, V).
        """
        batch_size, n_new = input_ids.shape
        start, end = self.length, self.length + n_new
        if end > self.max_length:
            raise ValueError(f"input_ids: the cache holds {self.max_length} tokens, {end} requested")
        if self.kv_cache is None and start > 0:
            raise ValueError("input_ids: a LeanGPT2 without a cache takes one call with the whole sequences")
        trunk = self.model.transformer
        self.key_mask[:, start:end] = mask.bool()
        attn_mask = self._attention_mask(start, end)  # (B, 1, T, S)

        x = F.embedding(input_ids, trunk.wte.weight) + F.embedding(position_ids, trunk.wpe.weight)  # (B, T, C)
        width = x.shape[-1]
        for layer, block in enumerate(trunk.h):
            # attention sub-block: x + c_proj(attention(ln_1(x)))
            h = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)  # (B, T, C)
            qkv = _conv1d(h, block.attn.c_attn)  # (B, T, 3C): queries | keys | values
            qkv = qkv.view(batch_size, n_new, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, C/H)
            if self.kv_cache is None:
                keys, values = qkv[1], qkv[2]  # (B, H, T, C/H) each
            else:
                cache = self.kv_cache[layer]  # (2, B, H, S, C/H)
                cache[:, :, :, start:end] = qkv[1:]  # store the new keys and values
                keys, values = cache[0, :, :, :end], cache[1, :, :, :end]
            y = F.scaled_dot_product_attention(qkv[0], keys, values, attn_mask=attn_mask,
                                               scale=block.attn.scaling)  # (B, H, T, C/H)
            y = y.transpose(1, 2).reshape(batch_size, n_new, width)  # (B, T, C)
            x = x + _conv1d(y, block.attn.c_proj)  # (B, T, C)
            # MLP sub-block: x + c_proj(gelu(c_fc(ln_2(x))))
            h = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)  # (B, T, C)
            h = _conv1d(h, block.mlp.c_fc)  # (B, T, 4C)
            h = F.gelu(h, approximate="tanh") if self.fused_gelu else block.mlp.act(h)  # (B, T, 4C)
            x = x + _conv1d(h, block.mlp.c_proj)  # (B, T, C)
        self.length = end
        if not all_logits:
            x = x[:, -1:]  # (B, 1, C) only the last token's next-token scores are needed for sampling
        x = F.layer_norm(x, (width,), trunk.ln_f.weight, trunk.ln_f.bias, trunk.ln_f.eps)
        return F.linear(x, self.model.lm_head.weight)  # (B, T, V) tied to wte

    def _attention_mask(self, start: int, end: int) -> Tensor:
        """(B, 1, T, S) True where new token i (cache slot start + i) may attend to slot j."""
        slots = torch.arange(end, device=self.key_mask.device)  # (S,)
        query_slots = slots[start:end, None]  # (T, 1)
        # causal (no peeking at later slots) and never at padding ...
        allowed = (slots <= query_slots) & self.key_mask[:, None, :end]  # (B, T, S)
        # ... but a padding token may attend to itself: a row with nothing to attend to gives NaN in older
        # torch versions, and a NaN value in a padding slot would leak into real rows (0 weight x NaN = NaN)
        allowed |= slots == query_slots  # (B, T, S)
        return allowed[:, None]  # (B, 1, T, S)


def _conv1d(x: Tensor, layer: torch.nn.Module) -> Tensor:
    """GPT-2's ``Conv1D`` is a linear layer whose weight is stored (in, out): x @ W + b."""
    out = torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight)  # (B*T, out)
    return out.view(*x.shape[:-1], -1)  # (B, T, out)
