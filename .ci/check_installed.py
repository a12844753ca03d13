"""CI: the installed package (a wheel, not the checkout) imports every module it ships.

Run by path from outside the checkout, so ``import ordmoe_megatron`` finds the installed copy;
prints what it imported and fails on the first module that does not import. Modules that need
Megatron-LM's ``megatron.training`` (not part of megatron-core) are the one exception.
"""

import importlib
import os
import pkgutil
import sys
import warnings

warnings.filterwarnings("ignore")
import ordmoe_megatron  # noqa: E402

root = os.path.dirname(ordmoe_megatron.__file__)
checkout = os.path.dirname(os.path.abspath(sys.argv[1])) if len(sys.argv) > 1 else None
if checkout and root.startswith(checkout + os.sep):
    sys.exit(f"check_installed: ordmoe_megatron was imported from the checkout ({root}), not the installed wheel")
names, skipped = [], []
for module in pkgutil.walk_packages(ordmoe_megatron.__path__, "ordmoe_megatron."):
    if module.name.endswith(".__main__"):
        continue  # runs its entry point
    try:
        importlib.import_module(module.name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("megatron.training"):
            skipped.append(module.name)
            continue
        raise
    names.append(module.name)
for package in ("mcore", "runtime", "method", "train", "data", "convert", "report", "sweep", "megatron_lm"):
    if f"ordmoe_megatron.{package}" not in names:
        sys.exit(f"check_installed: the installed package lacks ordmoe_megatron.{package}")
print(
    f"check_installed: {len(names)} modules of ordmoe_megatron {ordmoe_megatron.__version__} import from {root}"
    + (f"; skipped, as they need Megatron-LM: {', '.join(skipped)}" if skipped else "")
)
