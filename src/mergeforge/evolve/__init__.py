"""Evolutionary merge search: ``mergeforge evolve CONFIG`` (README: "Evolutionary merge search").

CMA-ES over per-model, per-layer-group merge parameters (and optionally the method and its
shared parameters), as mergekit-evolve and the evolutionary model merge paper (arXiv
2403.13187) do, or over the paper's data-flow space (which layers of which models, in which
order: ``genome.space: dataflow``), with candidates merged in memory through the engine and
scored in parallel on Ray; resumable, with progress, a fitness plot and the best recipe as a
plain mergekit YAML.

``config.py`` (the YAML and its checks) -> ``genome.py`` (vector <-> recipe <-> mergekit YAML)
-> ``fitness.py`` / ``suite.py`` (task pools, a language model's loss, a callable; the text
suite on a validation split) -> ``workers.py`` (one evaluator per Ray actor) -> ``search.py``
(the CMA-ES loop, state, outputs); ``report.py``: history, best.yaml, fitness.png.
"""

from mergeforge.evolve.config import (
    DataFlowSpec,
    EvolveConfig,
    GenomeSpec,
    SearchSpec,
    load_evolve_config,
)
from mergeforge.evolve.fitness import (
    CallableFitness,
    ClassifierPool,
    LanguageModelPool,
    PoolTask,
    Score,
)
from mergeforge.evolve.genome import DataFlowGenome, Genome, LayerRecipe, Recipe
from mergeforge.evolve.search import EvolveResult, default_population, evolve

__all__ = [
    "CallableFitness",
    "ClassifierPool",
    "DataFlowGenome",
    "DataFlowSpec",
    "EvolveConfig",
    "EvolveResult",
    "Genome",
    "GenomeSpec",
    "LanguageModelPool",
    "LayerRecipe",
    "PoolTask",
    "Recipe",
    "Score",
    "SearchSpec",
    "default_population",
    "evolve",
    "load_evolve_config",
]
