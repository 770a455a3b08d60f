"""The native library: loading it, checking its ABI, and the ctypes twins of its structs.

The kernel (``_cpu/rmsprop_cpu.c``) is a plain C library built by ``pip install`` and loaded with
ctypes: no torch headers, nothing compiled at run time. It reads every tensor through torch's
stable C shim (``torch_get_mutable_data_ptr``, ``aoti_torch_get_numel``, ...), whose functions
are looked up here in the libtorch that torch itself loaded and handed to ``rmsprop_init``.

Before the kernel is enabled, everything the two sides must agree on is checked, and any
disagreement leaves it unavailable with the reason in :func:`load_error` (the default path then
uses foreach, and ``fused=True`` raises):

- the ABI version;
- every field of the structs passed across (name, offset, size, and the struct's size), which the
  C side exports: the ``rms_call`` struct must hold exactly the option table's Rule fields;
- that the handles work: a probe tensor converted through the library gives torch's own values.

The list reader (:data:`LIST_READER`: the same library through ``ctypes.PyDLL``, called with the
GIL held) reads Python's lists of tensors in C once :func:`_python_layout` has proved the CPython
offsets it reads on live objects and :func:`_probe_list_reader` its answers; else Python reads them.

``RMSPROP_NATIVE_LIB`` names another build of the library to load (the sanitizer build of
``scripts/sanitize.sh``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import operator
import os
import sys
import sysconfig
from array import array
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ...options import RULE_OPTIONS

__all__ = ["LIB", "load_error", "is_available", "Lists", "Call", "LIST_NAMES", "handles", "memo_size"]

ABI_VERSION = 7
# Element kinds of the C side, in its order, and the dtypes they are.
KINDS = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128)
LIST_NAMES = ("param", "grad", "square_avg", "grad_avg", "momentum_buffer", "step")
SCALE_NAMES = ("square_avg_scale", "grad_avg_scale", "momentum_buffer_scale")
# The option table's state_dtype as the C side's code (RMS_SD_*).
STATE_DTYPE_CODES = {None: 0, torch.float32: 1, torch.bfloat16: 2, "int8": 3}

# Modes and return codes of rmsprop_step (see the C enums).
MODE_CHECK, MODE_RUN, MODE_STREAM, REQUIRE_UNCHANGED = 0, 1, 2, 0x100
OK, SKIPPED, CHANGED, INVALID = 0, 1, 2, -4
ERRORS = {
    -1: "bad argument",
    -2: "out of memory",
    -3: "the kernel was not initialised",
    -4: "a tensor failed validation",
    -5: "grad_scale / found_inf must be one-element float32 CPU tensors",
}


class Lists(ctypes.Structure):
    """rms_lists: one column of TensorImpl addresses per list (NULL: absent), then the columns
    of the int8 scales (a 0 address where a record's state is not int8)."""

    _fields_ = [(name, ctypes.c_void_p) for name in LIST_NAMES + SCALE_NAMES]


class Call(ctypes.Structure):
    """rms_call: lr, then the option table's Rule fields in order (numbers as double, switches and
    state_dtype's code as int32), then the call's own fields."""

    _fields_ = (
        [("lr", ctypes.c_double)]
        + [(o.name, ctypes.c_double if o.kind == "number" else ctypes.c_int32) for o in RULE_OPTIONS]
        + [
            ("mode", ctypes.c_int32),
            ("dtype_mask", ctypes.c_int32),
            ("write_back", ctypes.c_int32),
            ("grad_scale", ctypes.c_void_p),
            ("found_inf", ctypes.c_void_p),
            ("bump_versions", ctypes.c_int32),
        ]
    )


_FN = ctypes.c_void_p


class TorchApi(ctypes.Structure):
    """rms_torch_api: the shim functions the kernel calls, and torch's codes it compares with."""

    _fields_ = [
        ("struct_size", ctypes.c_int64),
        ("mutable_data_ptr", _FN),
        ("const_data_ptr", _FN),
        ("numel", _FN),
        ("dim", _FN),
        ("dtype", _FN),
        ("device_type", _FN),
        ("layout", _FN),
        ("sizes", _FN),
        ("strides", _FN),
        ("storage_size", _FN),
        ("storage_offset", _FN),
        ("dtype_code", ctypes.c_int32 * len(KINDS)),
        ("dtype_uint8", ctypes.c_int32),
        ("device_cpu", ctypes.c_int32),
        ("layout_strided", ctypes.c_int32),
        ("version_counter", _FN),
        ("bump_version", _FN),
        ("is_neg", _FN),
        ("is_conj", _FN),
    ]


_SHIM_FUNCTIONS = {
    "mutable_data_ptr": "torch_get_mutable_data_ptr",
    "const_data_ptr": "torch_get_const_data_ptr",
    "numel": "aoti_torch_get_numel",
    "dim": "aoti_torch_get_dim",
    "dtype": "aoti_torch_get_dtype",
    "device_type": "aoti_torch_get_device_type",
    "layout": "aoti_torch_get_layout",
    "sizes": "aoti_torch_get_sizes",
    "strides": "aoti_torch_get_strides",
    "storage_size": "aoti_torch_get_storage_size",
    "storage_offset": "aoti_torch_get_storage_offset",
}
# torch::autograd::impl::version_counter / bump_version (const at::Tensor&): the functions every
# in-place op's version bump goes through, exported by libtorch_cpu under their mangled names.
# They are not part of the stable shim: when a torch lacks them (or the probe below finds them
# misbehaving), Python bumps the counters instead, as it did before they were used.
_VERSION_FUNCTIONS = {
    "version_counter": "_ZN5torch8autograd4impl15version_counterERKN2at6TensorE",
    "bump_version": "_ZN5torch8autograd4impl12bump_versionERKN2at6TensorE",
}
# at::native::is_neg / is_conj (const at::Tensor&): the bits a lazily negated or conjugated view
# carries, which the kernel then checks on every tensor it validates (else Python does).
_BIT_FUNCTIONS = {"is_neg": "_ZN2at6native6is_negERKNS_6TensorE", "is_conj": "_ZN2at6native7is_conjERKNS_6TensorE"}
_DTYPE_FUNCTIONS = (
    "aoti_torch_dtype_float32",
    "aoti_torch_dtype_float64",
    "aoti_torch_dtype_bfloat16",
    "aoti_torch_dtype_float16",
    "aoti_torch_dtype_complex64",
    "aoti_torch_dtype_complex128",
)


class _Field(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("offset", ctypes.c_int64), ("size", ctypes.c_int64)]


_CDATA = operator.attrgetter("_cdata")


def handles(tensors: Sequence[torch.Tensor]) -> array:
    """The TensorImpl addresses of plain tensors (the caller keeps the tensors alive)."""
    return array("q", list(map(_CDATA, tensors)))  # (from a list: faster than from an iterator)


def optional_handles(tensors: Sequence[torch.Tensor | None]) -> array:
    """As :func:`handles`, with 0 for None (a record without that tensor)."""
    return array("q", (0 if t is None else t._cdata for t in tensors))


def buffer_address(buffer: bytearray) -> int:
    """Address of a bytearray's memory (stable while it is not resized; never resize it)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _library_path() -> str | None:
    override = os.environ.get("RMSPROP_NATIVE_LIB")
    if override:
        return override
    spec = importlib.util.find_spec("rmsprop._rmsprop_cpu")
    return spec.origin if spec is not None and spec.origin else None


def _libtorch() -> ctypes.CDLL:
    lib_dir = Path(torch.__file__).parent / "lib"
    names = {"win32": ["torch_cpu.dll"], "darwin": ["libtorch_cpu.dylib"]}.get(
        sys.platform, ["libtorch_cpu.so"]
    )
    for name in names:
        if (lib_dir / name).exists():
            return ctypes.CDLL(str(lib_dir / name))
    raise OSError(f"libtorch_cpu not found in {lib_dir}")


def _check_layout(lib: ctypes.CDLL, which: int, twin: type[ctypes.Structure], what: str) -> str | None:
    count, size = ctypes.c_int64(), ctypes.c_int64()
    fields = lib.rmsprop_layout(which, ctypes.byref(count), ctypes.byref(size))
    native = {fields[i].name.decode(): (fields[i].offset, fields[i].size) for i in range(count.value)}
    ours = {name: (getattr(twin, name).offset, getattr(twin, name).size) for name, *_ in twin._fields_}
    if native != ours or size.value != ctypes.sizeof(twin):
        differ = sorted(k for k in native.keys() | ours.keys() if native.get(k) != ours.get(k))
        return (
            f"the native {what} struct does not match the Python side (fields differing: {differ}; "
            f"sizes {size.value} vs {ctypes.sizeof(twin)}): rebuild the package (pip install .)"
        )
    return None


def _torch_api() -> TorchApi:
    libtorch = _libtorch()
    api = TorchApi(struct_size=ctypes.sizeof(TorchApi))
    for field, symbol in _SHIM_FUNCTIONS.items():
        setattr(api, field, ctypes.cast(getattr(libtorch, symbol), ctypes.c_void_p).value)
    for i, symbol in enumerate(_DTYPE_FUNCTIONS):
        fn = getattr(libtorch, symbol)
        fn.restype = ctypes.c_int32
        api.dtype_code[i] = fn()
    for field, symbol in (
        ("dtype_uint8", "aoti_torch_dtype_uint8"),
        ("device_cpu", "aoti_torch_device_type_cpu"),
        ("layout_strided", "aoti_torch_layout_strided"),
    ):
        fn = getattr(libtorch, symbol)
        fn.restype = ctypes.c_int32
        setattr(api, field, fn())
    for functions in (_VERSION_FUNCTIONS, _BIT_FUNCTIONS):
        try:
            addresses = {field: ctypes.cast(getattr(libtorch, symbol), ctypes.c_void_p).value
                         for field, symbol in functions.items()}  # fmt: skip
        except AttributeError:
            addresses = dict.fromkeys(functions)
        for field, address in addresses.items():
            setattr(api, field, address)
    return api


def _probe_bits(lib: ctypes.CDLL) -> bool:
    """True when the kernel reads the negative and conjugate bits as torch does."""
    x = torch.randn(3, dtype=torch.complex64)
    cases = [(x, 0), (x.conj(), 2), (torch._neg_view(x), 1), (torch._neg_view(x.conj()), 3),
             (x.conj().imag, 1), (torch.zeros(2), 0)]  # fmt: skip
    keep = handles([t for t, _ in cases])
    slot = ctypes.sizeof(ctypes.c_int64)
    return all(
        lib.rmsprop_tensor_bits(keep.buffer_info()[0] + i * slot) == bits and bits == t.is_neg() + 2 * t.is_conj()
        for i, (t, bits) in enumerate(cases)
    )


def _probe_versions(lib: ctypes.CDLL) -> bool:
    """True when the kernel's version bumps do exactly what an in-place op's do: +1 on a tensor,
    on a view's base with it (one shared counter), nothing on an inference tensor or on any
    other tensor."""
    base = torch.zeros(4)
    view, other = base[1:], torch.zeros(4)
    with torch.inference_mode():
        frozen = torch.zeros(4)
    before = (base._version, other._version)
    keep = handles([view, frozen])
    if lib.rmsprop_bump_versions(keep.buffer_info()[0], 2) != 0:
        return False
    return (base._version, view._version, other._version) == (before[0] + 1, before[0] + 1, before[1])


def _probe(lib: ctypes.CDLL) -> str | None:
    """Convert a probe tensor through the library and compare with torch: proves that handles,
    data pointers, element counts and dtype codes are read as torch means them."""
    source = torch.tensor([0.5, -2.0, 65504.0, 1e-6, 3.0], dtype=torch.float32)
    out = torch.full((5,), 7.0, dtype=torch.float16)
    keep = (handles([source]), handles([out]))
    status = lib.rmsprop_f32_to_f16(keep[0].buffer_info()[0], keep[1].buffer_info()[0])
    if status != 0 or not torch.equal(out, source.half()):
        return f"the native library misreads torch's tensors (probe status {status}); the torch version is unsupported"
    wrong = torch.zeros(4, dtype=torch.float16)  # an element count that does not match: must refuse
    keep = (handles([source]), handles([wrong]))
    if lib.rmsprop_f32_to_f16(keep[0].buffer_info()[0], keep[1].buffer_info()[0]) == 0:
        return "the native library accepted mismatched tensors in its probe; refusing to use it"
    return None


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    path = _library_path()
    if path is None:
        return (
            None,
            "the native library rmsprop._rmsprop_cpu was not built (reinstall with a C compiler: pip install .)",
        )
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return None, f"the native library {path} failed to load: {exc}"
    try:
        lib.rmsprop_abi_version.restype = ctypes.c_int32
        if lib.rmsprop_abi_version() != ABI_VERSION:
            return None, f"the native library {path} is a different version; reinstall the package"
        lib.rmsprop_layout.restype = ctypes.POINTER(_Field)
        lib.rmsprop_layout.argtypes = [
            ctypes.c_int32,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.POINTER(ctypes.c_int64),
        ]
        for which, twin, what in (
            (0, Call, "rms_call"),
            (1, Lists, "rms_lists"),
            (2, TorchApi, "rms_torch_api"),
        ):
            problem = _check_layout(lib, which, twin, what)
            if problem:
                return None, problem
        lib.rmsprop_init.argtypes = [ctypes.POINTER(TorchApi)]
        lib.rmsprop_init.restype = ctypes.c_int32
        try:
            api = _torch_api()
        except (OSError, AttributeError) as exc:
            return None, f"this torch lacks the stable C shim functions the kernel reads tensors with ({exc})"
        if lib.rmsprop_init(ctypes.byref(api)) != 0:
            return None, "the native library refused torch's shim functions"
        lib.rmsprop_bumps_versions.restype = ctypes.c_int32
        lib.rmsprop_bump_versions.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        lib.rmsprop_bump_versions.restype = ctypes.c_int32
        lib.rmsprop_reads_bits.restype = ctypes.c_int32
        lib.rmsprop_tensor_bits.argtypes = [ctypes.c_void_p]
        lib.rmsprop_tensor_bits.restype = ctypes.c_int32
        lib.rmsprop_step.argtypes = [
            ctypes.POINTER(Lists),
            ctypes.c_int64,
            ctypes.POINTER(Call),
            ctypes.c_int32,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int64),
        ]
        lib.rmsprop_step.restype = ctypes.c_int32
        lib.rmsprop_memo_size.argtypes = [ctypes.c_int64]
        lib.rmsprop_memo_size.restype = ctypes.c_int64
        lib.rmsprop_set_isa.argtypes = [ctypes.c_int32]
        lib.rmsprop_set_isa.restype = ctypes.c_int32
        lib.rmsprop_isa.restype = ctypes.c_int32
        lib.rmsprop_set_prefetch.argtypes = [ctypes.c_int32]
        lib.rmsprop_set_prefetch.restype = ctypes.c_int32
        lib.rmsprop_prefetches.restype = ctypes.c_int32
        for name in ("rmsprop_f16_to_f32", "rmsprop_f32_to_f16", "rmsprop_bf16_to_f32", "rmsprop_f32_to_bf16"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int32
        lib.rmsprop_use_openmp.argtypes = [ctypes.c_void_p]
        lib.rmsprop_use_openmp.restype = None
        problem = _probe(lib)
        if problem:
            return None, problem
        # torch's own functions the probes reject are given up (Python does their work instead);
        # the kernel stays usable
        if lib.rmsprop_bumps_versions() and not _probe_versions(lib):
            api.version_counter = api.bump_version = None
        if lib.rmsprop_reads_bits() and not _probe_bits(lib):
            api.is_neg = api.is_conj = None
        if lib.rmsprop_init(ctypes.byref(api)) != 0:
            return None, "the native library refused torch's shim functions"
    except AttributeError as exc:
        return None, f"the native library {path} lacks a function ({exc}); reinstall the package"
    gomp_parallel = _torch_openmp_entry()
    if gomp_parallel is not None:
        lib.rmsprop_use_openmp(gomp_parallel)
    return lib, None


def _torch_openmp_entry() -> int | None:
    """Address of GOMP_parallel in the OpenMP runtime torch ships and uses, or None.

    The kernel then runs on torch's own, already-warm thread pool instead of starting threads of
    its own, so the two never compete for the cores. A runtime torch does not use (or none at
    all) leaves the kernel on plain pthreads.
    """
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for pattern in ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libomp*.dylib", "libiomp5*.dylib"):
        for path in sorted(lib_dir.glob(pattern)):
            try:
                runtime = ctypes.CDLL(str(path))
                return ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value
            except (OSError, AttributeError):
                continue
    return None


def _python_layout(offsets: tuple[int, int, int] | None = None) -> tuple[int, int, int, int] | None:
    """The offsets of ob_type, ob_size, ob_item and THPVariable's cdata in this interpreter, each
    checked by reading it on live objects; None where any reads something else, or where the GIL
    does not serialise access to lists. ``offsets``: those of ob_type, ob_size and cdata to check
    instead of one word each in order (the tests' wrong layouts). ob_item is the word after
    ob_size (PyListObject: PyObject_VAR_HEAD, ob_item, allocated; its basic size is checked):
    the one word read as an address, and only once the words before it are verified, so that a
    wrong layout gives wrong values, never a fault."""
    if sys.implementation.name != "cpython" or sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    word = ctypes.sizeof(ctypes.c_void_p)
    type_at, size_at, impl_at = offsets or (word, 2 * word, 2 * word)
    items_at = size_at + word
    # (a debug build's extra header fields show here, before any read)
    if (object.__basicsize__, list.__basicsize__) != (2 * word, 5 * word) or not (
        0 <= type_at < object.__basicsize__
        and 0 <= size_at < 3 * word
        and 0 <= impl_at < Tensor.__basicsize__
        and all(offset % word == 0 for offset in (type_at, size_at, impl_at))
    ):
        return None

    def read(address: int) -> int:
        return ctypes.c_void_p.from_address(address).value or 0

    sample = [torch.zeros(2), torch.nn.Parameter(torch.zeros(3)), torch.zeros(4)[1:], None, torch.zeros(())]
    if read(id(sample) + type_at) != id(list) or read(id(sample) + size_at) != len(sample):
        return None
    items = read(id(sample) + items_at)
    for i, item in enumerate(sample):
        if read(items + i * word) != id(item) or read(id(item) + type_at) != id(type(item)):
            return None
        if item is not None and read(id(item) + impl_at) != item._cdata:
            return None
    return type_at, size_at, items_at, impl_at


def _load_list_reader(lib: ctypes.CDLL | None) -> ctypes.PyDLL | None:
    """The library again, called with the GIL held (ctypes.PyDLL), for rmsprop_py_handles and
    rmsprop_py_same; None where the interpreter's layout is not the one they read, or where
    they fail their probe (Python then reads the lists itself)."""
    layout = _python_layout() if lib is not None else None
    if layout is None:
        return None
    try:
        py = ctypes.PyDLL(lib._name)
        py.rmsprop_set_py_layout.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 4
        py.rmsprop_set_py_layout.restype = ctypes.c_int32
        py.rmsprop_py_handles.argtypes = [ctypes.py_object, ctypes.c_int64, ctypes.c_void_p]
        py.rmsprop_py_handles.restype = ctypes.c_int32
        py.rmsprop_py_same.argtypes = [ctypes.py_object, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        py.rmsprop_py_same.restype = ctypes.c_int32
        py.rmsprop_py_all_strided.argtypes = [ctypes.py_object, ctypes.c_int64]
        py.rmsprop_py_all_strided.restype = ctypes.c_int32
    except (OSError, AttributeError):
        return None
    if py.rmsprop_set_py_layout(*layout, id(list), id(Tensor), id(torch.nn.Parameter), id(None)) != 0:
        return None
    if not _probe_list_reader(py):
        py.rmsprop_set_py_layout(0, 0, 0, 0, None, None, None, None)  # (refused: leaves it unset)
        return None
    return py


def _probe_list_reader(py: ctypes.PyDLL) -> bool:
    """True when the list reader answers as Python would on lists it must read and refuse."""
    a, b = torch.zeros(2), torch.nn.Parameter(torch.zeros(3))
    sub = torch.zeros(1).as_subclass(type("_Probe", (Tensor,), {}))
    out = array("q", [0, 0])
    if py.rmsprop_py_handles([a, b], 2, out.buffer_info()[0]) != 1 or list(out) != [a._cdata, b._cdata]:
        return False
    refused = [((a, b), 2), ([a, b], 3), ([a, sub], 2), ([a, 1.0], 2), ([], 0)]
    if any(py.rmsprop_py_handles(lst, n, out.buffer_info()[0]) != -1 for lst, n in refused):
        return False
    objects, column = array("q", [id(a), id(None)]), array("q", [a._cdata, 0])
    kept = [a, None]

    def same(lst, n=2) -> int:
        return py.rmsprop_py_same(lst, n, objects.buffer_info()[0], column.buffer_info()[0])

    before = same(kept), same([b, None]), same([a, a]), same([a]), same((a, None))
    sparse = torch.zeros(3).to_sparse()
    strided = (py.rmsprop_py_all_strided([a, b], 2), py.rmsprop_py_all_strided([a, sparse], 2),
               py.rmsprop_py_all_strided([a, sub], 2), py.rmsprop_py_all_strided((a, b), 2),
               py.rmsprop_py_all_strided([a, b], 1))  # fmt: skip
    c = torch.ones(2)
    torch.utils.swap_tensors(a, c)  # a keeps its object and gets another TensorImpl
    return before == (1, 0, 0, 0, -1) and same(kept) == 0 and strided == (1, 0, -1, -1, -1)


def list_handles(tensors: Sequence[torch.Tensor]) -> tuple[array, bool]:
    """:func:`handles`, and whether every item was read in C as exactly a torch.Tensor or
    nn.Parameter (False: read in Python, whatever the items are)."""
    n = len(tensors)
    if LIST_READER is not None and n:
        out = array("q", bytes(8 * n))
        if LIST_READER.rmsprop_py_handles(tensors, n, out.buffer_info()[0]) == 1:
            return out, True
    return handles(tensors), False


def same_objects(tensors: Sequence, objects: array, column: array) -> bool | None:
    """Whether ``tensors`` holds, item by item, the objects whose ids are ``objects`` (kept alive by
    the caller), each still holding the TensorImpl ``column`` names (0: the item is None); None
    when C cannot answer (no list reader, or ``tensors`` is not a list)."""
    if LIST_READER is None or not objects:
        return None
    answer = LIST_READER.rmsprop_py_same(tensors, len(objects), objects.buffer_info()[0], column.buffer_info()[0])
    return None if answer < 0 else bool(answer)


def all_strided(tensors: Sequence[torch.Tensor]) -> bool | None:
    """Whether every tensor of ``tensors`` has a strided layout, read in C; None when C cannot
    answer (no list reader, not a list, an item that is not exactly a torch.Tensor or
    nn.Parameter)."""
    if LIST_READER is None or not tensors:
        return None
    answer = LIST_READER.rmsprop_py_all_strided(tensors, len(tensors))
    return None if answer < 0 else bool(answer)


LIB, _LOAD_ERROR = _load()
# Reads Python's lists of tensors in C (None: Python reads them).
LIST_READER = _load_list_reader(LIB)
# The kernel bumps the version counters of what it writes (else the caller does, in Python).
BUMPS_VERSIONS = LIB is not None and bool(LIB.rmsprop_bumps_versions())
# The kernel refuses (status 14) every tensor with a negative or conjugate bit (else the caller
# marks them, in Python).
READS_BITS = LIB is not None and bool(LIB.rmsprop_reads_bits())


# The kernel's instruction-set levels for bfloat16 / float16 storage, by the C side's number.
ISAS = ("portable", "avx2", "avx2+f16c", "avx512")
_ISA = ISAS[LIB.rmsprop_isa()] if LIB is not None else "portable"


def isa() -> str:
    """The conversions the kernel uses for bfloat16 / float16 storage on this CPU (a Python value:
    read under torch.compile without calling into C)."""
    return _ISA


def use_isa(name: str) -> str:
    """Use the best this CPU runs ("best"), or the best up to a level of :data:`ISAS` ("portable":
    the scalar code; "avx2+f16c": no AVX-512); for tests and benchmarks, which compare them.
    Returns the level now in use (lower than asked where the CPU lacks it)."""
    global _ISA
    if name != "best" and name not in ISAS:
        raise ValueError(f"use_isa takes 'best' or one of {ISAS}, got {name!r}")
    _ISA = ISAS[LIB.rmsprop_set_isa(-1 if name == "best" else ISAS.index(name))]
    return _ISA


def prefetches() -> bool:
    """Whether the element loops prefetch ahead of their streams: on for Intel CPUs, where it
    was measured to help, off elsewhere (see the kernel's RMS_AHEAD)."""
    return LIB is not None and bool(LIB.rmsprop_prefetches())


def use_prefetch(on: bool | None) -> bool:
    """Prefetch in the element loops (True), or not (False), or as this CPU's default (None); for
    tests and benchmarks, which compare them. The results are the same bits either way. Returns
    whether the loops prefetch now."""
    if on is not None and not isinstance(on, bool):
        raise TypeError(f"use_prefetch takes True, False or None, got {on!r}")
    if LIB is None:
        raise RuntimeError(f"the native library is unavailable: {load_error()}")
    return bool(LIB.rmsprop_set_prefetch(-1 if on is None else int(on)))


def memo_size(n: int) -> int:
    """Bytes of the kernel's memo of a previous step for n tensors (see rmsprop_step)."""
    return LIB.rmsprop_memo_size(n)


def is_available() -> bool:
    """True when the native kernel is built, matches this package and reads torch's tensors."""
    return LIB is not None


def load_error() -> str | None:
    """Why the native kernel is unavailable, or None."""
    return _LOAD_ERROR
