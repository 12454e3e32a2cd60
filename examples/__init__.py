"""Runnable examples. A package so that the test suite imports their parts (``examples.zero_adam``)."""
