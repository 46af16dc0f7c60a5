"""The built-in components: the models, data sets, losses and metrics of the shipped recipes.

Each module registers its entries where they are defined, through the same public contract a
user's component uses (harness.contracts, harness.components.register); the engine never imports
them by name. harness.config imports this package, which fills the registry.
"""

from harness.builtin import datasets, models, objectives, optimizers  # noqa: F401 - registration on import
