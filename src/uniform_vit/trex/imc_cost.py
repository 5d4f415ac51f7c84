"""ESTIMATE of the energy, delay and area of attention on crossbar in-memory-computing (IMC) hardware.

An analytical model in the spirit of TReX's EDAP figures (Moitra et al., arXiv 2408.12742), not a circuit
simulator: it counts, per attention layer, crossbar reads (matrix-vector operations), ADC conversions, crossbar cell
writes, softmax elements and digital MACs, and prices them with the constants of :class:`CrossbarConfig`. The
constants are ballpark values of the kind published for ReRAM IMC simulators (NeuroSim-/PUMA-like 64x64 arrays with
shared SAR ADCs); they are NOT calibrated against any chip, so read absolute numbers as orders of magnitude and use
the RATIOS (reused vs original), which depend mostly on the op counts.

Assumptions (change them via ``CrossbarConfig``):

* Static weights (Q/K/V/output projections, 1x1 convs) live in crossbars of ``xbar`` x ``xbar`` cells; a weight
  takes ``weight_bits / cell_bits`` adjacent columns; inputs are streamed bit-serially (``input_bits`` read cycles
  per vector); every used column is converted by an ADC each cycle; ``cols_per_adc`` columns share one ADC, so one
  read cycle takes ``cols_per_adc * t_adc_ns``. All tiles of a matrix work in parallel; vectors (tokens) go one
  after another (no pipelining), layers one after another.
* Dynamic matmuls (q k^T, attn v) write their second operand into crossbars first (``e_write_pj`` per cell,
  ``t_write_row_ns`` per row, rows one after another, tiles in parallel), then run like static ones. Dynamic
  crossbars are sized for all heads of ONE window; windows run one after another.
* Softmax and depthwise convs (UniForm's q/value convs, TReX's channel transform) run on a digital unit:
  ``e_softmax_pj`` / ``e_mac_pj`` per element / MAC, throughput ``digital_ops_per_ns``.
* A reused map costs nothing to keep (buffer energy/area ignored); peripheral circuits other than ADCs, buffers,
  interconnect and partial-sum adders are ignored. Area counts crossbars + ADCs + one digital unit per layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..layers.attention import MultiHeadAttention, ReuseAttention
from .reuse import (
    OutputReuse,
    TimmReuseAttention,
    TimmSourceAttention,
    UniformMHAReuseAttention,
    UniformMHASourceAttention,
    UniformReuseAttention,
    UniformSourceAttention,
)

LABEL = 'ESTIMATE (analytical crossbar IMC model, uncalibrated constants; compare ratios, not absolute values)'


@dataclass(frozen=True)
class CrossbarConfig:
    xbar: int = 64  # crossbar rows = columns
    weight_bits: int = 8
    cell_bits: int = 2  # bits stored per cell -> weight_bits / cell_bits columns per weight
    input_bits: int = 8  # bit-serial inputs: one read cycle per bit
    cols_per_adc: int = 8  # columns multiplexed onto one ADC
    e_adc_pj: float = 2.0  # energy of one ADC conversion
    e_cell_read_pj: float = 0.001  # energy of one cell in one read cycle
    e_write_pj: float = 1.0  # energy to program one cell (dynamic operands)
    t_adc_ns: float = 1.0  # one conversion
    t_write_row_ns: float = 20.0  # program one crossbar row
    e_softmax_pj: float = 1.0  # exp + sum + divide, per element
    e_mac_pj: float = 0.2  # digital MAC
    digital_ops_per_ns: float = 64.0  # digital unit throughput (MACs or softmax elements per ns)
    area_xbar_um2: float = 100.0  # one xbar x xbar array with drivers
    area_adc_um2: float = 600.0  # one SAR ADC
    area_digital_um2: float = 5000.0  # the digital unit attached to one attention layer

    @property
    def slices(self) -> int:
        return math.ceil(self.weight_bits / self.cell_bits)


@dataclass
class OpCounts:
    """What one attention layer does for one image."""

    mvm: int = 0  # crossbar matrix-vector operations (one input vector into one matrix, all its tiles)
    adc_reads: int = 0
    cell_reads: int = 0
    cells_written: int = 0
    softmax_elems: int = 0
    digital_macs: int = 0
    static_tiles: int = 0
    dynamic_tiles: int = 0
    delay_ns: float = 0.0


@dataclass
class LayerCost:
    index: int
    kind: str  # 'attention' | 'reuse-map' | 'reuse-output'
    energy_nj: float
    delay_us: float
    area_mm2: float
    counts: dict = field(default_factory=dict)


class _Acc:
    def __init__(self, cfg: CrossbarConfig):
        self.cfg, self.c = cfg, OpCounts()

    def static(self, in_dim: int, out_dim: int, vectors: int) -> None:
        """``vectors`` inputs through a fixed in_dim x out_dim weight matrix."""
        self.c.static_tiles += self._mvm(in_dim, out_dim, vectors)

    def dynamic(self, in_dim: int, out_dim: int, vectors: int, matrices: int, parallel: int) -> None:
        """``matrices`` operands of in_dim x out_dim written then read by ``vectors`` inputs each; ``parallel`` of
        them (the heads of one window) at once."""
        cfg = self.cfg
        tiles = self._tiles(in_dim, out_dim)
        self.c.cells_written += matrices * in_dim * out_dim * cfg.slices
        self.c.delay_ns += math.ceil(matrices / parallel) * min(in_dim, cfg.xbar) * cfg.t_write_row_ns
        self._mvm(in_dim, out_dim, vectors * matrices, serial_groups=math.ceil(matrices / parallel) * vectors)
        self.c.dynamic_tiles += tiles * min(parallel, matrices)

    def _tiles(self, in_dim: int, out_dim: int) -> int:
        x = self.cfg.xbar
        return math.ceil(in_dim / x) * math.ceil(out_dim * self.cfg.slices / x)

    def _mvm(self, in_dim: int, out_dim: int, vectors: int, serial_groups: int | None = None) -> int:
        cfg = self.cfg
        cols = out_dim * cfg.slices
        row_tiles = math.ceil(in_dim / cfg.xbar)
        self.c.mvm += vectors
        self.c.adc_reads += vectors * cfg.input_bits * cols * row_tiles  # every used column of every row tile
        self.c.cell_reads += vectors * cfg.input_bits * in_dim * cols
        per_vector = cfg.input_bits * min(cfg.cols_per_adc, cols) * cfg.t_adc_ns
        self.c.delay_ns += (vectors if serial_groups is None else serial_groups) * per_vector
        return self._tiles(in_dim, out_dim)

    def softmax(self, elems: int) -> None:
        self.c.softmax_elems += elems
        self.c.delay_ns += elems / self.cfg.digital_ops_per_ns

    def digital(self, macs: int) -> None:
        self.c.digital_macs += macs
        self.c.delay_ns += macs / self.cfg.digital_ops_per_ns

    def cost(self, index: int, kind: str) -> LayerCost:
        cfg, c = self.cfg, self.c
        energy_pj = (c.adc_reads * cfg.e_adc_pj + c.cell_reads * cfg.e_cell_read_pj + c.cells_written * cfg.e_write_pj
                     + c.softmax_elems * cfg.e_softmax_pj + c.digital_macs * cfg.e_mac_pj)
        tiles = c.static_tiles + c.dynamic_tiles
        adcs = tiles * math.ceil(cfg.xbar / cfg.cols_per_adc)
        area_um2 = tiles * cfg.area_xbar_um2 + adcs * cfg.area_adc_um2 + cfg.area_digital_um2
        return LayerCost(index, kind, energy_pj / 1e3, c.delay_ns / 1e3, area_um2 / 1e6, asdict(c))


def _dw_macs(convs: nn.ModuleList | list, tokens: int) -> int:
    return sum(c.in_channels * c.kernel_size[0] * c.kernel_size[1] for c in convs) * tokens


def _layer_cost(m: nn.Module, index: int, shape: tuple[int, ...], cfg: CrossbarConfig) -> LayerCost:
    from timm.models.vision_transformer import Attention

    a = _Acc(cfg)
    if len(shape) == 3:  # timm tokens (B=1, N, C)
        _, N, C = shape
        windows = 1
    else:  # UniForm windows (windows, C, h, w)
        windows, C, h, w = shape
        N = h * w
    T = windows * N  # tokens per image
    if isinstance(m, OutputReuse):
        if m.transform == 'channel':
            a.digital(T * C)
        else:
            a.static(C, C, T)
        return a.cost(index, 'reuse-output')
    if type(m) is Attention or isinstance(m, (TimmSourceAttention, TimmReuseAttention)):
        h, d, D = m.num_heads, m.head_dim, m.attn_dim
        reuse = isinstance(m, TimmReuseAttention)
        a.static(C, D if reuse else 3 * D, T)  # v only, or q, k, v
        if not reuse:
            a.dynamic(d, N, N, h, h)  # q k^T: k^T written, N queries per head
            a.softmax(h * N * N)
        a.dynamic(N, d, N, h, h)  # attn v: v written, N map rows per head
        a.static(D, m.proj.out_features, T)
        return a.cost(index, 'reuse-map' if reuse else 'attention')
    if isinstance(m, (ReuseAttention, UniformSourceAttention, UniformReuseAttention)):
        reuse = isinstance(m, UniformReuseAttention)
        tokens = T
        if not reuse:
            qk = m.qk_dim
            a.static(C, 2 * qk, tokens)
            a.digital(_dw_macs([m.q_dw.c if hasattr(m.q_dw, 'c') else m.q_dw], tokens))
            a.dynamic(qk, N, N, windows, 1)  # one shared map per window
            a.softmax(windows * N * N)
        a.digital(_dw_macs(list(m.v_convs), tokens))
        a.dynamic(N, C, N, windows, 1)  # every head's values against the one map
        a.static(C, C, tokens)
        return a.cost(index, 'reuse-map' if reuse else 'attention')
    if isinstance(m, (MultiHeadAttention, UniformMHASourceAttention, UniformMHAReuseAttention)):
        reuse = isinstance(m, UniformMHAReuseAttention)
        h, kd, vd = m.num_heads, getattr(m, 'key_dim', 0), m.v_dim
        a.static(C, h * vd if reuse else h * (2 * kd + vd), T)
        if not reuse:
            a.dynamic(kd, N, N, windows * h, h)
            a.softmax(windows * h * N * N)
        a.dynamic(N, vd, N, windows * h, h)
        a.static(C, C, T)
        return a.cost(index, 'reuse-map' if reuse else 'attention')
    raise TypeError(f"no IMC cost model for {type(m).__name__}")


_ATTN_TYPES = (ReuseAttention, MultiHeadAttention, TimmSourceAttention, TimmReuseAttention, UniformSourceAttention,
               UniformReuseAttention, UniformMHASourceAttention, UniformMHAReuseAttention, OutputReuse)


@torch.no_grad()
def attention_costs(model: nn.Module, example: torch.Tensor, cfg: CrossbarConfig = CrossbarConfig()) -> list[LayerCost]:
    """Per attention layer (forward order) IMC energy/delay/area for ONE image of ``example``'s size (train form)."""
    from timm.models.vision_transformer import Attention

    mods = [m for m in model.modules() if type(m) is Attention or isinstance(m, _ATTN_TYPES)]
    shapes: dict[int, tuple[int, ...]] = {}

    def record(i: int):
        def hook(mod: nn.Module, args: tuple) -> None:
            shapes.setdefault(i, tuple(args[0].shape))
        return hook

    hooks = [m.register_forward_pre_hook(record(i)) for i, m in enumerate(mods)]
    try:
        was = model.training
        model.eval()(example[:1])
        model.train(was)
    finally:
        for hk in hooks:
            hk.remove()
    return [_layer_cost(m, i, shapes[i], cfg) for i, m in enumerate(mods)]


def summarize(original: list[LayerCost], reused: list[LayerCost]) -> dict:
    """Totals of both models and reused/original ratios of energy, delay, area and EDAP (all attention layers)."""

    def tot(costs: list[LayerCost]) -> dict:
        e, d, a = (sum(getattr(c, k) for c in costs) for k in ('energy_nj', 'delay_us', 'area_mm2'))
        return dict(energy_nj=e, delay_us=d, area_mm2=a, edap=e * d * a)

    o, r = tot(original), tot(reused)
    return dict(label=LABEL, original=o, reused=r, ratio={k: (r[k] / o[k] if o[k] else float('nan')) for k in o},
                layers=[dict(index=c.index, kind=c.kind, energy_nj=round(c.energy_nj, 3), delay_us=round(c.delay_us, 3),
                             area_mm2=round(c.area_mm2, 4), adc_reads=c.counts['adc_reads'], mvm=c.counts['mvm'])
                        for c in reused])
