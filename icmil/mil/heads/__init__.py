"""The registered MIL heads: importing this package imports every module in it, and each head registers itself
(``@register_mil_head``), so a new head is one new file here."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
