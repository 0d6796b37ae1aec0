// The _hybrit extension: numpy arrays in and out, zero-copy for C-contiguous inputs of the right
// dtype, the GIL released while kernels run. Errors become ValueError / OSError / RuntimeError /
// MemoryError by kind. The `hybrit` package (hybrit/__init__.py) re-exports all of it.
// Each capability's bindings live in their own file (bind_*.cpp); this file makes the module and
// the one translation of library errors into Python exceptions.
#include "python/common.hpp"

using namespace hybrit;
using namespace hybrit::python;

PYBIND11_MODULE(_hybrit, m) {
  m.doc() = "hybrit: 1.58-bit (ternary) transformer training and serving; this is the native core";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      switch (e.kind()) {
        case ErrorKind::invalid_argument: PyErr_SetString(PyExc_ValueError, e.what()); return;
        case ErrorKind::io: PyErr_SetString(PyExc_OSError, e.what()); return;
        case ErrorKind::out_of_memory: PyErr_SetString(PyExc_MemoryError, e.what()); return;
        case ErrorKind::corrupt_data:
        case ErrorKind::unsupported:
        case ErrorKind::count: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
      }
    }
  });

  bind_dispatch(m);
  bind_inference(m);
  bind_training(m);
  bind_clustering(m);
  m.attr("__version__") = HYBRIT_VERSION;
}
