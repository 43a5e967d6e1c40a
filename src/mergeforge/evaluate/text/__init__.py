"""The text domain: classification tasks read from data packages (:mod:`.tasks`), encoder and
decoder backbones (:mod:`.backbones`), sentence embeddings and heads (:mod:`.eval`), the expert
training loop (:mod:`.experts`), the shared cache of base and experts (:mod:`.cache`) and the
``text`` bench suite (:mod:`.suite`). Imports only the shared evaluate modules and the floors
below, never :mod:`mergeforge.evaluate.vision`."""
