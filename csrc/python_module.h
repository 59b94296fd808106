// Each of our shared libraries is also a Python extension module that holds
// nothing: importing it loads the library, and loading it runs the library's
// static op registrations. Written against Python's limited API (setup.py
// defines Py_LIMITED_API), so the module is abi3: one build for every Python
// from the oldest the package supports.
#pragma once

#include <Python.h>

#define FLASH_ATTN_EXT_EMPTY_PYTHON_MODULE(name)                                             \
  extern "C" PyMODINIT_FUNC PyInit_##name(void) {                                           \
    static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, #name, nullptr, -1, nullptr}; \
    return PyModule_Create(&module_def);                                                     \
  }
