"""The released JAX checkpoints as their code writes them, for tests/test_released_layouts.py and
test_import.py.

No optax, BYOL, ssl_hsic, old haiku or dill is installed here, so this module defines stand-ins with
the released classes' module paths and names and registers them in sys.modules only while pickling
(`released_modules`): the pickle names the real paths, and the loader never finds the stand-ins.

* SSL-HSIC (deepmind/ssl_hsic ssl_hsic/experiment.py:508-517, requirements.txt: dm-haiku 0.0.5,
  optax 0.1.0): np.save(fp, {'experiment_state': _ExperimentState._asdict(), 'ema_state':
  _EMAState._asdict()}) of the state after jax.tree_map(np.array): haiku 0.0.5 FlatMaps (pickled by
  FlatMap.__reduce__ as (haiku._src.data_structures.FlatMapping, (mapping,)),
  data_structures.py:263-266), optax's chain state tuples.
* BYOL (deepmind-research byol/utils/checkpointing.py:69-75): dill.dump(dict(experiment_state=
  _ByolExperimentState(...), step=step, rng=rng), protocol=2). `DillLikePickler` writes what dill
  0.3.2 (_dill.py:795-810, 1332-1339) writes: namedtuple classes by
  `dill._dill._create_namedtuple(name, fields, module)`, arrays by `dill._dill._create_array(f,
  args, state, None)`, builtin functions (numpy's _reconstruct, _codecs.encode) by
  `dill._dill._get_attr(dill._dill._import_module(module), name)`.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import pickle
import sys
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
from numpy.core.multiarray import _reconstruct  # noqa: TID253 (the name the released pickles reference)

# ------------------------------------------------------------------ haiku's mappings (0.0.3 -
# 0.0.9, and 0.0.1-2)


class FlatMap(Mapping):
    """haiku 0.0.5's FlatMap (data_structures.py:181): pickles as FlatMapping(mapping) (its
    __reduce__)."""

    def __init__(self, mapping):
        self._mapping = dict(mapping)

    def __getitem__(self, key):
        return self._mapping[key]

    def __iter__(self):
        return iter(self._mapping)

    def __len__(self):
        return len(self._mapping)

    def __reduce__(self):
        return FlatMapping, (self._mapping,)


class FlatMapping(FlatMap):
    """haiku 0.0.5's FlatMapping: 'Only called from old checkpoints.'"""


class frozendict(Mapping):  # noqa: N801 - haiku 0.0.1-0.0.2's name
    """haiku 0.0.2's frozendict (data_structures.py:93, __reduce__ at 152: (frozendict,
    (self._storage,)))."""

    def __init__(self, mapping):
        self._storage = dict(mapping)

    def __getitem__(self, key):
        return self._storage[key]

    def __iter__(self):
        return iter(self._storage)

    def __len__(self):
        return len(self._storage)

    def __reduce__(self):
        return frozendict, (self._storage,)


def to_haiku(tree: dict, mapping: type = FlatMap) -> Mapping:
    """haiku's to_immutable_dict (0.0.5 data_structures.py:97-108): every nested dict becomes the
    mapping type."""
    return mapping({k: to_haiku(v, mapping) if isinstance(v, dict) else v for k, v in tree.items()})


# ------------------------------------------------------------------ optax, BYOL's and ssl_hsic's
# NamedTuples


class ScaleByAdamState(NamedTuple):  # optax 0.1.0 optax/_src/transform.py:260
    count: Any
    mu: Any
    nu: Any


class EmptyState(NamedTuple):  # optax 0.1.0 optax/_src/base.py:59 (ScaleState = base.EmptyState)
    pass


class ScaleState(NamedTuple):  # optax of August 2020 (optax/_src/transform.py:300), BYOL's release
    pass


class ScaleByLarsState(NamedTuple):  # deepmind-research byol/utils/optimizers.py:57
    mu: Any


class AddWeightDecayState(NamedTuple):  # byol/utils/optimizers.py:108
    pass


class _ExperimentState(NamedTuple):  # ssl_hsic/experiment.py:50
    online_params: Any
    target_params: Any
    online_state: Any
    target_state: Any
    kernel_params: Any
    kernel_opt_state: Any
    opt_state: Any


class _EMAState(NamedTuple):  # ssl_hsic/experiment.py:61
    online_params: Any
    kernel_params: Any
    ema_params: Any
    ema_state: Any


class _ByolExperimentState(NamedTuple):  # byol/byol_experiment.py:45
    online_params: Any
    target_params: Any
    online_state: Any
    target_state: Any
    opt_state: Any


RELEASED = {  # stand-in -> (module, qualname) of the released class
    FlatMapping: ("haiku._src.data_structures", "FlatMapping"),
    FlatMap: ("haiku._src.data_structures", "FlatMap"),
    frozendict: ("haiku._src.data_structures", "frozendict"),
    ScaleByAdamState: ("optax._src.transform", "ScaleByAdamState"),
    EmptyState: ("optax._src.base", "EmptyState"),
    ScaleState: ("optax._src.transform", "ScaleState"),
    ScaleByLarsState: ("byol.utils.optimizers", "ScaleByLarsState"),
    AddWeightDecayState: ("byol.utils.optimizers", "AddWeightDecayState"),
    _ExperimentState: ("ssl_hsic.experiment", "_ExperimentState"),
    _EMAState: ("ssl_hsic.experiment", "_EMAState"),
    _ByolExperimentState: ("byol.byol_experiment", "_ByolExperimentState"),
}


@contextlib.contextmanager
def released_modules():
    """While pickling: the stand-ins carry the released module paths, found in sys.modules there;
    afterwards every
    sys.modules entry and class attribute is as it was (the real haiku, if imported, is put back).
    """
    saved_modules, saved_names = {}, {cls: (cls.__module__, cls.__qualname__) for cls in RELEASED}
    try:
        for cls, (module, qualname) in RELEASED.items():
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in saved_modules:
                    saved_modules[name] = sys.modules.get(name)
                    sys.modules[name] = types.ModuleType(name)
            cls.__module__, cls.__qualname__ = module, qualname
            setattr(sys.modules[module], qualname, cls)
        yield
    finally:
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for cls, (module, qualname) in saved_names.items():
            cls.__module__, cls.__qualname__ = module, qualname


# ------------------------------------------------------------------ dill's pickle of BYOL's
# checkpoint


class _DillHelper:
    """A stand-in for one of dill._dill's functions: only its name matters to the pickle."""

    def __init__(self, name):
        self.__name__ = self.__qualname__ = name
        self.__module__ = "dill._dill"

    def __call__(self, *args):  # pickle wants a callable first item; it is never called
        raise RuntimeError("a stand-in for dill's helper")

    def __reduce__(self):
        return self.__name__


class _ModuleRef:
    def __init__(self, name):
        self.name = name


_CREATE_ARRAY, _CREATE_NAMEDTUPLE = _DillHelper("_create_array"), _DillHelper("_create_namedtuple")
_GET_ATTR, _IMPORT_MODULE = _DillHelper("_get_attr"), _DillHelper("_import_module")


class DillLikePickler(pickle.Pickler):
    """Writes what dill 0.3.2's Pickler writes for a dict of NamedTuples, haiku mappings and
    numpy arrays."""

    def __init__(self, file, create_array: bool = True):
        super().__init__(file, protocol=2)
        self.create_array = create_array
        self.builtins = {
            id(_reconstruct): ("numpy.core._multiarray_umath", "_reconstruct"),
            id(codecs.encode): ("_codecs", "encode"),
        }

    def reducer_override(self, obj):
        if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
            # dill _dill.py:1337
            return _CREATE_NAMEDTUPLE, (obj.__qualname__, obj._fields, obj.__module__)
        if type(obj) is np.ndarray and self.create_array:
            f, args, state = obj.__reduce__()
            # dill _dill.py:1241-1246 (numpy array hack)
            return _CREATE_ARRAY, (f, args, state, None)
        if id(obj) in self.builtins:  # builtin functions: _get_attr(_import_module(module), name)
            module, name = self.builtins[id(obj)]
            return _GET_ATTR, (_ModuleRef(module), name)
        if isinstance(obj, _ModuleRef):
            return _IMPORT_MODULE, (obj.name,)
        return NotImplemented


def dill_dumps(obj: Any, create_array: bool = True) -> bytes:
    dill = types.ModuleType("dill")
    dill._dill = types.ModuleType("dill._dill")
    for helper in (_CREATE_ARRAY, _CREATE_NAMEDTUPLE, _GET_ATTR, _IMPORT_MODULE):
        setattr(dill._dill, helper.__name__, helper)
    saved = {name: sys.modules.get(name) for name in ("dill", "dill._dill")}
    sys.modules.update({"dill": dill, "dill._dill": dill._dill})
    try:
        with released_modules():
            buffer = io.BytesIO()
            DillLikePickler(buffer, create_array).dump(obj)
            return buffer.getvalue()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# ------------------------------------------------------------------ the two released layouts


def ssl_hsic_checkpoint(online_params: dict, online_state: dict, ema_params: dict) -> dict:
    """What ssl_hsic/experiment.py:514-517 passes to np.save: the shallow _asdict() of its two
    NamedTuples (the
    official code np.saves this dict; np.save pickles it with protocol 3)."""
    kernel_params = {"hsic_loss": {"scale": np.float32(1.0) * np.ones((), np.float32)}}
    zeros = {m: {k: np.zeros_like(v) for k, v in e.items()} for m, e in online_params.items()}
    experiment = _ExperimentState(
        online_params=to_haiku(online_params),
        target_params=to_haiku(online_params),
        online_state=to_haiku(online_state),
        target_state=to_haiku(online_state),
        kernel_params=to_haiku(kernel_params),
        kernel_opt_state=(
            ScaleByAdamState(
                np.array(1000, np.int32), to_haiku(kernel_params), to_haiku(kernel_params)
            ),
            EmptyState(),
        ),
        opt_state=(AddWeightDecayState(), ScaleByLarsState(mu=to_haiku(zeros)), EmptyState()),
    )
    ema = _EMAState(
        online_params=to_haiku(ema_params),
        kernel_params=to_haiku(kernel_params),
        ema_params=to_haiku({}),
        ema_state=to_haiku(
            {
                "exponential_moving_average": {
                    "counter": np.array(1000, np.int32),
                    "hidden": np.zeros(2, np.float32),
                    "average": np.zeros(2, np.float32),
                }
            }
        ),
    )
    return {"experiment_state": experiment._asdict(), "ema_state": ema._asdict()}


def save_ssl_hsic(path, content: dict) -> None:
    """np.save of the dict, the stand-ins carrying the released module paths."""
    with released_modules():
        np.save(path, content, allow_pickle=True)


def byol_checkpoint(
    online_params: dict, online_state: dict, target_params: dict, mapping: type = FlatMap
) -> dict:
    """What byol/utils/checkpointing.py:69-73 dill-dumps: experiment_state a _ByolExperimentState
    (its fields
    jax.device_get to numpy), step an int and rng a numpy array."""
    zeros = {m: {k: np.zeros_like(v) for k, v in e.items()} for m, e in online_params.items()}
    experiment = _ByolExperimentState(
        online_params=to_haiku(online_params, mapping),
        target_params=to_haiku(target_params, mapping),
        online_state=to_haiku(online_state, mapping),
        target_state=to_haiku(online_state, mapping),
        opt_state=(
            AddWeightDecayState(),
            ScaleByLarsState(mu=to_haiku(zeros, mapping)),
            ScaleState(),
        ),
    )
    return {"experiment_state": experiment, "step": 300 * 5004, "rng": np.array([0, 42], np.uint32)}
