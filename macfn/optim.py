"""MAC as a ``torch.optim.Optimizer`` for ordinary ``nn.Module`` training loops.

:class:`MAC` wraps the functional core without a second copy of its mathematics: forward
hooks of a :class:`macfn.StatsRecorder` collect mean activations, and every step calls
:func:`macfn.step` on dicts of the model's parameters, gradients and state, then writes the
results back into the parameters in place. Parameter groups, learning rate schedulers,
``zero_grad``, ``step(closure)`` and gradient clipping work as with ``torch.optim.SGD``.

The checkpoint format of :meth:`MAC.state_dict` is keyed by parameter names::

    {
        "state": {param_name: {"momentum": Tensor, "mean_activation": Tensor [blocks, d],
                               "stat_count": int64 Tensor, "exact_preconditioner": Tensor}},
        "param_groups": [{"lr": ..., "momentum": ..., ..., "params": [param_name, ...]}],
        "group_state": [{"step": int64 Tensor}],
        "stats_schedule": {"interval": int, "phase": int},
    }

Only weights carry ``mean_activation`` and ``stat_count``; ``exact_preconditioner`` appears only
after :meth:`MAC.freeze_exact_preconditioner`.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast, overload

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import _finite, _kernels
from ._capture import LayerSpec, Stats, StatsRecorder, find_layers
from ._config import BaseUpdate, MACConfig
from ._step import MACState, init, step
from .distributed import average_across_ranks, is_dtensor, local_tensor, row_range, sync_active

__all__ = ["MAC"]

HYPERPARAMETERS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(MACConfig))
"""Per-group hyperparameters: the fields of :class:`macfn.MACConfig`."""

# Fields that define a layer's preconditioner. A weight and its bias in different parameter
# groups share one preconditioner, so their groups must agree on these.
_PRECONDITIONER_FIELDS = ("damping", "stat_decay", "damping_form")
_EXACT_KEY = "exact_preconditioner"
_FORMAT_KEYS = {"state", "param_groups", "group_state", "stats_schedule"}


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A preconditioned weight and the output rows of it stored on this rank.

    Attributes:
        spec: The layer as :func:`macfn.find_layers` describes it.
        shape: Global weight shape.
        d: Statistics row length, ``prod(shape[1:])`` plus 1 with a bias.
        start, stop: Global output rows ``[start, stop)`` stored on this rank.
    """

    spec: LayerSpec
    shape: tuple[int, ...]
    d: int
    start: int
    stop: int

    @property
    def sharded(self) -> bool:
        return (self.start, self.stop) != (0, self.shape[0])

    @property
    def empty(self) -> bool:
        return self.start == self.stop

    @property
    def blocks(self) -> tuple[int, int]:
        """Local blocks ``[first, last)``: whole blocks, or part of the only block of a one-block layer."""
        rows_per_block = self.shape[0] // self.spec.blocks
        return self.start // rows_per_block, -(-self.stop // rows_per_block)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has seen its input."""


class MAC(torch.optim.Optimizer):
    """MAC preconditioning with heavy-ball momentum, as a ``torch.optim.Optimizer``.

    Every step applies, per preconditioned layer with gradient rows ``G`` and bias-corrected
    running mean activation ``abar``,

        Ghat  = G - (G abar) abar^T / (rho + |abar|^2)
        buf   = mu * buf + Ghat + wd * theta;   theta = theta - lr * buf

    and momentum SGD to every other parameter (Seung, Lee and Ko, 2025, arXiv 2506.08464;
    see :func:`macfn.step` for every option). The mean activations come from the forward
    passes in training mode with gradients enabled since the previous statistics step, averaged
    over all their rows. Every ``stats_interval`` steps they are folded into the running
    average; the other steps reuse it and record nothing.

    When a process group with more than one rank is initialised, each statistics step averages
    the mean activations across ranks, weighted by the rows each rank saw, with one all-reduce.
    Parameters sharded by FSDP2 along dim 0 are updated on their local rows.

    Example:
        >>> optimizer = macfn.optim.MAC(model, lr=0.1, damping=1.0)
        >>> for x, y in loader:
        ...     optimizer.zero_grad()
        ...     loss_fn(model(x), y).backward()
        ...     optimizer.step()

    Args:
        model: The module to train, possibly wrapped by ``torch.compile`` or DDP; parameter
            names are those of the unwrapped module.
        param_groups: None for one group of every parameter of ``model``, or torch.optim-style
            groups: an iterable of parameters, of parameter names, or of dicts with ``"params"``
            and per-group hyperparameters.
        stats_interval: Steps between statistics updates (``T_cov`` of the authors' code), >= 1.
        sync_stats: Average statistics across ranks: None does so when a process group with
            more than one rank is initialised.
        process_group: Process group for that average; the default group when None.
        compile: Compile the parameter update with ``torch.compile(fullgraph=True)``; a dict
            passes further options to ``torch.compile``.
        recorder_options: Keyword arguments for :class:`macfn.StatsRecorder`, such as
            ``attention`` declarations; ``training_only`` is always True.
        **hyperparameters: Defaults for every group, named as the fields of
            :class:`macfn.MACConfig` (``lr``, ``momentum``, ``weight_decay``, ``damping``,
            ``stat_decay``, ...). ``lr`` may be a 0-dim tensor, which a compiled step reads
            without recompiling.

    Raises:
        ValueError: An unknown or invalid hyperparameter, a parameter that is not in
            ``model``, or a sharding layout that MAC cannot precondition.
    """

    def __init__(
        self,
        model: nn.Module,
        param_groups: Iterable[Any] | None = None,
        *,
        stats_interval: int = 1,
        sync_stats: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
        compile: bool | Mapping[str, Any] = False,
        recorder_options: Mapping[str, Any] | None = None,
        **hyperparameters: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model of type {type(model).__name__}: expected a torch.nn.Module.")
        _check_hyperparameter_names(hyperparameters, "MAC")
        defaults = dataclasses.asdict(MACConfig(**_config_values(hyperparameters, "MAC")))
        defaults.update(hyperparameters)
        if isinstance(stats_interval, bool) or not isinstance(stats_interval, int) or stats_interval < 1:
            raise ValueError(f"Invalid stats_interval={stats_interval!r}: expected an integer >= 1, e.g. 10.")
        if sync_stats is not None and not isinstance(sync_stats, bool):
            raise ValueError(f"Invalid sync_stats={sync_stats!r}: expected None, True or False.")
        if sync_stats and not sync_active(process_group):
            raise ValueError(
                "Invalid sync_stats=True: no process group with more than one rank is initialised; call "
                "torch.distributed.init_process_group first or leave sync_stats=None."
            )
        if not isinstance(compile, (bool, Mapping)):
            raise ValueError(f"Invalid compile={compile!r}: expected True, False or a dict of torch.compile options.")

        self._model = _unwrap(model)
        _check_not_fsdp1(self._model)
        self._params_by_name = dict(self._model.named_parameters())
        self._name_of = {id(p): name for name, p in self._params_by_name.items()}
        self._recorder = StatsRecorder(self._model, **{**(recorder_options or {}), "training_only": True})
        self._spec_by_weight = dict(self._recorder.layers)
        self._spec_by_bias = {s.bias: s for s in self._spec_by_weight.values() if s.bias is not None}
        self.stats_interval = stats_interval
        self._sync = sync_stats
        self._process_group = process_group
        self._compile_options: Mapping[str, Any] | None = None
        if isinstance(compile, Mapping):
            self._compile_options = compile
        elif compile:
            self._compile_options = {}
        self._update_fn: Callable[..., None] | None = None
        self._phase = 0
        self._rows: dict[str, int] = {}
        self._counting = False
        self._configs: dict[tuple[Any, ...], MACConfig] = {}
        self._call_configs: dict[tuple[MACConfig, tuple[str, ...]], MACConfig] = {}
        self._layouts_by_call: dict[tuple[MACConfig, tuple[str, ...]], dict[str, tuple[str, ...] | None]] = {}
        self._group_state: list[dict[str, Tensor]] = []
        self._lr_tensors: list[Tensor] = []
        self._stats_keys: set[str] = set()
        self._stats_weights: list[str] = []
        self._placeholders: dict[tuple[str, str], Tensor] = {}
        self._ready = False

        self._row_hooks: list[torch.utils.hooks.RemovableHandle] = []
        try:
            super().__init__(_named_groups(self, param_groups), defaults)
            self._ready = True
            self._build_structure()
            configs = [self._config_for(group) for group in self.param_groups]
            self._check_split_layers(configs)
        except Exception:
            self._recorder.remove()
            raise
        _, owners = find_layers(self._model)
        self._row_hooks = [m.register_forward_hook(self._make_row_hook(w)) for m, w in owners.items()]
        for index in range(len(self.param_groups)):
            self._init_group_state(index)
        self._prepare_calls(None, configs)
        self._start_recording()

    # ------------------------------------------------------------------ groups and structure

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, given by parameters or their names, with its own hyperparameters.

        Raises:
            ValueError: A parameter that is not in the model, or an invalid hyperparameter.
        """
        group = dict(param_group)
        MACConfig(**_config_values({**self.defaults, **group}, "param group"))
        group["params"] = [self._named(p) for p in _as_list(group["params"])]
        super().add_param_group(group)
        if self._ready:
            try:
                self._build_structure()
                configs = [self._config_for(g) for g in self.param_groups]
                self._check_split_layers(configs)
            except Exception:
                self.param_groups.pop()
                self._build_structure()
                raise
            self._init_group_state(len(self.param_groups) - 1)
            self._prepare_calls(None, configs)

    def _named(self, item: Any) -> tuple[str, Tensor]:
        """Return ``(name, parameter)`` for a parameter, its name, or a ``(name, parameter)`` pair."""
        if isinstance(item, tuple) and len(item) == 2:
            item = item[1]
        if isinstance(item, str):
            if item not in self._params_by_name:
                raise ValueError(f"Invalid parameter name '{item}': the model has no parameter of that name.")
            return item, self._params_by_name[item]
        if not isinstance(item, Tensor) or id(item) not in self._name_of:
            raise ValueError(
                f"Invalid parameter of type {type(item).__name__}: every parameter must belong to the model "
                "given to MAC (pass model.parameters() or names from model.named_parameters())."
            )
        return self._name_of[id(item)], item

    def _build_structure(self) -> None:
        """Derive every layout and the names of each group's macfn.step call from the groups."""
        self._group_of = {name: index for index, g in enumerate(self.param_groups) for name in g["param_names"]}
        self._layouts = {}
        for weight, spec in self._spec_by_weight.items():
            if weight in self._group_of:
                self._layouts[weight] = self._layout(spec)
        self._call_names = [self._call_for(g["param_names"]) for g in self.param_groups]
        self._own = [set(g["param_names"]) for g in self.param_groups]
        self._split_layers = [
            layout.spec for layout in self._layouts.values()
            if layout.spec.bias in self._group_of
            and self._group_of[layout.spec.bias] != self._group_of[layout.spec.weight]
        ]
        self._refresh_stats_weights()

    def _layout(self, spec: LayerSpec) -> _Layout:
        weight = self._params_by_name[spec.weight]
        start, stop = row_range(spec.weight, weight)
        if spec.bias is not None:
            bias_range = row_range(spec.bias, self._params_by_name[spec.bias])
            if bias_range != (start, stop):
                raise ValueError(
                    f"Invalid sharding of '{spec.bias}': this rank has its rows {bias_range} but rows {(start, stop)} "
                    f"of its weight '{spec.weight}'; shard a weight and its bias alike."
                )
        shape = tuple(weight.shape)
        rows_per_block = shape[0] // spec.blocks
        if spec.blocks > 1 and (start % rows_per_block or stop % rows_per_block):
            raise ValueError(
                f"Invalid sharding of '{spec.weight}': this rank has output rows [{start}, {stop}), which do "
                f"not cover whole blocks of {rows_per_block} rows ({spec.blocks} blocks, one mean activation "
                "each); use a world size that divides the number of blocks, or leave this layer unsharded."
            )
        d = math.prod(shape[1:]) + (1 if spec.bias is not None else 0)
        return _Layout(spec, shape, d, start, stop)

    def _call_for(self, own: list[str]) -> list[str]:
        """Return ``own`` plus the partners it is preconditioned with: a weight's bias, a bias's weight."""
        names = list(own)
        for name in own:
            layout = self._layouts.get(name)
            if layout is not None and layout.spec.bias is not None and layout.spec.bias not in names:
                names.append(layout.spec.bias)
            spec = self._spec_by_bias.get(name)
            if spec is not None and spec.weight in self._layouts and spec.weight not in names:
                names.append(spec.weight)
        skipped = {
            name for layout in self._layouts.values() if layout.empty
            for name in (layout.spec.weight, layout.spec.bias) if name is not None
        }
        return [name for name in names if name not in skipped]

    def _refresh_stats_weights(self) -> None:
        """List the weights preconditioned with mean activations, in one order on every rank."""
        self._stats_weights = sorted(w for w in self._layouts if _EXACT_KEY not in self.state[self._params_by_name[w]])
        self._update_fn = None

    def _init_group_state(self, index: int) -> None:
        """Create the state of group ``index`` with :func:`macfn.init`, so its layout is fixed from the start."""
        group = self.param_groups[index]
        config = self._config_for(group)
        own = group["param_names"]
        names = list(dict.fromkeys([*own, *self._call_names[index]]))
        local = {n: local_tensor(self._params_by_name[n]) for n in names}
        base = cast(dict[str, Any], init(local, self._call_config(config, local)))

        # Statistics entries come from init with zero statistics. Sharded weights and their biases
        # are given as placeholders of their global shapes, because the statistics must fit those.
        shapes = dict(local)
        zero_stats: dict[str, Tensor] = {}
        for weight in own:
            layout = self._layouts.get(weight)
            if layout is None:
                continue
            for name in (weight, layout.spec.bias):
                if name is not None:
                    shapes[name] = self._full_placeholder(name)
            param = self._params_by_name[weight]
            dtype = _kernels.accumulation_dtype(param.dtype)
            zero_stats[weight] = torch.zeros(layout.spec.blocks, layout.d, dtype=dtype, device=local[weight].device)
        with_stats = cast(dict[str, Any], init(shapes, self._call_config(config, shapes), zero_stats))

        device = local[own[0]].device if own else torch.device("cpu")
        self._group_state.append({})
        self._lr_tensors.append(torch.zeros((), dtype=torch.float64, device=device))
        for key, value in base.items():
            if isinstance(value, Mapping):
                for name in own:
                    if name in value:
                        self._store(name, key, value[name])
            else:
                self._group_state[index][key] = value
        for key, value in with_stats.items():
            if isinstance(value, Mapping) and value and not base[key]:
                self._stats_keys.add(key)
                for name in own:
                    if name in value:
                        self.state[self._params_by_name[name]][key] = value[name]
        self._refresh_stats_weights()

    def _store(self, name: str, key: str, local: Tensor) -> None:
        """Keep a per-parameter entry with the parameter's layout (a DTensor for a DTensor parameter)."""
        param = self._params_by_name[name]
        if is_dtensor(param):
            from torch.distributed.tensor import DTensor

            local = DTensor.from_local(
                local, param.device_mesh, param.placements,  # type: ignore[attr-defined]
                run_check=False, shape=param.shape, stride=param.stride(),
            )
        self.state[param][key] = local

    def _full_placeholder(self, name: str) -> Tensor:
        """Return a zero-stride tensor of the global shape, for a statistics-only :func:`macfn.step` call."""
        param = self._params_by_name[name]
        device = local_tensor(param).device
        return torch.zeros((), dtype=param.dtype, device=device).expand(tuple(param.shape))

    def _config_for(self, group: Mapping[str, Any]) -> MACConfig:
        """Return the group's MACConfig; ``lr`` is passed to each step separately and left at its default."""
        values = _config_values(group, "param group")
        values.pop("lr", None)
        key = tuple(sorted(values.items()))
        config = self._configs.get(key)
        if config is None:
            config = MACConfig(**values)
            self._configs[key] = config
        return config

    def _call_config(self, config: MACConfig, names: Iterable[str]) -> MACConfig:
        """Return ``config`` with its base-update groups cut down to ``names``, the params of one call."""
        if not config.base_updates:
            return config
        key = (config, tuple(names))
        restricted = self._call_configs.get(key)
        if restricted is None:
            present = set(key[1])
            groups = []
            for group in config.base_updates:
                inside = tuple(name for name in group.params if name in present)
                if inside:
                    groups.append(dataclasses.replace(group, params=inside))
            restricted = config.replace(base_updates=tuple(groups))
            self._call_configs[key] = restricted
        return restricted

    # ------------------------------------------------------------------ step

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one MAC step on the gradients in ``.grad``.

        Args:
            closure: Optional function that clears the gradients, runs the forward and backward
                passes and returns the loss; its forward pass counts for the statistics.

        Returns:
            The closure's loss, or None.

        Raises:
            ValueError: A negative learning rate, or parameter groups that split a weight from
                its bias with different damping, stat_decay or damping_form.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        configs = [self._config_for(group) for group in self.param_groups]
        self._check_split_layers(configs)
        lrs = self._learning_rates()
        stats = self._collect_stats()
        self._prepare_calls(stats, configs)
        if self._compile_options is not None and self._update_fn is None:
            options = {"fullgraph": True, **self._compile_options}
            self._update_fn = torch.compile(self._update, **options)
        update = self._update_fn if self._update_fn is not None else self._update
        update(stats, lrs, configs)
        self._advance_schedule()
        return loss

    def _prepare_calls(self, stats: Stats | None, configs: list[MACConfig]) -> None:
        """Fill the per-call caches eagerly, since a cache filled while compiling changes a guard."""
        for index, config in enumerate(configs):
            params = {n: local_tensor(self._params_by_name[n]) for n in self._call_names[index]}
            self._state_layout(self._call_config(config, params), params)
            if stats:
                placeholders = self._sharded_statistics_params(index, stats)
                if placeholders:
                    self._state_layout(self._call_config(config, placeholders), placeholders)

    def _learning_rates(self) -> list[Tensor]:
        """Return each group's learning rate as a 0-dim tensor; a float is written into a cached one."""
        rates = []
        for index, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, Tensor):
                if lr.numel() != 1:
                    raise ValueError(f"Invalid lr of shape {tuple(lr.shape)} in param group {index}: expected a 0-dim tensor.")
                rates.append(lr)
                continue
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
                raise ValueError(f"Invalid lr={lr!r} in param group {index}: expected a finite number >= 0.")
            rates.append(self._lr_tensors[index].fill_(lr))
        return rates

    def _check_split_layers(self, configs: list[MACConfig]) -> None:
        for spec in self._split_layers:
            assert spec.bias is not None
            weight_config = configs[self._group_of[spec.weight]]
            bias_config = configs[self._group_of[spec.bias]]
            for field in _PRECONDITIONER_FIELDS:
                if getattr(weight_config, field) != getattr(bias_config, field):
                    raise ValueError(
                        f"Invalid param groups: '{spec.weight}' and '{spec.bias}' share one preconditioner but "
                        f"their groups set {field}={getattr(weight_config, field)!r} and "
                        f"{getattr(bias_config, field)!r}; give both groups the same {field}."
                    )

    def _update(self, stats: Stats | None, lrs: list[Tensor], configs: list[MACConfig]) -> None:
        """Apply one step to every group; the pure part of :meth:`step`, compiled when requested."""
        grads = self._local_grads()
        finite = self._combined_finite(grads, stats, configs)
        if stats:
            self._update_sharded_statistics(stats, lrs, configs, finite)
        # NOTE: nothing here reads self.param_groups, whose float lr would become a guard and
        # recompile the compiled update on every scheduler step.
        # Every call reads the state before any call writes, because a weight split from its bias
        # is read by two calls.
        writes: list[tuple[Tensor, Tensor]] = []
        created: list[tuple[str, str, Tensor]] = []
        for index, config in enumerate(configs):
            self._update_group(index, grads, stats, lrs[index], config, writes, created, finite)
        for target, value in writes:
            target.copy_(value)
        for name, key, value in created:
            self._store(name, key, value)

    def _combined_finite(
        self, grads: Mapping[str, Tensor | None], stats: Stats | None, configs: list[MACConfig]
    ) -> Tensor | None:
        """Return one finite flag over every group's gradients and the statistics.

        Every :func:`macfn.step` call receives it, so a NaN in one group skips all groups. With
        row-sharded (FSDP2) parameters each rank sees only its own gradient rows, so the flag is
        combined across ranks with one all-reduce of a single integer.
        """
        if all(config.nonfinite == "ignore" for config in configs):
            return None
        tensors = [g for g in grads.values() if g is not None] + list((stats or {}).values())
        flag = _finite.all_finite(tensors)
        if any(layout.sharded for layout in self._layouts.values()) and dist.is_available() and dist.is_initialized():
            as_int = flag.to(torch.int32)
            dist.all_reduce(as_int, op=dist.ReduceOp.MIN, group=self._process_group)
            flag = as_int.bool()
        return flag

    def _local_grads(self) -> dict[str, Tensor | None]:
        names = {name for call in self._call_names for name in call}
        grads: dict[str, Tensor | None] = {}
        for name in names:
            grad = self._params_by_name[name].grad
            if grad is not None and grad.is_sparse:
                raise ValueError(f"Invalid sparse gradient of '{name}': MAC supports dense gradients only.")
            grads[name] = None if grad is None else local_tensor(grad)
        self._apply_exact_preconditioners(grads)
        return grads

    def _update_group(
        self,
        index: int,
        grads: Mapping[str, Tensor | None],
        stats: Stats | None,
        lr: Tensor,
        config: MACConfig,
        writes: list[tuple[Tensor, Tensor]],
        created: list[tuple[str, str, Tensor]],
        finite: Tensor | None,
    ) -> None:
        """Run :func:`macfn.step` for group ``index`` and queue the in-place writes of its results."""
        own = self._own[index]
        call = self._call_names[index]
        params = {n: local_tensor(self._params_by_name[n]) for n in call}
        stats_weights = [w for w in self._stats_weights if w in params]
        call_stats = None
        if stats is not None:
            call_stats = {w: stats[w] for w in stats_weights if w in stats and not self._layouts[w].sharded}
        config = self._call_config(config, params)

        # Step 1: gather the state of every name in the call, laid out as macfn.init lays it out.
        state: dict[str, Any] = {}
        for key, names in self._state_layout(config, params).items():
            if names is None:
                state[key] = self._group_state[index][key]
            elif key in self._stats_keys:
                state[key] = {w: self._local_stats_entry(w, key) for w in stats_weights}
            else:
                state[key] = {n: self._param_entry(n, key) for n in names}

        # Step 2: the functional step.
        call_grads = {n: grads[n] for n in call}
        new_params, new_state = step(params, call_grads, call_stats, cast(MACState, state), config, lr=lr, finite=finite)
        updated_state = cast(dict[str, Any], new_state)

        # Step 3: queue the writes of this group's own parameters and state.
        for name in call:
            if name in own and call_grads[name] is not None:
                writes.append((params[name], new_params[name]))
        for key, value in updated_state.items():
            if not isinstance(value, Mapping):
                writes.append((self._group_state[index][key], value))
                continue
            for name, updated in value.items():
                if name not in own or updated is state[key].get(name):
                    continue
                if key in self._stats_keys:
                    if not self._layouts[name].sharded:
                        writes.append((self.state[self._params_by_name[name]][key], updated))
                    continue
                stored = self.state[self._params_by_name[name]].get(key)
                if stored is None:
                    # A buffer that did not exist yet, e.g. after momentum was raised from 0.
                    created.append((name, key, updated.clone()))
                else:
                    writes.append((local_tensor(stored), updated))

    def _state_layout(self, config: MACConfig, params: Mapping[str, Tensor]) -> dict[str, tuple[str, ...] | None]:
        """Return the keys of :func:`macfn.init`'s state for one call: the names of a dict, None for a tensor.

        The layout is read from ``init`` on meta tensors, so it follows the core's state exactly
        (an empty ``momentum`` without momentum, AdamW moments only for AdamW parameters).
        """
        cache_key = (config, tuple(params))
        layout = self._layouts_by_call.get(cache_key)
        if layout is None:
            meta = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in params.items()}
            template = cast(dict[str, Any], init(meta, config))
            layout = {k: tuple(v) if isinstance(v, Mapping) else None for k, v in template.items()}
            self._layouts_by_call[cache_key] = layout
        return layout

    def _param_entry(self, name: str, key: str) -> Tensor:
        stored = self.state[self._params_by_name[name]].get(key)
        if stored is not None:
            return local_tensor(stored)
        # A partner from a group without this entry (or outside the optimizer) gets zeros that
        # are never written back.
        placeholder = self._placeholders.get((name, key))
        if placeholder is None:
            placeholder = torch.zeros_like(local_tensor(self._params_by_name[name]))
            self._placeholders[(name, key)] = placeholder
        return placeholder

    def _local_stats_entry(self, weight: str, key: str) -> Tensor:
        entry: Tensor = self.state[self._params_by_name[weight]][key]
        layout = self._layouts[weight]
        if layout.sharded and entry.dim() >= 1:
            first, last = layout.blocks
            return entry[first:last]
        return entry

    def _update_sharded_statistics(
        self, stats: Stats, lrs: list[Tensor], configs: list[MACConfig], finite: Tensor | None
    ) -> None:
        """Fold new statistics into the full running mean of every row-sharded weight.

        Each rank keeps the whole replicated running mean, also of blocks whose rows are on other
        ranks. So this update runs :func:`macfn.step` on zero-stride placeholders of the global
        shapes with no gradients, and the local rows are then preconditioned with their slice.
        """
        for index, config in enumerate(configs):
            params = self._sharded_statistics_params(index, stats)
            if not params:
                continue
            weights = [w for w in params if w in self._layouts]
            call_config = self._call_config(config, params)
            state: dict[str, Any] = {}
            for key, names in self._state_layout(call_config, params).items():
                if names is None:
                    state[key] = self._group_state[index][key]
                elif key in self._stats_keys:
                    state[key] = {w: self.state[self._params_by_name[w]][key] for w in weights}
                else:
                    state[key] = {n: params[n] for n in names}
            _, new_state = step(
                params, dict.fromkeys(params), {w: stats[w] for w in weights}, cast(MACState, state),
                call_config, lr=lrs[index], finite=finite,
            )
            for key in self._stats_keys:
                for weight in weights:
                    self.state[self._params_by_name[weight]][key].copy_(new_state[key][weight])  # type: ignore[literal-required]

    def _sharded_statistics_params(self, index: int, stats: Stats) -> dict[str, Tensor]:
        """Return global-shape placeholders of group ``index``'s row-sharded weights with new statistics, and their biases."""
        params: dict[str, Tensor] = {}
        for weight in self._stats_weights:
            layout = self._layouts[weight]
            if layout.sharded and weight in stats and weight in self._own[index]:
                for name in (weight, layout.spec.bias):
                    if name is not None:
                        params[name] = self._full_placeholder(name)
        return params

    # ------------------------------------------------------------------ statistics capture

    def _make_row_hook(self, weight: str) -> Callable[..., None]:
        """Count the rows each forward call gives ``weight``, to weigh this rank in the cross-rank average.

        The hook keeps a weak reference to the optimizer, so that a discarded optimizer is freed and removes its hooks.
        """
        reference = weakref.ref(self)

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self = reference()
            if self is None or not self._counting or not (module.training and torch.is_grad_enabled()):
                return None
            if not isinstance(output, Tensor) or output.dim() == 0:
                return None
            channels = output.shape[-3] if isinstance(module, nn.Conv2d) else output.shape[-1]
            self._rows[weight] = self._rows.get(weight, 0) + output.numel() // max(channels, 1)
            return None

        return hook

    def _sync_enabled(self) -> bool:
        return self._sync if self._sync is not None else sync_active(self._process_group)

    def _start_recording(self) -> None:
        self._recorder.start()
        self._rows = {}
        self._counting = self._sync_enabled()

    def _collect_stats(self) -> Stats | None:
        """End the recording, if one is running, and return statistics averaged across ranks."""
        if not self._recorder.recording:
            return None
        recorded = self._recorder.stop()
        rows, self._rows = self._rows, {}
        self._counting = False
        weights = self._stats_weights
        if self._sync_enabled():
            entries = []
            for weight in weights:
                layout = self._layouts[weight]
                mean = recorded.get(weight)
                # NOTE: statistics recorded by attention hooks, not by an nn.Linear or nn.Conv2d
                # module, have no row count, so every rank weighs 1 for them.
                count = float(rows.get(weight) or 1) if mean is not None else 0.0
                entries.append((weight, mean, count, (layout.spec.blocks, layout.d)))
            recorded = average_across_ranks(entries, self._process_group)
        stats = {w: recorded[w] for w in weights if w in recorded}
        return stats or None

    def _advance_schedule(self) -> None:
        if self.stats_interval > 1:
            self._phase = (self._phase + 1) % self.stats_interval
        if self._phase == 0:
            self._start_recording()

    def remove_hooks(self) -> None:
        """Detach the optimizer's forward hooks from the model; later steps use no new statistics."""
        self._recorder.remove()
        if self._recorder.recording:
            self._recorder.stop()
        for handle in self._row_hooks:
            handle.remove()
        self._row_hooks = []

    def __del__(self) -> None:
        # The model outlives a discarded optimizer; its hooks must not keep recording.
        recorder = getattr(self, "_recorder", None)
        if recorder is not None:
            self.remove_hooks()

    # ------------------------------------------------------------------ exact first-layer preconditioner

    def _apply_exact_preconditioners(self, grads: dict[str, Tensor | None]) -> None:
        """Replace the gradient rows ``[G, g_b]`` of frozen layers by ``[G, g_b] (A + rho I)^-1``."""
        for weight, layout in self._layouts.items():
            inverse = self.state[self._params_by_name[weight]].get(_EXACT_KEY)
            grad = grads.get(weight)
            if inverse is None or grad is None or layout.empty:
                continue
            first, last = layout.blocks
            bias = layout.spec.bias
            bias_grad = grads.get(bias) if bias is not None else None
            out_rows = grad.shape[0]
            dtype = _kernels.accumulation_dtype(grad.dtype)

            # Step 1: gradient rows with the bias gradient as last column -> [blocks, rows, d].
            rows = grad.reshape(out_rows, -1).to(dtype)
            if bias is not None:
                column = torch.zeros_like(rows[:, :1]) if bias_grad is None else bias_grad.reshape(out_rows, 1).to(dtype)
                rows = torch.cat([rows, column], dim=1)
            blocked = rows.reshape(last - first, out_rows // (last - first), layout.d)

            # Step 2: multiply by the symmetric inverse -> [out_rows, d].
            result = torch.bmm(blocked, inverse[first:last].to(dtype)).reshape(out_rows, layout.d)
            if bias is not None:
                if bias_grad is not None:
                    grads[bias] = result[:, -1].reshape(bias_grad.shape).to(bias_grad.dtype)
                result = result[:, :-1]
            grads[weight] = result.reshape(grad.shape).to(grad.dtype)

    @torch.no_grad()
    def freeze_exact_preconditioner(
        self,
        weight_name: str,
        loader: Iterable[Any],
        *,
        damping: float | None = None,
        max_batches: int | None = None,
    ) -> None:
        """Estimate ``A = E[a a^T]`` of one layer's inputs and precondition it by ``(A + rho I)^-1`` from now on.

        This is the authors' code choice for the stem convolution or ViT patch embedding
        (hseung88/mac), not part of the MAC method of the paper. ``a`` is an input row of the
        layer (an im2col patch for a convolution) with a trailing 1 for its bias, averaged over
        every row of the batches of ``loader``. The inverse is computed in float64, stored in the
        optimizer state and never updated. From then on the layer takes the base update on
        ``[G, g_b] (A + rho I)^-1`` in place of the rank-one MAC correction. Under
        torch.distributed the row sums of all ranks are added first.

        The model runs in evaluation mode up to that layer only; later layers are not run.

        Args:
            weight_name: The layer's weight, a key of ``model.named_parameters()``.
            loader: Batches: input tensors, or tuples or lists whose first element is the input.
            damping: rho > 0; the damping of the weight's parameter group when None.
            max_batches: Use at most this many batches.

        Raises:
            ValueError: Not a preconditioned weight of this optimizer, invalid damping or
                max_batches, or a loader without batches.
        """
        if weight_name not in self._layouts:
            valid = ", ".join(map(repr, sorted(self._layouts)))
            raise ValueError(f"Invalid weight_name={weight_name!r}: expected a preconditioned weight, one of {valid}.")
        layout = self._layouts[weight_name]
        group = self.param_groups[self._group_of[weight_name]]
        rho = group["damping"] if damping is None else damping
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
            raise ValueError(f"Invalid damping={rho!r}: expected a finite number > 0, e.g. 1.0.")
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"Invalid max_batches={max_batches!r}: expected None or an integer >= 1.")

        total, count = self._input_second_moment(layout, loader, max_batches)
        if self._sync_enabled():
            packed = torch.cat([total.reshape(-1), total.new_tensor([count])])
            dist.all_reduce(packed, group=self._process_group)
            total, count = packed[:-1].reshape(total.shape), int(packed[-1].item())
        if count == 0:
            raise ValueError(f"Invalid loader: it gave no input rows for '{weight_name}'; pass at least one batch.")

        eye = torch.eye(layout.d, dtype=torch.float64, device=total.device)
        inverse = torch.linalg.inv(total / count + rho * eye)
        param = self._params_by_name[weight_name]
        entry = self.state[param]
        entry[_EXACT_KEY] = inverse.to(_kernels.accumulation_dtype(param.dtype))
        for key in self._stats_keys:
            entry.pop(key, None)
        self._refresh_stats_weights()

    def _input_second_moment(
        self, layout: _Layout, loader: Iterable[Any], max_batches: int | None
    ) -> tuple[Tensor, int]:
        """Return ``sum a a^T`` as float64 ``[blocks, d, d]`` over the layer's input rows, and the row count."""
        _, owners = find_layers(self._model)
        modules = [m for m, w in owners.items() if w == layout.spec.weight]
        if not modules:
            raise ValueError(
                f"Invalid weight_name='{layout.spec.weight}': the exact preconditioner supports the weights of "
                "nn.Linear and nn.Conv2d layers only."
            )
        captured: list[Tensor] = []

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0].detach())
            raise _StopForward

        device = local_tensor(self._params_by_name[layout.spec.weight]).device
        total = torch.zeros(layout.spec.blocks, layout.d, layout.d, dtype=torch.float64, device=device)
        count = 0
        modes = {m: m.training for m in self._model.modules()}
        handles = [m.register_forward_pre_hook(hook) for m in modules]
        try:
            self._model.eval()
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                try:
                    self._model(inputs.to(device) if isinstance(inputs, Tensor) else inputs)
                except _StopForward:
                    pass
                for x in captured:
                    for rows in _input_rows(modules[0], x, layout):
                        total += torch.einsum("bni,bnj->bij", rows, rows)
                        count += rows.shape[1]
                captured.clear()
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes.items():
                module.train(training)
        return total, count

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Return the optimizer state keyed by parameter names (format in the module docstring).

        Tensors are the live state, as ``torch.optim`` returns them; ``torch.save`` the result or
        pass it to ``torch.distributed.checkpoint``. It loads with ``torch.load(weights_only=True)``.
        """
        state = {}
        for group in self.param_groups:
            for name in group["param_names"]:
                state[name] = dict(self.state[self._params_by_name[name]])
        groups = []
        for group in self.param_groups:
            saved = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            if "base_updates" in saved:
                # NOTE: records become plain dicts because torch.load(weights_only=True) rejects dataclasses.
                saved["base_updates"] = [dataclasses.asdict(g) for g in saved["base_updates"]]
            saved["params"] = list(group["param_names"])
            groups.append(saved)
        return {
            "state": state,
            "param_groups": groups,
            "group_state": [dict(entries) for entries in self._group_state],
            "stats_schedule": {"interval": self.stats_interval, "phase": self._phase},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, matching parameters by name.

        Everything is checked before anything changes: parameter names, group membership,
        hyperparameters, state keys and shapes, and the statistics interval.

        Raises:
            ValueError: A checkpoint of another model (naming the missing and unexpected
                parameters), other parameter groups, or another ``stats_interval``.
        """
        self._check_state_dict(state_dict)
        saved_groups = state_dict["param_groups"]

        # Step 1: hyperparameters; a tensor lr keeps its identity so a compiled step does not recompile.
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key == "params":
                    continue
                if key == "base_updates":
                    value = _base_updates(value)
                current = group.get(key)
                if isinstance(current, Tensor) and isinstance(value, Tensor) and current.shape == value.shape:
                    current.copy_(value)
                else:
                    group[key] = value

        # Step 2: per-parameter state. A weight is frozen to an exact preconditioner exactly when
        # the checkpoint's entry has one; entries that the other mode lacks are created.
        with torch.no_grad():
            for name, saved in state_dict["state"].items():
                entry = self.state[self._params_by_name[name]]
                if name in self._layouts:
                    dropped = set(self._stats_keys) if _EXACT_KEY in saved else {_EXACT_KEY}
                    for key in dropped:
                        entry.pop(key, None)
                for key, value in saved.items():
                    if key in entry:
                        entry[key].copy_(value)
                    else:
                        entry[key] = value.clone()
        self._refresh_stats_weights()
        for entries, saved in zip(self._group_state, state_dict["group_state"]):
            for key, value in saved.items():
                entries[key].copy_(value)

        # Step 3: the statistics schedule; a recording in progress is discarded.
        if self._recorder.recording:
            self._recorder.stop()
        self._phase = int(state_dict["stats_schedule"]["phase"])
        if self._phase == 0:
            self._start_recording()

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or not _FORMAT_KEYS <= set(state_dict):
            found = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(
                f"Invalid state_dict with keys {found}: expected the dict of macfn.optim.MAC.state_dict() with keys "
                f"{sorted(_FORMAT_KEYS)}."
            )
        saved_groups = state_dict["param_groups"]
        saved_names = {name for g in saved_groups for name in g["params"]} | set(state_dict["state"])
        current = set(self._group_of)
        missing, unexpected = sorted(current - saved_names), sorted(saved_names - current)
        if missing or unexpected:
            raise ValueError(
                f"Invalid state_dict for this model: missing parameters {missing}, unexpected parameters "
                f"{unexpected}; load a checkpoint saved from the same model architecture."
            )
        if len(saved_groups) != len(self.param_groups) or any(
            list(g["params"]) != list(current_group["param_names"])
            for g, current_group in zip(saved_groups, self.param_groups)
        ):
            raise ValueError(
                "Invalid state_dict: its parameter groups hold other parameters than this optimizer's groups; "
                "build the optimizer with the same param_groups as the one that was saved."
            )
        for index, saved in enumerate(saved_groups):
            try:
                values = _config_values(saved, "param group")
                if "base_updates" in values:
                    values["base_updates"] = _base_updates(values["base_updates"])
                MACConfig(**values)
            except ValueError as error:
                raise ValueError(f"Invalid state_dict param group {index}: {error}") from error
        for name, saved in state_dict["state"].items():
            entry = self.state[self._params_by_name[name]]
            required = set(entry) - self._stats_keys - {_EXACT_KEY}
            if name in self._layouts:
                required |= {_EXACT_KEY} if _EXACT_KEY in saved else self._stats_keys
            if set(saved) != required:
                raise ValueError(
                    f"Invalid state_dict entry '{name}' with state {sorted(saved)}: expected {sorted(required)}; "
                    "load a checkpoint of an optimizer with the same hyperparameters."
                )
            for key, value in saved.items():
                target = entry.get(key)
                if target is not None and tuple(target.shape) != tuple(value.shape):
                    raise ValueError(
                        f"Invalid state_dict entry '{name}'['{key}'] of shape {tuple(value.shape)}: this optimizer "
                        f"holds shape {tuple(target.shape)}; load a checkpoint of the same model."
                    )
        schedule = state_dict["stats_schedule"]
        if int(schedule["interval"]) != self.stats_interval:
            raise ValueError(
                f"Invalid state_dict saved with stats_interval={schedule['interval']}: this optimizer has "
                f"stats_interval={self.stats_interval}; build it with stats_interval={schedule['interval']}."
            )


# ---------------------------------------------------------------------- helpers


def _unwrap(model: nn.Module) -> nn.Module:
    """Return the module under ``torch.compile`` and DDP wrappers, whose parameter names are canonical."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def _check_not_fsdp1(model: nn.Module) -> None:
    """Reject FullyShardedDataParallel (FSDP1), whose flattened parameters hide the layers' weights."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(
            "Invalid model wrapped in FullyShardedDataParallel (FSDP1): it flattens parameters, so MAC cannot "
            "find the layer weights; shard the model with torch.distributed.fsdp.fully_shard (FSDP2) instead."
        )


def _as_list(params: Any) -> list[Any]:
    if isinstance(params, (Tensor, str)):
        return [params]
    if isinstance(params, set):
        raise TypeError("Invalid params of type set: use a list so the parameter order is reproducible.")
    return list(params)


def _named_groups(optimizer: MAC, param_groups: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Turn the ``param_groups`` argument into groups of ``(name, parameter)`` pairs."""
    if param_groups is None:
        return [{"params": list(optimizer._params_by_name.items())}]
    groups = list(param_groups)
    if not groups:
        raise ValueError("Invalid param_groups: it is empty; pass None to optimize every parameter of the model.")
    if not isinstance(groups[0], Mapping):
        groups = [{"params": groups}]
    return [dict(group) for group in groups]


def _check_hyperparameter_names(values: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(values) - set(HYPERPARAMETERS))
    if unknown:
        raise ValueError(
            f"Invalid {where} hyperparameter {', '.join(map(repr, unknown))}: expected one of "
            f"{', '.join(HYPERPARAMETERS)}, stats_interval, sync_stats, process_group, compile, recorder_options."
        )


def _base_updates(value: Any) -> tuple[BaseUpdate, ...]:
    """Rebuild base-update records saved as plain dicts by :meth:`MAC.state_dict`."""
    if isinstance(value, Mapping):
        raise ValueError(f"Invalid base_updates={value!r}: expected a list of BaseUpdate records or dicts.")
    records = []
    for entry in value:
        if isinstance(entry, BaseUpdate):
            records.append(entry)
        elif isinstance(entry, Mapping):
            fields = dict(entry)
            for key in ("params", "betas"):
                if key in fields:
                    fields[key] = tuple(fields[key])
            records.append(BaseUpdate(**fields))
        else:
            raise ValueError(f"Invalid base_updates entry {entry!r}: expected a BaseUpdate or a dict of its fields.")
    return tuple(records)


def _float_lr(lr: Any) -> Any:
    return float(lr.item()) if isinstance(lr, Tensor) and lr.numel() == 1 else lr


def _config_values(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Return the MACConfig fields present in ``values``, with a tensor lr read as a float for validation."""
    result = {key: values[key] for key in HYPERPARAMETERS if key in values}
    if "lr" in result:
        result["lr"] = _float_lr(result["lr"])
    return result


def _input_rows(module: nn.Module, x: Tensor, layout: _Layout) -> Iterator[Tensor]:
    """Yield float64 input rows ``[blocks, n, d]`` of a layer in chunks of about 2^22 values."""
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        kernel = (module.kernel_size[0], module.kernel_size[1])
        dilation = (module.dilation[0], module.dilation[1])
        padding = _kernels.conv2d_padding(module.padding, kernel, dilation)  # type: ignore[arg-type]
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        samples = 1
        start = 0
        while start < x.shape[0]:
            chunk = x[start : start + samples].to(torch.float64)
            if any(padding):
                chunk = F.pad(chunk, padding, mode=mode)
            patches = F.unfold(chunk, kernel, dilation=dilation, stride=module.stride)  # [n, C*kh*kw, L]
            n, width, positions = patches.shape
            rows = patches.transpose(1, 2).reshape(n * positions, module.groups, -1).transpose(0, 1)
            yield _with_bias_column(rows, layout)
            start += samples
            samples = max(1, (1 << 22) // max(width * positions, 1))
        return
    d_in = x.shape[-1]
    flat = x.reshape(-1, d_in).to(torch.float64)
    step_rows = max(1, (1 << 22) // max(d_in, 1))
    for start in range(0, flat.shape[0], step_rows):
        yield _with_bias_column(flat[start : start + step_rows].unsqueeze(0), layout)


def _with_bias_column(rows: Tensor, layout: _Layout) -> Tensor:
    if layout.spec.bias is None:
        return rows
    return torch.cat([rows, rows.new_ones(rows.shape[0], rows.shape[1], 1)], dim=2)

