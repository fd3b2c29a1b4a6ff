"""A restricted unpickler for the released checkpoints of taming-transformers and latent-diffusion.

Lightning 1.x pickled callback objects, OmegaConf containers, numpy scalars and paths next to the
weights, so ``torch.load(weights_only=True)`` refuses those files. This reader builds only tensors
and storages (torch's rebuild functions), plain containers, numbers, strings, bytes, torch dtypes,
sizes and devices, and numpy scalars/arrays decoded here from their bytes. Every other global the
pickle names becomes a `Placeholder` type: nothing is imported and nothing it names is called.

Why this is sound: a pickle reaches Python objects only through globals, and here every global is
resolved by `RestrictedUnpickler.find_class` (a table lookup, never an import; the extension-code
opcodes, the only other route, are refused). The opcodes that call or instantiate something
(REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ, BUILD) are overridden to call only the allow-listed
callables or placeholders; anything else yields a placeholder instead of a call.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch


class Resolution(NamedTuple):
    """One global the pickle asked for, and whether the allow-list supplied it."""

    name: str
    allowed: bool


class Placeholder:
    """Stands for an object the pickle names but that is never built: its dotted name and its data.

    `args`/`kwargs` are what the pickle would have called it with, `state` what it would have set,
    `items`/`values` what it would have stored into it (a dict or list subclass).
    """

    target: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        self = object.__new__(cls)
        self.args, self.kwargs = args, kwargs
        self.state: Any = None
        self.items: dict[Any, Any] = {}
        self.values: list[Any] = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Everything was recorded by `__new__` (NEWOBJ calls only that)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        return placeholder_type(f"{self.target}()")(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.values.append(value)

    def extend(self, values: Any) -> None:
        self.values.extend(values)

    def add(self, value: Any) -> None:
        self.values.append(value)

    def __repr__(self) -> str:
        return f"<not built: {self.target}>"


_PLACEHOLDER_TYPES: dict[str, type[Placeholder]] = {}


def placeholder_type(dotted: str) -> type[Placeholder]:
    """The one placeholder class standing for `dotted` (a class is also a dict key, as in Lightning's
    ``callbacks``, so equal names give the same class)."""
    if dotted not in _PLACEHOLDER_TYPES:
        name = dotted.rsplit(".", 1)[-1] or "Placeholder"
        _PLACEHOLDER_TYPES[dotted] = type(name, (Placeholder,), {
            "target": dotted, "__module__": __name__, "__qualname__": f"Placeholder[{dotted}]"})
    return _PLACEHOLDER_TYPES[dotted]


def _is_placeholder(obj: Any) -> bool:
    return isinstance(obj, Placeholder) or (isinstance(obj, type) and issubclass(obj, Placeholder))


# --- numpy, decoded from bytes --------------------------------------------------------------------
_STRUCT = {"b1": "?", "i1": "b", "i2": "h", "i4": "i", "i8": "q", "u1": "B", "u2": "H", "u4": "I",
           "u8": "Q", "f2": "e", "f4": "f", "f8": "d", "c8": "ff", "c16": "dd"}
_TORCH_DTYPE = {"b1": torch.bool, "i1": torch.int8, "i2": torch.int16, "i4": torch.int32, "i8": torch.int64,
                "u1": torch.uint8, "u2": torch.uint16, "u4": torch.uint32, "u8": torch.uint64,
                "f2": torch.float16, "f4": torch.float32, "f8": torch.float64,
                "c8": torch.complex64, "c16": torch.complex128}


class NumpyDtype:
    """A numpy dtype as ``numpy.dtype(descr, align, copy)`` pickles it; only its description is kept."""

    def __init__(self, descr: Any = "", align: Any = False, copy: Any = True):
        self.descr = descr if isinstance(descr, str) else repr(descr)
        self.byteorder = "|"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    @property
    def little_endian(self) -> bool:
        return self.byteorder != ">"

    def __repr__(self) -> str:
        return f"NumpyDtype({self.byteorder}{self.descr})"


def _numpy_scalar(dtype: Any, data: Any = b"") -> Any:
    """A numpy scalar as the Python number (or str/bytes) its bytes encode."""
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, bytes):
        return placeholder_type("numpy.core.multiarray.scalar")(dtype, data)
    order = "<" if dtype.little_endian else ">"
    fmt = _STRUCT.get(dtype.descr)
    if fmt and struct.calcsize(order + fmt) == len(data):
        values = struct.unpack(order + fmt, data)
        return complex(*values) if len(values) == 2 else values[0]
    if dtype.descr.startswith("S"):
        return data.rstrip(b"\0")
    if dtype.descr.startswith("U"):
        return data.decode("utf-32-le" if dtype.little_endian else "utf-32-be").rstrip("\0")
    return placeholder_type(f"numpy scalar {dtype.descr}")(dtype, data)


class _NDArrayClass:
    """Stands for ``numpy.ndarray`` as the first argument of ``_reconstruct``."""


class NumpyArray:
    """A numpy array; after unpickling, `value` holds it as a tensor (a list for object arrays)."""

    def __init__(self) -> None:
        self.value: Any = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("numpy array state is not (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, raw = state
        shape = tuple(int(s) for s in shape)
        if isinstance(raw, list):  # object arrays carry their elements
            self.value = raw
            return
        torch_dtype = _TORCH_DTYPE.get(getattr(dtype, "descr", ""))
        if torch_dtype is None or not isinstance(raw, (bytes, bytearray)):
            self.value = placeholder_type(f"numpy array {getattr(dtype, 'descr', dtype)}")(shape, raw)
            return
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        count = 1
        for s in shape:
            count *= s
        if flat.numel() != count * itemsize:
            raise pickle.UnpicklingError(f"numpy array of shape {shape} has {flat.numel()} bytes of data")
        if not dtype.little_endian and itemsize > 1:
            flat = flat.view(-1, itemsize).flip(1).reshape(-1)
        tensor = flat.view(torch_dtype)
        if fortran:
            tensor = tensor.reshape(shape[::-1]).permute(*reversed(range(len(shape))))
        self.value = tensor.reshape(shape)

    def __repr__(self) -> str:
        return f"NumpyArray({self.value!r})"


def _numpy_reconstruct(cls: Any, shape: Any = (0,), typecode: Any = b"b") -> Any:
    return NumpyArray() if cls is _NDArrayClass else placeholder_type("numpy.core.multiarray._reconstruct")(cls)


# --- torch tensors --------------------------------------------------------------------------------
def _tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
               backward_hooks: Any = None, metadata: Any = None) -> Any:
    """torch's ``_rebuild_tensor_v2`` without the pickled hooks (callables the pickle could choose)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        return placeholder_type("torch._utils._rebuild_tensor_v2")(storage)
    meta = metadata if isinstance(metadata, dict) and all(isinstance(v, bool) for v in metadata.values()) else None
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, bool(requires_grad), OrderedDict(), meta)


def _tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
               dtype: Any, metadata: Any = None) -> Any:
    if not isinstance(storage, torch.UntypedStorage) or not isinstance(dtype, torch.dtype):
        return placeholder_type("torch._utils._rebuild_tensor_v3")(storage)
    return torch._utils._rebuild_tensor_v3(storage, offset, size, stride, bool(requires_grad), OrderedDict(), dtype)


def _tensor_v1(storage: Any, offset: Any, size: Any, stride: Any) -> Any:
    if not isinstance(storage, torch.storage.TypedStorage):
        return placeholder_type("torch._utils._rebuild_tensor")(storage)
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None) -> Any:
    """A saved `nn.Parameter` is read back as its tensor: inference copies it into a module."""
    return data if isinstance(data, torch.Tensor) else placeholder_type("torch._utils._rebuild_parameter")(data)


_TENSOR_BUILDERS = (_tensor_v1, _tensor_v2, _tensor_v3, _parameter)


def _from_type(func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
    """torch's ``_rebuild_from_type_v2`` for plain tensors and parameters only."""
    if any(func is f for f in _TENSOR_BUILDERS) and new_type in (torch.Tensor, torch.nn.Parameter):
        return func(*args)
    return placeholder_type("torch._tensor._rebuild_from_type_v2")(func, new_type, args, state)


# --- plain data -----------------------------------------------------------------------------------
def _codecs_encode(text: Any, encoding: Any = "utf-8") -> Any:
    """Protocol 2 writes bytes as ``_codecs.encode(str, "latin1")``."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1"):
        return text.encode("latin-1")
    return placeholder_type("_codecs.encode")(text, encoding)


def _bytes_like(kind: type) -> Callable[..., Any]:
    def build(data: Any = b"", encoding: Any = None) -> Any:
        if isinstance(data, str) and encoding in ("latin1", "latin-1"):
            return kind(data.encode("latin-1"))
        if isinstance(data, (bytes, bytearray)):
            return kind(data)
        return placeholder_type(f"builtins.{kind.__name__}")(data)  # never bytes(<huge int>)

    return build


def _reconstructor(cls: Any, base: Any = object, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocols 0 and 1): only placeholders are created."""
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        return cls() if state is None else cls(state)
    return placeholder_type("copyreg._reconstructor")(cls, base, state)


def _newobj(cls: Any, *args: Any) -> Any:
    return _new_object(cls, args, {})


_CONTAINERS: dict[str, type] = {
    "builtins.dict": dict, "builtins.list": list, "builtins.tuple": tuple, "builtins.set": set,
    "builtins.frozenset": frozenset, "collections.OrderedDict": OrderedDict,
    "builtins.int": int, "builtins.float": float, "builtins.complex": complex, "builtins.bool": bool,
    "builtins.str": str, "builtins.slice": slice, "torch.Size": torch.Size,
}


def _allowed_globals() -> tuple[dict[str, Any], tuple[Any, ...]]:
    """Name -> object for every global a checkpoint may use, and which of them may be called."""
    callables: dict[str, Any] = dict(_CONTAINERS)
    callables.update({
        "torch.device": torch.device,
        "_codecs.encode": _codecs_encode,
        "builtins.bytes": _bytes_like(bytes),
        "builtins.bytearray": _bytes_like(bytearray),
        "copyreg._reconstructor": _reconstructor,
        "copyreg.__newobj__": _newobj,
        "torch._utils._rebuild_tensor": _tensor_v1,
        "torch._utils._rebuild_tensor_v2": _tensor_v2,
        "torch._utils._rebuild_tensor_v3": _tensor_v3,
        "torch._utils._rebuild_parameter": _parameter,
        "torch._utils._rebuild_parameter_with_state": _parameter,
        "torch._tensor._rebuild_from_type_v2": _from_type,
    })
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        callables[f"{module}.scalar"] = _numpy_scalar
        callables[f"{module}._reconstruct"] = _numpy_reconstruct
    callables["numpy.dtype"] = NumpyDtype
    values: dict[str, Any] = {  # referenced, never called (a call on them yields a placeholder)
        "torch.Tensor": torch.Tensor, "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.UntypedStorage": torch.UntypedStorage, "torch.storage.UntypedStorage": torch.UntypedStorage,
        "numpy.ndarray": _NDArrayClass, "builtins.object": object,
    }
    for name in dir(torch):
        if isinstance(getattr(torch, name), torch.dtype):
            values[f"torch.{name}"] = getattr(torch, name)
    return {**values, **callables}, tuple(callables.values())


ALLOWED, _CALLABLE = _allowed_globals()


def _may_call(func: Any) -> bool:
    return _is_placeholder(func) or any(func is f for f in _CALLABLE)


def _new_object(cls: Any, args: tuple, kwargs: dict) -> Any:
    """``cls.__new__(cls, ...)`` for placeholders and plain containers; a placeholder otherwise."""
    if _is_placeholder(cls) and isinstance(cls, type):
        return cls(*args, **kwargs)
    if isinstance(cls, type) and any(cls is c for c in _CONTAINERS.values()):
        return cls.__new__(cls, *args)
    return placeholder_type(f"new {getattr(cls, '__name__', type(cls).__name__)}")(*args)


class RestrictedUnpickler(pickle._Unpickler):
    """`pickle`'s Python unpickler with every route to a global or a call replaced (see the module doc)."""

    report: list[Resolution] | None = None
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, **kwargs: Any):
        super().__init__(file, **kwargs)
        read = self._file_read

        def read_exactly(n: int = -1) -> bytes:
            """Python's unpickler takes a short read for data; a file cut short must say so."""
            data = read(n)
            if n >= 0 and len(data) < n:
                raise EOFError(f"the pickle data ends early ({len(data)} of {n} bytes)")
            return data

        self._file_read = read_exactly

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as protocol 2 writes some (a table, no import)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        dotted = f"{module}.{name}"
        obj = ALLOWED.get(dotted)
        if self.report is not None:
            self.report.append(Resolution(dotted, obj is not None))
        return obj if obj is not None else placeholder_type(dotted)

    def _call(self, func: Any, args: Any, kwargs: Any = None) -> Any:
        if _may_call(func):
            return func(*args, **(kwargs or {}))
        return placeholder_type(f"call of {type(func).__name__}")(func, *args)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new_object(cls, args, {}))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new_object(cls, args, kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: list) -> None:  # INST and OBJ
        self.append(self._call(klass, args) if args or not isinstance(klass, type) else _new_object(klass, (), {}))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (Placeholder, NumpyDtype, NumpyArray)):
            inst.__setstate__(state)
        # any other object keeps its rebuilt value: a pickled state is never applied to it

    dispatch[pickle.BUILD[0]] = load_build

    def load_ext(self) -> None:
        raise pickle.UnpicklingError("extension-registry opcodes are not supported in a checkpoint")

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = load_ext
    del _op


class _PickleModule:
    """What ``torch.load(pickle_module=...)`` uses: an `Unpickler` class and `load`, bound to a report."""

    __name__ = __name__

    def __init__(self, report: list[Resolution] | None):
        self.Unpickler = type("Unpickler", (RestrictedUnpickler,), {"report": report})

    def load(self, file: Any, **kwargs: Any) -> Any:
        return self.Unpickler(file, **kwargs).load()


def _refuse_torchscript(path: str | os.PathLike) -> None:
    """``torch.load`` would hand a TorchScript archive to ``torch.jit.load``; refuse it instead."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in z.namelist()):
                raise pickle.UnpicklingError("a TorchScript archive, not a checkpoint")


def restricted_load(path: str | os.PathLike, report: list[Resolution] | None = None) -> Any:
    """The object in a ``torch.save`` file (zip or legacy format), rebuilt under the allow-list.

    `report`, if given, receives every global the file names and whether it was supplied.
    """
    _refuse_torchscript(path)
    return torch.load(path, map_location="cpu", pickle_module=_PickleModule(report), weights_only=False)
