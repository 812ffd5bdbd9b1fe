/* Transport-wide feedback in C (_twcc.c), registered by the module in _fastpath.c. */
#ifndef BRAID_TWCC_H
#define BRAID_TWCC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyObject *twcc_feed(PyObject *module, PyObject *args);
PyObject *delay_snapshot(PyObject *module, PyObject *args);
Py_ssize_t delay_state_size(void);

#endif
