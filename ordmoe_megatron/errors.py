"""The one exception base of ordmoe-megatron.

Everything the package refuses (a flag, a layout, a file, a checkpoint) is an ``OrdMoEError`` whose
message is one line naming the problem (the flag or the file) and the fix. Each front end catches
``OrdMoEError`` once and exits with the message; nothing rewraps one error into another. It is a
``ValueError``, so callers that already catch ``ValueError`` (argparse types, Megatron's own
validation around ours) keep working. This module imports nothing: every floor may raise it.
"""


class OrdMoEError(ValueError):
    """A setting, input or state the package refuses; the message names it and the way out."""
