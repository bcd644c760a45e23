"""Shared pieces of the benchmarks (docs/benchmarks.md): the offline corpus (the Python
stdlib's sources as byte tokens), the one LLaMA-style model (:class:`LlamaLM`), the one
method registry (:data:`METHODS`, :func:`method`), exact byte counts and their one closed
form (:func:`closed_form`), the one memory meter (:class:`MemoryMeter`), a timer, and the
Markdown writer (:func:`md_table`, :func:`write_report`).
"""
from __future__ import annotations

import argparse, ast, dataclasses, hashlib, math, os, platform, shlex, subprocess, sys, sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _paths import ROOT  # also puts the checkout's package first on sys.path

# --- Corpus ---

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


def _text_files(root: Path, suffixes, skip_dirs: set) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(suffixes)]
    return sorted(out)


def load_corpus(path: Optional[str] = None, val_fraction: float = 0.05,
                min_val_bytes: int = 1 << 16) -> Corpus:
    """The stdlib's ``.py`` files, or the text file / folder at ``path``, split by file (a
    hash of the relative path; binary files, with a NUL byte, skipped). A single file, or a
    split with under ``min_val_bytes`` of validation text, is split by position instead:
    the last ``val_fraction`` of the bytes is validation."""
    root = Path(sysconfig.get_paths()["stdlib"] if path is None else path)
    if path is None:
        files, name = _text_files(root, ".py", SKIP_DIRS), \
            f"python{sysconfig.get_python_version()} stdlib .py"
    elif not root.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    else:
        files = [root] if root.is_file() else _text_files(root, "", {"__pycache__"})
        name = str(path)
        root = root.parent if root.is_file() else root
    split = {False: [], True: []}   # is validation -> the files' bytes
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if data and b"\x00" not in data:
            h = hashlib.sha1(f.relative_to(root).as_posix().encode()).digest()[:8]
            split[int.from_bytes(h, "big") / 2 ** 64 < val_fraction].append(
                data if data.endswith(b"\n") else data + b"\n")
    train, val = split[False], split[True]
    n_train, n_val = len(train), len(val)
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
    """Seeded random training windows and fixed, evenly spaced validation windows (``val``);
    ``select``: the windows halfway between ``val``'s (``select_disjoint``: no byte in
    common with them), for choosing hyperparameters on other data than the reported."""

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


# --- Model ---

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
    return dataclasses.replace(CONFIGS[key], **{k: v for k, v in overrides.items()
                                                if v is not None})


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
        self.n_heads = cfg.n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(4))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin),
                                           v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj, self.up_proj = (nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
                                        for _ in range(2))
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        self.mlp_norm, self.mlp = nn.RMSNorm(cfg.dim, cfg.norm_eps), MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LlamaLM(nn.Module):
    """LLaMA-style causal LM (RMSNorm, rotary positions, SwiGLU, untied head); attention and
    MLP modules named ``attn`` and ``mlp`` (``param_groups(target_modules=("attn", "mlp"))``
    picks the papers' matrices), initialised by :func:`init_`. ``checkpointing``: recompute
    each block in backward."""

    def __init__(self, cfg: ModelConfig, checkpointing: bool = False):
        super().__init__()
        self.cfg, self.checkpointing = cfg, checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_table(cfg.seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_(self, cfg.n_layers)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None):
        t = idx.shape[1]
        if t > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {t} > the model's seq_len {self.rope_cos.shape[0]}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(idx)
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, use_reentrant=False) \
                if self.checkpointing and torch.is_grad_enabled() else layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def init_(module: nn.Module, n_layers: int) -> None:
    """LlamaLM's initialisation of ``module``'s parameters, in order: norms 1, matrices
    normal(0, 0.02), ``o_proj``/``down_proj`` scaled by 1/sqrt(2·n_layers)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            p.fill_(1.0)
        else:
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            p.normal_(0.0, 0.02 / math.sqrt(2 * n_layers) if residual else 0.02)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- Method registry: name -> how to swap the model's layers and build the optimizer ---

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
    parent: Optional[str] = None     # the method whose update rule it shares (its rate in a
                                     # shoot-out --lr-sweep)

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

    def build(self, model: nn.Module, a: MethodArgs, swapped: bool = False, **kwargs) -> tuple:
        """``(model, optimizer, hooks)``: the model with this method's layers (swapped here
        unless ``swapped``), its optimizer, the handle of its per-layer hooks (or None)."""
        model = model if swapped else self.swap(model, a)
        opt = self.optimizer(model, a, **{**self.kwargs, **kwargs})
        return model, opt, opt.register_hooks(
            model, max_grad_norm_per_param=a.max_grad_norm_per_param) if self.per_layer else None


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


# Default learning rates: the best of the shoot-out's --lr-sweep on its defaults (the sweep
# table of benchmarks/results/shootout_3seeds.md); variants take their parent's. Larger
# models want smaller rates: pass --lr. Adding a method is one Method(...) entry.
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
    Method("galore_lowrank", _GALORE, 4e-2, "GaLoreAdamW with a low-rank backward (issue #20: "
           "prepare_galore swaps the target Linears for GaLoreLinear; no dense weight gradient)",
           prepare=lambda model, a: __import__("lowrank_optim").prepare_galore(
               model, rank=a.rank, target_modules=a.target_modules),
           default=False, parent="galore"),
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
    Method("apollo", _lowrank("APOLLOAdamW", scale=0.7), 2e-2, "lowrank_optim.APOLLOAdamW: "
           "channel-wise scaling of the gradient from Adam on a random projection (scale 0.7 "
           "with lr 2e-2, tuned and confirmed on held-out seeds: results/apollo_tuning.md; "
           "the paper's scale is 1)"),
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


# --- Measurement ---

def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict()``: parameters and persistent buffers (the scales
    of quantized weights; not the rotary table)."""
    return sum(tensor_bytes(t) for t in {id(t): t for t in model.state_dict(
        keep_vars=True).values() if isinstance(t, Tensor)}.values())


def stored_tensors(model: nn.Module):
    """``(name, kind, tensor)`` for every tensor the model stores, ``kind`` "p" (parameter)
    or "b" (buffer); an INT8 weight as its uint8 codes ("p") and float32 scale/offset ("b")."""
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
    """Bytes of the trainable parameters' gradients; per-layer mode: the largest one's (each
    is freed right after its update)."""
    sizes = [tensor_bytes(p) for p in model.parameters() if p.requires_grad]
    return max(sizes, default=0) if per_layer else sum(sizes)


def storage_id(t: Tensor) -> int:
    """The address of ``t``'s StorageImpl: one per storage, shared by its views, on meta too
    (where ``data_ptr()`` is 0 for every tensor)."""
    return t.untyped_storage()._cdata


def state_tensors(optimizer: torch.optim.Optimizer):
    """``(key, tensor)`` for every tensor in ``optimizer.state`` (through dicts, lists and
    tuples; ``key``: the dict key it sits under)."""
    def walk(v, key=""):
        if isinstance(v, Tensor):
            yield key, v
        elif isinstance(v, dict):
            for k, x in v.items():
                yield from walk(x, str(k))
        elif isinstance(v, (list, tuple)):
            for x in v:
                yield from walk(x, key)
    for st in optimizer.state.values():
        yield from walk(st)


def state_bytes(optimizer: torch.optim.Optimizer, held: bool = False) -> int:
    """Bytes of every tensor in ``optimizer.state``, a shared one (bitsandbytes' maps) once.
    ``held=True``: the bytes of the distinct storages behind them, what memory really holds
    (a view keeps its whole base alive)."""
    ts = [t for _, t in state_tensors(optimizer)]
    if held:
        return sum({storage_id(t): t.untyped_storage().nbytes() for t in ts}.values())
    return sum({(storage_id(t), t.storage_offset(), t.numel()): tensor_bytes(t)
                for t in ts}.values())


_cdiv = lambda a, b: -(-a // b)   # ceil(a / b)


def matrix_shapes(model: nn.Module, target_modules=("attn", "mlp")) -> list[tuple]:
    """``(name, shape, projected)`` of every parameter; projected: the weight of a (Quant)Linear
    whose name contains one of ``target_modules``."""
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
    torch, bitsandbytes and the package imply for the optimizer class ``optimizer`` (one of
    :data:`CLOSED_FORM`) on ``shapes`` (:func:`matrix_shapes` of the float model) with
    ``esize``-byte floats; buffers not included. APOLLO-Mini counts at rank 1 (its registry
    entry's), whatever ``rank`` is; the formats are in the comments below."""
    if optimizer not in CLOSED_FORM:
        raise ValueError(f"no closed form for {optimizer!r}; known: {', '.join(CLOSED_FORM)}")
    q8 = lambda n: 2 * n + 2 * 4 * _cdiv(n, 256)                 # 2 uint8 moments + 2 absmax/256
    w = s = any8 = 0
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


def proc_kb(field: str, path: str = "/proc/self/status") -> Optional[int]:
    """A ``FIELD: N kB`` line of a /proc file (None when absent)."""
    try:
        with open(path) as f:
            return next((int(ln.split()[1]) for ln in f if ln.startswith(field + ":")), None)
    except OSError:
        return None


class MemoryMeter:
    """The one memory meter of the benchmarks: this process's peak since :meth:`reset`,
    ``torch.cuda.max_memory_allocated`` on CUDA (synchronised first), peak RSS (VmHWM,
    reset through /proc/self/clear_refs) on the CPU. :meth:`start` resets and takes
    ``baseline``, the memory in use then (on the CPU: the runtime and what was loaded)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError(f"device {device}: torch.cuda.is_available() is False")
        self.kind = "cuda max_memory_allocated" if self.cuda else "peak RSS (VmHWM)"
        self.what, self.baseline = "allocated" if self.cuda else "RSS", 0

    def sync(self) -> None:
        sync(self.device)

    def trim(self) -> None:
        """Collect garbage and give freed memory back, so that the next reading does not
        count memory the allocator merely keeps."""
        import gc
        gc.collect()
        self.sync()
        release_memory(self.device)

    def current(self) -> int:
        self.sync()
        return torch.cuda.memory_allocated(self.device) if self.cuda else \
            (proc_kb("VmRSS") or 0) * 1024

    def reset(self) -> bool:
        """Restart the peak here; False when the kernel refused (the CPU peak then counts
        from the process start)."""
        self.sync()
        try:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        self.reset()
        self.baseline = self.current()

    def peak(self) -> Optional[int]:
        self.sync()
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        kb = proc_kb("VmHWM")
        return None if kb is None else kb * 1024

    def reserved(self) -> Optional[int]:
        """The CUDA allocator's peak with its cache (``max_memory_reserved``); None on CPU."""
        self.sync()
        return torch.cuda.max_memory_reserved(self.device) if self.cuda else None


def release_memory(device: torch.device) -> None:
    """Give freed memory back: ``malloc_trim`` on glibc, the CUDA cache on GPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.empty_cache()
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
        self.total += time.perf_counter() - self._t0
        self.count += 1


@torch.no_grad()
def evaluate(model: nn.Module, windows) -> float:
    """Mean loss over ``windows``' batches, in eval mode (the model is left training)."""
    model.eval()
    losses = [model(x, y).item() for x, y in windows]
    model.train()
    return sum(losses) / len(losses)


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` (GaLore's
    schedule), a multiplier for ``LambdaLR``."""
    def f(step: int) -> float:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return (step + 1) / warmup if step < warmup else \
            min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# --- Results files: header lines and Markdown ---

def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def git_rev() -> str:
    """Short commit of the repository, marked when ``lowrank_optim`` has local changes."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip()
    try:
        rev, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--",
                                                              "lowrank_optim")
        return rev + (" (lowrank_optim modified)" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def command_line(script: str, argv: Optional[list] = None) -> str:
    """``python benchmarks/SCRIPT ARGS`` as typed (shell-quoted)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(x) for x in ["python", f"benchmarks/{script}", *args])


def md_table(header: list, rows) -> str:
    """A Markdown table; ``None`` cells print as an empty cell."""
    line = lambda cells: "| " + " | ".join("" if c is None else str(c) for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def report_meta(script: str, argv, device: str, **more) -> dict:
    """The first lines of a results file: command, date, versions, ``device``, ``more``."""
    return {"command": f"`{command_line(script, argv)}`",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
            "device": device, **more}


def write_report(path, title: str, meta: dict, body: str) -> str:
    """``# title``, a ``- key: value`` line per ``meta`` entry, then ``body``; written to
    ``path`` (relative: to the repository root; folders created) unless it is empty, and
    returned."""
    text = f"# {title}\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items()) \
        + "\n" + body.rstrip() + "\n"
    if path:
        path = Path(path) if Path(path).is_absolute() else ROOT / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """A script's parser: ``doc``'s first paragraph, then one ``--key-name`` option per
    keyword, of its default's type (a ``False`` default: a flag)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="What each option means: docs/benchmarks.md.")
    for key, default in defaults.items():
        flag = "--" + key.replace("_", "-")
        if default is False:
            p.add_argument(flag, action="store_true", help="a flag")
        else:
            p.add_argument(flag, type=type(default), default=default,
                           help=f"default {default!r}")
    return p


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
