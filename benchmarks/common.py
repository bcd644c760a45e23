"""Shared pieces of the benchmarks: an offline corpus, a LLaMA-style model, the optimizer
registry and measurement helpers.

* Corpus: by default the Python standard library's own ``.py`` files (found through
  ``sysconfig``; ``site-packages`` and test directories skipped), read in sorted order and
  split by a hash of each file's relative path into train (~95%) and validation (~5%).
  Tokens are bytes (vocabulary 256): nothing to download, nothing to train. ``load_corpus
  (path)`` takes any other text file or folder instead.
* Model: :class:`LlamaLM`, a compact LLaMA-style causal LM (RMSNorm, rotary positions,
  SwiGLU MLP, ``scaled_dot_product_attention``, untied embedding and head) whose attention
  and MLP modules are called ``attn`` and ``mlp``, so ``lowrank_optim.param_groups(model,
  target_modules=("attn", "mlp"))`` picks exactly the papers' matrices. :data:`CONFIGS`
  holds the papers' sizes and small CPU ones.
* :data:`METHODS`: the one method registry of every script (name -> :class:`Method`: the
  model swap, the optimizer factory, the default learning rate). Adding a method is one
  ``Method(name, factory, lr, description)`` entry; ``method("NAME+key=value")`` adds
  optimizer keywords to an entry.
* Measurement: exact bytes of weights / gradients / optimizer state, the one closed form of
  those bytes (:func:`closed_form`), the one memory meter (:class:`MemoryMeter`: VmHWM on
  CPU, ``torch.cuda.max_memory_allocated`` on CUDA), a synchronising timer.
* Reports: :func:`md_table` and :func:`write_report` (title, ``- key: value`` header lines
  with command, versions and device, body).
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import os
import platform
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _paths import ROOT  # also puts the checkout's package first on sys.path

# ---------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass
class Corpus:
    """Byte tokens (``torch.uint8``, 1-D) of the train and validation splits."""

    train: Tensor
    val: Tensor
    name: str
    n_train_files: int
    n_val_files: int

    def describe(self) -> str:
        size = lambda n: f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"
        files = lambda n: f" ({n} files)" if self.n_val_files else ""
        return (f"{self.name}: {size(self.train.numel())} train bytes{files(self.n_train_files)}"
                f", {size(self.val.numel())} validation bytes{files(self.n_val_files)}")


def _is_val(rel: str, val_fraction: float) -> bool:
    """Deterministic file-level split: the first 8 bytes of sha1(relative path)."""
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:8], "big")
    return h / 2 ** 64 < val_fraction


def _text_files(root: Path, suffixes: Optional[tuple], skip_dirs: set) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("."))
        for f in sorted(filenames):
            if suffixes is None or f.endswith(suffixes):
                out.append(Path(dirpath) / f)
    return sorted(out)


def load_corpus(path: Optional[str] = None, val_fraction: float = 0.05,
                min_val_bytes: int = 1 << 16) -> Corpus:
    """The default corpus (stdlib sources) or the text file / folder at ``path``.

    Folders are split by file (hash of the relative path); files that look binary (a NUL
    byte) are skipped. A single file, or a folder whose hash split leaves fewer than
    ``min_val_bytes`` of validation text, is split by position instead: the last
    ``val_fraction`` of the bytes is validation.
    """
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files, name = _text_files(root, (".py",), SKIP_DIRS), f"python{sysconfig.get_python_version()} stdlib .py"
    else:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"--data {path}: no such file or folder")
        if root.is_file():
            files, root, name = [root], root.parent, str(path)
        else:
            files, name = _text_files(root, None, {"__pycache__"}), str(path)
    train, val, n_train, n_val = [], [], 0, 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if not data or b"\x00" in data:
            continue
        data = data if data.endswith(b"\n") else data + b"\n"
        if _is_val(f.relative_to(root).as_posix(), val_fraction):
            val.append(data)
            n_val += 1
        else:
            train.append(data)
            n_train += 1
    if not train and not val:
        raise ValueError(f"no text found in {name}")
    if sum(map(len, val)) < min_val_bytes:  # too few files for a file-level split
        blob = b"".join(train + val) if len(files) > 1 else b"".join(val + train)
        cut = int(len(blob) * (1 - val_fraction))
        train, val, n_train, n_val = [blob[:cut]], [blob[cut:]], n_train + n_val, 0
        name += f" ({n_train} file{'s' * (n_train != 1)}, split by position)"
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
    return Corpus(as_tensor(train), as_tensor(val), name, n_train, n_val)


class Batches:
    """Random training windows (seeded: every method sees the same data in the same order)
    and fixed, evenly spaced validation windows (``val``). ``select``: as many windows
    less one, each halfway between two of ``val``'s (no byte in common with them when the
    validation split holds at least two windows' worth per ``val`` window,
    ``select_disjoint``), for choosing hyperparameters on other data than the reported."""

    def __init__(self, corpus: Corpus, batch_size: int, seq_len: int, seed: int,
                 eval_batches: int, device: torch.device):
        need = seq_len + 1
        for split, data in (("train", corpus.train), ("validation", corpus.val)):
            if data.numel() <= need:
                raise ValueError(f"{split} split has {data.numel()} bytes; "
                                 f"need more than seq_len + 1 = {need}")
        self.corpus, self.b, self.t, self.device = corpus, batch_size, seq_len, device
        self.gen = torch.Generator().manual_seed(seed)
        n_val = eval_batches * batch_size
        starts = torch.linspace(0, corpus.val.numel() - need, n_val).long()
        self.val = [self._windows(corpus.val, s) for s in starts.split(batch_size)]
        mid = (starts[:-1] + starts[1:]) // 2 if n_val > 1 else starts
        self.select = [self._windows(corpus.val, s) for s in mid.split(batch_size)]
        gaps = torch.cat([mid - starts[:-1], starts[1:] - mid]) if n_val > 1 else starts[:0]
        self.select_disjoint = bool(n_val > 1 and gaps.min() >= need)

    def _windows(self, data: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + torch.arange(self.t + 1)
        w = data[idx].long().to(self.device, non_blocking=True)
        return w[:, :-1], w[:, 1:]

    def next_train(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, self.corpus.train.numel() - self.t, (self.b,),
                               generator=self.gen)
        return self._windows(self.corpus.train, starts)


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    mlp_hidden: int
    vocab_size: int = 256
    seq_len: int = 256          # default training length (and the rotary table size)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0


CONFIGS: dict[str, ModelConfig] = {
    # CPU sizes (byte vocabulary)
    "micro": ModelConfig(64, 2, 2, 176, seq_len=64),
    "tiny": ModelConfig(128, 4, 4, 344, seq_len=128),
    "small": ModelConfig(256, 6, 4, 688, seq_len=256),
    # the GaLore / Q-GaLore / LoQT papers' LLaMA sizes (their vocabulary is T5's 32000:
    # pass vocab_size=32000 to match their embedding memory)
    "llama_60m": ModelConfig(512, 8, 8, 1376),
    "llama_130m": ModelConfig(768, 12, 12, 2048),
    "llama_350m": ModelConfig(1024, 24, 16, 2736),
    "llama_1b": ModelConfig(2048, 24, 32, 5461),
    "llama_7b": ModelConfig(4096, 32, 32, 11008),
    "llama_13b": ModelConfig(5120, 40, 40, 13824),
}


def get_config(name: str, **overrides) -> ModelConfig:
    key = name if name in CONFIGS else f"llama_{name}"
    if key not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(CONFIGS[key], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_table(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the head dimension (LLaMA/HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = RMSNorm(cfg.dim, cfg.norm_eps), MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LlamaLM(nn.Module):
    """LLaMA-style causal LM. Parameter names: ``embed``, ``layers.{i}.attn.{q,k,v,o}_proj``,
    ``layers.{i}.mlp.{gate,up,down}_proj``, ``layers.{i}.{attn,mlp}_norm``, ``norm``,
    ``lm_head``. Initialisation: normal(0, 0.02), residual outputs (``o_proj``,
    ``down_proj``) scaled by 1/sqrt(2·n_layers); seed it with ``torch.manual_seed``.
    ``checkpointing=True`` (or setting ``model.checkpointing``) recomputes each block in
    backward (``torch.utils.checkpoint``, non-reentrant) instead of keeping its
    activations; only the blocks' inputs are kept."""

    def __init__(self, cfg: ModelConfig, checkpointing: bool = False):
        super().__init__()
        self.cfg, self.checkpointing = cfg, checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_table(cfg.seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(
                    ("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None):
        t = idx.shape[1]
        if t > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {t} > the model's seq_len {self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(idx)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Method registry: name -> how to swap the model's layers and build the optimizer
# ---------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A built method: the model to train (possibly converted, e.g. with quantized
    weights), one optimizer, and the hooks handle when it steps inside backward."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    per_layer: bool = False
    hooks: object = None       # the handle register_hooks returned, if any


@dataclass
class MethodArgs:
    """Hyperparameters every method may read (unused ones are ignored)."""

    lr: float
    rank: int
    update_proj_gap: int = 200
    scale: float = 0.25
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    target_modules: tuple = ("attn", "mlp")
    max_grad_norm_per_param: Optional[float] = None   # per-layer mode's clipping


@dataclass(frozen=True)
class Method:
    """One entry of :data:`METHODS`. ``optimizer(model, args, **kwargs)`` builds the
    optimizer for the (prepared) model; ``prepare(model, args, **prepare_kwargs)`` swaps
    its layers first (Q-GaLore's INT8 weights, LoQT's ``W = Q + s·P·B``), in place."""

    name: str
    optimizer: Callable[..., torch.optim.Optimizer]
    lr: float                        # default peak learning rate (see below)
    description: str
    prepare: Optional[Callable[..., nn.Module]] = None
    kwargs: dict = dataclasses.field(default_factory=dict)           # optimizer keywords
    prepare_kwargs: dict = dataclasses.field(default_factory=dict)
    per_layer: bool = False          # stepped inside backward (opt.register_hooks(model))
    requires: tuple = ()             # importable modules it needs
    default: bool = True             # in the shoot-out's default set (when available)
    parent: Optional[str] = None     # the method whose update rule this one shares (8-bit
                                     # moments, per-layer stepping, other storage or options):
                                     # the shoot-out's --lr-sweep lets it inherit that rate

    @property
    def optimizer_class(self) -> Optional[str]:
        """The optimizer's class name (what :func:`closed_form` counts), when the factory
        declares it."""
        return getattr(self.optimizer, "cls", None)

    def available(self) -> bool:
        import importlib.util
        return all(importlib.util.find_spec(m) is not None for m in self.requires)

    def swap(self, model: nn.Module, a: MethodArgs) -> nn.Module:
        """The model with this method's layers (the same object when nothing is swapped)."""
        return self.prepare(model, a, **self.prepare_kwargs) if self.prepare else model

    def build(self, model: nn.Module, a: MethodArgs, **kwargs) -> Prepared:
        """Swap the model's layers, then :meth:`setup`."""
        return self.setup(self.swap(model, a), a, **kwargs)

    def setup(self, model: nn.Module, a: MethodArgs, **kwargs) -> Prepared:
        """The optimizer (and per-layer hooks) for a model already swapped."""
        opt = self.optimizer(model, a, **{**self.kwargs, **kwargs})
        hooks = opt.register_hooks(model, max_grad_norm_per_param=a.max_grad_norm_per_param) \
            if self.per_layer else None
        return Prepared(model, opt, self.per_layer, hooks)


def _adamw(model, a, **kw):
    return torch.optim.AdamW(model.parameters(), lr=a.lr, betas=a.betas,
                             weight_decay=a.weight_decay, **kw)


def _adamw8bit(model, a, **kw):
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(model.parameters(), lr=a.lr, betas=a.betas,
                               weight_decay=a.weight_decay, **kw)


_adamw.cls, _adamw8bit.cls = "AdamW", "AdamW8bit"


def _lowrank(cls: str, grouped: bool = True, **group):
    """Factory of the package's optimizer ``cls``: on ``param_groups(model)`` (attention and
    MLP matrices projected, the rest plain) or, for LoQT, on ``model.parameters()``.
    ``group``: the projected group's options that this method fixes (APOLLO-Mini's rank 1
    and scale √128) instead of taking ``--rank``/``--scale``."""
    def make(model, a, **kw):
        import lowrank_optim as lo
        if grouped:
            # a spec's keyword (NAME+scale=2) that names a projected-group option overrides
            # it there: as a constructor default it would lose to the group's own value
            fixed = {"rank": a.rank, "update_proj_gap": a.update_proj_gap, "scale": a.scale,
                     **group}
            fixed.update({k: kw.pop(k) for k in list(kw) if k in fixed})
        params = lo.param_groups(model, target_modules=a.target_modules, **fixed) \
            if grouped else model.parameters()
        return getattr(lo, cls)(params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay,
                                **kw)
    make.cls = cls
    return make


def _int8_weights(model, a):
    import lowrank_optim as lo
    return lo.quantize_weights(model, bits=8, group_size=256, target_modules=a.target_modules)


def _loqt_layers(model, a, **kw):
    # LoQT merges at its own schedule (first gap 100, growth 1.2, the paper's), not at
    # update_proj_gap: on the shoot-out's defaults (seed 0) a first gap of 100 gave val ppl
    # 3.973 and 200 gave 4.026
    import lowrank_optim as lo
    return lo.prepare_loqt(model, rank=a.rank, target_modules=a.target_modules,
                           scale=a.scale, **{"bits": 4, **kw})


# Default learning rates: the best of `--lr-sweep` on the shoot-out's defaults ("tiny", 500
# steps of 16 x 128 bytes, warmup 10%, cosine to 0.1, gradient clipping at norm 1.0):
#   python benchmarks/shootout.py --threads 1 --lr-sweep 0.5,1,2 --seeds 0,1,2
# (benchmarks/results/shootout_3seeds.md, whose sweep table holds the losses). The 8-bit,
# per-layer and other variants take their parent's rate. Larger models want smaller rates
# (the papers: AdamW 1e-3, GaLore 1e-2 at 60M-1B): pass --lr.
# Adding a method is one entry: Method(name, optimizer factory, default lr, description).
BNB = ("bitsandbytes",)
_GALORE = _lowrank("GaLoreAdamW")
_LOQT = _lowrank("LoQTAdamW", grouped=False)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("adamw", _adamw, 1.5e-3, "torch.optim.AdamW"),
    Method("adamw_fused", _adamw, 1.5e-3, "torch.optim.AdamW(fused=True)",
           kwargs=dict(fused=True), default=False, parent="adamw"),
    Method("adamw8bit", _adamw8bit, 1.5e-3, "bitsandbytes.optim.AdamW8bit", requires=BNB,
           parent="adamw"),
    Method("galore", _GALORE, 4e-2, "lowrank_optim.GaLoreAdamW on param_groups(attn, mlp)"),
    Method("galore_randomized", _GALORE, 4e-2,
           "GaLoreAdamW with svd=\"randomized\" (range finder, 1 power iteration)",
           kwargs=dict(svd="randomized"), default=False, parent="galore"),
    Method("galore_nostagger", _GALORE, 4e-2, "GaLoreAdamW with stagger=False (every matrix "
           "refreshes at 0, T, 2T, ... as in the reference)", kwargs=dict(stagger=False),
           default=False, parent="galore"),
    Method("galore8bit", _lowrank("GaLoreAdamW8bit"), 4e-2,
           "lowrank_optim.GaLoreAdamW8bit (8-bit moments)", requires=BNB, parent="galore"),
    Method("galore8bit_per_layer", _lowrank("GaLoreAdamW8bit"), 4e-2,
           "GaLoreAdamW8bit stepped inside backward (opt.register_hooks(model))",
           per_layer=True, requires=BNB, default=False, parent="galore"),
    Method("galore_per_layer", _GALORE, 4e-2,
           "GaLoreAdamW stepped inside backward (opt.register_hooks(model))", per_layer=True,
           parent="galore"),
    Method("qgalore", _lowrank("QGaLoreAdamW8bit"), 4e-2,
           "lowrank_optim.QGaLoreAdamW8bit: INT8 weights (quantize_weights), INT4 bases, lazy "
           "refresh, 8-bit moments", prepare=_int8_weights, requires=BNB),
    Method("qgalore_per_layer", _lowrank("QGaLoreAdamW8bit"), 4e-2,
           "QGaLoreAdamW8bit stepped inside backward (opt.register_hooks(model))",
           prepare=_int8_weights, per_layer=True, requires=BNB, default=False,
           parent="qgalore"),
    # issue #18; rates: the best of the sweep in results/shootout_3seeds.md
    Method("fira", _lowrank("FiraAdamW"), 2e-2, "lowrank_optim.FiraAdamW: GaLore's Adam plus "
           "the scaled residual outside the subspace (norm-growth limit 1.01)"),
    Method("apollo", _lowrank("APOLLOAdamW", scale=1.0), 1.4e-2, "lowrank_optim.APOLLOAdamW: "
           "channel-wise scaling of the gradient from Adam on a random projection (scale 1, "
           "the paper's)"),
    Method("apollo_mini", _lowrank("APOLLOMini", rank=1, scale=128 ** 0.5), 5e-3,
           "lowrank_optim.APOLLOMini: tensor-wise scaling from a rank-1 random projection "
           "(scale √128, the paper's)"),
    Method("apollo_mini_int8_per_layer", _lowrank("APOLLOMini", rank=1, scale=128 ** 0.5),
           1e-2, "APOLLOMini on INT8 weights (quantize_weights: the paper's Q-APOLLO-Mini) "
           "stepped inside backward (opt.register_hooks(model))", prepare=_int8_weights,
           per_layer=True, default=False, parent="apollo_mini"),
    Method("loqt", _LOQT, 2e-2, "lowrank_optim.LoQTAdamW: NF4 weights + INT8 basis P frozen, "
           "B trained (prepare_loqt), merges at exponentially growing intervals (staggered)",
           prepare=_loqt_layers, requires=BNB),
    Method("loqt8bit", _lowrank("LoQTAdamW8bit", grouped=False), 2e-2,
           "LoQTAdamW8bit (8-bit moments of B)", prepare=_loqt_layers, requires=BNB,
           default=False, parent="loqt"),
    Method("loqt8bit_per_layer", _lowrank("LoQTAdamW8bit", grouped=False), 2e-2,
           "LoQTAdamW8bit stepped inside backward", prepare=_loqt_layers, per_layer=True,
           requires=BNB, default=False, parent="loqt"),
    Method("loqt_nf4_64", _LOQT, 2e-2, "LoQTAdamW with the earlier storage: NF4 blocks of 64 "
           "with a float32 absmax (4.5 bits per weight) and an INT4 P (the defaults: NF4 "
           "blocks of 32 with a double-quantized absmax, 4.26 bits, and an INT8 P)",
           prepare=_loqt_layers, prepare_kwargs=dict(group_size=64, double_quant=False,
                                                     proj_bits=4),
           requires=BNB, default=False, parent="loqt"),
    Method("loqt_nostagger", _LOQT, 2e-2, "LoQTAdamW with stagger=False (every layer merges "
           "at the same steps, as in the reference)", prepare=_loqt_layers,
           kwargs=dict(stagger=False), requires=BNB, default=False, parent="loqt"),
    Method("loqt_nq", _LOQT, 2e-2, "LoQTAdamW without quantization (float W and P: LoQT-nq)",
           prepare=_loqt_layers, prepare_kwargs=dict(bits=None, proj_bits=None),
           default=False, parent="loqt"),
)}


def method(spec: str) -> Method:
    """The method of a name in :data:`METHODS`, optionally followed by optimizer keywords:
    ``NAME+key=value+...`` (values are Python literals, else strings), e.g.
    ``galore+state_on_refresh=project`` or ``qgalore+gamma_proj=1``. Such a variant is its
    own row, named by the whole spec, and inherits the base method's rate in a sweep."""
    name, *options = spec.strip().split("+")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    base = METHODS[name]
    if not options:
        return base
    kw = {}
    for item in options:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{spec!r}: expected NAME+key=value, got {item!r}")
        try:
            kw[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kw[key.strip()] = value.strip()
    return dataclasses.replace(base, name=spec.strip(), kwargs={**base.kwargs, **kw},
                               default=False, parent=name,
                               description=f"{base.description}, with " + ", ".join(
                                   f"{k}={v!r}" for k, v in kw.items()))


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------

def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict()``: the parameters plus persistent buffers such as
    the scales of quantized weights (not the rotary table, which is not persistent)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def stored_tensors(model: nn.Module):
    """``(name, kind, tensor)`` for every tensor the model stores, ``kind`` "p" (parameter)
    or "b" (buffer). An INT8 weight (``lo.nn.QuantWeight``) is stored as its uint8 codes
    ("p") and float32 ``_scale``/``_offset`` ("b"), as in ``QuantLinear.state_dict()``."""
    import lowrank_optim as lo

    for name, p in model.named_parameters():
        if isinstance(p, lo.nn.QuantWeight):
            yield name, "p", p.codes
            yield from ((f"{name}_{k}", "b", t) for k in ("scale", "offset")
                        if (t := getattr(p, k)) is not None)
        else:
            yield name, "p", p
    for name, b in model.named_buffers():
        yield name, "b", b


def grad_bytes(model: nn.Module, per_layer: bool = False) -> int:
    """Bytes the gradients take: all trainable parameters' in normal stepping; in per-layer
    mode only the largest one's, since each gradient is freed right after its update.
    An INT8 weight (``QuantLinear``) gets a float32 gradient like any float32 parameter."""
    sizes = [tensor_bytes(p) for p in model.parameters() if p.requires_grad]
    return (max(sizes, default=0) if per_layer else sum(sizes))


def _state_tensors(optimizer: torch.optim.Optimizer):
    """Every tensor reachable from ``optimizer.state``: dicts, lists and plain objects (such
    as galore-torch's projector) walked, 6 levels deep at most."""
    def walk(v, depth=0):
        if depth > 6:
            return
        if isinstance(v, Tensor):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from walk(x, depth + 1)
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from walk(x, depth + 1)
        elif hasattr(v, "__dict__") and not isinstance(v, type):
            for x in vars(v).values():
                yield from walk(x, depth + 1)
    for st in optimizer.state.values():
        yield from walk(st)


def state_bytes(optimizer: torch.optim.Optimizer, held: bool = False) -> int:
    """Bytes of every tensor in ``optimizer.state``; a tensor shared between parameters
    (bitsandbytes' quantization maps) is counted once. ``held=True``: the bytes of the
    distinct storages behind them instead, what memory (and ``torch.save``) really holds: a
    view keeps its whole base alive (a basis sliced from a full SVD)."""
    if held:
        return sum({(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                    for t in _state_tensors(optimizer)}.values())
    return sum({(t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()):
                tensor_bytes(t) for t in _state_tensors(optimizer)}.values())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def matrix_shapes(model: nn.Module, target_modules=("attn", "mlp")) -> list[tuple]:
    """``(name, shape, projected)`` of every parameter; projected: the weights of the Linear
    (or INT8 ``QuantLinear``) modules whose name contains one of ``target_modules``."""
    import lowrank_optim as lo
    proj = {id(m.weight) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, lo.QuantLinear)) and any(t in name for t in target_modules)}
    return [(n, tuple(p.shape), id(p) in proj) for n, p in model.named_parameters()]


LOQT = ("LoQTAdamW", "LoQTAdamW8bit")
APOLLO = ("APOLLOAdamW", "APOLLOMini")
CLOSED_FORM = ("AdamW", "AdamW8bit", "GaLoreAdamW", "GaLoreAdamW8bit", "QGaLoreAdamW8bit",
               "FiraAdamW") + APOLLO + LOQT


def closed_form(optimizer: str, shapes, rank: int, esize: int) -> tuple[int, int]:
    """The one closed form of the benchmarks: exact (weights, state) bytes that the dtypes of
    torch, bitsandbytes and the package imply, for the optimizer class named ``optimizer``
    (AdamW, AdamW8bit, GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW8bit, LoQTAdamW,
    LoQTAdamW8bit) on parameters ``shapes`` (:func:`matrix_shapes` of the float model) whose
    float tensors take ``esize`` bytes per element. Buffers (the rotary table) not included.

    8-bit moments: 2 uint8 codes + 2 float32 absmax per 256 elements, float32 (bitsandbytes)
    or model-dtype (the package) moments below 4096 elements; GaLore: float32 low-rank
    moments and basis (``4·(2·r·max(m,n) + r·min(m,n))``); Q-GaLore: INT8 weight codes + float32
    scale and offset per 256, INT4 packed bases + scale and offset per 256; LoQT: NF4 codes
    two per byte + a uint8 absmax per 32 + float32 scale and offset per 256 absmaxes, INT8
    P + scale and offset per 64, B in the model dtype; torch AdamW: a 4-byte step per
    parameter. Fira: GaLore's state and a float32 scalar per matrix (the norm-growth
    limiter's last norm); APOLLO: the same without a basis (drawn again from its seed), at
    rank 1 for APOLLO-Mini (its registry entry's rank, whatever ``rank`` is)."""
    if optimizer not in CLOSED_FORM:
        raise ValueError(f"no closed form for {optimizer!r}; known: {', '.join(CLOSED_FORM)}")
    q8 = lambda n: 2 * n + 2 * 4 * _cdiv(n, 256)                 # 2 uint8 moments + 2 absmax/256
    w = s = 0
    any8 = False
    for _, shape, proj in shapes:
        n = math.prod(shape)
        if optimizer in LOQT and proj:
            r = min(rank, *shape)
            blocks = _cdiv(n, 32)                                   # NF4 Q: codes, absmax/32
            w += _cdiv(n, 2) + blocks + 2 * 4 * _cdiv(blocks, 256)  # as uint8 + scale, offset/256
            p = min(shape) * r
            w += p + 2 * 4 * _cdiv(p, 64)                           # INT8 P + scale, offset/64
            w += max(shape) * r * esize + 8                         # B (model dtype), merges
            low = max(shape) * r                                    # B's moments:
            s += 2 * low * esize if optimizer == "LoQTAdamW" or low < 4096 else q8(low)
            continue
        if optimizer == "QGaLoreAdamW8bit" and proj:
            w += n + 2 * 4 * _cdiv(n, 256)                         # uint8 codes, scale, offset
        else:
            w += n * esize
        if optimizer == "AdamW":
            s += 2 * n * esize + 4                                  # moments in p.dtype + step
        elif optimizer == "AdamW8bit":
            any8 |= n >= 4096
            s += q8(n) if n >= 4096 else 2 * 4 * n                  # bnb: float32 below 4096
        elif proj:
            r = min(1 if optimizer == "APOLLOMini" else rank, *shape)
            low, basis = max(shape) * r, min(shape) * r
            if optimizer in ("GaLoreAdamW", "FiraAdamW") + APOLLO:
                s += 2 * 4 * low                                    # float32 low-rank moments
            else:
                s += q8(low) if low >= 4096 else 2 * 4 * low
            if optimizer == "QGaLoreAdamW8bit":
                s += _cdiv(basis, 2) + 2 * 4 * _cdiv(basis, 256)    # INT4 packed + scale, offset
            elif optimizer not in APOLLO:
                s += 4 * basis                                      # float32 basis
            if optimizer in ("FiraAdamW",) + APOLLO:
                s += 4                                              # limiter's last norm
        elif optimizer in ("GaLoreAdamW", "FiraAdamW", "LoQTAdamW") + APOLLO or n < 4096:
            s += 2 * n * esize                                      # zeros_like(p)
        else:
            s += q8(n)
    if any8:
        s += 2 * 256 * 4                                            # bnb qmap1, qmap2 (shared)
    return w, s


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """The one memory meter of the benchmarks: this process's peak since :meth:`reset`,
    ``torch.cuda.max_memory_allocated`` on CUDA (every reading synchronised first), peak RSS
    on the CPU (VmHWM of /proc/self/status, reset through /proc/self/clear_refs, Linux >=
    4.0). :meth:`start` resets and takes ``baseline``, the memory in use then (on the CPU:
    the Python/torch runtime and whatever was loaded)."""

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device}: torch.cuda.is_available() is False")
        self.cuda = self.device.type == "cuda"
        self.kind = "cuda max_memory_allocated" if self.cuda else "peak RSS (VmHWM)"
        self.what = "allocated" if self.cuda else "RSS"
        self.baseline = 0

    def sync(self) -> None:
        sync(self.device)

    def trim(self) -> None:
        """Collect garbage and give freed memory back (``malloc_trim``, the CUDA cache), so
        that a reading next is not inflated by memory the allocator merely keeps."""
        import gc
        gc.collect()
        self.sync()
        release_memory(self.device)

    def current(self) -> int:
        if self.cuda:
            self.sync()
            return torch.cuda.memory_allocated(self.device)
        return (_proc_status_kb("VmRSS") or 0) * 1024

    def reset(self) -> bool:
        """Restart the peak here; False when the kernel refused (the CPU peak then counts
        from the process start)."""
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        self.reset()
        self.baseline = self.current()

    def peak(self) -> Optional[int]:
        if self.cuda:
            self.sync()
            return torch.cuda.max_memory_allocated(self.device)
        kb = _proc_status_kb("VmHWM")
        return None if kb is None else kb * 1024

    def reserved(self) -> Optional[int]:
        """The CUDA allocator's peak with its cache (``max_memory_reserved``); None on CPU."""
        if not self.cuda:
            return None
        self.sync()
        return torch.cuda.max_memory_reserved(self.device)


def release_memory(device: torch.device) -> None:
    """Give freed memory back (``malloc_trim`` on glibc, the CUDA cache on GPU) so that a
    baseline taken next is not inflated by memory the allocator merely keeps."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``with timer: ...`` adds the block's wall time (device-synchronised) to ``total``."""

    def __init__(self, device: torch.device):
        self.device, self.total, self.count = device, 0.0, 0

    def __enter__(self):
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.last = time.perf_counter() - self._t0
        self.total += self.last
        self.count += 1


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` (GaLore's
    schedule), as a multiplier for ``torch.optim.lr_scheduler.LambdaLR``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# ---------------------------------------------------------------------------------------
# Result-file headers
# ---------------------------------------------------------------------------------------

def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), for the device line of a results file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_rev() -> str:
    """Short commit of the repository, marked when ``lowrank_optim`` has local changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lowrank_optim"],
                               cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + (" (lowrank_optim modified)" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------
# Markdown reports
# ---------------------------------------------------------------------------------------

def md_table(header: list, rows: list) -> str:
    """A Markdown table; ``None`` cells print as an empty cell."""
    cell = lambda c: "" if c is None else str(c)
    return "\n".join(["| " + " | ".join(map(cell, header)) + " |",
                      "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])


def command_line(script: str, argv: Optional[list] = None) -> str:
    """``python benchmarks/SCRIPT ARGS`` as typed (shell-quoted)."""
    import shlex
    import sys
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(x) for x in ["python", f"benchmarks/{script}", *args])


def versions() -> str:
    out = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("lowrank_optim", "bitsandbytes"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - a version line, never a failure
            out.append(f"{mod} not importable")
    return ", ".join(out + [f"git {git_rev()}"])


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def write_report(path, title: str, meta: dict, body: str) -> str:
    """``# title``, a ``- key: value`` line per ``meta`` entry, then ``body``; written to
    ``path`` (folders created) unless it is empty, and returned."""
    text = f"# {title}\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items()) \
        + "\n" + body.rstrip() + "\n"
    if path:
        path = Path(path) if Path(path).is_absolute() else ROOT / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text
