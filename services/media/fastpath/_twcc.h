/* Transport-wide feedback in C (_twcc.c), registered by the module in _fastpath.c. */
#ifndef BRAID_TWCC_H
#define BRAID_TWCC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* twcc.SentPackets' ring, which the send path writes and the feedback reader looks up: 4 bytes of next number,
 * then TWCC_RING entries of (send µs mod 2^32, size, seq) */
#define TWCC_RING 4096
#define TWCC_ENTRY 8

PyObject *twcc_feed(PyObject *module, PyObject *args);
PyObject *delay_snapshot(PyObject *module, PyObject *args);
Py_ssize_t delay_state_size(void);

#endif
