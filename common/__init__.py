"""Shared plumbing every layer may import: config loading and validation,
user-facing errors, checkpoint I/O, run directories, distributed helpers and
console logging. It imports nothing else from vitmpp."""
