"""Fingerprints of what an export reads, so that a resumed store or a later checkpoint is known to
see the same data, the same checkpoints and the same functions.

A digest is a 128-bit BLAKE2b of the arrays' dtypes, shapes and bytes (hex string). Paths are
digested by their bytes (a file), by the files a loader reads from a Hugging Face save_pretrained
folder (its weights and shard index: not a Trainer checkpoint's optimizer, scheduler or trainer
state), or by every file under them (another directory, in sorted order).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import os
import re
import stat
import sys
import threading
import types
import zlib
from collections.abc import Iterable, Mapping, Set
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from .pretrained_folder import weight_files

_CHUNK = 1 << 22  # bytes read at a time when digesting files


def _hasher() -> hashlib._Hash:
    return hashlib.blake2b(digest_size=16)


def _array_bytes(arrays: Iterable[np.ndarray]) -> Iterable[Any]:
    """The byte strings that identify a sequence of arrays: each one's dtype, shape and contents."""
    for a in arrays:
        a = np.asarray(a)
        yield f"{a.dtype.str}{a.shape};".encode()
        yield repr(a.tolist()).encode() if a.dtype.hasobject else np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def digest_arrays(arrays: Iterable[np.ndarray]) -> str:
    """Digest of a sequence of NumPy arrays: order, dtype, shape and contents all count."""
    h = _hasher()
    for b in _array_bytes(arrays):
        h.update(b)
    return h.hexdigest()


def checksum_arrays(arrays: Iterable[np.ndarray]) -> int:
    """CRC-32 of what digest_arrays digests: several times faster than BLAKE2b, enough to tell a
    reshuffled or changed batch from the same one (not a digest to record)."""
    value = 0
    for b in _array_bytes(arrays):
        value = zlib.crc32(b, value)
    return value


class FileStat(NamedTuple):
    """What os.stat says of a file a digest reads: a file changed since has another size, modification
    time or inode (a re-save replaces it; a copy over it rewrites it)."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> FileStat:
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def again(self) -> FileStat | OSError:
        """The file's FileStat now (unequal to this one where it changed), or the error of its os.stat."""
        try:
            return FileStat.of(self.path, os.stat(self.path))
        except OSError as e:
            return e


def digest_path(path: str | os.PathLike, name: str | None = None) -> str:
    """Digest of a file's bytes, or of the files under a directory (relative names and bytes): the
    weight files and index of a save_pretrained folder, every file of another. name: how errors
    name the checkpoint or state (default: the path). ValueError naming it for a path that is neither
    a regular file nor a folder (a FIFO, whose open would wait for a writer forever; a device, a
    socket), refused before it is opened: files are opened without blocking and checked again."""
    root = Path(path)
    said = f"{name}: " if name else ""
    h = _hasher()
    for relative, f in _files_digested(root, name):
        h.update(f"{relative};".encode())
        with open(f, "rb", opener=_open_nonblocking) as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):  # replaced since it was listed
                raise ValueError(f"{said}{os.fspath(f)} is {_not_regular}")
            while chunk := stream.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _files_digested(root: Path, name: str | None) -> list[tuple[str, Path]]:
    """(relative name, path) of the files digest_path reads of `root`, in order ("" for a file itself);
    its errors, naming the path as `name` when given."""
    where, said = name or os.fspath(root), f"{name}: " if name else ""
    mode = os.stat(root).st_mode
    if stat.S_ISREG(mode):
        return [("", root)]
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{said}{os.fspath(root)} is {_not_regular}")
    found = weight_files(root, where)
    if found is None:
        return [(p.relative_to(root).as_posix(), p) for p in sorted(p for p in root.rglob("*") if p.is_file())]
    return [(f, root / f) for f in found.read]  # plain file names in the folder (weight_files refuses others)


_not_regular = "not a regular file or a folder (a FIFO, device or socket: refused unread)"


def _open_nonblocking(path: str, flags: int) -> int:
    """os.open with O_NONBLOCK (open()'s opener): a FIFO swapped in after a check cannot block the open."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def checkpoint_file_digest(source: str | os.PathLike, index: int) -> str:
    """digest_path of a checkpoint given by path; FileNotFoundError naming it when it is missing,
    ValueError naming it when it is neither a regular file nor a folder (a FIFO would hang the export)."""
    return digest_path(_existing(source, index), _checkpoint_name(source, index))


def checkpoint_file_stats(source: str | os.PathLike, index: int) -> list[FileStat]:
    """The FileStat of every file checkpoint_file_digest reads of a checkpoint given by path (its errors
    alike), taken before it digests them: check_unchanged compares them once the checkpoint is loaded."""
    name = _checkpoint_name(source, index)
    return [FileStat.of(os.fspath(f), os.stat(f)) for _, f in _files_digested(Path(_existing(source, index)), name)]


def _existing(source: str | os.PathLike, index: int) -> str:
    path = os.path.abspath(os.fspath(source))
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoints[{index}]: no checkpoint at {path}")
    return path


def _checkpoint_name(source: str | os.PathLike, index: int) -> str:
    return f"checkpoints[{index}] ({os.fspath(source)})"


def check_unchanged(source: str | os.PathLike, index: int, stats: list[FileStat]) -> None:
    """ValueError naming checkpoint `index` and the file unless the files of `source` are those of
    `stats` (checkpoint_file_stats, taken before its digest) with the same size, modification time and
    inode: called once it is loaded, so that rows computed from another file than the one fingerprinted
    (a training job still saving it, a re-save) are never written under its fingerprint. A change that
    keeps all three (an in-place rewrite of the same size within the file system's time resolution)
    goes unseen."""
    name = _checkpoint_name(source, index)
    path = os.path.abspath(os.fspath(source))
    again = "the rows would not be those of the fingerprinted checkpoint; export again"
    try:
        files = [os.fspath(f) for _, f in _files_digested(Path(path), name)]
    except (OSError, ValueError) as e:
        raise ValueError(f"{name} changed while it was exported ({e}): {again}") from None
    if files != [s.path for s in stats]:
        raise ValueError(f"{name}: the files it holds changed while it was exported: {again}")
    for before in stats:
        subject = name if before.path == path else f"{name}: {before.path}"
        now = before.again()
        if isinstance(now, OSError):
            raise ValueError(f"{subject} changed while it was exported ({now}): {again}") from None
        if now != before:
            raise ValueError(
                f"{subject} changed while it was exported (its size, modification time or inode differ from "
                f"when it was fingerprinted): {again}"
            )


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def without_addresses(text: str) -> str:
    """`text` without memory addresses (" at 0x7f..."), which differ from run to run."""
    return _ADDRESS.sub("", text)


def stable_repr(obj: Any) -> str:
    """repr(obj) without memory addresses, the same in every process: the elements of a set or
    frozenset (whose order follows string hashes, so PYTHONHASHSEED) sorted by their stable_repr,
    in lists, tuples and dicts too, their subclasses (a NamedTuple, an OrderedDict, printed with
    their type's name) and the fields of dataclasses (a frozen config, an Equinox module) holding a
    set. Other objects keep their own repr."""
    return _stable_repr(obj, set())


_CONTAINERS = (set, frozenset, list, tuple, dict)


def _stable_repr(obj: Any, seen: set[int]) -> str:
    """stable_repr; `seen`: the ids of the containers being printed (a list holding itself)."""
    kind = type(obj)
    if kind not in _CONTAINERS:
        if not holds_set(obj, set()):
            return without_addresses(repr(obj))
        if id(obj) in seen:
            return "..."
        seen = seen | {id(obj)}
        if dataclasses.is_dataclass(obj):
            fields = (f"{f.name}={_stable_repr(getattr(obj, f.name, None), seen)}" for f in dataclasses.fields(obj))
            return f"{kind.__qualname__}({', '.join(fields)})"
        if hasattr(obj, "_fields"):  # a NamedTuple
            items = (f"{k}={_stable_repr(v, seen)}" for k, v in zip(obj._fields, obj, strict=True))
            return f"{kind.__name__}({', '.join(items)})"
        base = next(b for b in _CONTAINERS if isinstance(obj, b))
        return f"{kind.__qualname__}({_stable_repr(base(obj), seen)})"
    if id(obj) in seen:
        return "{...}" if kind in (set, frozenset, dict) else "[...]"
    seen = seen | {id(obj)}
    if kind is dict:
        return "{" + ", ".join(f"{_stable_repr(k, seen)}: {_stable_repr(v, seen)}" for k, v in obj.items()) + "}"
    items = [_stable_repr(v, seen) for v in obj]
    if kind is list:
        return "[" + ", ".join(items) + "]"
    if kind is tuple:
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if not items:
        return repr(obj)  # set(), frozenset()
    text = "{" + ", ".join(sorted(items)) + "}"
    return text if kind is set else f"frozenset({text})"


def holds_set(obj: Any, seen: set[int]) -> bool:
    """Whether a set or frozenset is in obj: itself, or in the containers or dataclass fields it holds."""
    if isinstance(obj, (set, frozenset)):
        return True
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, dict):
        return any(holds_set(k, seen) or holds_set(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return any(holds_set(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(holds_set(getattr(obj, f.name, None), seen) for f in dataclasses.fields(obj))
    return False


def callable_identity(fn: Any) -> str:
    """What a function is, stable across runs: "module.qualname" for functions and methods (lambdas
    by where they are defined), followed, when its closure holds settings (numbers, strings, arrays,
    functions, the fields of dataclasses such as Flax linen modules: a make_loss(scale) factory's
    scale, a closure's nn.Dropout(0.1)), by their names and digest as "closure[scale]=<digest>", and for
    a bound method the plain public settings of its object (numbers, strings: a model's temperature; the
    fields of the dataclasses it holds, alone or in tuples and lists; a dataclass object, a Flax or
    Equinox module, by its declared fields) as "self{'temperature': 2.0}". A dataclass's fields are those
    its repr shows that hold settings: plain values, enum members, dtypes, NumPy scalars, nested
    dataclasses, tuples of them, lists and dicts (with their plain values in a frozen dataclass or a Flax
    or Equinox module; else the dataclasses and functions they hold alone), and functions (an
    activation: by qualname, and the code digest of one defined outside the frameworks), read
    _MAX_DEPTH levels deep (_field_settings); the wrapped function and
    arguments of a functools.partial, its array
    arguments (whose repr NumPy and JAX abbreviate) also digested as "arrays[args[0], weight]=<digest>"; else the
    object's type, repr and plain public settings (a loss module's reduction, label_smoothing...), those
    of a torch module's submodules however deep as "modules{'inner': {...}}" (_submodules: a scripted one by
    its TorchScript identity; a module without submodules, such as nn.CrossEntropyLoss, as before),
    followed, when it holds arrays, by their names and digest (a torch module's state_dict: class
    weights, pos_weight...; public array attributes) as "arrays[weight]=<digest>".

    A Python function's identity ends with " code[3.11]=<digest>": the Python version (major.minor:
    bytecode differs between versions) and a digest of its code (bytecode, constants, nested code
    objects such as lambdas and comprehensions, names, arguments, default values), of the code of
    the functions its closure or a partial holds (named in the closure digest by their qualname
    alone: a script's function is the same imported), and of the decorators' wrappers around it
    (their code and closure settings). A loss object's ends with the digest of the forward and
    __call__ methods its class and bases define (a custom nn.Module loss's forward). Wrappers and
    base classes torch, JAX, Flax and Equinox define are left out (torch.compile, jax.jit,
    nn.Module.__call__: a library loss object such as nn.CrossEntropyLoss() has no code digest). Not
    of line numbers or files: moving a function, or adding a comment or blank line, keeps it. Not
    covered: helper functions or methods it calls by name, modules and objects it reads (their
    settings and code)."""
    identity = _identity(fn, set())
    if " closure[" in identity:  # functions a closure holds were named with their module before
        before = _identity(fn, set(), "before code")
        with _BEFORE_CODE_LOCK:  # exports in threads
            if len(_BEFORE_CODE) >= 256:
                del _BEFORE_CODE[next(iter(_BEFORE_CODE))]
            _BEFORE_CODE[identity] = before
    return identity


def identity_before_code(identity: str) -> str | None:
    """The identity tracin recorded, before it digested code, for the function whose identity
    callable_identity gave as `identity` in this process, when the two differ by more than the code
    digests (a closure holding functions: their names carried their module); None otherwise."""
    return _BEFORE_CODE.get(identity)


# callable_identity's latest identities holding a closure, and what versions before code digests made of them
_BEFORE_CODE: dict[str, str] = {}
_BEFORE_CODE_LOCK = threading.Lock()


PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"  # the version whose bytecode code digests cover
_EMPTY = _hasher().digest()


def _digest_function_code(fn: Any, h: Any, seen: set[int]) -> None:
    """Fold into `h` the code of a Python function (its code object, default values) and of the
    functions and partials its closure holds; nothing for other callables (builtins)."""
    if id(fn) in seen:
        return
    seen.add(id(fn))
    if isinstance(fn, functools.partial):
        _digest_function_code(fn.func, h, seen)
        return
    if not isinstance(fn, types.FunctionType):
        return
    _digest_code(fn.__code__, h)
    for default in (fn.__defaults__, fn.__kwdefaults__):
        if default:
            values = default.values() if isinstance(default, dict) else default
            arrays = [v for v in values if _is_array(v, sys.modules.get("torch"))]
            h.update(
                stable_repr(default).encode() + (_digest_named(dict(enumerate(arrays))) if arrays else "").encode()
            )
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, (types.FunctionType, functools.partial)):
            _digest_function_code(value, h, seen)


def _digest_code(code: types.CodeType, h: Any) -> None:
    """Fold a code object into `h`: bytecode, names, argument counts and flags, constants (nested code
    objects recursively), not co_filename, co_firstlineno or the line table."""
    h.update(code.co_code)
    h.update(getattr(code, "co_exceptiontable", b""))  # try blocks (Python 3.11+), by bytecode offsets
    parts = (
        code.co_name,
        getattr(code, "co_qualname", ""),
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags & 0xFFFF,  # not the __future__ imports in effect (exec and notebooks inherit them)
    )
    h.update(repr(parts).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(b"<code>")
            _digest_code(const, h)
        else:
            h.update(f"{type(const).__name__}:{stable_repr(const)};".encode())


# what _identity describes: a function as callable_identity does ("full"), one a closure holds
# ("held": a Python function named by its qualname, without code digest: the outer function's
# covers its code), one a dataclass field holds ("field": as "held", and a method of a class defined
# outside the frameworks by its qualname too: a script's is the same imported), or as tracin did
# before it digested code ("before code": module names, no code)
_Mode = Literal["full", "held", "field", "before code"]


def _identity(fn: Any, seen: set[int], mode: _Mode = "full") -> str:
    """callable_identity in `mode`; `seen`: the ids of the functions and partials being described (a
    recursive closure, a partial of a function held in that function's closure)."""
    if isinstance(fn, functools.partial):
        given = {f"args[{i}]": a for i, a in enumerate(fn.args)} | dict(fn.keywords)
        arrays = {k: v for k, v in given.items() if _is_array(v, sys.modules.get("torch"))}
        inner = "<recursive>" if id(fn.func) in seen else _identity(fn.func, seen | {id(fn)}, mode)
        return f"partial({inner}, {stable_repr(fn.args)}, {stable_repr(fn.keywords)})" + (
            f" arrays[{', '.join(arrays)}]={_digest_named(arrays)}" if arrays else ""
        )
    script = _script_identity(fn)
    if script is not None:
        return script
    h = _hasher()
    fn = _jit_unpickled(fn)
    if mode == "full":
        _digest_wrappers(fn, h)
    owner = _bound_object(fn)  # read before unwrapping: a Flax module's method unwraps to its plain function
    fn = inspect.unwrap(fn)  # a decorated (jax.jit, functools.wraps) function is named as the function it wraps
    if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        held = (mode in ("held", "field") and isinstance(fn, types.FunctionType)) or (
            mode == "field" and isinstance(fn, types.MethodType) and not _in_framework(fn.__module__)
        )
        module = "" if held else f"{getattr(fn, '__module__', None)}."
        captured = _captured(fn, seen | {id(fn)}, mode) if isinstance(fn, types.FunctionType) else {}
        owner = _bound_object(fn) if owner is None else owner
        bound = _settings(owner, seen) if owner is not None else {}
        text = (
            module
            + fn.__qualname__
            + (f" self{bound}" if bound else "")
            + (f" closure[{', '.join(captured)}]={_digest_closure(captured)}" if captured else "")
        )
        if mode == "full":
            _digest_function_code(getattr(fn, "__func__", fn), h, set())
    else:
        kind = type(fn)
        settings = _settings(fn)
        arrays = _held_arrays(fn)
        inner, kinds = _submodules(fn)
        text = (
            f"{kind.__module__}.{kind.__qualname__}: {stable_repr(fn)}"
            + (f" {settings}" if settings else "")
            + (f" modules{stable_repr(inner)}" if inner else "")
            + (f" arrays[{', '.join(arrays)}]={_digest_named(arrays)}" if arrays else "")
        )
        if mode == "full":
            _digest_class_methods(kind, h)
            for held in kinds:  # torch.compile's OptimizedModule's _orig_mod, nn.DataParallel's module...
                _digest_class_methods(held, h)
    return text + (f" code[{PYTHON}]={h.hexdigest()}" if h.digest() != _EMPTY else "")


_MANGLED = re.compile(r"___torch_mangle_\d+\.")  # TorchScript's per-process suffix of a class compiled twice


def _script_identity(fn: Any) -> str | None:
    """A torch.jit.script'ed function or module (None for anything else): "torch.jit.ScriptFunction
    <qualified name>" or "torch.jit.ScriptModule <original class name>", then the digest of its TorchScript
    code as "torch_script=<digest>" (a module's: each submodule's, by name, with its original class name
    and the values of its attributes and constants: reduction, label_smoothing...; TorchScript's mangled
    class names left out, and the source locations graphs carry not read), then, when it holds tensors
    (parameters, buffers, tensor attributes: class weights), their names and digest as
    "arrays[weight]=<digest>", with the constants the code reads as CONSTANTS.c0 (a torch.jit.trace'd loss's
    scalars and tensors). Not covered: scripted functions it calls by name (their code)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if isinstance(fn, torch.jit.ScriptFunction):
        name, modules = f"torch.jit.ScriptFunction {_MANGLED.sub('', fn.qualified_name)}", [("", fn)]
    elif isinstance(fn, torch.jit.ScriptModule):
        name = f"torch.jit.ScriptModule {getattr(fn, 'original_name', type(fn).__name__)}"
        modules = list(fn.named_modules(remove_duplicate=False))
    else:
        return None
    parts, tensors = [], {}
    for path, m in modules:
        try:
            code = m.code
        except RuntimeError:  # a module without a forward (a container its parent calls into)
            code = ""
        parts.append(f"[{path}] {getattr(m, 'original_name', '')}\n{_MANGLED.sub('', code)}")
        if "CONSTANTS." in code:  # values the code reads by name (a torch.jit.trace'd function's scalars, tensors)
            for k, v in _script_constants(m).items():
                if isinstance(v, torch.Tensor) and v.dim() == 0:  # a scalar (a module's float, a tensor once saved)
                    parts.append(f"CONSTANTS.{k}={stable_repr(v.item())}")
                elif isinstance(v, torch.Tensor):
                    tensors[f"{path}.CONSTANTS.{k}" if path else f"CONSTANTS.{k}"] = v
                else:
                    parts.append(f"CONSTANTS.{k}={stable_repr(v)}")
        concrete = getattr(m, "_concrete_type", None)  # absent on a torch.jit.load'ed module
        if concrete is not None:
            for k, v in sorted(concrete.get_constants().items()):
                parts.append(f"const {k}={stable_repr(v)}")
            for k in sorted(concrete.get_attributes()):
                if k == "training" or k.startswith("_"):
                    continue
                v = getattr(m, k, None)
                if isinstance(v, torch.Tensor):
                    tensors[f"{path}.{k}" if path else k] = v
                else:
                    parts.append(f"attr {k}={stable_repr(v)}")
    if isinstance(fn, torch.nn.Module):
        tensors.update(fn.state_dict())
    h = _hasher()
    h.update("\n".join(parts).encode())
    arrays = dict(sorted(tensors.items()))
    return f"{name} torch_script={h.hexdigest()}" + (
        f" arrays[{', '.join(arrays)}]={_digest_named(arrays)}" if arrays else ""
    )


def _script_constants(m: Any) -> dict[str, Any]:
    """The values a TorchScript function or module's code reads as CONSTANTS.<name>: a module's by name
    (code_with_constants), a function's (which lacks it) as its graph's tensor constants, in order."""
    try:
        return dict(m.code_with_constants[1].const_mapping)
    except (AttributeError, RuntimeError):
        pass
    nodes = [n for n in m.graph.findAllNodes("prim::Constant") if n.hasAttribute("value") and n.kindOf("value") == "t"]
    return {f"t{i}": n.t("value") for i, n in enumerate(nodes)}


def _submodules(obj: Any) -> tuple[dict[str, Any], list[type]]:
    """The submodules of a torch module, however deep, by name: a scripted one by its _script_identity
    (its own submodules in it), another by its plain public settings (_settings: an inner
    CrossEntropyLoss's reduction, label_smoothing...) when it has any; and the classes of the plain ones,
    in order, each once (their forward and __call__ code)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.nn.Module) or isinstance(obj, torch.jit.ScriptModule):
        return {}, []
    found: dict[str, Any] = {}
    kinds: list[type] = []
    scripted: list[str] = []
    for path, m in obj.named_modules(remove_duplicate=False):
        if not path or any(path.startswith(f"{p}.") for p in scripted):
            continue
        script = _script_identity(m)
        if script is not None:
            scripted.append(path)
            found[path] = script
            continue
        if type(m) not in kinds:
            kinds.append(type(m))
        settings = _settings(m)
        if settings:
            found[path] = settings
    return found, kinds


def _bound_object(fn: Any) -> Any:
    """The object a method is bound to (not a class: a classmethod's), else None."""
    owner = getattr(fn, "__self__", None) if isinstance(fn, types.MethodType) else None
    return None if isinstance(owner, type) else owner


def _settings(obj: Any, seen: Set[int] = frozenset()) -> dict[str, Any]:
    """An object's plain public settings (bool, int, float, str, None attributes but torch's `training`):
    a loss module's reduction, the temperature of the object a loss method is bound to; and those of the
    dataclasses it holds, alone or in tuples and lists (a Flax or Equinox submodule: its rate,
    features...), as _field_settings' text. A dataclass (a Flax linen or Equinox module) by its declared
    fields its repr shows, by name, as _field_settings reads them (not its attributes: a bound Flax
    module's setup() adds its submodules on first use), NumPy scalars by _value_text (not their repr,
    which NumPy's version and print options change). A list or dict in a field of a frozen dataclass or
    a Flax linen or Equinox module counts with its plain values (Sequence[float] dropout rates, class
    weights); one in a field of another dataclass or in another object's attribute, only for the
    dataclasses and functions it holds (a call log the loss appends to). `seen`: the ids of the objects
    and functions being described (an object holding its own method)."""
    if id(obj) in seen:
        return {}
    seen = seen | {id(obj)}
    settings: dict[str, Any] = {}
    if _is_instance_of_dataclass(obj):
        plain_items = _is_immutable_config(obj)
        for field in sorted(_shown_fields(obj), key=lambda f: f.name):
            try:
                v = getattr(obj, field.name)
            except Exception:  # noqa: BLE001 - a field a framework computes lazily (and may refuse to give)
                continue
            if isinstance(v, (bool, int, float, str, type(None))) and not isinstance(v, np.generic):
                settings[field.name] = v
            elif (text := _field_settings(v, seen, plain_items)) is not None:
                settings[field.name] = _shortened(v, text)
        return settings
    for k, v in sorted(getattr(obj, "__dict__", {}).items()):
        if k.startswith("_") or k == "training":
            continue
        if isinstance(v, (bool, int, float, str, type(None))):
            settings[k] = v
        elif _holds_dataclass(v, set()):  # a submodule of a Flax or Equinox model (or a tuple of them): its settings
            fields = _field_settings(v, seen)
            if fields is not None:
                settings[k] = _shortened(v, fields)
    return settings


_LONG = 400  # characters of a setting's text past which the identity records its digest instead


def _shortened(value: Any, text: str) -> str:
    """A setting's text (_field_settings), or when longer than _LONG characters (an Equinox model's tuple
    of layers, each with its fields) its value's type name and the digest of the text: the identity
    stays short in the store's metadata and in the message naming what changed."""
    if len(text) <= _LONG:
        return text
    digest = digest_arrays([np.frombuffer(text.encode(), np.uint8)])
    return f"{type(value).__qualname__} digest={digest}"


def _holds_dataclass(value: Any, seen: set[int], depth: int = 0, functions: bool = False) -> bool:
    """Whether a value is a dataclass instance (or with `functions`, a function) or a tuple, list or
    dict (its values) holding one, at any depth up to _MAX_DEPTH; `seen`: the ids of the containers
    already searched (a list holding itself)."""
    if isinstance(value, _PLAIN):  # most often: a fast way past a long list of numbers
        return False
    if _is_instance_of_dataclass(value) or (functions and _is_function(value)):
        return True
    if not isinstance(value, (tuple, list, dict)) or id(value) in seen or depth >= _MAX_DEPTH:
        return False
    seen.add(id(value))
    values = value.values() if isinstance(value, dict) else value
    return any(_holds_dataclass(v, seen, depth + 1, functions) for v in values)


# the frameworks whose wrappers (torch.compile, jax.checkpoint) and base classes (nn.Module.__call__,
# a library loss's forward) a loss's code digest leaves out
_FRAMEWORKS = frozenset({"builtins", "torch", "jax", "jaxlib", "flax", "equinox"})


def _in_framework(module: Any) -> bool:
    return isinstance(module, str) and module.partition(".")[0] in _FRAMEWORKS


def _jit_unpickled(fn: Any) -> Any:
    """The function a jax.jit function compiles where the jitted function was unpickled (jax restores
    only that function, not __wrapped__: a Dask worker's loss_fn), so that it is named, and its code
    digested, as the same function jitted before pickling is (inspect.unwrap); else fn."""
    while (
        type(fn).__name__ == "PjitFunction"
        and type(fn).__module__.startswith("jaxlib")
        and not hasattr(fn, "__wrapped__")
    ):  # a loop: a jitted jitted function
        fn = fn.__getstate__()["fun"]
    return fn


def _digest_wrappers(fn: Any, h: Any) -> None:
    """Fold into `h` the code and closure settings of each Python function that wraps another (the
    __wrapped__ chain inspect.unwrap follows: a functools.wraps decorator's wrapper), but those the
    frameworks define."""
    seen = {id(fn)}
    while hasattr(fn, "__wrapped__"):
        if isinstance(fn, types.FunctionType) and not _in_framework(fn.__globals__.get("__name__")):
            _digest_code(fn.__code__, h)
            captured = _captured(fn, {id(fn)}, "held")
            h.update(_digest_closure(captured).encode() if captured else b"")
        fn = fn.__wrapped__
        if id(fn) in seen:  # a cycle (inspect.unwrap raises ValueError on it)
            return
        seen.add(id(fn))


def _digest_class_methods(kind: type, h: Any) -> None:
    """Fold into `h` the code of the forward and __call__ methods a loss object's class and its bases
    define, but the frameworks' classes (a library loss, nn.Module.__call__)."""
    for cls in kind.__mro__:
        if _in_framework(cls.__module__):
            continue
        for name in ("forward", "__call__"):
            method = cls.__dict__.get(name)
            method = getattr(method, "__func__", method)  # a staticmethod or classmethod
            if callable(method):
                _digest_wrappers(method, h)
                _digest_function_code(inspect.unwrap(method), h, set())


_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _captured(fn: types.FunctionType, seen: set[int], mode: _Mode) -> dict[str, Any]:
    """The settings a function's closure holds, by variable name: plain values (numbers, strings and
    tuples or lists of them: class weights), arrays, functions (by their identity: "held", or
    "before code" in that mode), and the plain fields of a dataclass (_field_settings: a Flax linen or
    Equinox module, nn.Dropout(0.1) vs nn.Dropout(0.5)); other objects (dicts included) are left out. A
    call counter kept in the closure (`nonlocal calls`, calls[0] += 1) changes the identity at every call: it belongs
    outside the closure (a module variable)."""
    torch = sys.modules.get("torch")
    found: dict[str, Any] = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not yet filled
            continue
        if isinstance(value, _PLAIN) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)
        ):
            found[name] = repr(value)
        elif _is_array(value, torch):
            found[name] = value
        elif isinstance(value, (types.FunctionType, functools.partial)) and id(value) not in seen:
            found[name] = _identity(value, seen, "before code" if mode == "before code" else "held")
        elif id(value) in seen:
            found[name] = "<recursive>"
        elif _is_instance_of_dataclass(value):
            fields = _field_settings(value, seen)
            if fields is not None:
                found[name] = fields
    return found


def _is_instance_of_dataclass(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


# how deep _field_settings reads nested dataclasses, tuples and functions (a chain of thousands would
# exhaust Python's stack); beyond, a value is recorded by its type's name
_MAX_DEPTH = 64


def _field_settings(value: Any, seen: Set[int], plain_items: bool = False) -> str | None:
    """The plain settings a value holds, as text, or None when it holds none: a plain value (numbers,
    strings), an enum member, a dtype, a NumPy scalar or ufunc, a torch module (_value_text), a
    function (_function_text: a Flax module's activation), a tuple of such values, a list or dict, or a
    dataclass instance (a Flax linen module's rate, features..., an Equinox module's static fields and
    the submodules its tuples hold), by its type's qualname and the fields its repr shows (not Flax's
    `parent`) that hold settings, nested dataclasses and tuples of them included. With `plain_items` (in
    a field of a frozen dataclass or a Flax linen or Equinox module: _is_immutable_config) a list is read
    as a tuple and a mapping (Flax's FrozenDict too) as a dict with all its settings, its plain values
    included, as Flax freezes a list into a tuple and a dict into a FrozenDict when it binds a module;
    else a list or dict counts only for the dataclasses and functions it holds (its plain values, a call
    log the loss appends to, left out). A dict's keys are sorted. Arrays (weights), sets and other
    objects are left out, as a field holding only them (among other items of a tuple or list, "_").
    `seen`: the ids of the values and functions
    being described (a cycle is left out, a function as "<recursive>"); past _MAX_DEPTH of them, a
    dataclass, tuple, list, dict or function is recorded as its type's name and "(...)"."""
    if isinstance(value, _PLAIN) and not isinstance(value, np.generic):  # np.float64 is a float: _value_text
        return repr(value)
    if (text := _value_text(value)) is not None:
        return text
    function = _is_function(value)
    mapping = isinstance(value, dict) or (plain_items and isinstance(value, Mapping))
    if not (function or mapping or isinstance(value, (tuple, list)) or _is_instance_of_dataclass(value)):
        return None
    if id(value) in seen:
        return "<recursive>" if function else None
    if len(seen) >= _MAX_DEPTH:
        return f"{type(value).__qualname__}(...)"
    if function:
        return _function_text(value, seen)
    seen = seen | {id(value)}
    if isinstance(value, tuple) or (plain_items and isinstance(value, list)):
        if all(type(v) in _PLAIN for v in value):  # a long list of numbers, fast
            return "({})".format(", ".join(map(repr, value)))
        items = [_field_settings(v, seen, plain_items) for v in value]
        if all(item is None for item in items):
            return None
        # an item holding no settings (an array, a set, a submodule of weights only) keeps its place as "_"
        return "({})".format(", ".join("_" if item is None else item for item in items))
    if isinstance(value, list) or mapping:
        by_key = lambda kv: stable_repr(kv[0])  # noqa: E731
        pairs = enumerate(value) if isinstance(value, list) else sorted(value.items(), key=by_key)
        texts = [
            (k, text)
            for k, v in pairs
            if (plain_items or _holds_dataclass(v, set(), functions=True))
            and (text := repr(v) if type(v) in _PLAIN else _field_settings(v, seen, plain_items)) is not None
        ]
        if not texts:
            return None
        if isinstance(value, list):
            return "[{}]".format(", ".join(text for _, text in texts))
        return "{{{}}}".format(", ".join(f"{stable_repr(k)}: {text}" for k, text in texts))
    fields = []
    plain_items = _is_immutable_config(value)
    for field in _shown_fields(value):
        try:
            held = getattr(value, field.name)
        except Exception:  # noqa: BLE001 - a field a framework computes lazily (and may refuse to give)
            continue
        text = _field_settings(held, seen, plain_items)
        if text is not None:
            fields.append(f"{field.name}={text}")
    return f"{type(value).__qualname__}({', '.join(fields)})" if fields else None


def _is_immutable_config(value: Any) -> bool:
    """Whether a dataclass instance is a configuration not meant to change: a frozen dataclass, or a Flax
    linen or Equinox module (immutable by their frameworks' rules, not declared frozen), whose list and
    dict fields' plain values are settings (Sequence[float] dropout rates), not a log the loss appends to."""
    if getattr(getattr(type(value), "__dataclass_params__", None), "frozen", False):
        return True
    return any(
        isinstance(m := getattr(c, "__module__", None), str) and m.partition(".")[0] in ("flax", "equinox")
        for c in type(value).__mro__[1:]
    )


def _value_text(value: Any) -> str | None:
    """The text of a setting that is neither plain, a function, a container nor a dataclass, the same in
    every process: an enum member (Flax's precision=lax.Precision.HIGHEST) by its type's qualname and
    name, a dtype (dtype=jnp.bfloat16, np.float32, np.dtype("float32") alike) by its name, a NumPy scalar
    by its dtype's name and its Python value's repr (_numpy_scalar_text), a NumPy ufunc by its name, a
    torch dtype, a torch module by its repr (its type's name and settings: nn.Dropout(p=0.1)); None for
    anything else."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, np.dtype):
        return f"dtype({value.name})"
    scalar_type = isinstance(value, type) and issubclass(value, np.generic)
    if scalar_type or (isinstance(value, type) and isinstance(getattr(value, "dtype", None), np.dtype)):
        try:
            return f"dtype({np.dtype(value).name})"
        except TypeError:
            return None
    if isinstance(value, np.generic):
        return _numpy_scalar_text(value)
    if isinstance(value, np.ufunc):
        return f"numpy.{value.__name__}"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.dtype):
        return str(value)
    if torch is not None and isinstance(value, torch.nn.Module):
        return without_addresses(repr(value))
    return None


def _numpy_scalar_text(value: np.generic) -> str:
    """A NumPy scalar as "float64(0.1)", the same under every NumPy version and print options: its
    dtype's name ("bool" for np.bool_, "bool_" in NumPy 1; "str", "bytes" whatever their length) and the
    repr of its Python value (.item(); float() or complex() of a long double, whose .item() stays one)."""
    if isinstance(value, np.bool_):
        name = "bool"
    elif isinstance(value, np.str_):
        name = "str"
    elif isinstance(value, np.bytes_):
        name = "bytes"
    else:
        try:
            name = np.dtype(type(value)).name
        except TypeError:
            name = type(value).__name__
    item = value.item()
    if isinstance(item, np.generic):  # np.longdouble, np.clongdouble
        item = complex(item) if np.iscomplexobj(item) else float(item)
    return f"{name}({item!r})"


def _shown_fields(value: Any) -> list[dataclasses.Field]:
    """A dataclass instance's declared fields its repr shows (not Flax's `parent`)."""
    return [f for f in dataclasses.fields(value) if f.repr]


def _is_function(value: Any) -> bool:
    """Whether a value is a function: a Python or builtin function, a method, a functools.partial, or
    a callable wrapping one (jax.jit, jax.custom_jvp: jax.nn.relu, an Equinox filter_jit)."""
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)):
        return True
    if isinstance(value, type) or not callable(value):
        return False
    value = _jit_unpickled(value)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)):
        return True
    if inspect.getattr_static(value, "__wrapped__", None) is None:  # not hasattr: a bound Flax module would run setup()
        return False
    try:
        inner = inspect.unwrap(value)
    except ValueError:  # a cycle of __wrapped__
        return False
    return isinstance(inner, (types.FunctionType, types.BuiltinFunctionType, types.MethodType))


def _function_text(fn: Any, seen: Set[int]) -> str:
    """A function a dataclass field holds, as a closure names the functions it holds ("field": its
    qualname, a method of a class defined outside the frameworks too, its closure's settings; a
    builtin by its module too), followed, for a Python function
    defined outside torch, JAX, Flax and Equinox (whose own code is left out, as in a loss's code
    digest), by " code[3.11]=<digest>" of its code (_digest_function_code), as a loss's own code: a
    closure's held functions are covered by the loss's code digest, a field's are not."""
    text = _identity(fn, set(seen), "field")
    inner = fn
    while isinstance(inner, functools.partial):
        inner = inner.func
    try:
        inner = inspect.unwrap(_jit_unpickled(inner))
    except ValueError:  # a cycle of __wrapped__
        return text
    inner = getattr(inner, "__func__", inner)  # a method's function
    if not isinstance(inner, types.FunctionType) or _in_framework(inner.__globals__.get("__name__")):
        return text
    h = _hasher()
    _digest_function_code(inner, h, set())
    return f"{text} code[{PYTHON}]={h.hexdigest()}"


def _digest_closure(captured: dict[str, Any]) -> str:
    """Digest of a closure's settings (_captured): the texts by name, the arrays by _digest_named."""
    texts = {k: v for k, v in captured.items() if isinstance(v, str)}
    arrays = {k: v for k, v in captured.items() if not isinstance(v, str)}
    return digest_arrays([np.frombuffer(repr(sorted(texts.items())).encode(), np.uint8)]) + (
        _digest_named(arrays) if arrays else ""
    )


def _held_arrays(obj: Any) -> dict[str, Any]:
    """The arrays an object computes with, by name: a torch module's state_dict (parameters and
    buffers, submodules' included), then its public attributes holding a NumPy, torch or JAX array."""
    torch = sys.modules.get("torch")  # a torch object implies torch is imported; tracin does not import it here
    held = dict(obj.state_dict()) if torch is not None and isinstance(obj, torch.nn.Module) else {}
    for k, v in sorted(getattr(obj, "__dict__", {}).items()):
        if not k.startswith("_") and _is_array(v, torch):
            held[k] = v
    return held


def _is_array(v: Any, torch: Any) -> bool:
    if torch is not None and isinstance(v, torch.Tensor):
        return True
    return isinstance(v, np.ndarray) or (hasattr(v, "__array__") and hasattr(v, "shape") and hasattr(v, "dtype"))


def _key_data(a: Any) -> Any:
    """A JAX typed PRNG key array (jax.random.key) as its raw uint32 key data, which NumPy can read;
    anything else as is. (A key implies jax is imported; tracin does not import it here.)"""
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(a)
    return a


def _digest_named(arrays: dict[str, Any]) -> str:
    """digest_arrays of each array's name, dtype name and contents (torch tensors read on the host,
    dtypes NumPy lacks as raw bytes)."""
    parts = []
    for name, a in arrays.items():
        a = _key_data(a)
        if hasattr(a, "detach"):  # a torch tensor
            t = a.detach().cpu().contiguous()
            try:
                a = t.numpy()
            except TypeError:  # bfloat16 and other dtypes NumPy lacks
                a = t.reshape(-1).view(sys.modules["torch"].uint8).numpy().reshape(*t.shape, -1)
        parts += [np.frombuffer(f"{name}:{getattr(arrays[name], 'dtype', '')}".encode(), np.uint8), np.asarray(a)]
    return digest_arrays(parts)


_CHANGES = " (a shuffling DataLoader or sampler, or an iterable that changes between passes?)"
# other inputs on a later pass: also random augmentation in a Dataset (a transform drawing anew on every read)
_INPUTS_CHANGE = (
    " (a shuffling DataLoader or sampler, an iterable that changes between passes, or random augmentation in the "
    "Dataset, such as a RandomCrop transform: export with the evaluation transforms?)"
)


class DataFingerprint:
    """Order-sensitive digests of the batches one export reads, pass after pass.

    The first complete pass over the data folds a BLAKE2b digest of each batch's targets and one of
    its inputs into `data`, a digest of the whole data, and keeps a CRC-32 of each. Every later pass
    must give the same CRCs in the same batches, else ValueError: a shuffling loader or an iterable
    whose content changes between checkpoints would otherwise mix up rows silently (inputs count
    too: the rows of one class share their targets). Later passes compute only the CRCs, which cost
    a fraction of the digests.
    Usage per pass: begin(where), then batch(...) for every batch (skipped ones too), then end().
    """

    def __init__(self) -> None:
        self._reference: list[tuple[int, int]] | None = None
        self._seen: list[tuple[int, int]] = []
        self._whole = _hasher()
        self._where = ""
        self.data: str | None = None  # digest of every batch's inputs and targets, after the first pass

    def begin(self, where: str) -> None:
        self._seen, self._where = [], where

    def batch(self, targets: Iterable[np.ndarray] | None, inputs: Iterable[np.ndarray]) -> None:
        """One batch's target arrays and input arrays. targets None: the data has none (a language
        model's), compared as no arrays; `data` digests the inputs in their place, as it always has."""
        targets, inputs = None if targets is None else list(targets), list(inputs)
        d, given = checksum_arrays(targets or []), checksum_arrays(inputs)
        i = len(self._seen)
        self._seen.append((d, given))
        if self._reference is None:
            digest = digest_arrays(inputs)
            self._whole.update(digest.encode() + (digest if targets is None else digest_arrays(targets)).encode())
            return
        if i >= len(self._reference):  # refused before its rows are computed, naming what it is: one batch too many
            raise ValueError(
                f"{self._where}: the data gave more batches than the {len(self._reference)} of the first pass; "
                f"it must give the same rows in the same order for every checkpoint{_CHANGES}"
            )
        if self._reference[i] == (d, given):
            return
        what = "inputs" if self._reference[i][0] == d else "targets"
        raise ValueError(
            f"{self._where}: batch {i} of the data holds other {what} than on the first pass; the "
            f"data must give the same rows in the same order for every checkpoint"
            f"{_INPUTS_CHANGE if what == 'inputs' else _CHANGES}"
        )

    def end(self) -> None:
        if self._reference is None:
            self._reference, self.data = self._seen, self._whole.hexdigest()
        elif len(self._seen) != len(self._reference):
            raise ValueError(
                f"{self._where}: the data gave {len(self._seen)} batches, the first pass gave "
                f"{len(self._reference)}; it must give the same rows for every checkpoint"
            )
