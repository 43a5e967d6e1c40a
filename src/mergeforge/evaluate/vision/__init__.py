"""The vision domain: small image datasets and the regimes that split them across parents
(:mod:`.data`), the architectures (:mod:`.models`), the parents' training loop and cache
(:mod:`.train`) and the ``vision`` bench suite (:mod:`.suite`). Imports only the shared evaluate
modules and the floors below, never :mod:`mergeforge.evaluate.text`."""
