"""The text domain: classification tasks read from data packages (:mod:`.tasks`), encoder and
decoder backbones (:mod:`.backbones`), sentence embeddings and heads (:mod:`.eval`), the expert
training loop (:mod:`.experts`), the shared cache of base and experts (:mod:`.cache`), the
``text`` bench suite (:mod:`.suite`), and the editing recipes of issue 17: forgetting by negation
on the suite's experts (:mod:`.forget`) and SmolLM2 domain experts merged back into the base
(:mod:`.domain`, whose ``domain_lm_expert`` trains and caches one). Imports only the shared
evaluate modules and the floors below, never :mod:`mergeforge.evaluate.vision`."""
