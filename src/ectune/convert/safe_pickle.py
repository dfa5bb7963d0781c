"""Read EDM / EDM2 / official-ECT network pickles without executing anything they contain.

Those snapshots are pickles of dicts such as ``{'ema': network, 'loss_fn': ..., ...}`` whose network
modules are ``torch_utils.persistence`` objects: each is rebuilt by a call to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = dict(type='class', version=..., module_src=<source text>, class_name=..., state=<__dict__>)``,
and the stock implementation executes ``module_src``. Here the pickle is read by a restricted
unpickler:

- every global the file names is looked up in :data:`ALLOWED_GLOBALS`, a short table of safe
  stand-ins; any other global (``os.system``, ``builtins.eval``, an unknown class) raises
  :class:`~ectune.errors.CheckpointError` naming it, before anything is called;
- ``_reconstruct_persistent_obj`` becomes :class:`PersistentObject`, a plain record of the class
  name and state; ``module_src`` is dropped unread;
- ``torch.nn.ModuleDict`` becomes a :class:`ModuleRecord` (its ``__dict__`` as a plain dict), no
  torch constructor is run;
- tensor storages, serialised with ``torch.save`` inside the pickle, are read with
  ``torch.load(weights_only=True)``; tensors are rebuilt only after their size, stride and offset
  are checked against the storage;
- ``builtins.getattr`` (official ECT snapshots pickle a bound method of their loss object) becomes
  an inert :class:`AttributeRef` record: no attribute is looked up, and the record cannot be called;
- only the stand-ins are ever called (``REDUCE``, ``INST``, ``OBJ``); ``BUILD`` (``__setstate__``)
  is honoured only for the stand-ins and numpy dtypes, ``NEWOBJ`` only for allowed classes, and the
  container opcodes only on plain containers; persistent ids (torch.save's own format) are refused.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ectune.errors import CheckpointError

__all__ = ["ALLOWED_GLOBALS", "AttributeRef", "ModuleRecord", "PersistentObject", "load_pickle", "loads_pickle"]


@dataclass(eq=False)
class PersistentObject:
    """A ``torch_utils.persistence`` object, as data: the class name and the object's ``__dict__``.

    The module source that the pickle carries is never kept, let alone run.
    """

    class_name: str
    state: dict
    version: int | None = None

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name!r}, {len(self.state)} state entries)"


@dataclass(eq=False)
class ModuleRecord:
    """A pickled plain torch container module (``ModuleDict``): its class name and ``__dict__``."""

    class_name: str
    state: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name!r}, {len(self.state)} state entries)"


# ----------------------------------------------------------------------------------------------
# Safe stand-ins for the globals a snapshot may name.


def _persistent_object(meta: Any) -> PersistentObject:
    """Stand-in for ``torch_utils.persistence._reconstruct_persistent_obj``: a record, nothing executed."""
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise CheckpointError("a torch_utils.persistence object in the file is not of type 'class': "
                              "the file is damaged or not an EDM / EDM2 / ECT network pickle")
    class_name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(class_name, str) or not isinstance(state, dict):
        raise CheckpointError("a torch_utils.persistence object in the file has no class name or state: "
                              "the file is damaged or not an EDM / EDM2 / ECT network pickle")
    version = meta.get("version")
    # Keep the dict itself, not a copy: in self-referencing objects (a bound method of the object in its
    # own state) the record is created before the pickle has finished filling its state.
    return PersistentObject(class_name=class_name, state=state,
                            version=version if isinstance(version, int) else None)


@dataclass(eq=False)
class AttributeRef:
    """What ``builtins.getattr(obj, name)`` yields here: a note of the request, never a lookup.

    Official ECT snapshots need it: their loss object stores a bound method (``self.t_to_r``), which
    pickles as ``getattr(loss_fn, 't_to_r_sigmoid')``. The record is inert: the unpickler refuses to
    call it, so the classic ``getattr(x, 'system')(...)`` gadget cannot run.
    """

    obj: Any
    name: str


def _getattr_record(obj: Any, name: Any, *default: Any) -> AttributeRef:
    if not isinstance(name, str) or default:
        raise CheckpointError("refused: it calls getattr in an unsupported way; nothing was executed")
    return AttributeRef(obj, name)


class _ModuleDictStandIn(ModuleRecord):
    """What ``NEWOBJ torch.nn.ModuleDict`` creates; ``BUILD`` fills in the state."""

    def __init__(self) -> None:
        super().__init__(class_name="ModuleDict")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointError("a pickled ModuleDict has a state that is not a dict: the file is damaged")
        self.state = state


def _load_storage(data: Any) -> torch.storage.TypedStorage:
    """Stand-in for ``torch.storage._load_from_bytes``: read the bytes with ``torch.load(weights_only=True)``."""
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("a tensor storage in the file is not stored as bytes: the file is damaged")
    try:
        storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything torch.load refuses means an unreadable storage
        raise CheckpointError(f"a tensor storage in the file cannot be read safely ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise CheckpointError(f"a tensor storage in the file holds a {type(storage).__name__}, not a storage")
    return storage


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                       for v in value):
        raise CheckpointError(f"a tensor in the file has an invalid {what} {value!r}: the file is damaged")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor(_v2)``: a tensor viewing ``storage``, bounds checked, copied."""
    if isinstance(storage, torch.storage.TypedStorage):
        dtype, untyped = storage.dtype, storage._untyped_storage
    else:
        raise CheckpointError("a tensor in the file does not refer to a typed storage: the file is damaged")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if not isinstance(storage_offset, int) or storage_offset < 0 or len(size) != len(stride):
        raise CheckpointError("a tensor in the file has an invalid offset or stride: the file is damaged")
    numel = untyped.nbytes() // torch.empty((), dtype=dtype).element_size()
    if math.prod(size) > numel:  # checked first: with stride 0 a tiny file could make the copy below huge
        raise CheckpointError(f"a tensor of size {list(size)} in the file needs more elements than the {numel} its "
                              f"storage holds: the file is truncated or damaged")
    if math.prod(size) > 0:
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= numel:
            raise CheckpointError(f"a tensor of size {list(size)} in the file reaches past its storage of {numel} "
                                  f"elements: the file is truncated or damaged")
    view = torch.empty((0,), dtype=dtype).set_(untyped, storage_offset, size, stride)
    return view.clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, *_: Any) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_parameter(_with_state)``: the parameter's data as a plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("a parameter in the file holds no tensor: the file is damaged")
    return data


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for ``numpy._core.multiarray.scalar``: a numeric numpy scalar from its raw bytes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)) \
            or len(data) != dtype.itemsize:
        raise CheckpointError("a numpy scalar in the file is not a plain number: the file is damaged or unsupported")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, str):
        raise CheckpointError(f"a numpy dtype in the file has an unsupported description {spec!r}")
    try:
        return np.dtype(spec)
    except TypeError:
        raise CheckpointError(f"a numpy dtype in the file has an unknown description {spec!r}") from None


#: (module, name) -> the safe object the unpickler returns for that global.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): _ModuleDictStandIn,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("builtins", "getattr"): _getattr_record,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
}
# torch dtypes (torch.float32, ...) pickle as globals of the torch module; they are plain values.
ALLOWED_GLOBALS.update({("torch", name): value for name, value in vars(torch).items()
                        if isinstance(value, torch.dtype)})
#: The only things the unpickler ever calls (REDUCE, INST, OBJ): the stand-ins above.
_CALLABLES = tuple(v for v in ALLOWED_GLOBALS.values() if callable(v))


def _check_callable(func: Any) -> None:
    if not any(func is f for f in _CALLABLES):
        raise CheckpointError(f"refused: it calls a {type(func).__name__} object, which is not on the converter's "
                              f"allow-list; nothing was executed")


# ----------------------------------------------------------------------------------------------
# The unpickler


class _SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcode table can be restricted
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(f"refused: it references {module}.{name}, which is not on the converter's "
                                 f"allow-list (EDM / EDM2 / ECT network pickles do not need it, and a normal load "
                                 f"could run code); nothing was executed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("it uses persistent ids (a torch.save archive?), so it is not an EDM / EDM2 / ECT "
                              "network pickle: ectune convert reads the .pkl snapshots those codes write")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        _check_callable(func)
        if not isinstance(args, tuple):
            raise CheckpointError("refused: it calls a function with arguments that are not a tuple; "
                                  "nothing was executed")
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
        _check_callable(klass)
        self.append(klass(*args))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _ModuleDictStandIn):
            inst.__setstate__(state)
        elif isinstance(inst, np.dtype) and isinstance(state, tuple):
            inst.__setstate__(state)
        else:
            raise CheckpointError(f"refused: it sets the state of a {type(inst).__name__} object, which the "
                                  f"converter does not allow; nothing was executed")

    dispatch[pickle.BUILD[0]] = load_build

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls is _ModuleDictStandIn and not args:
            self.append(_ModuleDictStandIn())
        elif cls is collections.OrderedDict and not args:
            self.append(collections.OrderedDict())
        else:
            raise CheckpointError(f"refused: it creates an object of type "
                                  f"{getattr(cls, '__name__', type(cls).__name__)} with arguments the converter "
                                  f"does not allow; nothing was executed")

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        if kwargs:
            raise CheckpointError("refused: it creates an object with keyword arguments, which the converter "
                                  "does not allow; nothing was executed")
        self.load_newobj()

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    # The container opcodes call .append / .extend / .add / __setitem__ on whatever object is on the
    # stack: allow them only on plain containers.
    def _container(self, kinds: tuple[type, ...], position: int) -> None:
        target = self.stack[position]
        if not isinstance(target, kinds):
            raise CheckpointError(f"refused: it adds items to a {type(target).__name__} object, which the "
                                  f"converter does not allow; nothing was executed")

    def load_append(self) -> None:
        self._container((list,), -2)
        super().load_append()

    def load_appends(self) -> None:
        items = self.pop_mark()
        if not isinstance(self.stack[-1], list):
            raise CheckpointError(f"refused: it adds items to a {type(self.stack[-1]).__name__} object, which the "
                                  f"converter does not allow; nothing was executed")
        self.stack[-1].extend(items)

    def load_setitem(self) -> None:
        self._container((dict,), -3)
        super().load_setitem()

    def load_setitems(self) -> None:
        items = self.pop_mark()
        self._container((dict,), -1)
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._container((set,), -1)
        self.stack[-1].update(items)

    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems


def loads_pickle(data: bytes, name: str = "pickle") -> Any:
    """Unpickle ``data`` with the restricted unpickler; ``name`` labels error messages.

    Returns plain Python values, tensors, :class:`PersistentObject` and :class:`ModuleRecord` records.

    Raises:
        CheckpointError: a global not on the allow-list, a truncated or damaged pickle.
    """
    return _unpickle(io.BytesIO(data), name)


def _unpickle(file: BinaryIO, name: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            return _SafeUnpickler(file).load()
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    except EOFError:
        raise CheckpointError(f"{name} ends early: the file is truncated (re-download or re-copy it)") from None
    except pickle.UnpicklingError as e:
        if "truncated" in str(e) or "exhausted" in str(e):
            raise CheckpointError(f"{name} ends early: the file is truncated (re-download or re-copy it)") from None
        raise CheckpointError(f"{name} is not a readable pickle ({str(e).splitlines()[0] if str(e) else 'damaged'}): "
                              f"the file is damaged or not an EDM / EDM2 / ECT network pickle") from None
    except RecursionError:
        raise CheckpointError(f"{name} is nested too deeply to be an EDM / EDM2 / ECT network pickle") from None
    except Exception as e:  # noqa: BLE001 - every other failure of the unpickler means a damaged file
        detail = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{name} is not a readable pickle ({type(e).__name__}{': ' + detail if detail else ''}): "
                              f"the file is damaged or not an EDM / EDM2 / ECT network pickle") from None


def load_pickle(path: str | Path) -> Any:
    """Read the pickle at ``path`` safely (see :func:`loads_pickle`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass an EDM / EDM2 / ECT network pickle (.pkl)")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file: pass an EDM / EDM2 / ECT network pickle (.pkl)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head == b"PK\x03\x04":
                raise CheckpointError(f"{path} is a zip archive (as torch.save writes), not a network pickle: pass "
                                      "the .pkl snapshot EDM, EDM2 or ECT training wrote")
            if head[:1] != b"\x80":  # PROTO: every pickle of protocol 2 or later (EDM, EDM2 and ECT write 4+)
                raise CheckpointError(f"{path} is not a network pickle (it does not start as one): pass the .pkl "
                                      "snapshot EDM, EDM2 or ECT training wrote")
            f.seek(0)
            return _unpickle(f, str(path))
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror})") from None
