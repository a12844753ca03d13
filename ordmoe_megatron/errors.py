"""The one exception base of ordmoe-megatron.

Everything the package refuses (a flag, a layout, a file, a checkpoint) is an ``OrdMoEError`` whose
message is one line naming the problem (the flag or the file) and the fix. Each front end catches
``OrdMoEError`` once and exits with the message; nothing rewraps one error into another: the
context a message needs (``--load X: ...``) is given where it is raised. It is a ``ValueError``, so
callers that already catch ``ValueError`` (argparse types, Megatron's own validation around ours)
keep working. This module imports nothing: every floor may raise it.

The lower floors name the kind of input they refuse with a subclass, for Python callers that handle
one kind: ``runtime.checkpointing.CheckpointError``, ``runtime.outputs.OutputError``,
``runtime.bridges.BridgeError`` (a megatron-core or torch the bridges do not know),
``data.documents.DocumentError`` and ``convert.ConversionError``. Everything else, the front ends'
refusals included, raises ``OrdMoEError`` itself.
"""


class OrdMoEError(ValueError):
    """A setting, input or state the package refuses; the message names it and the way out."""
