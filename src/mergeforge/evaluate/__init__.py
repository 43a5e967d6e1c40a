"""Measuring merges. Shared by every domain: :mod:`.pool` (task pools, normalized accuracy),
:mod:`.metrics` (accuracy), :mod:`.data` (what data loaders share), :mod:`.report` (tables,
plots, results files), :mod:`.editing` (forgetting by negation and domain merges: their merge
configs and the rules that pick λ on a validation split); the domains :mod:`.text` and
:mod:`.vision`, each with its data, models and training loops; and :mod:`.bench`, the
``mergeforge bench`` runner, which picks a domain's suite by name and so sits above both (see
the README's layer table)."""
